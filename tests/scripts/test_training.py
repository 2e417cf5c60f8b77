"""The training scripts end to end: exact resume, two processes, checkpoints, and sample.py on the result."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import RESUMABLE, TINY, assert_same, brief_classifier, checkpoint_state, in_process, read_metrics, script
from PIL import Image
from safetensors.torch import load_file

from modules.training.checkpoint import list_checkpoints


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
    in tests/scripts/test_reliability.py)."""
    out = tmp_path / "resumed"
    common = ["--output_dir", out, *RESUMABLE]
    in_process("train_cfm.py", "--max_train_steps", 3, *common)
    in_process("train_cfm.py", "--max_train_steps", 6, "--resume_from_checkpoint", "latest", *common)
    assert "resumed from" in capsys.readouterr().out
    whole = checkpoint_state(tiny_cfm_run / "checkpoints" / "checkpoint-6")
    resumed = checkpoint_state(out / "checkpoints" / "checkpoint-6")
    assert_same(whole, resumed, "state")
    # and the run did train: step 3 and step 6 differ
    halfway = checkpoint_state(tiny_cfm_run / "checkpoints" / "checkpoint-3")
    assert any(not torch.equal(halfway[0][k], whole[0][k]) for k in whole[0])
    # the post-hoc EMA's snapshots too (step 2 from the first part, 4 and 6 from the resumed one)
    snapshots = sorted(p.name for p in (tiny_cfm_run / "phema").iterdir())
    assert len(snapshots) == 6 and snapshots == sorted(p.name for p in (out / "phema").iterdir())
    for name in snapshots:
        assert_same(load_file(str(tiny_cfm_run / "phema" / name)), load_file(str(out / "phema" / name)), name)


def test_post_hoc_ema_of_the_run(tiny_cfm_run, tmp_path, monkeypatch):
    """Snapshots every 2 steps of both profiles; the stored profile of the last step reconstructs as its snapshot;
    another width saved by `python -m modules.artifacts.phema` samples as sample.py --ema_std does; --ema_sweep's
    rows."""
    import sample
    from modules.artifacts import phema
    from modules.artifacts.phema import list_snapshots, reconstruct, snapshot_name

    run = tiny_cfm_run
    assert [(step, std) for step, std, _ in list_snapshots(run)] == [(s, d) for s in (2, 4, 6) for d in (0.05, 0.1)]
    weights, record = reconstruct(run, 0.1)
    stored = load_file(str(run / "phema" / snapshot_name(6, 0.1)))
    assert record["step"] == 6 and weights.keys() == stored.keys()
    for key in stored:
        torch.testing.assert_close(weights[key], stored[key], atol=1e-6, rtol=1e-5)
    saved = phema.main([str(run), "--ema_std", "0.07", "--output_dir", str(tmp_path / "ema")])
    assert json.loads((saved / "objective.json").read_text())["posthoc_ema"]["std"] == 0.07
    pngs = {}
    for name, flags in {"saved": ["--model", str(saved)], "flag": ["--model", str(run), "--ema_std", "0.07"]}.items():
        sample.main([*flags, "--num_images", "3", "--output", str(tmp_path / name)])
        pngs[name] = [np.array(Image.open(p)) for p in sorted((tmp_path / name).glob("*.png"))]
    sample.main(["--model", str(run), "--num_images", "3", "--output", str(tmp_path / "ema_model")])
    trained = [np.array(Image.open(p)) for p in sorted((tmp_path / "ema_model").glob("*.png"))]
    assert len(pngs["saved"]) == 3 and all(np.array_equal(a, b) for a, b in zip(*pngs.values(), strict=True))
    assert any(not np.array_equal(a, b) for a, b in zip(pngs["saved"], trained, strict=True))

    def fake_metrics(images, *args, **kwargs):  # the metrics are tested on their own; here the sweep is
        return {"fd_classifier": float(images.float().std())}

    monkeypatch.setattr(sample, "evaluate_generated", fake_metrics)
    prefix = tmp_path / "sweep"
    argv = ["--model", str(run), "--num_images", "2", "--eval_metrics", "classifier", "--output", str(prefix)]
    sample.main([*argv, "--ema_sweep", "0.05,0.07"])
    rows = json.loads(prefix.with_suffix(".json").read_text())["rows"]
    assert [r["ema"] for r in rows] == ["the run's EMA", "post-hoc 0.05", "post-hoc 0.07"]
    assert len({r["fd_classifier"] for r in rows}) == 3
    assert "| post-hoc 0.07 |" in prefix.with_suffix(".md").read_text()


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


