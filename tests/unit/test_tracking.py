"""What a run logs and shows, without running one: which trackers --report_to gets, the run record as MLflow
parameters, what reaches the trackers, and which limit the progress bar and the ETA count to."""

import importlib.util
import io
import math
from types import SimpleNamespace

import pytest
from tqdm.auto import tqdm

from modules.config import UserError
from modules.training import tracking
from modules.training.boundary import show_progress
from modules.training.stopping import Outlook, StopRequest, outlook

FIND_SPEC = importlib.util.find_spec


def without(monkeypatch, *missing):
    """Pretend the packages `missing` are not installed."""
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else FIND_SPEC(name, *a))


def test_all_drops_a_missing_tracker_with_a_warning(monkeypatch, tmp_path):
    without(monkeypatch, "wandb", "mlflow")
    with pytest.warns(UserWarning) as warned:
        assert tracking.resolve_trackers("all", tmp_path) == ["tensorboard"]
    messages = [str(w.message) for w in warned]
    assert any("wandb is not installed (pip install wandb)" in m for m in messages)
    assert any("mlflow is not installed (pip install mlflow-skinny)" in m for m in messages)
    without(monkeypatch)
    assert "mlflow" in tracking.resolve_trackers("all", tmp_path)  # installed here (requirements.txt)


@pytest.mark.parametrize(("name", "package"), [("mlflow", "mlflow-skinny"), ("wandb", "wandb")])
def test_a_tracker_asked_for_by_name_must_be_installed(monkeypatch, tmp_path, name, package):
    without(monkeypatch, name)
    with pytest.raises(UserError, match=f"--report_to {name}: {name} is not installed; pip install {package}"):
        tracking.resolve_trackers(name, tmp_path)


def test_mlflow_logs_into_the_run_dir_unless_a_tracking_uri_is_set(monkeypatch, tmp_path):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # put back as it was after the test
    before = mlflow.get_tracking_uri()
    try:
        assert tracking.mlflow_store(tmp_path / "run") == (tmp_path / "run" / "mlruns").as_uri()
        assert mlflow.get_tracking_uri() == (tmp_path / "run" / "mlruns").as_uri()
        assert tracking.os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true"
        # mlflow exported that URI; the next run of this process still logs into its own run dir, made again
        assert tracking.os.environ["MLFLOW_TRACKING_URI"] == (tmp_path / "run" / "mlruns").as_uri()
        assert tracking.mlflow_store(tmp_path / "next") == (tmp_path / "next" / "mlruns").as_uri()
        assert (tmp_path / "next" / "mlruns").is_dir()

        monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
        assert tracking.mlflow_store(tmp_path / "run") == "http://mlflow.example:5000"
        assert mlflow.get_tracking_uri() == "http://mlflow.example:5000"
        assert "MLFLOW_ALLOW_FILE_STORE" not in tracking.os.environ  # the user's store: the user's settings
    finally:
        mlflow.set_tracking_uri(before)


def test_a_tracking_uri_is_printed_without_its_credentials():
    assert tracking.hide_password("https://me:s3cret@mlflow.example/x") == "https://***@mlflow.example/x"
    assert tracking.hide_password("file:///runs/a@b/mlruns") == "file:///runs/a@b/mlruns"


