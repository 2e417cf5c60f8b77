"""Resume elsewhere: a run whose disk is lost resumes from the checkpoints it pushed to the Hub
(--push_checkpoints_to_hub, `hub:user/repo`) or logged to wandb (--wandb_log_checkpoints, `wandb:entity/project/id`)
and ends with the uninterrupted run's weights, continuing the same wandb run.

Everything runs in this process against the session's six-step run: the Hub is tests/hub_server.py (huggingface_hub
pointed at it), wandb is the real SDK offline. What reached "wandb" is read back from the offline run files, which
are what `wandb sync` uploads; the download side of wandb (`wandb.Api`) needs a server, so a stand-in serves the
artifacts those files record, from the staged copies they name."""

import json
import shutil
import struct
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import SIX_STEPS, assert_same_model, fails, in_process
from hub_server import FakeHub

import modules.training.loop
from modules.config import UserError
from modules.training.remote import fetch, parse_reference

REPO = "someone/preemptible"
TOKEN = "hf_TestToken0123456789abcdef"
PUSH = ["--push_checkpoints_to_hub", "--hub_model_id", REPO, "--hub_token", TOKEN, "--checkpoints_total_limit", "1"]
WANDB = ["--report_to", "all", "--wandb_log_checkpoints"]
# The resumed runs skip the held-out loss at their end (seconds; it does not touch the weights).
RESUME = [*SIX_STEPS, *WANDB, "--validation_steps", "0", "--resume_from_checkpoint"]


class MachineLost(Exception):
    """The machine went away (preempted): the process ends and its disk is gone."""


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The Hub stand-in, with huggingface_hub (in this process) pointed at it and no saved token; wandb stages its
    artifact copies in a folder of the module's own."""
    from huggingface_hub import constants

    tmp = tmp_path_factory.mktemp("hub-home")
    with FakeHub() as server, pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "ENDPOINT", server.url)
        mp.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
        mp.setattr(constants, "HF_HUB_OFFLINE", False)
        mp.setattr(constants, "HF_HUB_CACHE", str(tmp / "cache"))
        mp.setattr(constants, "HF_TOKEN_PATH", str(tmp / "no-token"))
        mp.delenv("HF_TOKEN", raising=False)
        mp.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        mp.setenv("WANDB_DATA_DIR", str(tmp / "wandb-data"))
        yield server


def wait_for(condition, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def interrupted(hub, tmp_path_factory):
    """The session's six-step run, pushing its checkpoints to the Hub and logging them to wandb, lost right after
    its checkpoint at step 3: wandb records a crash, the run dir is deleted. What is left: the Hub repo, and a copy
    of the offline wandb files (standing for the wandb server)."""
    import wandb

    tmp = tmp_path_factory.mktemp("elsewhere")
    out = tmp / "run"
    real = modules.training.loop.validate_if_due

    def lost_after_step_3(run, done):
        real(run, done)
        if done == 3:
            raise MachineLost

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(modules.training.loop, "validate_if_due", lost_after_step_3)
        with pytest.raises(MachineLost):
            in_process("train_cfm.py", "--output_dir", out, *SIX_STEPS, *WANDB, *PUSH)
    wait_for(lambda: [c["summary"] for c in commits(hub)] == ["Training checkpoint at step 3"], "the upload")
    wait_for(lambda: not (out / ".hub").exists() or not any((out / ".hub").iterdir()), "the staged copy's removal")
    wandb.finish(exit_code=1)
    records, _ = offline_run(out / "wandb")
    server = tmp / "wandb-server"
    shutil.copytree(out / "wandb", server)
    shutil.rmtree(out)
    return SimpleNamespace(out=out, tmp=tmp, server=server, records=records)


@pytest.fixture(scope="module")
def from_hub(interrupted):
    """The same command on a new disk, resumed from the Hub."""
    out = interrupted.out
    in_process("train_cfm.py", "--output_dir", out, *PUSH, *RESUME, f"hub:{REPO}")
    return out


@pytest.fixture(scope="module")
def from_wandb(interrupted):
    """The command on another new disk, resumed from the wandb run's checkpoint artifact."""
    import wandb

    out = interrupted.tmp / "run-from-wandb"
    reference = f"wandb:someone/train_cfm/{interrupted.records['run'][0].run_id}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(wandb, "Api", lambda *args, **kwargs: OfflineWandbApi(interrupted.server))
        in_process("train_cfm.py", "--output_dir", out, *RESUME, reference)
    return out


def commits(hub) -> list[dict]:
    return [c for c in hub.commits if c["repo"] == REPO]


def test_resumed_from_the_hub_after_the_disk_is_lost_it_equals_an_uninterrupted_run(hub, from_hub, tiny_cfm_run):
    assert_same_model(from_hub, tiny_cfm_run)
    downloaded = from_hub / "checkpoints" / "downloaded" / "hub-someone--preemptible"
    assert [p.name for p in downloaded.iterdir()] == ["checkpoint-3"]  # whole, no temporary folder left
    # One commit per checkpoint; the one adding checkpoint-6 deleted checkpoint-3 (--checkpoints_total_limit 1).
    first, last = commits(hub)
    assert first["deleted"] == [] and last["summary"] == "Training checkpoint at step 6"
    assert last["deleted"] == ["checkpoints/checkpoint-3/"]
    local = from_hub / "checkpoints" / "checkpoint-6"
    pushed = {name: data for name, data in hub.repos[REPO].items()}
    expected = {
        f"checkpoints/checkpoint-6/{p.relative_to(local).as_posix()}": p for p in local.rglob("*") if p.is_file()
    }
    assert sorted(pushed) == sorted(expected) and all(pushed[k] == p.read_bytes() for k, p in expected.items())
    assert "random_states_0.pkl" in {Path(k).name for k in expected} and "ema.safetensors" in {
        Path(k).name for k in expected
    }
    assert all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in hub.requests if REPO in r["path"])


