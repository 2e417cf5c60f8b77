"""Shared helpers: tests run offline, on tiny models, and each script end to end in a subprocess where it must."""

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # before datasets/huggingface_hub are imported: no test may reach the network
os.environ.setdefault("WANDB_MODE", "offline")
# FID weights and reference statistics go to a cache of this session's own, not the user's.
os.environ["DIFFUSION_CACHE"] = tempfile.mkdtemp(prefix="diffusion-test-cache-")
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
RESUMABLE = ["--checkpointing_steps", 3, "--dropout", 0.1, "--random_flip", "--cond_drop_prob", 0.3, *TINY]


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
    import importlib

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


@pytest.fixture(scope="session")
def tiny_cfm_run(tmp_path_factory):
    """A finished 6-step class-conditional flow run with checkpoints at steps 3 and 6."""
    out = tmp_path_factory.mktemp("cfm") / "run"
    in_process("train_cfm.py", "--output_dir", out, "--max_train_steps", 6, "--report_to", "tensorboard", *RESUMABLE)
    return out


@pytest.fixture(scope="session")
def hf_clip_tokenizer(tmp_path_factory):
    """transformers' CLIPTokenizer from vocab.json and merges.txt written from open_clip's BPE file."""
    from transformers import CLIPTokenizer

    from modules.networks.tokenizer import clip_vocab

    folder = tmp_path_factory.mktemp("clip-vocab")
    vocab, merges = clip_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizer.from_pretrained(folder)


@pytest.fixture(scope="session")
def clip_text_folder(tmp_path_factory, hf_clip_tokenizer):
    """A tiny CLIPTextModel (as Stable Diffusion's text_encoder) saved with its tokenizer."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from modules.networks.tokenizer import EOT_ID, SOT_ID

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip-text")
    CLIPTextModel(CLIPTextConfig(**TINY_TEXT, bos_token_id=SOT_ID, eos_token_id=EOT_ID)).save_pretrained(folder)
    hf_clip_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def captioned(tmp_path_factory):
    """24 Fashion-MNIST images with labels and templated captions, as a local `datasets` dataset."""
    import datasets
    from PIL import Image

    from modules.data.images import FASHION_MNIST_CLASSES, load_fashion_mnist

    root = tmp_path_factory.mktemp("captioned")
    images, labels = load_fashion_mnist("test")
    rows = {
        "image": [Image.fromarray(images[i].numpy()) for i in range(24)],
        "label": labels[:24].tolist(),
        "caption": [f"a photo of a {FASHION_MNIST_CLASSES[int(y)].lower()}" for y in labels[:24]],
    }
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).to_parquet(str(root / "train.parquet"))
    return root