def test_the_run_record_as_flat_mlflow_parameters(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_env_secret")
    record = {
        "script": "/repo/train_cfm.py",
        "command": "python train_cfm.py --hub_token '***'",
        "config": {
            "learning_rate": 0.002,
            "resolution": 32,
            "mixed_precision": None,
            "latent": {"vae": {"source": "stabilityai/sd-vae", "scaling": 0.18}, "channels": [4, 8]},
            "prompt": "x" * 50,
            "bad key!": "echo hf_env_secret and hf_flag_secret",
            "empty": {},
        },
    }
    params = tracking.flat_params(record, max_length=20, token="hf_flag_secret")
    assert params == {
        "script": "/repo/train_cfm.py",
        "command": "python train_cfm....",  # 17 characters and "..."
        "learning_rate": "0.002",
        "resolution": "32",
        "mixed_precision": "None",
        "latent.vae.source": "stabilityai/sd-vae",
        "latent.vae.scaling": "0.18",
        "latent.channels": "[4, 8]",
        "prompt": "x" * 17 + "...",
        "bad key_": "echo *** and ***",
        "empty": "{}",
    }
    assert all(len(v) <= 20 for v in params.values())


class RecordingTracker:
    def __init__(self, name):
        self.name, self.artifacts = name, []

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append((path, artifact_path))


class RecordingAccelerator:
    """What MetricsLog calls on Accelerate: log() on the main process, and the trackers."""

    is_main_process = True

    def __init__(self):
        self.logged, self.trackers = [], [RecordingTracker("tensorboard"), RecordingTracker("mlflow")]

    def log(self, values, step):
        self.logged.append((step, values))


def test_trackers_get_every_number_at_its_step_and_mlflow_the_files(tmp_path):
    accelerator = RecordingAccelerator()
    log = tracking.MetricsLog(accelerator, tmp_path / "metrics.jsonl")
    log.log(3, {"loss": float("nan"), "images_seen": 24, "reference": "fashion_mnist", "bins": [1, 2], "gap": None})
    assert accelerator.logged == [(3, {"loss": accelerator.logged[0][1]["loss"], "images_seen": 24})]
    assert math.isnan(accelerator.logged[0][1]["loss"])
    assert '"reference": "fashion_mnist"' in (tmp_path / "metrics.jsonl").read_text()  # the rest stays in the file
    log.log_files([tmp_path / "a.png", tmp_path / "b.gif"], "samples")
    tensorboard, mlflow = accelerator.trackers
    assert tensorboard.artifacts == [] and mlflow.artifacts == [
        (str(tmp_path / "a.png"), "samples"),
        (str(tmp_path / "b.gif"), "samples"),
    ]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # 100 steps in 50 s (2 steps/s): 900 steps left take 450 s, inside a 600 s budget: the steps bind.
        ((100, 100, 50.0, 1000, 600.0), Outlook(1000, 450.0, False)),
        # The same speed with 1e9 steps and 60 s left: the time binds, 120 more steps (the one under way finishes).
        ((100, 100, 50.0, 10**9, 60.0), Outlook(220, 60.0, True)),
        ((100, 100, 50.0, 10**9, 60.2), Outlook(221, 60.2, True)),
        # A resumed launch: its speed is its own (20 steps in 10 s), from step 500 on.
        ((520, 20, 10.0, 10**9, 30.0), Outlook(580, 30.0, True)),
        # No time limit: the steps, however many.
        ((100, 100, 50.0, 10**9, None), Outlook(10**9, (10**9 - 100) / 2, False)),
        # The time is up: the run ends at this step, now.
        ((100, 100, 50.0, 10**9, 0.0), Outlook(100, 0.0, True)),
        # The last step: nothing left either way.
        ((1000, 1000, 50.0, 1000, 5.0), Outlook(1000, 0.0, False)),
    ],
)
def test_outlook_counts_to_the_limit_that_binds_first(args, expected):
    assert outlook(*args) == expected


def test_seconds_left_of_the_time_limit():
    with StopRequest(None) as unlimited:
        assert unlimited.seconds_left() is None
    with StopRequest(1.0) as minute:
        assert 59.0 < minute.seconds_left() <= 60.0
        minute.deadline -= 120
        assert minute.seconds_left() == 0.0 and minute.reason() == "--max_train_minutes 1"


def test_the_bar_counts_to_the_step_the_binding_limit_ends_at():
    bar = tqdm(total=10**9, desc="training", file=io.StringIO())
    run = SimpleNamespace(progress=bar, train_args=SimpleNamespace(max_train_minutes=30))
    show_progress(run, Outlook(end_step=5400, eta_s=1500.0, by_time=True))
    assert (bar.n, bar.total, bar.desc) == (1, 5400, "training (30 min limit)")
    show_progress(run, Outlook(end_step=10**9, eta_s=1e9, by_time=False))  # faster now: the steps bind
    assert (bar.n, bar.total, bar.desc) == (2, 10**9, "training")
    bar.close()
    run.progress = tqdm(total=10**9, disable=True)  # the other processes' bar
    show_progress(run, Outlook(end_step=5400, eta_s=1500.0, by_time=True))
