"""The Hugging Face Hub: push a run's model while training goes on, download a model by id, keep tokens out of files.

A push (one commit at each checkpoint and one at the end of training) uploads a model folder that `sample.py --model`
and `--init_from` read, whether it is local or a Hub id:

    config.json, diffusion_pytorch_model.safetensors   the EMA weights (save_pretrained, safetensors)
    objective.json                                     how it trained and samples: sampler, classes, latents, text
    README.md                                          the model card: YAML metadata, command, metrics, usage
    run_config.json                                    the training command (token hidden) and settings
    sample.png                                         the latest sample grid
    vae/, text_encoder/                                a local VAE or CLIP text encoder the model needs (a Hub one
                                                       is named by its id instead)

With --push_checkpoints_to_hub the training checkpoints go to the same repo too, each folder in one commit
(`HubPusher.push_folder`; modules/training/remote.py says which folders).

Uploads run in a background thread, so training never waits for the network; a failed one (no token, bad repo id,
no network) prints a warning with the command that pushes the finished run later:

    python -m modules.artifacts.hub runs/my_run --hub_model_id me/my-model

The token (--hub_token, else $HF_TOKEN or the saved `hf auth login`) is only ever sent to the Hub: commands written
to disk or to cards show it as ***, and error messages have it replaced.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

import yaml
from safetensors import safe_open

from modules.artifacts.model_folder import WEIGHT_SUFFIXES
from modules.config import UserError, cli_entry, warn
from modules.records import OBJECTIVE_FILE, RUN_CONFIG_FILE, describe_error

STAGING_DIR = ".hub"  # inside the run dir: snapshots waiting for their upload
SAMPLE_FILE = "sample.png"


def push_later(run_dir: str | Path, repo_id: str | None) -> str:
    return shlex.join(
        ["python", "-m", "modules.artifacts.hub", str(run_dir), "--hub_model_id", repo_id or "<user>/<name>"]
    )


def check_push(repo_id: str | None, token: str | None, run_dir: str | Path) -> str | None:
    """Why a push cannot work (malformed repo id, no token), or None. Checked before training; never raises."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if repo_id is not None:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as e:
            return f"--hub_model_id {repo_id!r} is not a valid repo id ({str(e).splitlines()[0]})"
    if not (token or get_token()):
        return "no Hub token: pass --hub_token, set HF_TOKEN, or run `hf auth login`"
    return None


def _copy_files(src: Path, dst: Path, recursive: bool):
    """Copy the files of `src` (all levels with `recursive`) except hidden ones and non-safetensors weights."""
    for path in sorted(src.rglob("*") if recursive else src.iterdir()):
        rel = path.relative_to(src)
        if not path.is_file() or any(p.startswith(".") for p in rel.parts) or path.suffix in WEIGHT_SUFFIXES:
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dst / rel)


def bundle_components(record: dict, folder: Path) -> dict:
    """Copy a local VAE and a local CLIP text encoder that the model needs into `folder` (vae/, text_encoder/) and
    return the record naming them relatively; Hub ids, 'minilm' and the model's own encoder stay as they are."""
    record = json.loads(json.dumps(record))
    vae = record.get("latent", {}).get("vae")
    if vae and Path(vae["source"]).is_dir():
        src = Path(vae["source"])
        src = src / "vae" if not (src / "config.json").is_file() and (src / "vae").is_dir() else src
        (folder / "vae").mkdir(parents=True, exist_ok=True)
        _copy_files(src, folder / "vae", recursive=False)  # a run dir also holds checkpoints: top level only
        vae["source"] = "vae"
    text = record.get("text_encoder")
    if text and text.get("kind") == "clip" and Path(text["source"]).is_dir():
        _copy_files(Path(text["source"]), folder / "text_encoder", recursive=True)
        text["source"] = "text_encoder"
    return record


def _hub_dataset(run_config: dict) -> str | None:
    """The training data's Hub id, when it is one (not a local path or the built-in Fashion-MNIST)."""
    name = (run_config.get("config") or {}).get("dataset_name")
    if not name or Path(name).expanduser().exists() or name.count("/") != 1:
        return "zalando-datasets/fashion_mnist" if name == "fashion_mnist" else None
    return name


