"""What the tests share: the repository's root, tiny training settings, ways to run a script (in this process, in
a new one, or as two Accelerate processes), and readers of what a run wrote. Test files import from here, never from
each other; pytest fixtures live in conftest.py."""

import contextlib
import importlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]

# A tiny class-conditional UNet on 64 Fashion-MNIST images: seconds per run on two CPU cores.
TINY = [
    "--max_train_samples",
    "64",
    "--train_batch_size",
    "8",
    "--base_channels",
    "8",
    "--num_sample_images",
    "4",
    "--num_inference_steps",
    "2",
    "--logging_steps",
    "1",
    "--fid_num_samples",
    "0",
    "--lr_warmup_steps",
    "2",
]

# Everything that draws random numbers during training, so that exact resume is tested on all of it.
RESUMABLE = [
    *("--checkpointing_steps", 3, "--dropout", 0.1, "--random_flip", "--cond_drop_prob", 0.3),
    *("--ema_phema_stds", "0.05,0.1", "--ema_snapshot_steps", 2),  # post-hoc EMA: profiles and snapshots resume too
    *TINY,
]
# The session's finished run (conftest.tiny_cfm_run), which the resume tests interrupt and compare with.
SIX_STEPS = ["--max_train_steps", "6", "--report_to", "tensorboard", *map(str, RESUMABLE)]


# MeanFlow, class-conditional with training-time guidance (--cond_drop_prob trains the null class it needs), on 64
# Fashion-MNIST images at 16 px, sampled in one step without guidance on top; the network's flags are the test's.
TINY_MEANFLOW = [
    *("--objective", "meanflow", "--meanflow_guidance_scale", 2, "--meanflow_ratio", 0.5, "--cond_drop_prob", 0.1),
    *("--sampler", "meanflow", "--num_inference_steps", 1, "--guidance_scale", 1),
    *("--resolution", 16, "--max_train_samples", 64, "--train_batch_size", 8, "--lr_warmup_steps", 2),
    *("--logging_steps", 1, "--num_sample_images", 4, "--validation_samples", 8, "--fid_num_samples", 0),
]

# Two steps on 8 Moving Fashion-MNIST clips of 4 frames at 16x16, two clips a step; no grids, validation or FID.
TINY_CLIPS = [
    *("--dataset_name", "moving_fashion_mnist", "--resolution", 16, "--num_frames", 4, "--max_train_samples", 8),
    *("--train_batch_size", 2, "--max_train_steps", 2, "--num_inference_steps", 2),
    *("--num_sample_images", 0, "--validation_steps", 0, "--fid_num_samples", 0),
]

# A tiny text encoder of our own, trained with the denoiser.
TINY_OWN = "own:width=32,layers=2,heads=2,max_length=16"

# A tiny CLIP text transformer over the real CLIP BPE vocabulary (open-clip-torch ships it).
TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=49408)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, timeout=300, check=True, **kwargs) -> subprocess.CompletedProcess:
    """Run a command from the repo root with this interpreter's environment; fail with its output on error."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **kwargs.pop("env", {})}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, args))} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def script(name: str, *args, **kwargs) -> subprocess.CompletedProcess:
    return run([sys.executable, str(ROOT / name), *map(str, args)], **kwargs)


def in_process(name: str, *args):
    """Run a script's main(argv) in this process: as `script`, without paying a new interpreter's imports."""
    return importlib.import_module(Path(name).stem).main([str(a) for a in args])


def read_metrics(run_dir) -> list[dict]:
    """A run's metrics.jsonl, one dict per logged row."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def accelerate_launch(name: str, *args, config_file=None, launch_args=(), **kwargs) -> subprocess.CompletedProcess:
    """`accelerate launch` two processes, from `config_file`, from `launch_args` or from flags."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port())]
    if config_file:
        launch += ["--config_file", str(ROOT / config_file)]
    elif launch_args:
        launch += list(map(str, launch_args))
    else:
        launch += [
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ]
    return run([*launch, str(ROOT / name), *map(str, args)], **kwargs)


def fails(capsys, argv, *needles, main=None):
    """Run a script's main (default: train_cfm's) in-process; it must exit 2 with one 'error:' line containing every
    needle."""
    with pytest.raises(SystemExit) as exc:
        (main or importlib.import_module("train_cfm").main)(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in errors[0], err
    return errors[0]


def weights(run_dir) -> dict:
    return load_file(str(run_dir / "diffusion_pytorch_model.safetensors"))


def assert_same_model(a, b):
    """Two runs ended with the same EMA weights, bit for bit."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# Runs a training script with some of its library calls wrapped: how a test makes a step slow, fail or not finite
