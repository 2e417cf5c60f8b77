"""Checkpoints kept off the machine, for runs that outlive their disks (preemptible machines): pushed to the run's
Hub repo (--push_checkpoints_to_hub) or logged as wandb artifacts (--wandb_log_checkpoints), and downloaded again by
`--resume_from_checkpoint hub:user/repo[@revision]` or `wandb:entity/project/run_id`.

On the Hub a checkpoint is the folder `checkpoints/checkpoint-<step>/`, laid out as in the run dir and uploaded in one
commit, so a folder there is whole as a renamed local one is; the same commit deletes the folders beyond
--checkpoints_total_limit. In wandb it is a version of the artifact `<run id>-checkpoint` (type "checkpoint", aliases
latest and step-<step>, the step in its metadata). A download goes to `<output_dir>/checkpoints/downloaded/`, under a
temporary name renamed once whole; complete means holding training_state.json, as for a local checkpoint.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from modules.config import UserError, warn
from modules.records import describe_error, hub_lookup_error
from modules.training.checkpoint import STATE_FILE, checkpoint_step, checkpoints_dir
from modules.training.run import Run
from modules.training.tracking import wandb_run

HUB, WANDB = "hub", "wandb"
ARTIFACT_TYPE = "checkpoint"
HUB_FOLDER = "checkpoints"  # in the repo, as in the run dir: checkpoints/checkpoint-<step>/
DOWNLOADED = "downloaded"  # under the run's checkpoints/


@dataclass(frozen=True)
class RemoteCheckpoint:
    """Where to resume from: a Hub repo (`path` user/repo, at `revision`) or a wandb run (entity/project/run_id)."""

    kind: str
    path: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}" + (f"@{self.revision}" if self.revision else "")


def parse_reference(text: str | None) -> RemoteCheckpoint | None:
    """`hub:user/repo[@revision]` or `wandb:entity/project/run_id` parsed; None for anything else ('latest', a
    local path). A malformed reference is a UserError."""
    kind, colon, rest = (text or "").partition(":")
    if not colon or kind not in (HUB, WANDB):
        return None
    flag = f"--resume_from_checkpoint {text}"
    if kind == WANDB:
        if len(parts := rest.split("/")) != 3 or not all(parts):
            raise UserError(f"{flag}: give the wandb run as wandb:entity/project/run_id")
        return RemoteCheckpoint(WANDB, rest)
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo, at, revision = rest.partition("@")
    if not repo:
        raise UserError(f"{flag}: no repo; give hub:user/repo or hub:user/repo@revision")
    if at and not revision.strip():
        raise UserError(f"{flag}: no revision after '@'; give hub:user/repo@revision (a branch, tag or commit)")
    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise UserError(f"{flag}: {repo!r} is not a Hub repo id ({str(e).splitlines()[0]})") from None
    return RemoteCheckpoint(HUB, repo, revision or None)


def fetch(reference: RemoteCheckpoint, out: Path, token: str | None) -> Path:
    """The newest complete checkpoint of `reference`, downloaded whole into the run dir (or a UserError)."""
    if reference.kind == HUB:
        sha, step, folder = _hub_latest(reference, token)
        return _download(reference, out, step, token, lambda tmp: _hub_download(reference, sha, folder, tmp, token))
    artifact, step = _wandb_latest(reference)
    return _download(reference, out, step, None, lambda tmp: Path(artifact.download(root=str(tmp / "files"))))


def _download(reference, out: Path, step: int, token, download: Callable[[Path], Path]) -> Path:
    """`download(tmp)` fills a temporary folder and returns the checkpoint in it, which is renamed into place."""
    root = checkpoints_dir(out) / DOWNLOADED / f"{reference.kind}-{reference.path.replace('/', '--')}"
    final, partial = root / f"checkpoint-{step}", root / f".checkpoint-{step}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # left by a download that was killed
    try:
        partial.mkdir(parents=True)
        folder = download(partial)
        if not (folder / STATE_FILE).is_file():
            raise UserError(f"--resume_from_checkpoint {reference}: checkpoint-{step} holds no {STATE_FILE}")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(folder, final)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the network, a full disk: the user's to fix
        raise UserError(
            f"--resume_from_checkpoint {reference}: could not download checkpoint-{step} ({describe_error(e, token)})"
        ) from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    print(f"downloaded checkpoint-{step} of {reference} to {final}", flush=True)
    return final


def hub_step(path_in_repo: str) -> int | None:
    """The step of a repo file in `checkpoints/checkpoint-<step>/`, else None."""
    parts = path_in_repo.split("/")
    return checkpoint_step(parts[1]) if len(parts) > 2 and parts[0] == HUB_FOLDER else None


def complete_hub_checkpoints(files: list[str]) -> dict[int, str]:
    """step -> folder in the repo of the complete checkpoints (those holding training_state.json)."""
    return {
        s: f.rsplit("/", 1)[0]
        for f in files
        if (s := hub_step(f)) is not None and f.count("/") == 2 and f.endswith(f"/{STATE_FILE}")
    }


def _hub_latest(reference: RemoteCheckpoint, token: str | None) -> tuple[str, int, str]:
    """(the commit, the newest complete checkpoint's step and folder) of a `hub:` reference."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled

    flag = f"--resume_from_checkpoint {reference}"
    try:
        info = HfApi(token=token).model_info(reference.path, revision=reference.revision or "main")
    except Exception as e:  # noqa: BLE001 - the network, a bad token: the user's to fix
        missing = (
            "is not a model repo on the Hub, or it is private and no token gives access (pass --hub_token, set "
            "HF_TOKEN or run `hf auth login`)"
        )
        if known := hub_lookup_error(e, f"{flag}: the repo {reference.path!r}", reference.revision, missing):
            raise known from None
        if isinstance(e, OfflineModeIsEnabled):
            raise UserError(f"{flag}: HF_HUB_OFFLINE is set, so the Hub cannot be reached") from None
        raise UserError(f"{flag}: could not read the repo ({describe_error(e, token)})") from None
    found = complete_hub_checkpoints([s.rfilename for s in info.siblings or []])
    if not found:
        raise UserError(
            f"{flag}: the repo holds no complete checkpoint (no {HUB_FOLDER}/checkpoint-<step>/{STATE_FILE}); "
            "push them with --push_checkpoints_to_hub"
        )
    step = max(found)
    return info.sha, step, found[step]


def _hub_download(reference: RemoteCheckpoint, sha: str, folder: str, tmp: Path, token: str | None) -> Path:
    from huggingface_hub import snapshot_download

    snapshot_download(reference.path, revision=sha, allow_patterns=[f"{folder}/*"], local_dir=tmp, token=token)
    return tmp / folder


def artifact_name(run_id: str) -> str:
    return f"{run_id}-checkpoint"


def _wandb_latest(reference: RemoteCheckpoint):
    """(the newest checkpoint artifact of a `wandb:` reference's run, its step)."""
    flag = f"--resume_from_checkpoint {reference}"
    try:
        import wandb
    except ImportError:
        raise UserError(f"{flag} needs wandb: pip install wandb") from None
    entity, project, run_id = reference.path.split("/")
    name = f"{entity}/{project}/{artifact_name(run_id)}:latest"
    try:
        artifact = wandb.Api().artifact(name, type=ARTIFACT_TYPE)
    except Exception as e:  # noqa: BLE001 - no such run or artifact, no login, no network
        raise UserError(
            f"{flag}: could not get the checkpoint artifact {name!r} from wandb ({describe_error(e)}); a run logs "
            "them with --wandb_log_checkpoints"
        ) from None
    step = (artifact.metadata or {}).get("step")
    if not isinstance(step, int):
        raise UserError(f"{flag}: the artifact {name!r} has no step in its metadata, so it is no checkpoint of ours")
    return artifact, step


def share_checkpoint(run: Run, path: Path, step: int):
    """A complete checkpoint to the run's Hub repo (--push_checkpoints_to_hub) and to its wandb run as an artifact
    (--wandb_log_checkpoints), both in the background. Main process only; failures warn and training goes on."""
    train_args = run.train_args
    if train_args.push_checkpoints_to_hub and run.pusher is not None:
        limit = train_args.checkpoints_total_limit
        message = f"Training checkpoint at step {step}"
        stale = functools.partial(stale_hub_folders, step=step, total_limit=limit)
        run.pusher.push_folder(path.name, path, f"{HUB_FOLDER}/{path.name}", message, stale)
    tracker = wandb_run(run.accelerator) if train_args.wandb_log_checkpoints else None
    if tracker is not None:
        try:
            log_artifact(tracker, path, step)
        except Exception as e:  # noqa: BLE001 - a full staging disk, a wandb error: the run matters more
            warn(f"could not log checkpoint-{step} to wandb ({describe_error(e)}); training goes on")


def stale_hub_folders(files: list[str], step: int, total_limit: int | None) -> list[str]:
    """The checkpoint folders that the commit adding checkpoint-`step` deletes: an earlier upload of the same step
    (replaced whole) and, with --checkpoints_total_limit, those beyond the newest."""
    folders = {s: f.split("/")[1] for f in files if (s := hub_step(f)) is not None}
    kept = sorted({*folders, step})[-total_limit:] if total_limit else [*folders, step]
    return [f"{HUB_FOLDER}/{name}/" for s, name in sorted(folders.items()) if s == step or s not in kept]


def log_artifact(tracker, path: Path, step: int):
    """Log the checkpoint at `path` to the wandb run `tracker` (wandb copies it to its staging area first)."""
    import wandb

    artifact = wandb.Artifact(artifact_name(tracker.id), type=ARTIFACT_TYPE, metadata={"step": step})
    artifact.add_dir(str(path))
    tracker.log_artifact(artifact, aliases=["latest", f"step-{step}"])
