"""Representation alignment (REPA, Yu et al. 2024, "Representation Alignment for Generation"): the denoiser's hidden
states at one depth, through a small MLP projector, are pulled toward a frozen vision encoder's features of the clean
image, token by token: loss += --repa_weight * mean over tokens of -cos(projector(h), features).

    --repa_encoder      a transformers vision model with a patch grid (AutoModel id or folder, e.g. a DINOv2
                        checkpoint), or fashion_mnist_classifier: the cached Fashion-MNIST classifier's conv features
    --repa_depth        the DiT block whose output is aligned (1-based; default a third of the depth, as REPA's 8 of
                        SiT-XL's 28); a UNet aligns its middle block
    --repa_projector_dim  the projector's hidden width (REPA: 2048)

The encoder sees the images the objective trains on (after --random_flip), resized so that its patch grid is the
model's token grid (a DiT's sample_size / patch_size, a UNet's middle-block resolution); a grid finer than that by a
whole factor is average-pooled to it. On a latent dataset the encoder never runs: `encode_latents.py --repa_encoder`
stored each image's features (and its flipped image's) beside its latents, and the batch brings those of the image
each latent is of. The projector is a submodule of the network (`repa_projector`), so that the
optimizer, DDP, checkpoints and exact resume carry it; `artifacts.model_folder.save_model` leaves it out of every
saved model. The hidden state is read by a forward hook, only while `capture()` is open: a gradient-checkpointed
block's recomputation in backward is not read again.
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from modules.artifacts.model_folder import REPA_PROJECTOR
from modules.config import UserError
from modules.evaluation.classifier import load_or_train_classifier
from modules.networks.dit import DiTModel
from modules.networks.unet import UNetModel

CLASSIFIER_ENCODER = "fashion_mnist_classifier"
PROJECTOR = REPA_PROJECTOR  # the network's submodule while it trains; saved models and snapshots leave it out
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Projector(nn.Sequential):
    """REPA's projector: Linear, SiLU, Linear, SiLU, Linear, from the hidden width to the encoder's."""

    def __init__(self, hidden_dim: int, projector_dim: int, feature_dim: int):
        super().__init__(
            nn.Linear(hidden_dim, projector_dim),
            nn.SiLU(),
            nn.Linear(projector_dim, projector_dim),
            nn.SiLU(),
            nn.Linear(projector_dim, feature_dim),
        )


def pool_to_grid(features: torch.Tensor, grid: int, what: str) -> torch.Tensor:
    """(B, C, h, w) feature map -> (B, grid * grid, C) tokens: as it is when h = w = grid, average-pooled when h is
    a whole multiple of grid; otherwise a UserError naming `what`."""
    side = features.shape[-1]
    if features.shape[-2] != side or side % grid:
        raise UserError(
            f"--repa_encoder: {what} gives a {features.shape[-2]}x{side} feature grid, which cannot be matched to the "
            f"model's {grid}x{grid} tokens (it must be the same or a whole multiple)"
        )
    if side != grid:
        features = F.avg_pool2d(features, side // grid)
    return features.flatten(2).transpose(1, 2)


class ClassifierEncoder:
    """The cached Fashion-MNIST classifier's conv features (modules/evaluation/classifier.py): the output of the
    block whose resolution is the model's grid (16, 8 or 4 px from its 32 px input), or a finer one pooled to it."""

    def __init__(self, classifier):
        self.classifier = classifier.eval().requires_grad_(False)
        self.name = CLASSIFIER_ENCODER

    def feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Each block's output for images in [-1, 1] (B, C, H, W), made grey and 32x32 as the classifier's input."""
        x = images.float().mean(1, keepdim=True)
        if x.shape[-1] != 32:
            x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True)
        maps, layers = [], list(self.classifier.conv)
        for i in range(0, len(layers), 3):  # (conv, batch norm, ReLU) per block
            x = layers[i + 2](layers[i + 1](layers[i](x)))
            maps.append(x)
        return maps

    def _block_for(self, grid: int) -> int:
        sizes = [32 // 2 ** (i + 1) for i in range(len(self.classifier.conv) // 3)]  # 16, 8, 4
        usable = [i for i, s in enumerate(sizes) if s % grid == 0]
        if not usable:
            raise UserError(
                f"--repa_encoder {CLASSIFIER_ENCODER}: its feature grids are {', '.join(f'{s}x{s}' for s in sizes)}, "
                f"none of which can be matched to the model's {grid}x{grid} tokens"
            )
        return usable[-1]  # the coarsest that fits: the deepest features

    def dim(self, grid: int) -> int:
        return self.classifier.conv[3 * self._block_for(grid)].out_channels

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, grid: int) -> torch.Tensor:
        block = self._block_for(grid)
        return pool_to_grid(self.feature_maps(images)[block], grid, CLASSIFIER_ENCODER)


class VisionModelEncoder:
    """A transformers vision model with a patch grid (ViT, DINOv2, ...): its last hidden state's patch tokens (the
    last grid^2 of them: a class token and register tokens come first), for images resized to grid * patch_size and
    normalised with its image processor's mean and std (ImageNet's when it has none)."""

    def __init__(self, source: str, device, revision=None, token=None, trust_remote_code: bool = False):
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        kwargs = dict(revision=revision, token=token, trust_remote_code=trust_remote_code)
        try:
            config = AutoConfig.from_pretrained(source, **kwargs)
            self.model = AutoModel.from_pretrained(source, **kwargs).to(device).eval().requires_grad_(False)
        except (OSError, ValueError) as e:
            raise UserError(f"--repa_encoder '{source}': could not load it ({str(e).splitlines()[0]})") from None
        patch = getattr(config, "patch_size", None)
        if patch is None:
            raise UserError(
                f"--repa_encoder '{source}' is a {type(self.model).__name__} without a patch grid (no patch_size): "
                "its features cannot be matched to the model's tokens; give a ViT-like encoder such as DINOv2"
            )
        self.patch = patch[0] if isinstance(patch, (list, tuple)) else int(patch)
        self.channels = getattr(config, "num_channels", 3)
        self.feature_dim = config.hidden_size
        try:
            processor = AutoImageProcessor.from_pretrained(source, **kwargs)
            mean, std = processor.image_mean, processor.image_std
        except (OSError, ValueError, AttributeError):
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.interpolate = "interpolate_pos_encoding" in inspect.signature(self.model.forward).parameters
        self.name = source

    def dim(self, grid: int) -> int:
        return self.feature_dim

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, grid: int) -> torch.Tensor:
        x = (images.float() + 1) / 2
        if x.shape[1] != self.channels:
            x = x.mean(1, keepdim=True).expand(-1, self.channels, -1, -1)
        size = grid * self.patch
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        extra = {"interpolate_pos_encoding": True} if self.interpolate else {}
        tokens = self.model(pixel_values=x.to(self.model.dtype), **extra).last_hidden_state
        if tokens.shape[1] < grid * grid:
            raise UserError(
                f"--repa_encoder '{self.name}' gives {tokens.shape[1]} tokens for a {size}x{size} image, fewer than "
                f"the model's {grid}x{grid}: its feature grid cannot be matched to the model's tokens"
            )
        return tokens[:, -grid * grid :].float()


def encoder_source(spec: str) -> str:
    """--repa_encoder as found again from anywhere: a local folder's absolute path, else as given."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if spec != CLASSIFIER_ENCODER and path.is_dir() else spec