# on purpose. The loss's third call (call 1 measures FLOPs) is step 2's.
RUNNER = """
import os, sys, time
sys.path.insert(0, {root!r})
import safetensors.torch
real_save = safetensors.torch.save_file
def slow_save(tensors, filename, *args, **kwargs):
    if {slow_in!r} and {slow_in!r} in str(filename):
        print("writing", filename, flush=True)
        time.sleep(60)
    return real_save(tensors, filename, *args, **kwargs)
safetensors.torch.save_file = slow_save
import modules.objectives.flow
real_loss = modules.objectives.flow.FlowObjective.loss
calls = [0]
def loss(self, *args, **kwargs):
    calls[0] += 1
    if os.environ.get("RANK") == {fail_rank!r} and calls[0] == 3:
        raise RuntimeError("injected failure on rank " + os.environ["RANK"])
    value = real_loss(self, *args, **kwargs)
    return value * float("nan") if os.environ.get("RANK") == {nan_rank!r} and calls[0] == 3 else value
modules.objectives.flow.FlowObjective.loss = loss
import train_cfm
train_cfm.main(sys.argv[1:])
"""


def runner(tmp_path, slow_in: str = "", fail_rank: str = "", nan_rank: str = "") -> str:
    path = tmp_path / "runner.py"
    path.write_text(RUNNER.format(root=str(ROOT), slow_in=slow_in, fail_rank=fail_rank, nan_rank=nan_rank))
    return str(path)