@pytest.fixture(scope="module")
def quick_classifier():
    """A briefly trained Fashion-MNIST classifier standing in for the cached one (minutes to train)."""
    return brief_classifier(1000, epochs=1)


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


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, quick_classifier):
    """A 2-step run with --eval_metrics fid,kid,classifier, the validation loss and a grid at the end, logged to MLflow
    (its default file store in the run dir)."""
    import modules.evaluation.metrics as metrics
    import train_cfm

    out = tmp_path_factory.mktemp("metrics") / "run"
    args = [*map(str, TINY), "--max_train_steps", "2"]
    fid = ["--fid_num_samples", "8", "--fid_reference_samples", "8", "--eval_metrics", "fid,kid,classifier"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(metrics, "load_or_train_classifier", lambda: quick_classifier)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # the run sets it; put back after
        train_cfm.main([*args, *fid, "--output_dir", str(out), "--report_to", "mlflow", "--hub_token", "hf_secret"])
    return out


def test_in_training_metrics_kid_and_classifier(evaluated_run):
    """--eval_metrics fid,kid,classifier at the end of a run."""
    result = json.loads((evaluated_run / "fid.json").read_text())
    assert set(result) >= {"fid", "kid", "kid_std", "fd_classifier", "class_accuracy"}
    assert result["fid"] > 0 and result["fd_classifier"] > 0 and 0 <= result["class_accuracy"] <= 1


def test_mlflow_holds_the_run_config_every_metric_at_its_step_the_grids_and_fid(evaluated_run, monkeypatch, tmp_path):
    """Read back with MLflow's own client: the run record as parameters (no secret), every number of metrics.jsonl
    at its step, and the sample grids and fid.json as artifacts."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads a file store only when allowed
    client = MlflowClient((evaluated_run / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("train_cfm")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    record = json.loads((evaluated_run / "run_config.json").read_text())
    params = run.data.params
    assert set(params) == {"script", "command", *record["config"]}
    assert params["command"] == record["command"] and "--hub_token '***'" in params["command"]
    assert params["learning_rate"] == str(record["config"]["learning_rate"]) and params["max_train_steps"] == "2"
    assert not any("hf_secret" in value for value in params.values())

    expected = {}
    for row in read_metrics(evaluated_run):
        for key, value in row.items():
            if key != "step" and isinstance(value, int | float):
                expected.setdefault(key, []).append((row["step"], float(value)))
    assert {"loss", "val_loss", "fid", "class_accuracy", "eta_min", "end_step"} <= set(expected)
    for key, points in expected.items():
        assert sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)) == points, key

    samples = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    grid = "samples/step_0000002"
    assert {f"{grid}.png", f"{grid}_denoising.png", f"{grid}_trajectories.png", f"{grid}_denoising.gif"} <= samples
    fid = client.download_artifacts(run.info.run_id, "fid.json", str(tmp_path))
    assert json.loads(Path(fid).read_text()) == json.loads((evaluated_run / "fid.json").read_text())


def test_wandb_without_a_login_logs_offline_into_the_run_dir(tmp_path):
    out = tmp_path / "wandb_run"
    env = {"WANDB_MODE": "", "HOME": str(tmp_path), "NETRC": str(tmp_path / "no_netrc")}
    proc = script("train_cfm.py", "--output_dir", out, "--max_train_steps", 2, "--report_to", "wandb", *TINY, env=env)
    assert "not logged in" in proc.stderr and f"wandb sync {out / 'wandb'}" in proc.stderr
    assert list((out / "wandb").glob("offline-run-*")), "no offline wandb run was written"
    assert (out / "metrics.jsonl").is_file()
