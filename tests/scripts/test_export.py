"""sample.py --export_pipeline: the folder loads with diffusers' DiffusionPipeline (trust_remote_code) and generates
sample.py's images, to the float, for each kind of model; it also loads where this repository cannot be imported."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import TINY, TINY_OWN, train_text_model
from PIL import Image

import sample
import train_ddpm
from modules.artifacts.model_folder import save_model
from modules.config import FlowArguments
from modules.objectives.flow import FlowObjective


@pytest.fixture(scope="module", autouse=True)
def modules_cache(tmp_path_factory):
    """diffusers copies an export's code into its module cache: here one of this module's own, not the user's."""
    from diffusers.utils import dynamic_modules_utils

    cache = tmp_path_factory.mktemp("hf-modules")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(cache))
        yield cache


def export_and_load(run, folder):
    from diffusers import DiffusionPipeline

    sample.main(["--model", str(run), "--export_pipeline", str(folder)])
    weights = {p.suffix for p in folder.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")}
    assert not weights and any(folder.rglob("*.safetensors"))
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_py(run, out, **settings) -> tuple[torch.Tensor, np.ndarray]:
    """sample.py's images for the pipeline's `settings`: the floats in [-1, 1] it quantises, and its PNGs."""
    flags = []
    for key, value in settings.items():
        if key == "class_labels":
            flags += ["--class_labels", ",".join(map(str, value))]
        elif key == "prompt":
            flags += ["--prompt", *value]
        else:
            flags += [f"--{key}", str(value)]
    kept, generate = [], sample.generate_images

    def generate_and_keep(*args, decode=None, **kwargs):
        def decode_and_keep(x0):
            images = decode(x0) if decode is not None else x0
            kept.append(images.float().cpu())
            return images

        return generate(*args, decode=decode_and_keep, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sample, "generate_images", generate_and_keep)
        sample.main(["--model", str(run), "--output", str(out), *flags])
    return torch.cat(kept), np.stack([np.array(Image.open(p)) for p in sorted(out.glob("*.png"))])


def assert_same_as_sample_py(pipe, run, tmp_path, **settings):
    floats, pngs = sample_py(run, tmp_path / "sample_py", **settings)
    images = pipe(**settings, output_type="pt").images
    assert images.shape == floats.shape
    assert (images - (floats / 2 + 0.5).clamp(0, 1)).abs().max() < 1e-5
    assert np.array_equal(np.stack([np.array(image) for image in pipe(**settings).images]), pngs)
    return images


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    """A class-conditional adaLN-single DiT on the latents of a tiny KL-VAE of ours, weights random but not zero, as
    training would save it; the SDE sampler draws noise from the per-image generators on the way."""
    from modules.networks.dit import DiTModel
    from modules.networks.vae import KLVAE, VAE

    root = tmp_path_factory.mktemp("latent")
    torch.manual_seed(0)
    vae = KLVAE(in_channels=1, latent_channels=2, block_out_channels=(8, 8), norm_num_groups=4, sample_size=16)
    vae.save_pretrained(root / "vae")
    model = DiTModel(
        in_channels=2, sample_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=3, adaln="single"
    )
    for p in model.parameters():  # DiT starts with a zero output, which would hide wrong weights
        torch.nn.init.normal_(p, std=0.1)
    latent = {
        "vae": VAE(vae, str(root / "vae")).config_record(),
        "channel_mean": [0.1, -0.2],
        "channel_std": [1.5, 0.5],
    }
    objective = FlowObjective(FlowArguments(sampler="euler_maruyama", num_inference_steps=2, guidance_scale=2.0))
    save_model(model, objective, root / "run", {"latent": latent, "class_names": ["a", "b", "c"]})
    return root / "run"


@pytest.fixture(scope="module")
def own_text_run(captioned, tmp_path_factory):
    run = tmp_path_factory.mktemp("own_text") / "run"
    train_text_model(captioned, run, TINY_OWN, "cross_attn")
    return run


def test_class_conditional_flow_unet(tiny_cfm_run, tmp_path):
    pipe = export_and_load(tiny_cfm_run, tmp_path / "pipe")
    assert type(pipe).__name__ == "DenoiserPipeline" and type(pipe.unet).__name__ == "UNetModel"
    assert pipe.config.class_names[0] == "T-shirt/top"
    assert_same_as_sample_py(
        pipe,
        tiny_cfm_run,
        tmp_path,
        class_labels=[3, 0, 7],
        num_images=4,
        seed=1,
        sampler="heun",
        num_inference_steps=2,
        guidance_scale=2.0,
        batch_size=3,
    )
    assert pipe(class_labels=[1], num_inference_steps=1, output_type="np").images.shape == (1, 32, 32, 1)
    for bad, needle in [
        (dict(prompt="a bag"), "not text-conditional"),
        (dict(class_labels=[10]), "[0, 10)"),
        (dict(sampler="ddim"), "samples with euler, heun, euler_maruyama"),
    ]:
        with pytest.raises(ValueError, match=re.escape(needle)):
            pipe(**bad)


def test_ddpm_each_sampler(tmp_path):
    run = tmp_path / "ddpm"
    train_ddpm.main(
        [
            "--output_dir",
            str(run),
            "--max_train_steps",
            "2",
            "--validation_steps",
            "0",
            "--checkpointing_steps",
            "0",
            *TINY,
        ]
    )
    pipe = export_and_load(run, tmp_path / "pipe")
    assert pipe.config.objective["objective"] == "ddpm"
    for sampler in ("ddpm", "ddim", "dpm_solver"):
        assert_same_as_sample_py(
            pipe,
            run,
            tmp_path / sampler,
            class_labels=[2, 5],
            num_images=2,
            seed=3,
            sampler=sampler,
            num_inference_steps=2,
        )


@pytest.mark.parametrize("vae_class", ["KLVAE", "AutoencoderKL"])
def test_latent_dit_with_its_vae(latent_run, tmp_path, vae_class):
    run = latent_run
    if vae_class == "AutoencoderKL":  # the same DiT, decoded by a diffusers autoencoder (a native component)
        from diffusers import AutoencoderKL

        from modules.networks.vae import VAE

        torch.manual_seed(1)
        vae = AutoencoderKL(
            in_channels=1,
            out_channels=1,
            latent_channels=2,
            block_out_channels=(8, 8),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=4,
            sample_size=16,
        )
        vae.save_pretrained(tmp_path / "vae")
        record = json.loads((latent_run / "objective.json").read_text())
        record["latent"]["vae"] = VAE(vae, str(tmp_path / "vae")).config_record()
        run = tmp_path / "run"
        run.mkdir()
        for name in ("config.json", "diffusion_pytorch_model.safetensors"):
            (run / name).write_bytes((latent_run / name).read_bytes())
        (run / "objective.json").write_text(json.dumps(record))
    pipe = export_and_load(run, tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["transformer"][1] == "DiTModel" and index["vae"][1] == vae_class
    assert index["latent_statistics"] == {"channel_mean": [0.1, -0.2], "channel_std": [1.5, 0.5]}
    images = assert_same_as_sample_py(pipe, run, tmp_path, num_images=3, seed=2, batch_size=2)
    assert images.shape == (3, 1, 16, 16) and images.std() > 0.01


def test_text_model_with_its_own_encoder(own_text_run, tmp_path):
    pipe = export_and_load(own_text_run, tmp_path / "pipe")
    assert pipe.text_encoder is None and pipe.config.text_encoder_record["kind"] == "own"
    assert_same_as_sample_py(
        pipe,
        own_text_run,
        tmp_path,
        prompt=["a photo of a bag", "a sneaker"],
        num_images=3,
        num_inference_steps=2,
        guidance_scale=3.0,
    )


@pytest.mark.parametrize("kind", ["clip", "minilm"])
def test_text_model_with_a_frozen_encoder(captioned, clip_text_folder, tmp_path, kind):
    run = tmp_path / kind
    train_text_model(captioned, run, clip_text_folder if kind == "clip" else kind, "pooled")
    pipe = export_and_load(run, tmp_path / "pipe")
    assert type(pipe.text_encoder).__name__ == {"clip": "CLIPTextModel", "minilm": "BertModel"}[kind]
    assert pipe.tokenizer is not None
    # No prompt: the captions recorded at training, as sample.py takes them.
    assert_same_as_sample_py(pipe, run, tmp_path, num_images=2, num_inference_steps=2, guidance_scale=2.0)


def test_the_export_loads_without_this_repository(latent_run, own_text_run, tmp_path):
    """A process that cannot import `modules` loads two exports (custom code in two components; a tokenizer of
    our own) and generates sample.py's images."""
    settings = [
        (latent_run, dict(class_labels=[2, 1], num_images=2, seed=4)),
        (own_text_run, dict(prompt=["a photo of a coat"], num_images=2, num_inference_steps=2)),
    ]
    for i, (run, _) in enumerate(settings):
        sample.main(["--model", str(run), "--export_pipeline", str(tmp_path / f"pipe{i}")])
    code = f"""
import importlib.util, torch
from diffusers import DiffusionPipeline
assert importlib.util.find_spec("modules") is None, "this repository is importable"
for i, settings in enumerate({[s for _, s in settings]!r}):
    pipe = DiffusionPipeline.from_pretrained(f"pipe{{i}}", trust_remote_code=True)
    torch.save(pipe(**settings, output_type="pt").images, f"images{{i}}.pt")
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf-modules")
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for i, (run, s) in enumerate(settings):
        floats, _ = sample_py(run, tmp_path / f"sample_py{i}", **s)
        assert (torch.load(tmp_path / f"images{i}.pt") - (floats / 2 + 0.5).clamp(0, 1)).abs().max() < 1e-5


def test_refusals_leave_nothing_behind(tmp_path, capsys, monkeypatch, latent_run):
    from modules.artifacts import export
    from modules.config import VAEArguments
    from modules.networks.vae import KLVAE
    from modules.objectives.autoencoder import VAEObjective

    vae_run = tmp_path / "vae_run"
    save_model(
        KLVAE(block_out_channels=(8, 8), norm_num_groups=4, sample_size=8), VAEObjective(VAEArguments()), vae_run
    )
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("")
    for run, out, needle in [
        (vae_run, "pipe", "is a vae model, which does not generate: there is no pipeline"),
        (latent_run, "taken", "taken' already exists; remove it or choose another folder"),
    ]:
        with pytest.raises(SystemExit):
            sample.main(["--model", str(run), "--export_pipeline", str(tmp_path / out)])
        assert needle in capsys.readouterr().err
    monkeypatch.setattr(export, "_model_card", lambda *a: 1 / 0)  # fails after everything else is written
    with pytest.raises(ZeroDivisionError):
        export.export_pipeline(latent_run, tmp_path / "pipe")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken", "vae_run"]  # no half folder, no temporary one
