"""Checkpoints kept elsewhere, the parts that need no run: references, which Hub folders are complete and which a
new checkpoint's commit deletes, and how a continued wandb run is started and logged to."""

import json
from types import SimpleNamespace

import pytest

from modules.config import UserError
from modules.training.remote import RemoteCheckpoint, complete_hub_checkpoints, parse_reference, stale_hub_folders
from modules.training.tracking import MetricsLog, wandb_init_kwargs


def test_references_parse_and_anything_else_is_local():
    assert parse_reference("hub:me/run") == RemoteCheckpoint("hub", "me/run")
    assert parse_reference("hub:me/run@refs/pr/1") == RemoteCheckpoint("hub", "me/run", "refs/pr/1")
    assert str(parse_reference("hub:me/run@v1")) == "hub:me/run@v1"
    assert parse_reference("wandb:team/train_cfm/abc123") == RemoteCheckpoint("wandb", "team/train_cfm/abc123")
    for local in (None, "", "latest", "runs/x/checkpoints/checkpoint-3", "C:/runs/x", "hubs:x"):
        assert parse_reference(local) is None
    for bad, needle in (
        ("hub:", "no repo"),
        ("hub:@main", "no repo"),
        ("hub:me/run@", "no revision after '@'"),
        ("hub:me/run/extra", "is not a Hub repo id"),
        ("wandb:team/abc", "wandb:entity/project/run_id"),
        ("wandb:team//abc", "wandb:entity/project/run_id"),
    ):
        with pytest.raises(UserError, match=f"^--resume_from_checkpoint {bad}: .*{needle}"):
            parse_reference(bad)


def test_a_hub_checkpoint_is_complete_with_its_training_state():
    files = [
        "README.md",
        "checkpoints/checkpoint-3/model.safetensors",
        "checkpoints/checkpoint-3/training_state.json",
        "checkpoints/checkpoint-6/model.safetensors",  # no training state: not complete
        "checkpoints/checkpoint-9/pytorch_model/training_state.json",  # not at the folder's top
        "other/checkpoint-12/training_state.json",
    ]
    assert complete_hub_checkpoints(files) == {3: "checkpoints/checkpoint-3"}


def test_the_commit_of_a_checkpoint_replaces_its_step_and_keeps_the_newest():
    files = [f"checkpoints/checkpoint-{s}/{name}" for s in (2, 4, 6) for name in ("a.bin", "training_state.json")]
    assert stale_hub_folders(files, 8, None) == []
    assert stale_hub_folders(files, 8, 2) == ["checkpoints/checkpoint-2/", "checkpoints/checkpoint-4/"]
    assert stale_hub_folders(files, 8, 1) == [f"checkpoints/checkpoint-{s}/" for s in (2, 4, 6)]
    assert stale_hub_folders(files, 4, None) == ["checkpoints/checkpoint-4/"]  # an earlier upload of the same step
    assert stale_hub_folders(files, 3, 2) == ["checkpoints/checkpoint-2/"]  # by step, as locally: 4 and 6 stay
    assert stale_hub_folders([], 5, 1) == []


def test_a_resumed_run_continues_its_wandb_run_and_logs_only_steps_it_does_not_hold(tmp_path):
    assert wandb_init_kwargs(tmp_path, None) == {"dir": str(tmp_path)}
    continued = {"id": "abc123", "entity": "team", "project": "train_cfm"}
    assert wandb_init_kwargs(tmp_path, continued) == {
        "dir": str(tmp_path),
        "id": "abc123",
        "resume": "allow",
        "entity": "team",
    }
    assert "entity" not in wandb_init_kwargs(tmp_path, {**continued, "entity": None})  # an offline run has none
    sent = []
    wandb = SimpleNamespace(name="wandb", tracker=SimpleNamespace(starting_step=5))  # the server held steps 0-4
    accelerator = SimpleNamespace(is_main_process=True, trackers=[wandb], log=lambda values, step: sent.append(step))
    log = MetricsLog(accelerator, tmp_path / "metrics.jsonl")
    for step in (4, 5, 6):
        log.log(step, {"loss": 1.0})
    assert sent == [5, 6]
    assert [json.loads(line)["step"] for line in log.path.read_text().splitlines()] == [4, 5, 6]
