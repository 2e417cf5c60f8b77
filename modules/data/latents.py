"""Latent datasets: images encoded once by a VAE into their posterior mean and std, read back for training.

A latent dataset is a directory (or a Hub dataset repo) that `datasets.load_dataset` also reads:

    data/train-00000-of-00003.parquet  rows in image order: mean, std (float16 (C, h, w), raw latents; of a clip
                                       (F, C, h, w), its frames encoded one by one); flip_mean, flip_std (the same
                                       for the horizontally flipped image or clip, with --random_flip); label (int)
                                       and caption (str) when the images have them;
                                       text_tokens (float16 (L, D): the caption's real tokens), text_pooled
                                       (float16 (P,)) with --text_encoder; repa_features (float16 (G*G, D): a
                                       frozen vision encoder's features of the image on a G x G grid, for REPA)
                                       and repa_flip_features (of the flipped image) with --repa_encoder
    README.md                          dataset card
    latents.json                       VAE, shapes (latent_shape [C, h, w] of one frame; num_frames F of clips),
                                       statistics, source data, the REPA encoder ("repa": encoder, grid, dim);
                                       written last: marks the data complete

Training draws z = mean + std * eps afresh each step and normalises it per channel with statistics over all images
(every frame of every clip): channel_mean = E[mean], channel_std^2 = Var[mean] + E[std^2], the variance of z itself
(law of total variance).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from modules.config import UserError
from modules.data.images import collate_examples, labels_needed, short_digest
from modules.data.shards import check_shard, read_metadata
from modules.networks.vae import load_vae

METADATA_FILE = "latents.json"
LATENT_COLUMNS = ("mean", "std")
FLIP_COLUMNS = ("flip_mean", "flip_std")
TEXT_COLUMNS = ("text_tokens", "text_pooled")
REPA_COLUMNS = ("repa_features", "repa_flip_features")  # a frozen encoder's features of each image (and flipped)
# Parquet column -> batch key.
BATCH_KEYS = {
    "mean": "latent_mean",
    "std": "latent_std",
    "flip_mean": "flip_mean",
    "flip_std": "flip_std",
    **{name: name for name in REPA_COLUMNS},
}
REQUIRED_KEYS = (
    "vae",
    "image_resolution",
    "latent_shape",
    "num_images",
    "shards",
    "columns",
    "channel_mean",
    "channel_std",
)
# Latents larger than this share of the machine's memory (split between the processes on it) are read lazily.
MEMORY_FRACTION = 0.25


@torch.no_grad()
def encode_shard(
    vae, dataset, indices, batch_size: int, num_workers: int = 0, flip: bool = False, progress=None, features=None
):
    """Encode `dataset[i]` for i in `indices`, in order, through `vae` (modules.vae.VAE): images, or clips frame by
    frame. `batch_size` counts items (clips, not frames).

    Returns numpy arrays: "mean", "std" (and with `flip` "flip_mean", "flip_std", of the image or the whole clip
    flipped left-right) float16 (N, C, h, w), or (N, F, C, h, w) for clips, plus "label" int64 (N,) when the items
    have labels. `num_workers` does not change it. `features` (images in [-1, 1] -> (N, G*G, D), REPA's frozen
    encoder) adds "repa_features" (and "repa_flip_features") float16 (N, G*G, D).
    """
    indices = list(indices)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=[indices[i : i + batch_size] for i in range(0, len(indices), batch_size)],
        collate_fn=collate_examples,
        # Workers pay off for images decoded on access; an in-memory dataset gathers a batch in one index op.
        num_workers=0 if hasattr(dataset, "__getitems__") else num_workers,
        pin_memory=vae.device.type == "cuda",
    )
    out = {}
    try:
        for batch in loader:
            x = batch["pixel_values"].to(vae.device, non_blocking=True)  # (N, C, H, W) or clips (N, F, C, H, W)
            n = len(x)
            x = torch.cat([x, x.flip(-1)]) if flip else x  # flips in the same forward pass; a clip's every frame
            mean, std = (v.unflatten(0, x.shape[:-3]) for v in vae.encode(x.flatten(0, -4)))  # as x, latent (C, h, w)
            columns = {"mean": mean[:n], "std": std[:n]}
            if flip:
                columns.update(flip_mean=mean[n:], flip_std=std[n:])
            if features is not None:
                encoded = features(x)
                columns.update(repa_features=encoded[:n], **({"repa_flip_features": encoded[n:]} if flip else {}))
            for name, value in columns.items():
                value = value.to(torch.float16)
                if not torch.isfinite(value).all():
                    raise UserError(
                        f"the VAE gave latents that are not finite in float16 (column {name}, rows "
                        f"{indices[0]}..{indices[-1]}); encode with --dtype fp32 or bf16, or another VAE"
                    )
                out.setdefault(name, []).append(value.cpu())
            if "labels" in batch:
                out.setdefault("label", []).append(batch["labels"].long())
            if progress is not None:
                progress.update(n)
    except UserError as e:  # from a DataLoader worker it arrives wrapped in the worker's traceback
        raise UserError(str(e).strip().splitlines()[-1].split("UserError: ", 1)[-1]) from None
    return {name: torch.cat(parts).numpy() for name, parts in out.items()}


@torch.no_grad()
def encode_captions(encoder, captions: list[str], batch_size: int) -> dict[str, list[np.ndarray]]:
    """Each caption through the frozen text `encoder` (modules.text.TextEncoder), each distinct one once, for
    storage: "text_tokens", the real tokens' states as float16 (L_i, D), and "text_pooled", float16 (P,)."""
    distinct, stored = list(dict.fromkeys(captions)), {}
    for i in range(0, len(distinct), batch_size):
        chunk = distinct[i : i + batch_size]
        e = encoder(chunk)
        for j, caption in enumerate(chunk):
            tokens = e.tokens[j, : int(e.mask[j].sum())].to(torch.float16)
            pooled = e.pooled[j].to(torch.float16)
            if not (torch.isfinite(tokens).all() and torch.isfinite(pooled).all()):
                raise UserError(
                    f"text encoder {encoder.source!r} gave embeddings that are not finite in float16 for caption "
                    f"{caption!r}"
                )
            stored[caption] = (tokens.cpu().numpy(), pooled.cpu().numpy())
    return {"text_tokens": [stored[c][0] for c in captions], "text_pooled": [stored[c][1] for c in captions]}


