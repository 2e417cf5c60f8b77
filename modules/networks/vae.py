"""Autoencoders for latent diffusion: our own small KL-VAE, its training objective, and one interface over it and
diffusers' `AutoencoderKL`.

KL-VAE (Kingma & Welling 2014, as used by latent diffusion, Rombach et al. 2022): the encoder gives a diagonal
Gaussian posterior N(mean, exp(logvar)) per latent element, the decoder maps a latent back to an image in [-1, 1].

Layout of `KLVAE` for block_out_channels = (32, 64, 128), layers_per_block = 1, at 32x32 (f4):

    encoder: conv_in -> [Res, Down] 32 -> [Res, Down] 16 -> [Res] 8 -> mid (Res, Attn, Res) 8 -> out (mean, logvar)
    decoder: conv_in -> mid (Res, Attn, Res) 8 -> [Res x 2, Up] 8 -> [Res x 2, Up] 16 -> [Res x 2] 32 -> out

where out is GroupNorm-SiLU-conv. The decoder's output is not clamped; `VAE.decode` clamps to [-1, 1].

Pretrained autoencoders that `load_vae` takes by Hub id (all `AutoencoderKL`, f8):
    stabilityai/sd-vae-ft-ema          4 latent channels, scaling_factor 0.18215 (SD 1.x/2.x)
    madebyollin/sdxl-vae-fp16-fix      4 latent channels, scaling_factor 0.13025, safe in fp16 (SDXL)
    black-forest-labs/FLUX.1-dev       16 latent channels, a pipeline: its VAE is in subfolder vae (gated)
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from modules.config import UserError
from modules.networks.unet import AttentionBlock, Downsample, Upsample

LOGVAR_RANGE = (-30.0, 20.0)  # as diffusers' DiagonalGaussianDistribution: keeps exp(logvar) finite in fp32


class VAEResBlock(nn.Module):
    """out = skip(x) + conv2(SiLU(GN(conv1(SiLU(GN(x)))))), with a 1x1 conv as skip when the channels change."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class CheckpointedSequential(nn.Sequential):
    """Stages run in order; with gradient checkpointing on, each stage's activations are recomputed in backward."""

    def __init__(self, *stages: nn.Module):
        super().__init__(*stages)
        self.gradient_checkpointing = False  # ModelMixin.enable_gradient_checkpointing finds and sets this

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(stage, x)
            else:
                x = stage(x)
        return x


def mid_block(channels: int, groups: int, attention: bool) -> nn.Sequential:
    """Res, single-head attention over the H*W latent positions (cheap at latent size), Res."""
    attn = [AttentionBlock(channels, num_head_channels=channels)] if attention else []
    return nn.Sequential(VAEResBlock(channels, channels, groups), *attn, VAEResBlock(channels, channels, groups))


class KLVAE(ModelMixin, ConfigMixin):
    """Small SD-style KL autoencoder: (B, in_channels, H, W) <-> (B, latent_channels, H / f, W / f).

    f = `downsample_factor` = 2^(len(block_out_channels) - 1). Each encoder level has `layers_per_block` ResBlocks,
    each decoder level one more (as in SD's VAE). `sample_size` is the training resolution, recorded for reference.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 4,
        block_out_channels: tuple[int, ...] = (32, 64, 128),
        layers_per_block: int = 1,
        norm_num_groups: int = 8,
        sample_size: int = 32,
        mid_attention: bool = True,
    ):
        super().__init__()
        chans, g = list(block_out_channels), norm_num_groups
        if any(c % g for c in chans):
            raise ValueError(f"block_out_channels {tuple(chans)} must all be multiples of norm_num_groups ({g}).")
        if sample_size % 2 ** (len(chans) - 1):
            raise ValueError(f"sample_size ({sample_size}) must be divisible by {2 ** (len(chans) - 1)}.")

        levels, ch = [], chans[0]
        for level, out in enumerate(chans):
            blocks = []
            for _ in range(layers_per_block):
                blocks.append(VAEResBlock(ch, out, g))
                ch = out
            if level != len(chans) - 1:
                blocks.append(Downsample(ch))
            levels.append(nn.Sequential(*blocks))
        self.encoder = nn.ModuleDict(
            dict(
                conv_in=nn.Conv2d(in_channels, chans[0], 3, padding=1),
                blocks=CheckpointedSequential(*levels, mid_block(ch, g, mid_attention)),
                norm_out=nn.GroupNorm(g, ch),
                conv_out=nn.Conv2d(ch, 2 * latent_channels, 3, padding=1),  # mean and logvar
            )
        )

        levels = []
        for level, out in reversed(list(enumerate(chans))):
            blocks = []
            for _ in range(layers_per_block + 1):
                blocks.append(VAEResBlock(ch, out, g))
                ch = out
            if level != 0:
                blocks.append(Upsample(ch))
            levels.append(nn.Sequential(*blocks))
        self.decoder = nn.ModuleDict(
            dict(
                conv_in=nn.Conv2d(latent_channels, chans[-1], 3, padding=1),
                blocks=CheckpointedSequential(mid_block(chans[-1], g, mid_attention), *levels),
                norm_out=nn.GroupNorm(g, ch),
                conv_out=nn.Conv2d(ch, in_channels, 3, padding=1),
            )
        )

    @property
    def downsample_factor(self) -> int:
        """Image height and width must be multiples of this; the latent is this much smaller per side."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) in [-1, 1] -> posterior (mean, logvar), each (B, latent_channels, H / f, W / f)."""
        f = self.downsample_factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"Input size {tuple(x.shape[-2:])} is not divisible by the VAE's downsample factor {f}.")
        e = self.encoder
        h = e.conv_out(F.silu(e.norm_out(e.blocks(e.conv_in(x)))))
        mean, logvar = h.chunk(2, dim=1)  # 2 x (B, latent_channels, H / f, W / f)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (B, latent_channels, h, w) -> image (B, in_channels, h * f, w * f), not clamped."""
        d = self.decoder
        return d.conv_out(F.silu(d.norm_out(d.blocks(d.conv_in(z)))))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """(reconstruction, mean, logvar) decoding z = mean + exp(logvar / 2) * eps, eps from `generator`;
        with no generator, z = mean."""
        mean, logvar = self.encode(x)
        z = mean
        if generator is not None:
            eps = torch.randn(mean.shape, generator=generator, device=generator.device).to(mean)
            z = mean + torch.exp(0.5 * logvar) * eps
        return self.decode(z), mean, logvar


