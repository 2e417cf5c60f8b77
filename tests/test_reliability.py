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
from conftest import RESUMABLE, ROOT, TINY, free_port, read_metrics, run, script
from safetensors.torch import load_file

import train_cfm
from modules.training.checkpoint import list_checkpoints, resolve_resume

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


def weights(run_dir) -> dict:
    return load_file(str(run_dir / "diffusion_pytorch_model.safetensors"))


def assert_same_model(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# The run the SIGKILL tests interrupt, resume and compare with the one never interrupted.
SIX_STEPS = ["--max_train_steps", "6", "--report_to", "tensorboard", *map(str, RESUMABLE)]


def resume(out):
    script("train_cfm.py", "--output_dir", out, *SIX_STEPS, "--resume_from_checkpoint", "latest")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run never killed, made as the killed runs and their reruns are: each in a process of its own."""
    out = tmp_path_factory.mktemp("whole") / "run"
    script("train_cfm.py", "--output_dir", out, *SIX_STEPS)
    return out


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
    args = ["--output_dir", out, "--max_train_steps", 40, *TINY, "--num_sample_images", 0, "--checkpointing_steps", 0]
    proc = start([sys.executable, str(ROOT / "train_cfm.py"), *map(str, args)])
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    [checkpoint] = list_checkpoints(out)
    stopped = int(checkpoint.name.split("-")[1])
    assert 2 <= stopped < 40 and f"stopped at step {stopped} of 40 (SIGTERM)" in output
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


def test_a_failure_on_one_process_ends_both_with_an_error(tmp_path):
    out = tmp_path / "run"
    started = time.monotonic()
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--main_process_port",
        str(free_port()),
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
    proc = run(
        [
            *launch,
            runner(tmp_path, fail_rank="1"),
            "--output_dir",
            str(out),
            "--max_train_steps",
            "20",
            *map(str, TINY),
            "--num_sample_images",
            "0",
        ],
        check=False,
        timeout=240,
    )
    assert proc.returncode != 0 and time.monotonic() - started < 200
    assert "injected failure on rank 1" in proc.stdout + proc.stderr
    assert not (out / "config.json").exists()