def hub_env(hub_url: str, home) -> dict:
    """The Hub at `hub_url` and nothing else: its own HF_HOME (no saved login, an empty cache), no $HF_TOKEN."""
    return {
        "HF_ENDPOINT": hub_url,
        "HF_HUB_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(home),
        "HF_TOKEN": "",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


# A UNet of two levels at 16x16 that builds and runs in milliseconds: the model tests' tiny configuration.
TINY_UNET = dict(
    in_channels=2,
    sample_size=16,
    base_channels=8,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(8,),
    num_head_channels=8,
)


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter so zero-initialised layers no longer hide the rest of the network."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


# UNets at in_channels=3, sample_size=32, unconditional (CIFAR-10 shape). unet_l is the DDPM CIFAR-10 network:
# 35.7M in the paper, plus 2,560,896 for the scale half of the scale-shift conditioning.
UNET_PARAMS = {"unet_s": 1_034_515, "unet_m": 9_925_059, "unet_l": 38_307_203}
# DiTs at in_channels=4, sample_size=32, patch_size=2, num_classes=1000 (ImageNet-256 latents), out_channels=4.
# The paper's DiT-XL/2 (675,129,632) learns sigma (out_channels=8, +18,448) and counts its frozen position
# embedding as a parameter (+294,912): 674,816,272 + 18,448 + 294,912 = 675,129,632.
DIT_PARAMS = {
    "dit_tiny": 4_357_648,
    "dit_s": 32_858_896,
    "dit_b": 130_303_504,
    "dit_l": 457_824_272,
    "dit_xl": 674_816_272,
}
# The same DiTs with adaLN-single (--adaln single): depth + 1 modulation linears give way to one shared linear, a
# (6, D) table per block and a (2, D) table in the final layer.
DIT_SINGLE_PARAMS = {
    "dit_tiny": 3_179_152,
    "dit_s": 22_834_192,
    "dit_b": 90_200_080,
    "dit_l": 311_029_776,
    "dit_xl": 457_178_128,
}

# What caption.py and encode_latents.py are tested on: Fashion-MNIST images, in shards.
CAPTION_FASHION = ["--dataset_name", "fashion_mnist", "--max_train_samples", 16, "--shard_size", 8, "--batch_size", 4]
LATENT_FASHION = ["--dataset_name", "fashion_mnist", "--max_train_samples", 48, "--resolution", 32, "--shard_size", 16]


def table(out) -> dict:
    """Every row of the finished dataset at `out`, as python lists (image bytes included), in shard order."""
    meta = json.loads((out / "captions.json").read_text())
    parts = [pq.read_table(out / shard).to_pydict() for shard in meta["shards"]]
    return {k: [v for part in parts for v in part[k]] for k in parts[0]}


def fashion_images(n):
    from modules.data.images import load_fashion_mnist

    images, labels = load_fashion_mnist("train")
    return [Image.fromarray(x.numpy()).convert("RGB") for x in images[:n]], labels[:n].tolist()


def brief_classifier(num_images: int = 2000, epochs: int = 2):
    """The Fashion-MNIST classifier trained for seconds on the first `num_images` train images: 80% accurate on the
    test split where the cached one (all 60,000, four epochs, minutes) is 92%, which tests can tell apart from
    chance."""
    from modules.data.images import load_fashion_mnist
    from modules.evaluation.classifier import train_classifier
    from modules.pixels import resize_uint8

    images, labels = load_fashion_mnist("train")
    images = resize_uint8(images[:num_images, None], 32)
    return train_classifier(images, labels[:num_images], epochs=epochs, batch_size=64, seed=0, progress=False)


def own_captions(path, images, text=None):
    """The oracle: the saved model's greedy generate on each image by itself, its new tokens decoded."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor, model = AutoProcessor.from_pretrained(path), AutoModelForImageTextToText.from_pretrained(path)
    captions = []
    for image in images:
        inputs = processor(images=[image], text=None if text is None else [text], return_tensors="pt")
        inputs.pop("labels", None)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=30, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :] if "input_ids" in inputs else out
        captions.append(processor.batch_decode(new, skip_special_tokens=True)[0].strip())
    return captions


def rows(path) -> dict:
    from modules.data.latents import load_latent_data

    data = load_latent_data(str(path))
    return data.dataset.__getitems__(list(range(len(data.dataset))))


def assert_same_rows(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_golden(names, workdir):
    """Golden runs `names` (tests/golden_runs.py), each in a fresh process, end with their stored EMA weights."""
    import golden_runs

    stored = json.loads(golden_runs.HASHES.read_text())
    assert set(stored) == set(golden_runs.JOBS), "tests/golden_hashes.json and golden_runs.JOBS name other runs"
    now = golden_runs.run_in_fresh_process(names, workdir)
    differ = {
        name: sorted(k for k in set(stored[name]) | set(now[name]) if stored[name].get(k) != now[name].get(k))
        for name in names
    }
    differ = {name: keys for name, keys in differ.items() if keys}
    assert not differ, "runs whose final EMA weights changed: " + "; ".join(
        f"{name}: {len(keys)} tensors, e.g. {keys[:3]}" for name, keys in differ.items()
    )


WORDS = "a photo of the shirt dress shoe bag coat on white black background grey small large caption en".split()


def tiny_tokenizer(pad: str, eos: str, bos: str):
    """A word-level tokenizer over WORDS, with '<image>' among its special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([pad, eos, bos, "<unk>", "<image>", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece()  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=pad,
        eos_token=eos,
        bos_token=bos,
        unk_token="<unk>",
        additional_special_tokens=["<image>"],
    )


def assert_clean_two_process_run(proc, out, steps):
    """A two-process run ended without a crash in its log, with both processes' RNG states in its last checkpoint."""
    log = proc.stdout + proc.stderr
    for bad in ("Traceback", "Aborted", "core dumped", "terminate called"):
        assert bad not in log, log[-3000:]
    assert (out / "checkpoints" / f"checkpoint-{steps}" / "random_states_1.pkl").is_file()
    assert (out / "diffusion_pytorch_model.safetensors").is_file()


def train_text_model(captioned, out, encoder, mode, *extra) -> dict:
    """A 2-step text-conditional model on the `captioned` dataset in this process; returns its config.json."""
    import train_cfm

    train_cfm.main(
        [
            "--dataset_name",
            str(captioned),
            "--text_encoder",
            str(encoder),
            "--text_conditioning",
            mode,
            "--output_dir",
            str(out),
            "--max_train_steps",
            "2",
            "--train_batch_size",
            "4",
            "--base_channels",
            "8",
            "--num_sample_images",
            "4",
            "--num_inference_steps",
            "2",
            "--lr_warmup_steps",
            "0",
            "--fid_num_samples",
            "0",
            "--class_conditional",
            "false",
            "--validation_steps",
            "0",
            "--checkpointing_steps",
            "0",
            *extra,
        ]
    )
    return json.loads((out / "config.json").read_text())


def write_captioned_dataset(folder: Path, n: int = 24) -> Path:
    """The first `n` Fashion-MNIST test images with labels and templated captions ("a photo of a bag"), as
    `folder`/train.parquet, which `datasets` opens as a local dataset; returns `folder`."""
    import datasets

    from modules.data.images import FASHION_MNIST_CLASSES, load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    rows = {
        "image": [Image.fromarray(images[i].numpy()) for i in range(n)],
        "label": labels[:n].tolist(),
        "caption": [f"a photo of a {FASHION_MNIST_CLASSES[int(y)].lower()}" for y in labels[:n]],
    }
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).to_parquet(str(folder / "train.parquet"))
    return folder


def write_latent_dataset(folder: Path, n: int = 4, labels: bool = True) -> Path:
    """A latent dataset as encode_latents.py lays it out, of `n` random 4x4x4 latents with two classes or no labels,
    and no VAE behind it: for tests that open it and read its rows, never decode. Returns `folder`."""
    from modules.data.latents import METADATA_FILE, latent_table

    g = torch.Generator().manual_seed(0)
    columns = {
        "mean": torch.randn(n, 4, 4, 4, generator=g).half().numpy(),
        "std": torch.rand(n, 4, 4, 4, generator=g).half().numpy(),
    }
    if labels:
        columns["label"] = [i % 2 for i in range(n)]
    shard = "data/train-00000-of-00001.parquet"
    (folder / "data").mkdir(parents=True)
    pq.write_table(latent_table(columns), folder / shard)
    meta = {
        "vae": {"kind": "KLVAE", "source": "no-vae"},
        "image_resolution": 16,
        "latent_shape": [4, 4, 4],
        "num_images": n,
        "num_classes": 2 if labels else 0,
        "shards": [shard],
        "columns": list(columns),
        "channel_mean": [0.0] * 4,
        "channel_std": [1.0] * 4,
    }
    (folder / METADATA_FILE).write_text(json.dumps(meta))
    return folder


def write_pairs_dataset(folder: Path, n: int = 10, shape=(1, 4, 4), num_classes: int = 2) -> Path:
    """A pairs dataset as sample.py --output_pairs lays it out, of `n` random (noise, sample) pairs with labels
    i % num_classes (none when 0), in two shards, and no teacher behind it: for tests that open it. Returns
    `folder`."""
    from modules.data.latents import latent_table
    from modules.data.pairs import METADATA_FILE

    g = torch.Generator().manual_seed(0)
    columns = {
        "noise": torch.randn(n, *shape, generator=g).numpy(),
        "sample": torch.rand(n, *shape, generator=g).numpy(),
    }
    if num_classes:
        columns["label"] = np.arange(n) % num_classes
    (folder / "data").mkdir(parents=True)
    half = n // 2
    shards = ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]
    for name, rows in zip(shards, (slice(0, half), slice(half, n)), strict=True):
        pq.write_table(latent_table({k: v[rows] for k, v in columns.items()}), folder / name)
    meta = {
        "teacher": {"model": "no-teacher", "objective": "flow"},
        "sampler": "euler",
        "num_inference_steps": 2,
        "guidance_scale": 1.0,
        "seed": 0,
        "shape": list(shape),
        "image_resolution": shape[-1],
        "conditioning": "class" if num_classes else "none",
        "num_classes": num_classes,
        "num_pairs": n,
        "shards": shards,
        "columns": list(columns),
    }
    (folder / METADATA_FILE).write_text(json.dumps(meta))
    return folder


