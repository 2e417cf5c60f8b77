"""Training on two DDP processes: a DDPM run of a video UNet on clips from the accelerate config and what sample.py
makes of it, a MeanFlow DiT whose saved model samples alike through sample.py and its exported pipeline, a REPA DiT
with post-hoc EMA snapshots, and a failure on one process ending both."""

import json
import time

import numpy as np
import pytest
from helpers import (
    TINY,
    TINY_MEANFLOW,
    accelerate_launch,
    assert_clean_two_process_run,
    assert_same_as_sample_py,
    export_and_load,
    runner,
)
from PIL import Image

# Clips of 4 frames of Moving Fashion-MNIST at 16 px, for a video UNet as small as TINY's UNet.
TINY_CLIPS = [
    "--dataset_name",
    "moving_fashion_mnist",
    "--resolution",
    16,
    "--num_frames",
    4,
    "--model",
    "video_unet_s",
]


def test_two_process_ddpm_of_clips_from_the_accelerate_config(tmp_path):
    import sample

    out = tmp_path / "ddpm2"
    proc = accelerate_launch(
        "train_ddpm.py",
        "--output_dir",
        out,
        "--max_train_steps",
        3,
        "--checkpointing_steps",
        3,
        "--prediction_type",
        "v_prediction",
        "--snr_gamma",
        5,
        *TINY,
        *TINY_CLIPS,
        config_file="accelerate_configs/cpu_2proc.yaml",
    )
    assert_clean_two_process_run(proc, out, 3)
    record = json.loads((out / "objective.json").read_text())
    assert record["objective"] == "ddpm" and record["num_frames"] == 4
    # ancestral sampling draws fresh noise every step: still per clip, whatever the batch size
    grids = []
    for bs in (1, 3):
        sample.main(
            [
                "--model",
                str(out),
                "--num_images",
                "3",
                "--batch_size",
                str(bs),
                "--sampler",
                "ddpm",
                "--num_inference_steps",
                "4",
                "--output",
                str(tmp_path / f"bs{bs}.png"),
            ]
        )
        grids.append(np.array(Image.open(tmp_path / f"bs{bs}.png")))
    assert np.array_equal(*grids)


@pytest.mark.usefixtures("modules_cache")
def test_two_process_meanflow_samples_as_its_exported_pipeline(tmp_path):
    """MeanFlow's JVP and null-class passes run on each process's own copy of the DiT, outside DDP's collectives
    (with minibatch OT pairing of noise and data, which MeanFlow takes as flow matching does)."""
    out = tmp_path / "meanflow2"
    no_duties = ["--num_sample_images", 0, "--validation_steps", 0]
    model = ["--model", "dit_tiny", "--patch_size", 4, "--ot_coupling", "--max_train_steps", 2]
    proc = accelerate_launch("train_cfm.py", "--output_dir", out, *model, *TINY_MEANFLOW, *no_duties)
    assert_clean_two_process_run(proc, out, 2)
    assert json.loads((out / "objective.json").read_text())["objective"] == "meanflow"
    pipe = export_and_load(out, tmp_path / "pipe")
    assert_same_as_sample_py(pipe, out, tmp_path, class_labels=[1, 8, 8], seed=0, max_batch_size=2)


def test_two_process_repa_with_post_hoc_ema(tmp_path):
    """REPA's projector, outside DDP's forward, trains on both processes with a tiny DINOv2 as the encoder; the
    post-hoc EMA profiles are snapshotted once, by the main process; the saved model has no projector."""
    import torch
    from safetensors.torch import load_file
    from transformers import Dinov2Config, Dinov2Model

    from modules.artifacts.phema import list_snapshots, reconstruct

    torch.manual_seed(0)
    config = Dinov2Config(
        image_size=16, patch_size=4, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48
    )
    Dinov2Model(config).save_pretrained(tmp_path / "encoder")
    out = tmp_path / "repa2"
    model = ["--model", "dit_tiny", "--patch_size", 4, "--resolution", 16, "--max_train_steps", 2]
    repa = ["--repa_encoder", tmp_path / "encoder", "--repa_projector_dim", 16]
    phema = ["--ema_phema_stds", "0.05,0.1", "--ema_snapshot_steps", 1]
    no_duties = ["--num_sample_images", 0, "--validation_steps", 0]
    proc = accelerate_launch("train_cfm.py", "--output_dir", out, *TINY, *model, *repa, *phema, *no_duties)
    assert_clean_two_process_run(proc, out, 2)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(-1 <= r["repa_similarity"] <= 1 for r in rows if "loss" in r)
    assert [(s, d) for s, d, _ in list_snapshots(out)] == [(1, 0.05), (1, 0.1), (2, 0.05), (2, 0.1)]
    assert not list((out / "phema").glob(".*"))  # no temporary file left behind
    saved = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    assert not any(k.startswith("repa_projector") for k in saved)
    assert reconstruct(out, 0.07)[0].keys() == saved.keys()  # snapshots of the model, without the projector


def test_a_failure_on_one_process_ends_both_with_an_error(tmp_path):
    out = tmp_path / "run"
    started = time.monotonic()
    proc = accelerate_launch(
        runner(tmp_path, fail_rank="1"),
        "--output_dir",
        out,
        "--max_train_steps",
        20,
        *TINY,
        "--num_sample_images",
        0,
        check=False,
        timeout=240,
    )
    assert proc.returncode != 0 and time.monotonic() - started < 200
    assert "injected failure on rank 1" in proc.stdout + proc.stderr
    assert not (out / "config.json").exists()