def latent_table(columns: dict, class_names=None):
    """One shard's pyarrow table from columns as `encode_shard` returns them, plus "caption" (list of str) and the
    `encode_captions` columns (or a reflow pairs dataset's, modules/data/pairs.py). Arrays (N, C, h, w) or
    (N, F, C, h, w) are stored as datasets' Array3D (Array4D for clips) of their dtype (latents float16), which
    `datasets.load_dataset` reads back with its shape; text tokens as lists of fixed-size float16 vectors."""
    import datasets

    features = {}
    for name, values in columns.items():
        if isinstance(values, np.ndarray) and values.ndim in (3, 4, 5):
            array = {3: datasets.Array2D, 4: datasets.Array3D, 5: datasets.Array4D}[values.ndim]
            features[name] = array(tuple(int(d) for d in values.shape[1:]), values.dtype.name)
        elif name == "text_tokens":
            width = int(values[0].shape[1])
            features[name] = datasets.List(datasets.List(datasets.Value("float16"), length=width))
        elif name == "text_pooled":
            features[name] = datasets.List(datasets.Value("float16"), length=int(values[0].shape[0]))
        elif name == "label":
            features[name] = datasets.ClassLabel(names=list(class_names)) if class_names else datasets.Value("int64")
        else:
            features[name] = datasets.Value("string")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features)).data.table