# The scheduler configs that DDPMPipeline (google/ddpm-*) and DiTPipeline (facebook/DiT-*) checkpoints publish.
DDPM_HUB_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "_diffusers_version": "0.1.1",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "clip_sample": True,
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "variance_type": "fixed_small",
}
DIT_HUB_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.12.0.dev0",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "trained_betas": None,
}


def write_scheduler(pipeline: Path, config: dict):
    """`config` as the pipeline's scheduler, model_index.json naming its class (the class diffusers builds)."""
    (pipeline / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2))
    index = json.loads((pipeline / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", config.get("_class_name")]
    (pipeline / "model_index.json").write_text(json.dumps(index, indent=2))


def tiny_ddpm_pipeline(folder: Path, in_channels: int = 3, sample_size: int = 16, scheduler=None) -> Path:
    """A DDPMPipeline folder laid out as google/ddpm-cifar10-32's (model_index.json, unet/, scheduler/), with a
    randomly initialised 45k-parameter UNet2DModel and that repo's scheduler config unless `scheduler` is given."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(folder)
    write_scheduler(folder, scheduler or DDPM_HUB_SCHEDULER)
    return folder


def tiny_dit_pipeline(folder: Path, vae_folder, scheduler=None, sample_size: int = 8) -> Path:
    """A DiTPipeline folder laid out as facebook/DiT-XL-2-256's: model_index.json with 1000 ImageNet-style id2label
    names ("tench, Tinca tinca": synonyms), transformer/ saved under its old class name Transformer2DModel (norm_type
    ada_norm_zero), learning sigma (out_channels 8 = 2 x 4), vae/ (the tiny AutoencoderKL in `vae_folder`: latents
    of `sample_size` are images twice that size) and scheduler/ with that repo's DDIM config unless `scheduler` is
    given."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=sample_size,
        patch_size=2,
        num_embeds_ada_norm=1000,
    )
    vae = AutoencoderKL.from_pretrained(vae_folder)
    DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler()).save_pretrained(folder)
    write_scheduler(folder, scheduler or DIT_HUB_SCHEDULER)
    index = json.loads((folder / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "Transformer2DModel"]
    index["id2label"] = {str(i): f"name{i}, synonym{i}" for i in range(1000)}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    config = json.loads((folder / "transformer" / "config.json").read_text())
    config["_class_name"] = "Transformer2DModel"
    (folder / "transformer" / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def checkpoint_state(checkpoint):
    """(model, EMAs, optimizer state) of a checkpoint, to compare bit for bit; the EMAs by file (the EMA, and the
    post-hoc EMA's profiles)."""
    model = load_file(str(checkpoint / "model.safetensors"))
    ema = {p.name: load_file(str(p)) for p in sorted(checkpoint.glob("ema*.safetensors"))}
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=True)
    return model, ema, optimizer


def assert_same(a, b, where=""):
    """Nested dicts, lists and tensors equal exactly, or an assertion naming where they differ."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    else:
        assert a == b, f"{where}: {a} != {b}"


# --- The exported pipeline against sample.py -------------------------------------------------------------------------


def export_and_load(run, folder):
    """sample.py --export_pipeline of `run` into `folder` (weights only as safetensors), loaded as diffusers loads it.
    A test that loads pipelines uses the `modules_cache` fixture."""
    import sample

    sample.main(["--model", str(run), "--export_pipeline", str(folder)])
    weights = {p.suffix for p in folder.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")}
    assert not weights and any(folder.rglob("*.safetensors"))
    return load(folder)


def load(folder):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_py_flags(settings: dict) -> list[str]:
    """sample.py's flags for a pipeline call: sample.py cycles --class_labels or --prompt over --num_images, where
    the pipeline gives one image per label, num_images_per_prompt per prompt, or batch_size images."""
    settings, flags = dict(settings), []
    per_prompt = settings.pop("num_images_per_prompt", 1)
    if "class_labels" in settings:
        labels = settings.pop("class_labels")
        flags += ["--class_labels", ",".join(map(str, labels)), "--num_images", str(len(labels))]
    if "prompt" in settings:
        prompts = [p for p in settings.pop("prompt") for _ in range(per_prompt)]
        flags += ["--prompt", *prompts, "--num_images", str(len(prompts))]
    renames = {"batch_size": "num_images", "max_batch_size": "batch_size"}
    for key, value in settings.items():
        flags += [f"--{renames.get(key, key)}", str(value)]
    return flags


@contextlib.contextmanager
def keeping_floats():
    """sample.py's generate_images, which also keeps, in the list yielded, the floats in [-1, 1] it quantises."""
    import sample

    kept, generate = [], sample.generate_images

    def generate_and_keep(*args, decode=None, **kwargs):
        def decode_and_keep(x0):
            images = decode(x0) if decode is not None else x0
            kept.append(images.float().cpu())
            return images

        return generate(*args, decode=decode_and_keep, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sample, "generate_images", generate_and_keep)
        yield kept


def sample_py(run, out, **settings) -> tuple[torch.Tensor, np.ndarray]:
    """sample.py's images for the pipeline's `settings`: the floats in [-1, 1] it quantises, and its PNGs."""
    import sample

    with keeping_floats() as kept:
        sample.main(["--model", str(run), "--output", str(out), *sample_py_flags(settings)])
    return torch.cat(kept), np.stack([np.array(Image.open(p)) for p in sorted(out.glob("*.png"))])


def assert_same_as_sample_py(pipe, run, tmp_path, **settings):
    floats, pngs = sample_py(run, tmp_path / "sample_py", **settings)
    images = pipe(**settings, output_type="pt").images
    assert images.shape == floats.shape
    assert (images - (floats / 2 + 0.5).clamp(0, 1)).abs().max() < 1e-5
    assert np.array_equal(np.stack([np.array(image) for image in pipe(**settings).images]), pngs)
    return images
