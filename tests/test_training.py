"""The training scripts end to end: exact resume, two processes, checkpoints, and sample.py on the result."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import RESUMABLE, ROOT, TINY, accelerate_launch, in_process, read_metrics, script
from PIL import Image
from safetensors.torch import load_file
from test_reliability import runner, weights

from modules.training.checkpoint import list_checkpoints


def _state(checkpoint):
    model = load_file(str(checkpoint / "model.safetensors"))
    ema = load_file(str(checkpoint / "ema.safetensors"))
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=True)
    return model, ema, optimizer


def _assert_same(a, b, where=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    else:
        assert a == b, f"{where}: {a} != {b}"


def test_run_writes_checkpoints_model_samples_and_metrics(tiny_cfm_run):
    out = tiny_cfm_run
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3", "checkpoint-6"]
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "objective.json", "run_config.json"):
        assert (out / name).is_file(), name
    for figure in ("denoising.png", "trajectories.png", "denoising.gif"):
        assert (out / "samples" / f"step_0000006_{figure}").is_file(), figure
    grid = Image.open(out / "samples" / "step_0000006.png")
    assert grid.mode == "L" and grid.size[0] > 32
    rows = read_metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 7))
    assert all(r["loss"] > 0 and r["img_per_s"] > 0 and r["tflops"] > 0 for r in train_rows)
    # validation at the end: overall and per t-bin, on Fashion-MNIST's test split
    (val,) = [r for r in rows if "val_loss" in r]
    bins = [k for k in val if k.startswith("val_loss_t")]
    assert val["step"] == 6 and len(bins) == 10 and "val_loss_t0.05" in bins
    assert abs(val["val_loss"] - sum(val[k] for k in bins) / 10) < 1e-6
    assert list(out.rglob("events.out.tfevents.*")), "--report_to tensorboard wrote no event file"
    # the saved model is the EMA, not the raw weights
    ema = load_file(str(out / "checkpoints" / "checkpoint-6" / "ema.safetensors"))
    saved = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    raw = load_file(str(out / "checkpoints" / "checkpoint-6" / "model.safetensors"))
    assert all(torch.equal(saved[k], ema[k]) for k in ema)
    assert any(not torch.equal(saved[k], raw[k]) for k in raw)


def test_resume_is_exact(tiny_cfm_run, tmp_path, capsys):
    """6 steps in one run == 3 steps, then a second run resuming from checkpoint-3 for 3 more (a new process resumes
    in tests/test_reliability.py)."""
    out = tmp_path / "resumed"
    common = ["--output_dir", out, *RESUMABLE]
    in_process("train_cfm.py", "--max_train_steps", 3, *common)
    in_process("train_cfm.py", "--max_train_steps", 6, "--resume_from_checkpoint", "latest", *common)
    assert "resumed from" in capsys.readouterr().out
    whole = _state(tiny_cfm_run / "checkpoints" / "checkpoint-6")
    resumed = _state(out / "checkpoints" / "checkpoint-6")
    _assert_same(whole, resumed, "state")
    # and the run did train: step 3 and step 6 differ
    halfway = _state(tiny_cfm_run / "checkpoints" / "checkpoint-3")
    assert any(not torch.equal(halfway[0][k], whole[0][k]) for k in whole[0])


def test_sample_is_independent_of_batch_size(tiny_cfm_run, tmp_path):
    import sample

    for bs in (1, 8):
        sample.main(
            [
                "--model",
                str(tiny_cfm_run),
                "--num_images",
                "8",
                "--batch_size",
                str(bs),
                "--output",
                str(tmp_path / f"bs{bs}"),
                "--sampler",
                "euler_maruyama",
                "--guidance_scale",
                "2.0",
            ]
        )
    files = sorted(p.name for p in (tmp_path / "bs1").iterdir())
    assert files == [f"{i:06d}.png" for i in range(8)]
    for name in files:
        a = torch.tensor(np.array(Image.open(tmp_path / "bs1" / name)))
        b = torch.tensor(np.array(Image.open(tmp_path / "bs8" / name)))
        assert torch.equal(a, b), name
    sample.main(
        [
            "--model",
            str(tiny_cfm_run),
            "--num_images",
            "10",
            "--output",
            str(tmp_path / "grid.png"),
            "--denoising_path",
        ]
    )
    assert (tmp_path / "grid_denoising.png").is_file() and (tmp_path / "grid_trajectories.png").is_file()
    assert Image.open(tmp_path / "grid.png").size[0] > 10 * 32


def _assert_clean_multiprocess_run(proc, out, steps):
    log = proc.stdout + proc.stderr
    for bad in ("Traceback", "Aborted", "core dumped", "terminate called"):
        assert bad not in log, log[-3000:]
    assert (out / "checkpoints" / f"checkpoint-{steps}" / "random_states_1.pkl").is_file()
    assert (out / "diffusion_pytorch_model.safetensors").is_file()


def test_two_process_ddpm_from_the_accelerate_config(tmp_path):
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
        config_file="accelerate_configs/cpu_2proc.yaml",
    )
    _assert_clean_multiprocess_run(proc, out, 3)
    assert json.loads((out / "objective.json").read_text())["objective"] == "ddpm"
    # ancestral sampling draws fresh noise every step: still per image, whatever the batch size
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


# A tiny DiT for 4 steps on 2 processes, checkpointed at step 2: run under DDP, FSDP2 and DeepSpeed ZeRO-2.
SHARDED = [
    "--model",
    "dit_tiny",
    "--patch_size",
    4,
    "--class_conditional",
    "--ot_coupling",
    "--max_train_steps",
    4,
    "--checkpointing_steps",
    2,
    "--max_train_samples",
    64,
    "--train_batch_size",
    8,
    "--lr_warmup_steps",
    2,
    "--validation_samples",
    8,
    "--num_sample_images",
    4,
    "--num_inference_steps",
    2,
    "--logging_steps",
    1,
    "--fid_num_samples",
    0,
]


def _losses_and_ema(out):
    return [r["loss"] for r in read_metrics(out) if "loss" in r], weights(out)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """SHARDED under cpu_2proc.yaml (DDP): what the sharded runs must reproduce."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    proc = accelerate_launch(
        "train_cfm.py", "--output_dir", out, *SHARDED, config_file="accelerate_configs/cpu_2proc.yaml"
    )
    _assert_clean_multiprocess_run(proc, out, 4)
    return out


