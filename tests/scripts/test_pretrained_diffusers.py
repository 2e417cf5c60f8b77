"""Diffusers checkpoints through the scripts: train_ddpm.py --init_from fine-tunes the wrapped network itself and
resumes exactly, the result is a diffusers model folder again that sample.py loads; sample.py evaluates a diffusers
checkpoint (--nfe_sweep with --fid_dataset) and downloads one from a Hub id (the local Hub stand-in)."""

import json

import numpy as np
import pytest
import torch
from helpers import fails, hub_env, in_process, script, tiny_ddpm_pipeline, tiny_dit_pipeline
from hub_server import FakeHub
from PIL import Image
from safetensors.torch import load_file

import sample

# A fine-tuning run: 4 steps with checkpoints at 2 and 4, no validation (it is the objective's, tested elsewhere).
FINE_TUNE = [
    "--max_train_steps",
    4,
    "--checkpointing_steps",
    2,
    "--train_batch_size",
    8,
    "--num_sample_images",
    2,
    "--num_inference_steps",
    2,
    "--logging_steps",
    1,
    "--lr_warmup_steps",
    2,
    "--fid_num_samples",
    0,
    "--validation_steps",
    0,
    "--cond_drop_prob",
    0.3,
]


def state(checkpoint) -> dict:
    return {
        "model": load_file(str(checkpoint / "model.safetensors")),
        "ema": load_file(str(checkpoint / "ema.safetensors")),
        "optimizer": torch.load(checkpoint / "optimizer.bin", weights_only=True)["state"],
    }


def assert_same(a, b, where=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    else:
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b, where


@pytest.fixture(scope="module")
def dit_runs(tiny_vae, encoded, tmp_path_factory):
    """A class-conditional latent DiT (a DiTPipeline folder) fine-tuned for 4 steps on a latent dataset encoded by
    its VAE, once whole and once as 2 steps then a resume to 4."""
    tmp = tmp_path_factory.mktemp("dit-fine-tune")
    pipeline = tiny_dit_pipeline(tmp / "pipeline", tiny_vae, sample_size=16)
    common = ["--init_from", pipeline, "--latent_dataset", encoded, *FINE_TUNE]
    in_process("train_ddpm.py", "--output_dir", tmp / "whole", *common)
    in_process("train_ddpm.py", "--output_dir", tmp / "resumed", *common, "--max_train_steps", 2)
    in_process("train_ddpm.py", "--output_dir", tmp / "resumed", *common, "--resume_from_checkpoint", "latest")
    return pipeline, tmp / "whole", tmp / "resumed"


def test_fine_tuning_a_dit_pipeline_resumes_exactly_and_saves_a_diffusers_model(dit_runs, capsys):
    from diffusers import DiTTransformer2DModel

    pipeline, whole, resumed = dit_runs
    assert_same(state(whole / "checkpoints" / "checkpoint-4"), state(resumed / "checkpoints" / "checkpoint-4"))
    assert_same(
        load_file(str(whole / "diffusion_pytorch_model.safetensors")),
        load_file(str(resumed / "diffusion_pytorch_model.safetensors")),
    )
    before = load_file(str(pipeline / "transformer" / "diffusion_pytorch_model.safetensors"))
    after = load_file(str(whole / "diffusion_pytorch_model.safetensors"))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    DiTTransformer2DModel.from_pretrained(whole)  # the saved model is a diffusers model folder
    record = json.loads((whole / "objective.json").read_text())
    assert record["network"] == {"kind": "diffusers_dit", "num_train_timesteps": 1000}
    # The latents were normalised as the DiT was trained (its VAE's scaling factor), not by the data's statistics.
    assert record["latent"]["channel_std"] == [1 / 0.18215] * 4 and record["latent"]["channel_mean"] == [0.0] * 4
    config = json.loads((whole / "run_config.json").read_text())["config"]
    assert config["clip_sample"] is False and config["beta_schedule"] == "linear"  # the scheduler's schedule


def test_sample_loads_the_fine_tuned_model_and_the_pipeline_with_class_names(dit_runs, tmp_path, capsys):
    pipeline, whole, _ = dit_runs
    in_process(
        "sample.py", "--model", whole, "--num_images", 2, "--num_inference_steps", 2, "--output", tmp_path / "a"
    )
    in_process(
        "sample.py",
        "--model",
        pipeline,
        "--class_labels",
        "synonym3,name7",  # DiTPipeline's names, any synonym
        "--num_images",
        2,
        "--num_inference_steps",
        2,
        "--output",
        tmp_path / "b.png",
    )
    assert len(list((tmp_path / "a").glob("*.png"))) == 2 and (tmp_path / "b.png").is_file()
    fails(
        capsys,
        ["--model", str(pipeline), "--class_labels", "nothing"],
        "'nothing' is not a class id",
        main=sample.main,
    )


def test_fine_tuning_a_ddpm_pipeline_on_gray_images_needs_its_channels(tmp_path, capsys):
    import train_ddpm

    pipeline = tiny_ddpm_pipeline(tmp_path / "ddpm", in_channels=3, sample_size=16)
    argv = ["--init_from", str(pipeline), "--output_dir", str(tmp_path / "run"), "--max_train_samples", "16"]
    fails(capsys, [*argv, "--resolution", "16"], "takes 3x16x16 inputs", "gives 1x16x16 images", main=train_ddpm.main)
    in_process("train_ddpm.py", *argv, "--resolution", 16, "--num_channels", 3, *FINE_TUNE, "--max_train_steps", 1)
    out = capsys.readouterr().out
    assert "diffusers UNet2DModel from" in out and "(unconditional)" in out  # whatever --class_conditional says
    assert json.loads((tmp_path / "run" / "config.json").read_text())["_class_name"] == "UNet2DModel"


def test_nfe_sweep_of_a_latent_dit_pipeline_against_a_named_dataset(dit_pipeline, tmp_path, capsys):
    args = ["--model", str(dit_pipeline), "--num_images", "4", "--output", str(tmp_path / "sweep")]
    fails(capsys, [*args, "--compute_fid"], "run_config.json", "--fid_dataset", main=sample.main)
    sample.main([*args, "--nfe_sweep", "2", "--fid_dataset", "fashion_mnist"])
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert [(r["sampler"], r["steps"]) for r in rows] == [("ddim", 2)] and rows[0]["fid"] > 0


def test_a_hub_id_of_a_diffusers_pipeline_downloads_at_its_revision(ddpm_pipeline, tmp_path):
    repo = "google/tiny-ddpm"
    files = {str(p.relative_to(ddpm_pipeline)): p.read_bytes() for p in ddpm_pipeline.rglob("*") if p.is_file()}
    args = ["--num_images", 3, "--num_inference_steps", 3, "--sampler", "ddpm"]
    with FakeHub() as hub:
        hub.repos[repo] = files
        env = hub_env(hub.url, tmp_path / "home")
        script("sample.py", "--model", repo, "--revision", "main", "--output", tmp_path / "hub.png", *args, env=env)
    assert any(r["path"] == f"/api/models/{repo}/revision/main" for r in hub.requests)
    in_process("sample.py", "--model", ddpm_pipeline, "--output", tmp_path / "local.png", *args)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "hub.png")), np.asarray(Image.open(tmp_path / "local.png")))