def model_card(folder: Path, repo_id: str, run_config: dict, fid: dict | None) -> str:
    """README.md for the model in `folder` (its config.json and objective.json) trained by `run_config`."""
    config = json.loads((folder / "config.json").read_text())
    record = json.loads((folder / "objective.json").read_text())
    latent, text = record.get("latent"), record.get("text_encoder")
    meta, condition, objective = _card_metadata(config, record, run_config)
    size, channels = config.get("sample_size"), config.get("in_channels")
    params = _parameters(folder / "diffusion_pytorch_model.safetensors")
    what = f"{params / 1e6:.2f}M-parameter {config.get('_class_name')} ({condition}, {objective})"
    if latent:
        vae, pixels = latent["vae"]["source"], latent["image_resolution"]
        space = f"{channels}x{size}x{size} latents of the VAE `{vae}` ({pixels}px images)"
    else:
        space = f"{size}x{size} images with {channels} channel(s)"
    rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in _card_metrics(record, fid) if v is not None)
    usage = f"python sample.py --model {repo_id} --num_images 16 --output grid.png"
    if text:
        usage += ' --prompt "a photo of a bag" --guidance_scale 4'
    elif num_classes(config):
        usage += " --class_labels 0,1,2,3"
    command = run_config.get("command")
    command = command if isinstance(command, str) else shlex.join(["python", *map(str, command or [])])
    image = f"\n![samples]({SAMPLE_FILE})\n" if (folder / SAMPLE_FILE).is_file() else ""
    return f"""---
{yaml.safe_dump(meta, sort_keys=False).strip()}
---

# {repo_id.split("/")[-1]}

A {what} that generates {space}.
{image}
## Usage

With this repository's training scripts (`sample.py` downloads the model, and any VAE or text encoder it names):

```bash
{usage}
```

## Training

```bash
{command}
```

| metric | value |
|---|---|
{rows}

`objective.json` holds the sampler defaults and every training setting of the objective; `config.json` the network's.
"""


def num_classes(config: dict) -> int:
    """A network config's number of classes: ours name it num_classes, diffusers' DiTTransformer2DModel
    num_embeds_ada_norm and UNet2DModel num_class_embeds."""
    return config.get("num_classes") or config.get("num_embeds_ada_norm") or config.get("num_class_embeds") or 0


def _card_metadata(config: dict, record: dict, run_config: dict) -> tuple[dict, str, str]:
    """(the card's YAML metadata, the kind of condition, the objective's name) of a model."""
    latent, text = record.get("latent"), record.get("text_encoder")
    kind = {"UNetModel": "unet", "DiTModel": "dit"}.get(config.get("_class_name"), config.get("_class_name"))
    objective = {"flow": "flow-matching", "ddpm": "ddpm"}.get(record["objective"], record["objective"])
    if text:
        condition, pipeline_tag = "text-to-image", "text-to-image"
    elif num_classes(config):
        condition, pipeline_tag = "class-conditional", "unconditional-image-generation"
    else:
        condition, pipeline_tag = "unconditional", "unconditional-image-generation"
    tags = ["diffusion", objective, condition, kind, *(["latent-diffusion"] if latent else [])]
    base = [c["source"] for c in (latent and latent["vae"], text) if c and c.get("source", "").count("/") == 1]
    base = [b for b in base if not Path(b).is_absolute()]
    meta = {"library_name": "pytorch", "pipeline_tag": pipeline_tag, "tags": tags}
    dataset = _hub_dataset(run_config)
    if dataset:
        meta["datasets"] = [dataset]
    if base:
        meta["base_model"] = base
    return meta, condition, objective


def _parameters(weights: Path) -> int:
    """The number of parameters in a safetensors file, counted from its header without loading the weights."""
    if not weights.is_file():
        return 0
    with safe_open(str(weights), "pt") as f:
        return sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())