def test_two_process_cfm(ddp_run):
    """Two DDP processes with minibatch OT coupling: each checkpoint holds both processes' RNG states."""
    assert [p.name for p in list_checkpoints(ddp_run)] == ["checkpoint-2", "checkpoint-4"]
    assert all((p / "random_states_1.pkl").is_file() for p in list_checkpoints(ddp_run))
    assert json.loads((ddp_run / "objective.json").read_text())["args"]["ot_coupling"] is True


def _sharded_launch(config, out, *extra, script="train_cfm.py"):
    """SHARDED under accelerate_configs/`config` on 2 CPU processes, launched as its header shows (tests/cpu_as_gpus.py
    lets Accelerate's FSDP and DeepSpeed run without GPUs)."""
    launch = ["--config_file", ROOT / "accelerate_configs" / config, "--num_processes", 2, "--mixed_precision", "no"]
    proc = accelerate_launch("tests/cpu_as_gpus.py", script, "--output_dir", out, *SHARDED, *extra, launch_args=launch)
    _assert_clean_multiprocess_run(proc, out, 4)


def _assert_sharded_run_matches_ddp_and_resumes_exactly(config, out, ddp_run, capsys, written_under):
    import train_cfm

    (losses, ema), (ddp_losses, ddp_ema) = _losses_and_ema(out), _losses_and_ema(ddp_run)
    assert len(losses) == 4 and np.allclose(losses, ddp_losses, rtol=1e-5, atol=0)
    assert sorted(ema) == sorted(ddp_ema)
    assert max(float((ema[k] - ddp_ema[k]).abs().max()) for k in ddp_ema) < 1e-5
    # the same run resumed from its step-2 checkpoint ends with the same weights, bit for bit
    checkpoint = out / "checkpoints" / "checkpoint-2"
    resumed = out.parent / "resumed"
    shutil.copytree(checkpoint, resumed / "checkpoints" / "checkpoint-2")
    _sharded_launch(config, resumed, "--resume_from_checkpoint", "latest")
    again = weights(resumed)
    assert all(torch.equal(again[k], ema[k]) for k in ema)
    # resumed without the launch that wrote it: one line
    with pytest.raises(SystemExit):
        train_cfm.main(["--output_dir", str(resumed), *map(str, SHARDED), "--resume_from_checkpoint", str(checkpoint)])
    err = capsys.readouterr().err
    assert f"was written under {written_under} and this run is under neither FSDP nor DeepSpeed" in err