def read_shard(path: Path, columns=None, arrays=tuple(BATCH_KEYS)) -> dict[str, np.ndarray]:
    """Columns of one parquet shard as numpy arrays; those named in `arrays` (latents, stored as nested lists) as
    (N, C, h, w), or (N, F, C, h, w) for clips."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=columns)
    out = {}
    for name in table.column_names:
        array = table.column(name).combine_chunks()
        if name not in arrays:
            out[name] = array.to_numpy(zero_copy_only=False)
            continue
        array = array.storage if isinstance(array, pa.ExtensionArray) else array  # datasets' Array3D
        shape = [len(array)]
        while pa.types.is_list(array.type) or pa.types.is_fixed_size_list(array.type):
            inner = array.flatten()
            shape.append(len(inner) // max(len(array), 1))
            array = inner
        if len(shape) not in (3, 4, 5) or int(np.prod(shape)) != len(array):
            raise UserError(f"{path}: column '{name}' does not hold arrays of one shape")
        out[name] = array.to_numpy(zero_copy_only=False).reshape(shape)
    return out


def channel_statistics(paths, num_channels: int) -> dict:
    """Per-channel statistics over every latent of the shards at `paths`, every frame of clips (see the module
    docstring)."""
    total, s_mean, s_mean2, s_var = 0, np.zeros(num_channels), np.zeros(num_channels), np.zeros(num_channels)
    for path in paths:
        shard = read_shard(path, list(LATENT_COLUMNS))
        mean, std = shard["mean"].astype(np.float64), shard["std"].astype(np.float64)
        others = tuple(a for a in range(mean.ndim) if a != mean.ndim - 3)  # all but the channels of (..., C, h, w)
        total += mean.size // num_channels
        s_mean += mean.sum(others)
        s_mean2 += np.square(mean).sum(others)
        s_var += np.square(std).sum(others)
    channel_mean = s_mean / total
    var_of_means = np.maximum(s_mean2 / total - channel_mean**2, 0.0)
    return dict(
        channel_mean=channel_mean.tolist(),
        channel_std=np.sqrt(var_of_means + s_var / total).tolist(),
        channel_std_of_means=np.sqrt(var_of_means).tolist(),
        channel_statistics="of samples z = mean + std * eps over all images and positions: channel_mean = E[mean], "
        "channel_std^2 = Var[mean] + E[std^2]; channel_std_of_means = sqrt(Var[mean])",
    )


class LatentDataset(torch.utils.data.Dataset):
    """Rows of a latent dataset: `{"latent_mean", "latent_std"[, "flip_mean", "flip_std"]: float32 (C, h, w), or
    (F, C, h, w) for clips, "labels": long}`, batched in one index op by `__getitems__`. `rows` is a dict of
    in-memory tensors (latents float16), or a `datasets.Dataset` in torch format read lazily from its memory-mapped
    Arrow cache. `keys` maps columns to batch keys (a pairs dataset's are modules/data/pairs.py's)."""

    def __init__(self, rows, num_rows: int, labels: torch.Tensor | None, keys: dict[str, str] = BATCH_KEYS):
        self.rows, self.num_rows, self.labels, self.keys = rows, num_rows, labels, keys
        self.columns = list(rows) if isinstance(rows, dict) else rows.column_names

    def __len__(self):
        return self.num_rows

    def __getitems__(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.long)
        if isinstance(self.rows, dict):
            rows = {name: column[idx] for name, column in self.rows.items()}
        else:
            rows = self.rows[idx.tolist()]
        batch = {self.keys[name]: rows[name].float() for name in self.columns}
        if self.labels is not None:
            batch["labels"] = self.labels[idx]
        return batch

    def __getitem__(self, i):
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


@dataclass
class LatentData:
    """A latent dataset opened for training: the counterpart of modules.data.TrainData."""

    dataset: LatentDataset
    num_channels: int  # latent channels
    resolution: int  # latent height = width
    num_classes: int  # 0 when the data has no labels
    class_names: tuple[str, ...] | None
    key: str  # names the data for caches; includes a digest of latents.json, which holds content statistics
    vae: dict  # the encoding VAE's config_record(); its "source" is what modules.vae.load_vae takes
    channel_mean: torch.Tensor  # (C,)
    channel_std: torch.Tensor  # (C,)
    image_resolution: int
    metadata: dict  # the whole latents.json
    captions: list[str] | None = None  # by index, when the images had captions (for text-conditional training)
    root: Path | None = None  # the local directory (a Hub dataset's download)
    text_encoder: dict | None = None  # config_record() of the text encoder whose embeddings are stored, if any
    num_frames: int = 0  # frames per clip of encoded clips (latents (F, C, h, w)); 0 for images

    def text_embeddings(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The stored text embeddings of every distinct caption of the first len(dataset) rows, and of the empty
        caption: {caption: (tokens float32 (L, D), pooled float32 (P,))}."""
        if self.text_encoder is None:
            raise UserError(
                f"the latent dataset '{self.key}' stores no text embeddings (encode_latents.py --text_encoder)"
            )
        null = self.metadata["text_null"]
        stored = {
            "": (
                torch.tensor(null["tokens"], dtype=torch.float32).view(-1, self.text_encoder["token_dim"]),
                torch.tensor(null["pooled"], dtype=torch.float32),
            )
        }
        stored.update(_stored_text(self.root, self.metadata["shards"], len(self.dataset)))
        return stored