def test_the_resumed_run_continues_the_wandb_run_with_increasing_steps(interrupted, from_hub):
    before, (after, run_file) = interrupted.records, offline_run(from_hub / "wandb")
    run_id = before["run"][0].run_id
    assert after["run"][0].run_id == run_id and run_file.parent.name.endswith(f"-{run_id}")
    state = json.loads((from_hub / "checkpoints" / "checkpoint-6" / "training_state.json").read_text())
    assert state["wandb_run"]["id"] == run_id
    steps = [h.step.num for h in before["history"]] + [h.step.num for h in after["history"]]
    assert steps == [1, 2, 3, 4, 5, 6]
    # Each part logged its checkpoints as versions of one artifact, the files as in the checkpoint folder.
    [logged_3], [logged_6] = before["artifact"], after["artifact"]
    for logged, step in ((logged_3, 3), (logged_6, 6)):
        assert (logged.name, logged.type) == (f"{run_id}-checkpoint", "checkpoint")
        assert sorted(logged.aliases) == ["latest", f"step-{step}"] and json.loads(logged.metadata) == {"step": step}
    local = from_hub / "checkpoints" / "checkpoint-6"
    assert sorted(e.path for e in logged_6.manifest.contents) == sorted(
        p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()
    )


def test_resumed_from_the_wandb_artifact_it_equals_an_uninterrupted_run(interrupted, from_wandb, tiny_cfm_run):
    assert_same_model(from_wandb, tiny_cfm_run)
    records, _ = offline_run(from_wandb / "wandb")
    assert records["run"][0].run_id == interrupted.records["run"][0].run_id
    assert (from_wandb / "checkpoints" / "downloaded").is_dir()


def test_bad_references_fail_in_one_line_and_write_nothing(hub, interrupted, from_hub, capsys, tmp_path):
    """Malformed references fail before anything opens; missing, private, gated, empty or foreign checkpoints fail
    naming the reference, and nothing half downloaded is left."""
    out = tmp_path / "run"
    for reference, needle in (
        ("hub:", "no repo"),
        (f"hub:{REPO}@", "no revision after '@'"),
        ("hub:not a repo!", "is not a Hub repo id"),
        ("wandb:someone/train_cfm", "wandb:entity/project/run_id"),
    ):
        fails(capsys, ["--output_dir", str(out), "--resume_from_checkpoint", reference], needle)
    fails(capsys, ["--output_dir", str(out), "--wandb_log_checkpoints"], "--wandb_log_checkpoints needs --report_to")
    hub.repos["someone/empty"] = {"checkpoints/checkpoint-9/ema.safetensors": b"half"}
    hub.repos["someone/private"] = dict(hub.repos[REPO])
    hub.private.add("someone/private")
    hub.repos["someone/gated"] = {}
    hub.gated.add("someone/gated")
    for reference, needle in (
        ("hub:someone/missing", "the repo 'someone/missing' is not a model repo on the Hub, or it is private"),
        ("hub:someone/private", "the repo 'someone/private' is not a model repo on the Hub, or it is private"),
        ("hub:someone/gated", "is gated"),
        ("hub:someone/empty", "holds no complete checkpoint (no checkpoints/checkpoint-<step>/training_state.json)"),
        (f"hub:{REPO}@nope", f"the repo '{REPO}' has no revision 'nope'"),
    ):
        with pytest.raises(UserError) as e:
            fetch(parse_reference(reference), out, None)
        message = str(e.value)
        assert message.startswith(f"--resume_from_checkpoint {reference}: ") and needle in message, message
        assert "\n" not in message
    assert not out.exists()
    assert fetch(parse_reference("hub:someone/private"), out, TOKEN).name == "checkpoint-6"  # with the token
    import wandb

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(wandb, "Api", lambda *args, **kwargs: OfflineWandbApi(tmp_path))
        with pytest.raises(UserError, match="could not get the checkpoint artifact 'someone/p/abc-checkpoint:latest'"):
            fetch(parse_reference("wandb:someone/p/abc"), out, None)
        foreign = SimpleNamespace(artifact=lambda name, type=None: SimpleNamespace(metadata={"epoch": 1}))
        mp.setattr(wandb, "Api", lambda *args, **kwargs: foreign)
        with pytest.raises(UserError, match="has no step in its metadata, so it is no checkpoint of ours"):
            fetch(parse_reference("wandb:someone/p/abc"), out, None)
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        with pytest.raises(UserError, match="HF_HUB_OFFLINE is set, so the Hub cannot be reached"):
            fetch(parse_reference(f"hub:{REPO}"), out, TOKEN)
    # A checkpoint of another model is refused once downloaded, as a local one is; the run dir stays empty.
    other = tmp_path / "other"
    argv = ["--output_dir", str(other), *SIX_STEPS, "--base_channels", "16", "--resume_from_checkpoint", f"hub:{REPO}"]
    fails(capsys, argv, "was made for a different model", "base_channels: checkpoint 8 vs now 16")
    assert [p.name for p in (other / "checkpoints" / "downloaded" / "hub-someone--preemptible").iterdir()] == [
        "checkpoint-6"
    ]
    assert not (other / "run_config.json").exists()


