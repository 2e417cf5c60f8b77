"""Datasets written as parquet shards by one or many processes: resumable, and complete only once marked so.

The layout, which `datasets.load_dataset` reads (locally or from the Hub):

    data/train-00000-of-00003.parquet  rows in source order; each shard is written under a temporary name and
                                       renamed once whole, so a file with its final name is always complete
    README.md                          dataset card, its YAML header pointing `datasets` at data/*.parquet
    <metadata>.json                    written last, once every shard is whole: marks the dataset complete
    .<args file>.json                  what the shards were made with: a rerun with other arguments is refused

Shard k is written by process k % num_processes, so the result does not depend on the number of processes; a rerun
with the same arguments skips the shards that are already whole.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from modules.config import UserError, help_field, warn
from modules.files import write_text_atomically
from modules.records import command_line, describe_error


@dataclass
class ShardedOutputArguments:
    output_dir: str = help_field("Directory of the dataset written; rerunning with the same arguments resumes there.")
    shard_size: int = help_field(
        "Images per parquet shard (the unit of work, of resume and of upload).", default=10000
    )
    overwrite: bool = help_field(
        "Replace a dataset in --output_dir that was made with other arguments.", default=False
    )
    push_to_hub: bool = help_field("Upload the finished dataset to the Hub as a dataset repo.", default=False)
    hub_dataset_id: str | None = help_field(
        "Hub dataset repo to push to. Default: the name of --output_dir.", default=None
    )
    hub_private_repo: bool = help_field("Create the Hub repo as private.", default=False)
    hub_token: str | None = help_field(
        "Hub token (never written anywhere). Default: $HF_TOKEN or the saved login.", default=None
    )


@dataclass(frozen=True)
class ShardedFormat:
    """What one script writes: named in its messages, its recorded command and its file names."""

    script: str  # e.g. "encode_latents.py"
    what: str  # what the shards hold, e.g. "latents"
    metadata_file: str  # written last: marks the dataset complete
    args_file: str  # hidden: what the shards were made with


def process_state():
    """This process's place among those `accelerate launch` started (a single process without it)."""
    from accelerate import PartialState

    # Several processes without GPUs (`accelerate launch --multi_gpu` on CPUs) talk over gloo.
    return PartialState(cpu=not torch.cuda.is_available() and "LOCAL_RANK" in os.environ)


def shard_name(k: int, n: int) -> str:
    return f"data/train-{k:05d}-of-{n:05d}.parquet"


def shard_ranges(num_rows: int, shard_size: int) -> list[range]:
    """Row indices of each shard: consecutive runs of `shard_size` (the last may be shorter)."""
    return [range(a, min(a + shard_size, num_rows)) for a in range(0, num_rows, shard_size)]


def shard_is_complete(path: Path, num_rows: int) -> bool:
    """Whether the shard at `path` exists whole, with the expected number of rows."""
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(path).num_rows == num_rows
    except (OSError, ValueError):  # absent, or not parquet
        return False


def write_table(path: Path, table):
    """Write a pyarrow table as parquet under a temporary name, renamed once whole and on disk.

    The temporary name is fixed (`.<name>.partial`, unlike modules.files' unique ones): one process owns each
    shard, and a rerun after a kill overwrites the partial file it left instead of leaving it behind."""
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def card_header(pretty_name: str, tags: list[str], paths: list[Path]) -> str:
    """The YAML header of a dataset card: `configs` lets `datasets.load_dataset` find the shards at `paths`, and
    `dataset_info` (rows and sizes) lets it check the row count. The sizes also key `datasets`' cache of a local
    directory, which ignores the files' dates: without them, a directory written again reads as the old data."""
    import pyarrow.parquet as pq
    import yaml

    metadata = [pq.read_metadata(p) for p in paths]
    num_bytes = sum(m.row_group(i).total_byte_size for m in metadata for i in range(m.num_row_groups))
    header = {
        "pretty_name": pretty_name,
        "tags": tags,
        "dataset_info": {
            "splits": [{"name": "train", "num_bytes": num_bytes, "num_examples": sum(m.num_rows for m in metadata)}],
            "download_size": sum(Path(p).stat().st_size for p in paths),
            "dataset_size": num_bytes,
        },
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*.parquet"}]}],
    }
    return f"---\n{yaml.safe_dump(header, sort_keys=False).strip()}\n---\n"


def card_sections(columns: dict[str, str], command: str) -> str:
    """The middle of a dataset card: its columns and what each holds, then how it was made (the command line)."""
    rows = "\n".join(f"| {name} | {content} |" for name, content in columns.items())
    return f"""| column | content |
|---|---|
{rows}

## How it was made

```
{command}
```
"""


def read_metadata(path_or_id: str, meta_path: Path, required: tuple[str, ...], what: str, rerun: str):
    """(text, dict) of the metadata file that marks a dataset of shards complete, with the `required` keys; `what`
    names the dataset in messages, `rerun` says how to finish one whose file is missing."""
    if not meta_path.is_file():
        raise UserError(
            f"'{path_or_id}' is not a complete {what} (no {meta_path.name}): {rerun} with the same arguments to resume"
        )
    text = meta_path.read_text()
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{meta_path}: not valid JSON ({e})") from None
    missing = [k for k in required if k not in meta]
    if missing:
        raise UserError(f"{meta_path}: missing keys {', '.join(missing)} (it has: {', '.join(meta)})")
    return text, meta