def local_dataset_dir(
    path_or_id: str, revision: str | None, what: str = "latent dataset", script: str = "encode_latents.py"
) -> Path:
    """The local directory of a dataset of shards (`what`, written by `script`): as given, or a Hub dataset
    downloaded."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{what} '{path_or_id}' is a file; give the directory {script} wrote")
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path_or_id, repo_type="dataset", revision=revision))
    except Exception as e:  # noqa: BLE001 - bad id, no such repo, private, offline: all the user's to fix
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(
            f"{what} '{path_or_id}' is not a local directory and could not be downloaded from the Hub "
            f"({type(e).__name__}: {reason})"
        ) from None


def _memory_budget() -> int:
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62
    return int(physical * MEMORY_FRACTION) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def load_latent_data(
    path_or_id: str, max_samples: int | None = None, revision: str | None = None, need_labels: bool = False
) -> LatentData:
    """Open a complete latent dataset (a local directory or a Hub dataset id); raise `UserError` on bad input."""
    root = local_dataset_dir(path_or_id, revision)
    meta_path = root / METADATA_FILE
    text, meta = _read_metadata(path_or_id, meta_path)
    num_frames = int(meta.get("num_frames") or 0)
    shape = (num_frames, *meta["latent_shape"]) if num_frames else tuple(meta["latent_shape"])  # of one row
    paths, total, names = _check_shards(root, meta, meta_path)
    n = min(max_samples or total, total)
    has_labels = "label" in names
    if need_labels and not has_labels:
        raise labels_needed(f"the latent dataset '{path_or_id}'")
    columns = [c for c in (*LATENT_COLUMNS, *FLIP_COLUMNS, *REPA_COLUMNS) if c in names]
    if n * 2 * len(columns) * int(np.prod(shape)) <= _memory_budget():  # float16 latents
        rows, labels = _read_rows(paths, n, shape, columns, has_labels, meta_path)
    else:
        import datasets

        ds = datasets.load_dataset("parquet", data_files=[str(p) for p in paths], split="train")
        ds = ds.select(range(n)) if n < len(ds) else ds
        if tuple(ds.features["mean"].shape) != shape:
            raise UserError(f"{root}: latents of shape {ds.features['mean'].shape}, but {meta_path} says {shape}")
        labels = torch.as_tensor(np.asarray(ds["label"]), dtype=torch.long) if has_labels else None
        rows = ds.select_columns(columns).with_format("torch")

    class_names = tuple(meta["class_names"]) if meta.get("class_names") else None
    name = root.name if Path(path_or_id).exists() else path_or_id.replace("/", "--")
    return LatentData(
        dataset=LatentDataset(rows, n, labels),
        num_channels=shape[-3],
        resolution=shape[-2],
        num_classes=int(meta.get("num_classes") or 0) if has_labels else 0,
        class_names=class_names,
        key=f"latents-{name}-{n}-{short_digest(text)}",
        vae=meta["vae"],
        channel_mean=torch.tensor(meta["channel_mean"], dtype=torch.float32),
        channel_std=torch.tensor(meta["channel_std"], dtype=torch.float32),
        image_resolution=int(meta["image_resolution"]),
        metadata=meta,
        captions=_captions(paths, n) if "caption" in names else None,
        root=root,
        text_encoder=meta.get("text_encoder") if TEXT_COLUMNS[0] in names else None,
        num_frames=num_frames,
    )


def _read_metadata(path_or_id: str, meta_path: Path) -> tuple[str, dict]:
    """latents.json as text and as a dict, checked for the keys and shapes a latent dataset needs."""
    rerun = "encoding did not finish; rerun encode_latents.py"
    text, meta = read_metadata(path_or_id, meta_path, REQUIRED_KEYS, "latent dataset", rerun)
    shape = tuple(meta["latent_shape"])
    if len(shape) != 3 or len(meta["channel_mean"]) != shape[0] or len(meta["channel_std"]) != shape[0]:
        raise UserError(
            f"{meta_path}: latent_shape {list(shape)} should be [C, h, w] with C channel_mean and channel_std "
            f"values (got {len(meta['channel_mean'])} and {len(meta['channel_std'])})"
        )
    frames = meta.get("num_frames") or 0
    if not isinstance(frames, int) or frames < 0:
        raise UserError(f"{meta_path}: num_frames should be the frames per clip (a positive integer), got {frames!r}")
    return text, meta


def _check_shards(root: Path, meta: dict, meta_path: Path) -> tuple[list[Path], int, list[str]]:
    """(the shards' paths, their total rows, the columns of the last) after checking that each is there, holds the
    latent columns, and that together they hold what latents.json says."""
    import pyarrow.parquet as pq

    paths, counts, names = [root / name for name in meta["shards"]], [], []
    for path in paths:
        names = check_shard(path, meta_path, LATENT_COLUMNS)
        counts.append(pq.read_metadata(path).num_rows)
    if not paths or sum(counts) != meta["num_images"]:
        raise UserError(f"{root}: the shards hold {sum(counts)} rows, but {meta_path} says {meta['num_images']}")
    return paths, sum(counts), names


def _read_rows(paths, n: int, shape, columns, has_labels: bool, meta_path: Path):
    """The first n rows of `columns` into memory as tensors (latents stay float16), and the labels."""
    parts, kept = {c: [] for c in [*columns, *(["label"] if has_labels else [])]}, 0
    for path in paths:
        if kept >= n:
            break
        shard = read_shard(path, list(parts))
        if shard["mean"].shape[1:] != shape:
            raise UserError(f"{path}: latents of shape {shard['mean'].shape[1:]}, but {meta_path} says {shape}")
        for name, values in shard.items():
            parts[name].append(values[: n - kept])
        kept += len(shard["mean"])
    rows = {c: torch.from_numpy(np.concatenate(parts[c])) for c in columns}
    labels = torch.from_numpy(np.concatenate(parts["label"]).astype(np.int64)) if has_labels else None
    return rows, labels


def _captions(paths, n: int) -> list[str]:
    """The caption column of the first n rows across the shards."""
    import pyarrow.parquet as pq

    captions = []
    for path in paths:
        if len(captions) >= n:
            break
        captions += pq.read_table(path, columns=["caption"]).column("caption").to_pylist()
    return [str(c) for c in captions[:n]]


def _stored_text(root: Path, shards: list[str], n: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{caption: (tokens, pooled)} from the first row of each distinct caption among the first n rows."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    out, seen = {}, 0
    for name in shards:
        if seen >= n:
            break
        path = root / name
        captions = pq.read_table(path, columns=["caption"]).column("caption").to_pylist()[: n - seen]
        seen += len(captions)
        first = {}
        for i, caption in enumerate(captions):
            if caption not in out:
                first.setdefault(caption, i)
        if not first:
            continue
        table = pq.read_table(path, columns=list(TEXT_COLUMNS)).take(list(first.values()))
        tokens = table.column("text_tokens").combine_chunks()
        pooled = table.column("text_pooled").combine_chunks()
        width = tokens.type.value_type.list_size
        flat = tokens.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
        offsets = np.concatenate([[0], np.cumsum(pc.list_value_length(tokens).to_numpy())])
        pooled = pooled.flatten().to_numpy(zero_copy_only=False).reshape(len(first), -1)
        for j, caption in enumerate(first):
            out[caption] = (
                torch.from_numpy(flat[offsets[j] : offsets[j + 1]].astype(np.float32)),
                torch.from_numpy(pooled[j].astype(np.float32)),
            )
    return out


def _channel_stats(data_or_metadata, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) shaped (C, 1, 1) on `like`'s device and dtype, from a LatentData or a latents.json dict: they
    broadcast over the channels of images (B, C, h, w) and clips (B, F, C, h, w) alike."""
    if isinstance(data_or_metadata, LatentData):
        mean, std = data_or_metadata.channel_mean, data_or_metadata.channel_std
    else:
        mean, std = (torch.tensor(data_or_metadata[k]) for k in ("channel_mean", "channel_std"))
    return mean.to(like).view(-1, 1, 1), std.to(like).view(-1, 1, 1)


def sample_latents(batch: dict, generator: torch.Generator, data: LatentData, flip: bool = False) -> torch.Tensor:
    """z = (mean + std * eps - channel_mean) / channel_std, eps ~ N(0, I) from `generator`: (B, C, h, w), or
    (B, F, C, h, w) for clips.

    With `flip`, each sample first takes its flipped image's (or whole clip's) (mean, std) with probability 1/2 (one
    uniform per sample, drawn before eps). Random numbers are drawn on the generator's device (best: the batch's).
    A batch with stored REPA features gets "repa_target": those of the image (flipped or not) each latent is of.
    """
    mean, std = batch["latent_mean"], batch["latent_std"]
    if flip:
        if "flip_mean" not in batch:
            raise UserError(
                f"--random_flip: the latent dataset '{data.key}' holds no flipped latents; encode it with "
                "encode_latents.py --random_flip, or train without --random_flip"
            )
        pick = torch.rand(mean.shape[0], generator=generator, device=generator.device) < 0.5
        pick = pick.to(mean.device).view(-1, *[1] * (mean.ndim - 1))  # (B, 1, 1, 1) or (B, 1, 1, 1, 1)
        mean = torch.where(pick, batch["flip_mean"], mean)
        std = torch.where(pick, batch["flip_std"], std)
        if "repa_features" in batch:  # REPA's target: the features of the image the latent is of
            batch["repa_target"] = torch.where(
                pick.view(-1, 1, 1), batch["repa_flip_features"], batch["repa_features"]
            )
    elif "repa_features" in batch:
        batch["repa_target"] = batch["repa_features"]
    eps = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype).to(mean.device)
    channel_mean, channel_std = _channel_stats(data, mean)
    return (mean + std * eps - channel_mean) / channel_std