def test_a_pushed_folder_is_taken_at_once_whole_and_a_refused_push_only_warns(hub, tmp_path, capsys):
    from modules.artifacts.hub import HubPusher

    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    (checkpoint / "pytorch_model").mkdir(parents=True)  # a nested folder, as DeepSpeed writes
    (checkpoint / "pytorch_model" / "shard.pt").write_bytes(b"shard")
    (checkpoint / "training_state.json").write_text("{}")
    pusher = HubPusher(tmp_path / "run", "someone/nested", TOKEN)
    pusher.push_folder("checkpoint-2", checkpoint, "checkpoints/checkpoint-2", "Training checkpoint at step 2")
    shutil.rmtree(checkpoint)  # e.g. --checkpoints_total_limit, before the upload: what was taken is uploaded
    pusher.finish()
    assert hub.repos["someone/nested"] == {
        "checkpoints/checkpoint-2/pytorch_model/shard.pt": b"shard",
        "checkpoints/checkpoint-2/training_state.json": b"{}",
    }
    assert not (tmp_path / "run" / ".hub").exists()
    checkpoint.mkdir()
    (checkpoint / "training_state.json").write_text("{}")
    hub.gated.add("someone/refused")
    pusher = HubPusher(tmp_path / "run", "someone/refused", TOKEN)
    pusher.push_folder("checkpoint-2", checkpoint, "checkpoints/checkpoint-2", "Training checkpoint at step 2")
    pusher.finish()
    err = capsys.readouterr().err
    assert "warning: could not push checkpoint-2 to the Hub repo 'someone/refused' (GatedRepoError" in err
    assert TOKEN not in err and not hub.repos["someone/refused"]


# Reading the offline run files: a LevelDB-style log (32 KiB blocks of records, each with a 7-byte header) after a
# 7-byte W&B header, each record a wandb_internal_pb2.Record.
BLOCK, HEADER = 32768, 7


def wandb_records(path: Path) -> dict[str, list]:
    """The records of an offline .wandb file by kind (run, history, artifact, ...), in order."""
    from wandb.proto import wandb_internal_pb2

    data, found, pos, parts = path.read_bytes(), {}, HEADER, b""
    assert data[:4] == b":W&B"
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0:
            break
        parts, pos = parts + data[pos + HEADER : pos + HEADER + length], pos + HEADER + length
        if kind in (1, 4):  # a full record, or the last part of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            found.setdefault(record.WhichOneof("record_type"), []).append(
                getattr(record, record.WhichOneof("record_type"))
            )
            parts = b""
    return found


def offline_run(wandb_dir: Path) -> tuple[dict[str, list], Path]:
    """The records and the file of the one offline run under `wandb_dir`, once wandb has written them all (its exit
    record: `finish` can return before its writer has flushed the file)."""
    [path] = wandb_dir.glob("offline-run-*/run-*.wandb")
    wait_for(lambda: "exit" in wandb_records(path), f"wandb to write {path}", timeout=60)
    return wandb_records(path), path


class OfflineWandbApi:
    """`wandb.Api` as far as a resume uses it: `artifact("entity/project/name:latest", type)` answers the newest
    version of `name` that the offline run files under `root` record in `project` (the entity of an offline run is
    unknown), with its metadata, and downloads the staged copies its manifest names."""

    def __init__(self, root: Path):
        self.root = root

    def artifact(self, name: str, type: str | None = None):
        import wandb

        path, _, alias = name.partition(":")
        _, project, artifact = path.split("/")
        found = [
            a
            for f in sorted(self.root.glob("offline-run-*/run-*.wandb"))
            for a in wandb_records(f).get("artifact", [])
            if a.name == artifact and a.project == project and alias in a.aliases and type in (None, a.type)
        ]
        if not found:
            raise wandb.errors.CommError(f"artifact '{name}' not found")
        return OfflineArtifact(found[-1])


class OfflineArtifact:
    def __init__(self, record):
        self.record, self.metadata = record, json.loads(record.metadata or "{}")

    def download(self, root: str) -> str:
        for entry in self.record.manifest.contents:
            (Path(root) / entry.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(entry.local_path, Path(root) / entry.path)
        return root