def _card_metrics(record: dict, fid: dict | None) -> list[tuple[str, object]]:
    """The rows of the card's metric table: training progress, then the final metrics and what they measured."""
    metrics = [
        ("steps", record.get("steps")),
        ("images seen", record.get("images_seen")),
        ("training hours", record.get("train_hours")),
    ]
    if fid:
        metrics += [
            (k.upper() if k in ("fid", "kid") else k, v)
            for k, v in fid.items()
            if k not in ("step", "reference", "num_samples", "reference_samples")
        ]
        metrics.append(
            (
                "evaluated on",
                f"{fid.get('num_samples')} samples vs {fid.get('reference_samples')} images at step {fid.get('step')}",
            )
        )
    return metrics


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def stage(folder: Path, write_model, repo_id: str, run_dir: Path, sample_grid: Path | None) -> Path:
    """Write the model folder to upload: `write_model(folder)` (save_model), bundled local components, the latest
    sample grid and the model card (from run_config.json and fid.json in `run_dir`)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    write_model(folder)
    record = json.loads((folder / "objective.json").read_text())
    (folder / "objective.json").write_text(json.dumps(bundle_components(record, folder), indent=2))
    if sample_grid is not None and sample_grid.is_file():
        shutil.copy2(sample_grid, folder / SAMPLE_FILE)
    if (run_dir / RUN_CONFIG_FILE).is_file():  # the training data and settings, for sample.py --compute_fid
        shutil.copy2(run_dir / RUN_CONFIG_FILE, folder / RUN_CONFIG_FILE)
    run_config = _read_json(run_dir / RUN_CONFIG_FILE) or {}
    (folder / "README.md").write_text(model_card(folder, repo_id, run_config, _read_json(run_dir / "fid.json")))
    return folder


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def latest_grid(run_dir: Path) -> Path | None:
    grids = sorted(p for p in (run_dir / "samples").glob("step_*.png") if p.stem[len("step_") :].isdigit())
    return grids[-1] if grids else None  # not the denoising figures next to it


class HubPusher:
    """Pushes snapshots of a run's model to a Hub model repo from a background thread (one upload at a time, in
    order). Nothing it does raises into training: failures are printed as warnings with the command to push later."""

    def __init__(self, run_dir: str | Path, repo_id: str | None, token: str | None, private: bool = False):
        from huggingface_hub import HfApi

        self.run_dir, self.token = Path(run_dir), token
        self.repo_id = repo_id or self.run_dir.resolve().name
        self.api = HfApi(token=token)  # None: $HF_TOKEN or the saved login
        self.staging = self.run_dir / STAGING_DIR
        shutil.rmtree(self.staging, ignore_errors=True)  # left by a killed run
        self.futures, self.failures, self.pushed = [], 0, None
        self.repo = self.api.run_as_future(self.api.create_repo, self.repo_id, private=private, exist_ok=True)

    def push(self, step: int, write_model, final: bool = False):
        """Stage the model now (`write_model(folder)` writes it) and upload it in the background."""
        try:
            folder = stage(
                self.staging / f"step-{step:07d}", write_model, self.repo_id, self.run_dir, latest_grid(self.run_dir)
            )
        except Exception as e:  # noqa: BLE001 - e.g. a full disk: the run and its checkpoints matter more
            self._failed(f"step {step}", e)
            return
        message = f"{'Final model' if final else 'Checkpoint'} at step {step}"
        self.futures.append(self.api.run_as_future(self._upload, folder, message, f"step {step}"))

    def _upload(self, folder: Path, message: str, label: str):
        try:
            repo_id = self.repo.result().repo_id
            self.api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=message)
            self.pushed = (repo_id, label)
        except Exception as e:  # noqa: BLE001 - no network, no rights, a bad id: warn and go on
            self._failed(label, e)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def push_folder(self, label: str, source: Path, path_in_repo: str, message: str, stale=None):
        """Upload `source` as it is now (hard links taken at once, so later changes in the run dir do not reach it)
        to `path_in_repo`, in the background and in one commit, which also deletes the repo paths that
        `stale(files in the repo)` names (a folder ends with '/'), first: the folder in the repo is whole or absent."""
        folder = self.staging / source.name
        try:
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(source, folder, copy_function=_link_or_copy)
        except Exception as e:  # noqa: BLE001 - e.g. a full disk: the run and its checkpoints matter more
            shutil.rmtree(folder, ignore_errors=True)
            self._failed(label, e)
            return
        self.futures.append(
            self.api.run_as_future(self._commit_folder, label, folder, path_in_repo.rstrip("/"), message, stale)
        )

    def _commit_folder(self, label: str, folder: Path, path_in_repo: str, message: str, stale):
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        try:
            repo_id = self.repo.result().repo_id
            deletes = [CommitOperationDelete(p) for p in stale(self.api.list_repo_files(repo_id))] if stale else []
            adds = [
                CommitOperationAdd(f"{path_in_repo}/{p.relative_to(folder).as_posix()}", str(p))
                for p in sorted(folder.rglob("*"))
                if p.is_file()
            ]
            self.api.create_commit(repo_id, deletes + adds, commit_message=message)
            self.pushed = (repo_id, label)
        except Exception as e:  # noqa: BLE001 - no network, no rights, a bad id: warn and go on
            self._failed(label, e)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _failed(self, label: str, error: Exception):
        self.failures += 1
        if self.failures == 1:
            warn(
                f"could not push {label} to the Hub repo {self.repo_id!r} ({describe_error(error, self.token)}); "
                f"training goes on and the checkpoints stay in {self.run_dir}; once it has finished, push it with "
                f"`{push_later(self.run_dir, self.repo_id)}`"
            )
        else:
            warn(f"could not push {label} to the Hub either ({describe_error(error, self.token)})")

    def finish(self):
        """Wait for the uploads still running, then say where the model is."""
        for future in self.futures:
            future.result()
        shutil.rmtree(self.staging, ignore_errors=True)
        if self.pushed:
            from huggingface_hub import constants

            print(f"pushed {self.pushed[1]} to {constants.ENDPOINT}/{self.pushed[0]}", flush=True)


def _link_or_copy(src: str, dst: str):
    """A hard link (instant; the run's files are never changed in place once written), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def push_run(run_dir: str | Path, repo_id: str | None, token: str | None = None, private: bool = False) -> str:
    """Push the final model of a finished run (its output_dir) now; returns the repo id. Raises on failure."""
    from huggingface_hub import HfApi

    run_dir = Path(run_dir)
    files = ("config.json", "diffusion_pytorch_model.safetensors", OBJECTIVE_FILE)
    missing = [f for f in files if not (run_dir / f).is_file()]
    if missing:
        raise UserError(f"{run_dir} holds no finished model (no {', '.join(missing)}); let training finish first")

    def copy_model(folder: Path):
        for name in files:
            shutil.copy2(run_dir / name, folder / name)

    repo_id = repo_id or run_dir.resolve().name
    folder = stage(run_dir / STAGING_DIR / "manual", copy_model, repo_id, run_dir, latest_grid(run_dir))
    try:
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload model")
    except Exception as e:  # noqa: BLE001 - one line, token hidden
        raise UserError(f"could not push {run_dir} to {repo_id!r} ({describe_error(e, token)})") from None
    finally:
        shutil.rmtree(run_dir / STAGING_DIR, ignore_errors=True)
    return repo_id


@cli_entry
def main(argv=None):
    parser = argparse.ArgumentParser(description="Push a finished training run's model to the Hub.")
    parser.add_argument("run_dir", help="The run's output_dir.")
    parser.add_argument("--hub_model_id", default=None, help="user/name. Default: the run directory's name.")
    parser.add_argument("--hub_token", default=None, help="Default: $HF_TOKEN or the saved login.")
    parser.add_argument("--hub_private_repo", action="store_true", help="Create the repo as private.")
    args = parser.parse_args(argv)
    repo_id = push_run(args.run_dir, args.hub_model_id, args.hub_token, args.hub_private_repo)
    from huggingface_hub import constants

    print(f"pushed {args.run_dir} to {constants.ENDPOINT}/{repo_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