def test_fsdp_trains_as_ddp_does_and_resumes_exactly(tmp_path, ddp_run, capsys):
    """accelerate_configs/fsdp.yaml: FSDP2, each DiT block sharded over the 2 processes, the EMA sharded alike."""
    out = tmp_path / "fsdp"
    _sharded_launch("fsdp.yaml", out)
    shards = out / "checkpoints" / "checkpoint-2" / "pytorch_model_fsdp_0"
    assert sorted(p.name for p in shards.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one per process
    _assert_sharded_run_matches_ddp_and_resumes_exactly("fsdp.yaml", out, ddp_run, capsys, "FSDP")


def test_deepspeed_zero2_trains_as_ddp_does_skips_nonfinite_steps_and_resumes_exactly(tmp_path, ddp_run, capsys):
    """accelerate_configs/deepspeed_zero2.yaml: gradients and AdamW state split over the 2 processes; DeepSpeed steps
    inside backward and skips a step whose gradients are not finite, which the non-finite guard counts."""
    out = tmp_path / "zero2"
    _sharded_launch("deepspeed_zero2.yaml", out)
    optimizer_shards = (out / "checkpoints" / "checkpoint-2" / "pytorch_model").glob("*optim_states.pt")
    assert len(list(optimizer_shards)) == 2  # one per process
    _assert_sharded_run_matches_ddp_and_resumes_exactly("deepspeed_zero2.yaml", out, ddp_run, capsys, "DeepSpeed")

    # the loss of step 2 on the second process is NaN
    _sharded_launch("deepspeed_zero2.yaml", tmp_path / "nan", script=runner(tmp_path, nan_rank="1"))
    rows = [r for r in read_metrics(tmp_path / "nan") if "loss" in r]
    assert [r.get("nonfinite_steps", 0) for r in rows] == [0, 1, 1, 1]
    assert rows[1]["lr"] == rows[0]["lr"]  # the skipped step did not advance the schedule
    assert rows[2]["lr"] > rows[0]["lr"] and all(np.isfinite(r["loss"]) for r in rows if r is not rows[1])
    assert all(torch.isfinite(w).all() for w in weights(tmp_path / "nan").values())


@pytest.fixture(scope="module")
def quick_classifier():
    """A briefly trained Fashion-MNIST classifier standing in for the cached one (minutes to train)."""
    from modules.data.images import load_fashion_mnist
    from modules.evaluation import classifier
    from modules.pixels import resize_uint8

    images, labels = load_fashion_mnist("train")
    return classifier.train_classifier(resize_uint8(images[:1000, None], 32), labels[:1000], epochs=1, progress=False)


def test_sample_fid_and_nfe_sweep(tiny_cfm_run, tmp_path, monkeypatch, quick_classifier):
    import modules.evaluation.metrics as metrics
    import sample

    monkeypatch.setattr(metrics, "load_or_train_classifier", lambda: quick_classifier)
    prefix = tmp_path / "sweep"
    sample.main(
        [
            "--model",
            str(tiny_cfm_run),
            "--num_images",
            "4",
            "--nfe_sweep",
            "1,2",
            "--samplers",
            "euler,heun",
            "--eval_metrics",
            "fid,kid,classifier",
            "--output",
            str(prefix),
        ]
    )
    rows = json.loads(prefix.with_suffix(".json").read_text())["rows"]
    assert [(r["sampler"], r["steps"], r["nfe"]) for r in rows] == [
        ("euler", 1, 1),
        ("euler", 2, 2),
        ("heun", 1, 1),
        ("heun", 2, 3),
    ]
    assert all(r["fid"] > 0 and r["kid_std"] >= 0 and r["fd_classifier"] > 0 for r in rows)
    assert all(0 <= r["class_accuracy"] <= 1 for r in rows)
    table = prefix.with_suffix(".md").read_text()
    assert "| sampler | steps | NFE | FID | KID (x1e3) | FD classifier | class acc. |" in table
    assert "| heun | 2 | 3 |" in table


def test_in_training_metrics_kid_and_classifier(monkeypatch, tmp_path, quick_classifier):
    """--eval_metrics fid,kid,classifier at the end of a run."""
    import modules.evaluation.metrics as metrics
    import train_cfm

    monkeypatch.setattr(metrics, "load_or_train_classifier", lambda: quick_classifier)
    out = tmp_path / "metrics"
    train_cfm.main(
        [
            *map(str, TINY),
            "--output_dir",
            str(out),
            "--max_train_steps",
            "2",
            "--fid_num_samples",
            "8",
            "--fid_reference_samples",
            "8",
            "--eval_metrics",
            "fid,kid,classifier",
        ]
    )
    result = json.loads((out / "fid.json").read_text())
    assert set(result) >= {"fid", "kid", "kid_std", "fd_classifier", "class_accuracy"}
    assert result["fid"] > 0 and result["fd_classifier"] > 0 and 0 <= result["class_accuracy"] <= 1


def test_wandb_without_a_login_logs_offline_into_the_run_dir(tmp_path):
    out = tmp_path / "wandb_run"
    env = {"WANDB_MODE": "", "HOME": str(tmp_path), "NETRC": str(tmp_path / "no_netrc")}
    proc = script("train_cfm.py", "--output_dir", out, "--max_train_steps", 2, "--report_to", "wandb", *TINY, env=env)
    assert "not logged in" in proc.stderr and f"wandb sync {out / 'wandb'}" in proc.stderr
    assert list((out / "wandb").glob("offline-run-*")), "no offline wandb run was written"
    assert (out / "metrics.jsonl").is_file()


def test_missing_tracker_package_is_dropped_with_a_warning(monkeypatch, tmp_path):
    import importlib.util

    from modules.training import tracking

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.warns(UserWarning, match=r"wandb is not installed \(pip install wandb\)"):
        assert tracking.resolve_trackers("all", tmp_path) == ["tensorboard"]
    with pytest.warns(UserWarning, match="wandb is not installed"):
        assert tracking.resolve_trackers("wandb", tmp_path) == []
