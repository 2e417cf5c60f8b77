"""Kill it anywhere, rerun the same command, get the same model: SIGKILL after a checkpoint and while one is being
written, SIGTERM and the wall-clock limit, non-finite steps, a full disk, and a process that fails among two."""

import errno
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT, SIX_STEPS, TINY, assert_same_model, in_process, read_metrics, runner, script, weights

import train_cfm
from modules.training.checkpoint import list_checkpoints, resolve_resume


def start(argv) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 180, poll: float = 0.02):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before the moment to kill it:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the run")
        time.sleep(poll)


def resume(out):
    """The same command with --resume_from_checkpoint latest, in this process (on one thread, as the killed run)."""
    in_process("train_cfm.py", "--output_dir", out, *SIX_STEPS, "--resume_from_checkpoint", "latest")


@pytest.fixture(scope="module")
def uninterrupted(tiny_cfm_run):
    """The run never killed: the session's six-step run, made with SIX_STEPS in this process."""
    return tiny_cfm_run


def test_sigkill_at_a_random_step_after_a_checkpoint_then_rerun_equals_an_uninterrupted_run(uninterrupted, tmp_path):
    out = tmp_path / "run"
    proc = start([sys.executable, str(ROOT / "train_cfm.py"), "--output_dir", str(out), *SIX_STEPS])
    wait_for(lambda: (out / "checkpoints" / "checkpoint-3").is_dir(), proc)
    time.sleep(random.uniform(0.0, 0.3))  # somewhere in steps 4-6
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "diffusion_pytorch_model.safetensors").exists(), "killed too late to test anything"
    assert resolve_resume("latest", out).name in ("checkpoint-3", "checkpoint-6")
    resume(out)
    assert_same_model(out, uninterrupted)


def test_killed_while_writing_a_checkpoint_latest_is_the_previous_one(uninterrupted, tmp_path):
    out = tmp_path / "run"
    proc = start(
        [sys.executable, runner(tmp_path, slow_in=".checkpoint-6.partial"), "--output_dir", str(out), *SIX_STEPS]
    )
    wait_for(lambda: (out / "checkpoints" / ".checkpoint-6.partial").is_dir(), proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoints" / ".checkpoint-6.partial").is_dir()  # half written
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3"]
    assert resolve_resume("latest", out).name == "checkpoint-3"
    resume(out)
    assert_same_model(out, uninterrupted)
    assert not list((out / "checkpoints").glob(".*"))  # the half-written one was cleared


def test_sigterm_saves_a_checkpoint_exits_0_and_resume_continues(tmp_path):
    out = tmp_path / "run"
    args = ["--output_dir", out, "--max_train_steps", 16, *TINY, "--num_sample_images", 0, "--checkpointing_steps", 0]
    proc = start([sys.executable, str(ROOT / "train_cfm.py"), *map(str, args)])
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    [checkpoint] = list_checkpoints(out)
    stopped = int(checkpoint.name.split("-")[1])
    assert 2 <= stopped < 16 and f"stopped at step {stopped} of 16 (SIGTERM)" in output
    assert "--resume_from_checkpoint latest" in output and not (out / "config.json").exists()
    again = script("train_cfm.py", *args, "--resume_from_checkpoint", "latest")
    assert f"at step {stopped}" in again.stdout and (out / "config.json").is_file()


def test_max_train_minutes_stops_with_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    train_cfm.main(
        [
            "--output_dir",
            str(out),
            "--max_train_steps",
            "50",
            *map(str, TINY),
            "--num_sample_images",
            "0",
            "--checkpointing_steps",
            "0",
            "--max_train_minutes",
            "0.0001",
        ]
    )
    assert "(--max_train_minutes 0.0001)" in capsys.readouterr().out
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"] and not (out / "config.json").exists()
    # the time limit bound first: the log line says the run ends at this step, now (not at step 50)
    (row,) = read_metrics(out)
    assert row["step"] == 1 and row["end_step"] == 1 and row["eta_min"] == 0


def nan_loss(monkeypatch, bad_calls):
    import modules.objectives.flow

    real, calls = modules.objectives.flow.FlowObjective.loss, [0]

    def loss(self, *args, **kwargs):
        calls[0] += 1
        value = real(self, *args, **kwargs)
        return value * float("nan") if bad_calls(calls[0]) else value

    monkeypatch.setattr(modules.objectives.flow.FlowObjective, "loss", loss)


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run_after_the_limit(tmp_path, monkeypatch, capsys):
    args = [*map(str, TINY), "--num_sample_images", "0", "--checkpointing_steps", "2"]
    nan_loss(monkeypatch, lambda call: call in (3, 4))  # steps 3 and 4 (call 1 counts the FLOPs)
    out = tmp_path / "skips"
    train_cfm.main(["--output_dir", str(out), "--max_train_steps", "6", *args])
    records = read_metrics(out)
    assert [r.get("nonfinite_steps", 0) for r in records if "loss" in r] == [0, 1, 2, 2, 2, 2]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[1] != losses[1] and all(loss == loss for i, loss in enumerate(losses) if i not in (1, 2))
    assert all(torch.isfinite(w).all() for w in weights(out).values())

    nan_loss(monkeypatch, lambda call: call >= 5)  # from step 4 on
    out = tmp_path / "diverged"
    with pytest.raises(SystemExit) as e:
        train_cfm.main(["--output_dir", str(out), "--max_train_steps", "20", *args, "--max_nonfinite_steps", "3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "training stopped at step 6: the loss or the gradients were not finite for 3 steps in a row" in err
    assert f"the last complete checkpoint is {out / 'checkpoints' / 'checkpoint-4'}" in err


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint_and_stops(tmp_path, monkeypatch, capsys):
    import safetensors.torch

    real = safetensors.torch.save_file

    def full(tensors, filename, *args, **kwargs):
        if "checkpoint-4" in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "run"
    with pytest.raises(SystemExit):
        train_cfm.main(
            [
                "--output_dir",
                str(out),
                "--max_train_steps",
                "6",
                *map(str, TINY),
                "--num_sample_images",
                "0",
                "--checkpointing_steps",
                "2",
            ]
        )
    err = capsys.readouterr().err
    assert "could not write checkpoint-4" in err and "No space left on device" in err
    assert f"the last complete checkpoint, {out / 'checkpoints' / 'checkpoint-2'}, is intact" in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-2"]
    assert resolve_resume("latest", out).name == "checkpoint-2"