def denormalize_latents(z: torch.Tensor, data_or_metadata) -> torch.Tensor:
    """Inverse of the normalisation in `sample_latents`: raw latents z * channel_std + channel_mean, for VAE.decode.
    `data_or_metadata` is a LatentData or the latents.json dict (e.g. as a trained model records it)."""
    channel_mean, channel_std = _channel_stats(data_or_metadata, z)
    return z * channel_std + channel_mean


def scaled_latent_record(vae, latent_size: int) -> dict:
    """The latent record (what latent_decoder reads) of a diffusers pipeline's latents, which are normalised by the
    VAE's factors instead of per-channel statistics: z = (raw - shift_factor) * scaling_factor, so
    raw = z * (1 / scaling_factor) + shift_factor, the decoding of DiTPipeline (and Stable Diffusion's)."""
    channels = vae.latent_channels
    return {
        "vae": vae.config_record(),
        "channel_mean": [vae.shift_factor] * channels,
        "channel_std": [1 / vae.scaling_factor] * channels,
        "image_resolution": latent_size * vae.downsample_factor,
    }


def latent_decoder(record: dict, device="cpu"):
    """`decode(z)` for a model trained on a latent dataset: normalised latents (B, C, h, w) -> images in [-1, 1]
    (B, C', H, W), and clips (B, F, C, h, w) frame by frame -> (B, F, C', H, W), at most B frames per VAE pass.

    `record` is what training stores with such a model: {"vae": config_record, "channel_mean", "channel_std"}. The VAE
    is loaded from its recorded source and must still be the one that encoded the data."""

    recorded = record["vae"]
    vae = load_vae(recorded["source"], device, revision=recorded.get("revision"))
    for key in ("kind", "latent_channels", "downsample_factor", "scaling_factor", "shift_factor"):
        if key in recorded and recorded[key] != getattr(vae, key):
            raise UserError(
                f"VAE '{recorded['source']}' has {key} {getattr(vae, key)}, but the latents were encoded by one with "
                f"{recorded[key]}: it is not the same VAE"
            )

    def decode(z: torch.Tensor) -> torch.Tensor:
        frames = denormalize_latents(z, record).flatten(0, -4)  # (B * F, C, h, w) for clips
        images = torch.cat([vae.decode(chunk) for chunk in frames.split(max(len(z), 1))])  # (B * F, C', H, W)
        return images.unflatten(0, z.shape[:-3])  # as z: (B, C', H, W) or (B, F, C', H, W)

    return decode