def load_encoder(source: str, device, revision=None, token=None, trust_remote_code=False):
    """The frozen encoder --repa_encoder names."""
    if source == CLASSIFIER_ENCODER:
        return ClassifierEncoder(load_or_train_classifier().to(device))
    return VisionModelEncoder(source, device, revision, token, trust_remote_code)


def alignment_site(model, depth: int | None) -> tuple[nn.Module, int, int, str]:
    """(the module whose output is aligned, the model's token grid, its hidden width, where) for --repa_depth."""
    if isinstance(model, DiTModel):
        blocks = len(model.blocks)
        depth = max(1, blocks // 3) if depth is None else depth
        if not 1 <= depth <= blocks:
            raise UserError(f"--repa_depth {depth}: the DiT has {blocks} blocks; give a depth in 1..{blocks}")
        grid = model.config.sample_size // model.config.patch_size
        return model.blocks[depth - 1], grid, model.config.hidden_size, f"DiT block {depth} of {blocks}"
    if isinstance(model, UNetModel):
        if depth is not None:
            raise UserError(f"--repa_depth {depth}: a UNet aligns its middle block; drop --repa_depth")
        grid = model.config.sample_size // model.downsample_factor
        width = model.config.base_channels * model.config.channel_mult[-1]
        return model.mid_block, grid, width, "the UNet's middle block"
    raise UserError(
        f"--repa_encoder aligns the hidden states of an image DiT or UNet of ours, not a {type(model).__name__}"
    )


class Alignment:
    """REPA for one network: `capture()` around the objective's loss reads the aligned module's output; `loss`
    compares it, projected, with the encoder's features of the same images."""

    def __init__(self, model, encoder, depth: int | None, weight: float, projector_dim: int, stored=None):
        """`encoder` computes the features of each batch's images; or, for a latent dataset, `stored` is its
        record of the features stored beside the latents ({"encoder", "grid", "dim"}), read from the batch."""
        site, self.grid, width, self.where = alignment_site(model, depth)
        self.encoder, self.weight, self.stored = encoder, weight, stored
        if stored is not None and stored["grid"] % self.grid:
            raise UserError(
                f"--repa_encoder: the latent dataset stores {stored['encoder']}'s features on a {stored['grid']}x"
                f"{stored['grid']} grid, which cannot be matched to the model's {self.grid}x{self.grid} tokens; "
                f"encode it with --repa_grid {self.grid}"
            )
        dim = stored["dim"] if stored is not None else encoder.dim(self.grid)
        model.add_module(PROJECTOR, Projector(width, projector_dim, dim))
        self._hidden, self._open = [], False
        self.window = []

        def keep(module, inputs, output):  # a function, not a bound method: the EMA's deep copy shares it
            if self._open:
                self._hidden.append(output)

        site.register_forward_hook(keep)

    @contextlib.contextmanager
    def capture(self):
        self._hidden, self._open = [], True
        try:
            yield
        finally:
            self._open = False

    def target(self, x0: torch.Tensor, batch: dict) -> torch.Tensor:
        """The features to align with, (B, grid * grid, D): the encoder's of the images x0, or those stored for
        them (the batch's "repa_target", modules/data/latents.sample_latents), pooled to the model's grid."""
        if self.stored is None:
            return self.encoder(x0, self.grid)
        stored = batch["repa_target"].float()  # (B, G * G, D)
        side = self.stored["grid"]
        return pool_to_grid(stored.transpose(1, 2).unflatten(2, (side, side)), self.grid, self.stored["encoder"])

    def loss(self, model, x0: torch.Tensor, batch: dict) -> torch.Tensor:
        """--repa_weight times the mean negative cosine similarity between the projected hidden tokens of the last
        forward and the features of the batch's images (`target`); `model` holds the projector."""
        if len(self._hidden) != 1:
            raise RuntimeError(f"REPA expects one forward of the network per loss, saw {len(self._hidden)}")
        hidden = self._hidden.pop()
        tokens = hidden.flatten(2).transpose(1, 2) if hidden.ndim == 4 else hidden  # a UNet's (B, C, h, w)
        target = self.target(x0, batch).to(tokens.dtype)
        projected = model.get_submodule(PROJECTOR)(tokens)
        similarity = F.cosine_similarity(projected.float(), target.float(), dim=-1).mean()
        self.window.append(float(similarity.detach()))
        return -self.weight * similarity

    def log_values(self) -> dict:
        """The window's mean cosine similarity (repa_similarity), then a new window."""
        if not self.window:
            return {}
        values = {"repa_similarity": sum(self.window) / len(self.window)}
        self.window = []
        return values


class NoAlignment:
    """Without --repa_encoder: nothing to capture, nothing added."""

    @contextlib.contextmanager
    def capture(self):
        yield

    def loss(self, model, x0, batch):
        return 0.0

    def log_values(self) -> dict:
        return {}


def make_alignment(train_args, model, objective, data, device, weight_sharding: str | None):
    """The run's Alignment for --repa_encoder, its encoder on `device` (attaching the projector to `model`, before
    the optimizer is made), or NoAlignment; what REPA does not support is refused in one line."""
    if not train_args.repa_encoder:
        for flag in ("repa_depth",):
            if getattr(train_args, flag) is not None:
                raise UserError(f"--{flag} aligns hidden states with --repa_encoder, which is not given")
        return NoAlignment()
    name = objective.name
    if name not in ("flow", "ddpm") or getattr(objective.args, "shared_noise", False):
        kind = "the shared-noise frame trainer" if name in ("flow", "ddpm") else f"--objective {name}"
        raise UserError(f"--repa_encoder trains flow matching and DDPM image models, not {kind}")
    if data.train.num_frames:
        raise UserError("--repa_encoder aligns image models; the data are clips")
    stored = None
    if data.latent is not None:  # the features were stored by encode_latents.py --repa_encoder: no encoder here
        stored = data.train.metadata.get("repa")
        source = encoder_source(train_args.repa_encoder)
        if stored is None or stored["encoder"] != source:
            held = f"holds {stored['encoder']}'s" if stored else "holds no"
            raise UserError(
                f"--repa_encoder {train_args.repa_encoder}: the latent dataset {held} features; encode it with "
                f"encode_latents.py --repa_encoder {train_args.repa_encoder} (the encoder never runs in training)"
            )
    if weight_sharding:
        raise UserError(
            f"--repa_encoder under {weight_sharding}: the projector runs outside the sharded forward; train with DDP "
            "(or DeepSpeed ZeRO-1/2)"
        )
    if train_args.repa_weight <= 0 or train_args.repa_projector_dim <= 0:
        raise UserError(
            f"--repa_weight and --repa_projector_dim must be positive, got {train_args.repa_weight} and "
            f"{train_args.repa_projector_dim}"
        )
    encoder = (
        None if stored else load_encoder(encoder_source(train_args.repa_encoder), device, token=train_args.hub_token)
    )
    settings = (train_args.repa_depth, train_args.repa_weight, train_args.repa_projector_dim)
    return Alignment(model, encoder, *settings, stored=stored)
