"""The KL-VAE's training objective (Kingma & Welling 2014, as latent diffusion uses it): reconstruction plus a
small KL term. An autoencoder reconstructs, it does not generate: its previews are reconstructions."""

from __future__ import annotations

import torch

from modules.config import UserError, VAEArguments
from modules.networks.vae import KLVAE, VAE_CONFIGS, VAE_PRESETS
from modules.pixels import to_model_range, to_uint8


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) = 0.5 * sum(mean^2 + exp(logvar) - 1 - logvar), summed per sample: (B,)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1]: 10 log10(2^2 / MSE), data range 2. (N, ...) -> (N,)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse)


class VAEObjective:
    """KL-VAE training loss; no samplers (an autoencoder reconstructs, it does not generate)."""

    name = "vae"
    samplers = ()

    def __init__(self, args: VAEArguments):
        self.args = args

    def loss(self, model, x0: torch.Tensor, cond, generator: torch.Generator) -> torch.Tensor:
        """Per-sample loss (B,) in fp32: mean over pixel values of |x_rec - x0| (or its square) + kl_weight * KL / D.

        KL is summed over latent elements and D is the number of pixel values C*H*W: SD's loss (sums over pixels and
        latents) divided by D, so kl_weight means the same as there. `cond` is ignored.
        """
        return self._loss(x0, *model(x0, generator=generator))

    def _loss(self, x0, rec, mean, logvar) -> torch.Tensor:
        err = rec.float() - x0.float()
        err = err.abs() if self.args.reconstruction_loss == "l1" else err.pow(2)
        kl = kl_divergence(mean.float(), logvar.float()) / x0[0].numel()
        return err.flatten(1).mean(1) + self.args.kl_weight * kl

    @torch.no_grad()
    def reconstruct(self, model, x0: torch.Tensor) -> torch.Tensor:
        """Decoding of the posterior mean, clamped to [-1, 1]."""
        return model(x0)[0].float().clamp(-1, 1)

    # What the training loop asks of every objective besides `loss` (see modules/training.py).

    def build_model(self, model_args, in_channels: int, resolution: int, num_classes: int = 0, text=None) -> KLVAE:
        """The `--vae_model` preset for the data; labels and text are not used."""

        a = self.args
        if a.vae_model not in VAE_PRESETS:
            raise UserError(f"unknown --vae_model '{a.vae_model}' (presets: {', '.join(VAE_PRESETS)})")
        if a.latent_channels < 1:
            raise UserError(f"--latent_channels must be positive, got {a.latent_channels}")
        overrides = dict(in_channels=in_channels, sample_size=resolution, latent_channels=a.latent_channels)
        if a.vae_base_channels is not None:
            preset = VAE_CONFIGS[a.vae_model]["block_out_channels"]
            overrides["block_out_channels"] = tuple(c * a.vae_base_channels // preset[0] for c in preset)
        try:
            return VAE_PRESETS[a.vae_model](**overrides)
        except ValueError as e:
            raise UserError(f"--vae_model {a.vae_model} at --resolution {resolution}: {e}") from None

    @torch.no_grad()
    def validation(self, model, x0: torch.Tensor, cond, seed: int, num_bins: int, batch_size: int = 256) -> dict:
        """Held-out loss with the posterior mean as the latent (no sampling noise), and reconstruction PSNR (dB)."""
        device = next(model.parameters()).device
        loss, db = [], []
        for batch in x0.split(batch_size):
            batch = batch.to(device)
            rec, mean, logvar = model(batch)
            loss.append(self._loss(batch, rec, mean, logvar).cpu())
            db.append(psnr(rec.clamp(-1, 1), batch).cpu())
        return {"val_loss": torch.cat(loss).mean().item(), "val_psnr": torch.cat(db).mean().item()}

    def preview(
        self,
        model,
        num_images: int,
        seed: int,
        shape,
        labels,
        device,
        data=None,
        decode=None,
        callback=None,
        progress: bool = False,
        null_cond=None,
    ) -> torch.Tensor:
        """Reconstructions of the first `num_images` images of `data`, uint8 (N, C, H, W): what the grid shows
        (under the originals) and what the FID measures (rFID)."""

        images = data.dataset.uint8_images(num_images)
        out = [to_uint8(self.reconstruct(model, to_model_range(b).to(device))).cpu() for b in images.split(64)]
        return torch.cat(out)

    def grid_layout(self, images: torch.Tensor, data) -> tuple[torch.Tensor, int]:
        """Rows of 8 originals, each followed by the row of their reconstructions."""
        originals = data.dataset.uint8_images(len(images))
        rows = [(originals[i : i + 8], images[i : i + 8]) for i in range(0, len(images), 8)]
        return torch.cat([t for pair in rows for t in pair]), 8