def check_shard(path: Path, meta_path: Path, columns) -> list[str]:
    """The column names of the shard at `path`, which the metadata file `meta_path` lists, after checking that it is
    there and holds `columns`."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise UserError(f"{path}: listed in {meta_path} but missing; the dataset is incomplete")
    names = pq.read_schema(path).names
    absent = [c for c in columns if c not in names]
    if absent:
        raise UserError(f"{path}: no column '{absent[0]}' (columns: {', '.join(names)})")
    return names


def check_output_dir(fmt: ShardedFormat, out: Path, record: dict, overwrite: bool):
    """Refuse to resume into shards made with other arguments, naming each key that differs."""
    if (out / fmt.args_file).is_file():
        before = json.loads((out / fmt.args_file).read_text())
        diff = [k for k in sorted(set(before) | set(record)) if before.get(k) != record.get(k)]
        if diff and not overwrite:
            detail = "; ".join(f"{k}: {before.get(k)!r} then, {record.get(k)!r} now" for k in diff)
            raise UserError(
                f"--output_dir '{out}' holds {fmt.what} made with other arguments ({detail}); rerun with the same "
                "arguments to resume, give another --output_dir, or pass --overwrite to replace them"
            )
    elif out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise UserError(f"--output_dir '{out}' exists and was not written by {fmt.script}; give a new directory")


def prepare_output_dir(fmt: ShardedFormat, out: Path, record: dict, overwrite: bool):
    """Main process: mark the dataset incomplete until this run finishes, and record the arguments."""
    if overwrite:
        for path in (out / "data").glob("*train-*.parquet*"):  # shards, and partial ones
            path.unlink()
    (out / fmt.metadata_file).unlink(missing_ok=True)
    (out / "data").mkdir(parents=True, exist_ok=True)
    write_text_atomically(out / fmt.args_file, json.dumps(record, indent=2))


def write_my_shards(state, out: Path, num_rows: int, shard_size: int, make_shard, desc: str) -> list[Path]:
    """Write the unfinished shards that fall to this process (k % num_processes), each `make_shard(rows, progress)`
    (a pyarrow table of those rows; it advances the progress bar by images done); returns every shard's path."""
    from tqdm.auto import tqdm

    ranges = shard_ranges(num_rows, shard_size)
    paths = [out / shard_name(k, len(ranges)) for k in range(len(ranges))]
    done = {k for k, path in enumerate(paths) if shard_is_complete(path, len(ranges[k]))}
    if done:
        state.print(f"resuming: {len(done)} of {len(ranges)} shards already complete, skipped")
    mine = [k for k in range(len(ranges)) if k % state.num_processes == state.process_index and k not in done]
    progress = tqdm(
        total=sum(len(ranges[k]) for k in mine),
        unit="img",
        dynamic_ncols=True,
        desc=f"{desc} ({state.num_processes} processes)" if state.num_processes > 1 else desc,
        disable=not state.is_main_process,
    )
    with progress:  # closed on errors too, so an error message starts on a line of its own
        for k in mine:
            write_table(paths[k], make_shard(ranges[k], progress))
    return paths


def push_to_hub(out: Path, args: ShardedOutputArguments):
    """Upload a finished dataset; on failure warn and say how to push later (the local dataset is complete)."""
    from huggingface_hub import HfApi

    repo_id = args.hub_dataset_id or out.resolve().name
    try:
        api = HfApi(token=args.hub_token)  # None: $HF_TOKEN or the saved login
        repo_id = api.create_repo(repo_id, repo_type="dataset", private=args.hub_private_repo, exist_ok=True).repo_id
        api.upload_folder(folder_path=out, repo_id=repo_id, repo_type="dataset", ignore_patterns=[".*", "*/.*"])
        print(f"pushed to https://huggingface.co/datasets/{repo_id}")
    except Exception as e:  # noqa: BLE001 - offline, no token, no rights: the local dataset is still complete
        warn(
            f"could not push to the Hub ({describe_error(e, args.hub_token)}); {out} is complete: push it later "
            f"with `hf upload {repo_id} {out} --repo-type dataset`"
        )


def write_sharded_dataset(
    fmt: ShardedFormat,
    state,
    args: ShardedOutputArguments,
    record: dict,
    num_rows: int,
    make_shard: Callable,
    describe: Callable[[list[Path], str], tuple[str, dict, str]],
    desc: str,
    argv=None,
) -> Path:
    """Write (or finish) the dataset in `args.output_dir`, in every process of `state`.

    `record` (JSON-able) names everything the rows depend on; a rerun must give the same. `make_shard(rows,
    progress)` returns the pyarrow table of those rows. Once every shard is whole, the main process calls
    `describe(shard_paths, command)` (`command`: the command line as run, from `argv`, token hidden) for (dataset
    card, metadata dict, one-line summary), writes the card, then the metadata file, prints the summary and pushes
    to the Hub if asked.
    """
    out = Path(args.output_dir)
    check_output_dir(fmt, out, record, args.overwrite)
    state.wait_for_everyone()
    if state.is_main_process:
        prepare_output_dir(fmt, out, record, args.overwrite)
    state.wait_for_everyone()
    paths = write_my_shards(state, out, num_rows, args.shard_size, make_shard, desc)
    state.wait_for_everyone()
    if state.is_main_process:
        ranges = shard_ranges(num_rows, args.shard_size)
        missing = [str(p) for p, r in zip(paths, ranges, strict=True) if not shard_is_complete(p, len(r))]
        if missing:
            raise RuntimeError(f"shards missing after every process finished: {', '.join(missing)}")
        card, metadata, summary = describe(paths, command_line(fmt.script, argv))
        write_text_atomically(out / "README.md", card)
        write_text_atomically(out / fmt.metadata_file, json.dumps(metadata, indent=2))
        print(summary)
        if args.push_to_hub:
            push_to_hub(out, args)
    state.wait_for_everyone()
    return out