# The presets' configurations: vae_f4 turns 32x32 images into 8x8 latents with 3 levels of 32/64/128 channels;
# vae_f8 (SD's factor) 64x64 images into 8x8 latents with 4 levels of 32/64/128/128.
VAE_CONFIGS = {
    "vae_f4": dict(in_channels=3, sample_size=32, latent_channels=4, block_out_channels=(32, 64, 128)),
    "vae_f8": dict(in_channels=3, sample_size=64, latent_channels=4, block_out_channels=(32, 64, 128, 128)),
}


def vae_f4(**overrides) -> KLVAE:
    """4x downsampling: 32x32 images to 8x8 latents; 3 levels of 32/64/128 channels."""
    return KLVAE(**{**VAE_CONFIGS["vae_f4"], **overrides})


def vae_f8(**overrides) -> KLVAE:
    """8x downsampling, SD's factor: 64x64 images to 8x8 latents; 4 levels of 32/64/128/128 channels."""
    return KLVAE(**{**VAE_CONFIGS["vae_f8"], **overrides})


VAE_PRESETS = {"vae_f4": vae_f4, "vae_f8": vae_f8}
AUTOENCODER_CLASSES = ("AutoencoderKL", "KLVAE")


class VAE:
    """One interface over diffusers' `AutoencoderKL` and our `KLVAE`: images in [-1, 1] <-> raw latents.

    Runs the model as given, in its device and dtype, under no_grad (`load_vae` also puts it in eval mode).

    Latents are raw (what the encoder's mean is in); a diffusion model usually trains on
    (latents - shift_factor) * scaling_factor, with the factors recorded here (1 and 0 for a KLVAE).
    """

    def __init__(self, model: nn.Module, source: str, revision: str | None = None):
        from diffusers import AutoencoderKL

        if not isinstance(model, AutoencoderKL | KLVAE):
            raise TypeError(f"expected an AutoencoderKL or KLVAE, got {type(model).__name__}")
        self.model, self.source, self.revision = model, source, revision
        self.kind = type(model).__name__
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        c = model.config
        self.in_channels, self.latent_channels = c.in_channels, c.latent_channels
        self.downsample_factor = 2 ** (len(c.block_out_channels) - 1)
        if self.kind == "AutoencoderKL":
            self.scaling_factor = float(c.scaling_factor)
            self.shift_factor = float(getattr(c, "shift_factor", None) or 0.0)
        else:
            self.scaling_factor, self.shift_factor = 1.0, 0.0

    def _to_model(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.device.type == "cuda" else x

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (N, C, H, W) in [-1, 1] -> posterior (mean, std), float32, raw, on the images' device.

        1-channel images go into a 3-channel VAE as gray RGB."""
        if images.ndim != 4:
            raise UserError(f"VAE '{self.source}' encodes (N, C, H, W) images, got shape {tuple(images.shape)}")
        C, H, W = images.shape[1:]
        if C == 1 and self.in_channels == 3:
            images = images.expand(-1, 3, -1, -1)
        elif C != self.in_channels:
            raise UserError(f"images have {C} channels but the VAE '{self.source}' takes {self.in_channels}")
        f = self.downsample_factor
        if H % f or W % f:
            raise UserError(
                f"image shape {tuple(images.shape)}: height and width must be multiples of {f}, the downsample "
                f"factor of the VAE '{self.source}'; change the resolution"
            )
        x = self._to_model(images)
        if self.kind == "AutoencoderKL":
            dist = self.model.encode(x).latent_dist
            mean, std = dist.mean, dist.std
        else:
            mean, logvar = self.model.encode(x)
            std = torch.exp(0.5 * logvar)
        return tuple(t.to(images.device, torch.float32).contiguous() for t in (mean, std))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw latents (N, latent_channels, h, w) -> images float32 (N, C, h * f, w * f) in [-1, 1]."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise UserError(
                f"latents of shape {tuple(latents.shape)} do not fit the VAE '{self.source}', which takes "
                f"(N, {self.latent_channels}, h, w)"
            )
        z = self._to_model(latents)
        x = self.model.decode(z).sample if self.kind == "AutoencoderKL" else self.model.decode(z)
        return x.to(latents.device, torch.float32).clamp(-1, 1).contiguous()

    def config_record(self) -> dict:
        """What a latent dataset stores, to find its VAE again and check that it is the same one."""
        return dict(
            source=self.source,
            revision=self.revision,
            kind=self.kind,
            in_channels=self.in_channels,
            latent_channels=self.latent_channels,
            downsample_factor=self.downsample_factor,
            scaling_factor=self.scaling_factor,
            shift_factor=self.shift_factor,
        )


def _not_loadable(name: str, error: Exception) -> UserError:
    reason = (str(error).strip().splitlines() or [""])[0][:200]
    return UserError(
        f"VAE '{name}' is not a local directory and could not be loaded from the Hub ({type(error).__name__}: "
        f"{reason}); give a directory written by save_pretrained or a Hub id such as stabilityai/sd-vae-ft-ema"
    )


def _hub_config(repo_id: str, revision: str | None) -> tuple[dict, str | None]:
    """(config, subfolder) of a Hub autoencoder: the repo's own config.json, else a pipeline's vae/config.json."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    missing = None
    for subfolder in (None, "vae"):
        try:
            path = hf_hub_download(repo_id, "config.json", subfolder=subfolder, revision=revision)
            return json.loads(Path(path).read_text()), subfolder
        except EntryNotFoundError as e:  # also raised offline for a file not in the cache
            missing = missing or e
        except Exception as e:  # noqa: BLE001 - bad id, no such repo, gated, no network: all the user's to fix
            raise _not_loadable(repo_id, e) from None
    raise _not_loadable(repo_id, missing) from None


def load_vae(name_or_path: str, device="cpu", dtype: torch.dtype = torch.float32, revision: str | None = None) -> VAE:
    """A VAE from a local directory (an autoencoder's save_pretrained, or a diffusers pipeline with vae/) or a Hub
    id (a repo holding an AutoencoderKL, or a pipeline whose vae/ does). Weights are read from safetensors only."""
    from diffusers import AutoencoderKL

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
            path = path / "vae"
        if not (path / "config.json").is_file():
            raise UserError(
                f"VAE '{name_or_path}' holds no config.json (nor vae/config.json); give a directory written by "
                "save_pretrained or a diffusers pipeline"
            )
        config, location, subfolder = json.loads((path / "config.json").read_text()), str(path), None
    elif path.exists():
        raise UserError(f"VAE '{name_or_path}' is a file; give a directory written by save_pretrained or a Hub id")
    else:
        config, subfolder = _hub_config(name_or_path, revision)
        location = name_or_path

    class_name = config.get("_class_name")
    if class_name not in AUTOENCODER_CLASSES:
        raise UserError(f"'{name_or_path}' is a {class_name}, not an autoencoder ({' or '.join(AUTOENCODER_CLASSES)})")
    cls = AutoencoderKL if class_name == "AutoencoderKL" else KLVAE
    try:
        model = cls.from_pretrained(
            location, subfolder=subfolder, revision=revision, use_safetensors=True, torch_dtype=dtype
        )
    except (OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"VAE '{name_or_path}': could not load its safetensors weights ({reason})") from None
    if dtype == torch.float16 and config.get("force_upcast"):
        warnings.warn(
            f"VAE '{name_or_path}' is marked force_upcast (it may overflow in fp16); use bf16, fp32 or an fp16-safe "
            "VAE such as madebyollin/sdxl-vae-fp16-fix",
            stacklevel=2,
        )
    model = model.to(device).eval().requires_grad_(False)
    if model.device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return VAE(model, name_or_path, revision)
