"""FSDP2 and DeepSpeed ZeRO-2 on two CPU processes (through tests/cpu_as_gpus.py) train as DDP does and resume
exactly; the DDP run they are held against is the two-process golden run."""

import json
import shutil

import golden_runs
import numpy as np
import pytest
import torch
from golden_runs import SHARDED
from helpers import ROOT, accelerate_launch, assert_clean_two_process_run, read_metrics, runner, weights

from modules.training.checkpoint import list_checkpoints


def _losses_and_ema(out):
    return [r["loss"] for r in read_metrics(out) if "loss" in r], weights(out)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """SHARDED under cpu_2proc.yaml (DDP): the two-process golden run, and what the sharded runs must reproduce."""
    workdir = tmp_path_factory.mktemp("ddp")
    hashes = golden_runs.run_in_fresh_process(["ddp_two_processes"], workdir)["ddp_two_processes"]
    return workdir / "ddp_two_processes" / "run", hashes


def test_the_ddp_run_is_the_golden_one_and_checkpoints_both_processes(ddp_run):
    """Two DDP processes with minibatch OT coupling end with the stored golden weights, bit for bit; each
    checkpoint holds both processes' RNG states."""
    ddp_run, hashes = ddp_run
    assert hashes == json.loads(golden_runs.HASHES.read_text())["ddp_two_processes"]
    assert [p.name for p in list_checkpoints(ddp_run)] == ["checkpoint-2", "checkpoint-4"]
    assert all((p / "random_states_1.pkl").is_file() for p in list_checkpoints(ddp_run))
    assert json.loads((ddp_run / "objective.json").read_text())["args"]["ot_coupling"] is True


def _sharded_launch(config, out, *extra, script="train_cfm.py"):
    """SHARDED under accelerate_configs/`config` on 2 CPU processes, launched as its header shows (tests/cpu_as_gpus.py
    lets Accelerate's FSDP and DeepSpeed run without GPUs)."""
    launch = ["--config_file", ROOT / "accelerate_configs" / config, "--num_processes", 2, "--mixed_precision", "no"]
    proc = accelerate_launch("tests/cpu_as_gpus.py", script, "--output_dir", out, *SHARDED, *extra, launch_args=launch)
    assert_clean_two_process_run(proc, out, 4)


def _assert_sharded_run_matches_ddp_and_resumes_exactly(config, out, ddp_run, capsys, written_under):
    import train_cfm

    ddp_run, _ = ddp_run
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
