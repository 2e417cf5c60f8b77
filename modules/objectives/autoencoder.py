"""The KL-VAE's training objective (Kingma & Welling 2014, as latent diffusion uses it): reconstruction plus a
small KL term. An autoencoder reconstructs, it does not generate: its previews are reconstructions."""

from __future__ import annotations

import torch

from modules.config import UserError, VAEArguments
from modules.networks.presets import build_vae
from modules.networks.vae import KLVAE
from modules.objectives.protocol import PreviewRequest
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

    def check_launch(self, weight_sharding: str | None) -> None:
        """The autoencoder trains under every launch: one process, DDP, FSDP and DeepSpeed."""

    def loss(self, model, x0: torch.Tensor, cond, generator: torch.Generator) -> torch.Tensor:
        """Per-sample loss (B,) in fp32: mean over pixel values of |x_rec - x0| (or its square) + kl_weight * KL / D.

        KL is summed over latent elements and D is the number of pixel values C*H*W: SD's loss (sums over pixels and
        latents) divided by D, so kl_weight means the same as there. `cond` is ignored.
        """
        return self._loss(x0, *model(x0, generator=generator))

    def refuses_pairs(self) -> str | None:
        return (
            "a VAE reconstructs images and does not learn from (noise, sample) pairs; train the student with "
            "train_cfm.py"
        )

    def _loss(self, x0, rec, mean, logvar) -> torch.Tensor:
        err = rec.float() - x0.float()
        err = err.abs() if self.args.reconstruction_loss == "l1" else err.pow(2)
        kl = kl_divergence(mean.float(), logvar.float()) / x0[0].numel()
        return err.flatten(1).mean(1) + self.args.kl_weight * kl

    @torch.no_grad()
    def reconstruct(self, model, x0: torch.Tensor) -> torch.Tensor:
        """Decoding of the posterior mean, clamped to [-1, 1]."""
        return model(x0)[0].float().clamp(-1, 1)

    def build_model(
        self, model_args, in_channels: int, resolution: int, num_classes: int = 0, text=None, num_frames: int = 0
    ) -> KLVAE:
        """The `--vae_model` preset for the data; labels and text are not used. It encodes images: clips are encoded
        frame by frame (encode_latents.py), so a VAE trains on images."""
        if num_frames:
            raise UserError(
                f"train_vae.py trains on images, but the data are clips of {num_frames} frames; train the VAE on "
                "images (e.g. --dataset_name fashion_mnist): encode_latents.py encodes clips frame by frame"
            )
        return build_vae(self.args, in_channels, resolution)

    def sample(self, model, noise, cond=None, **settings) -> torch.Tensor:
        """An autoencoder does not generate."""
        raise UserError("a vae model does not generate; use it as encode_latents.py --vae")

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

    def preview(self, model, request: PreviewRequest) -> torch.Tensor:
        """Reconstructions of the first `request.num_images` images of `request.data`, uint8 (N, C, H, W): what the
        grid shows (under the originals) and what the FID measures (rFID)."""
        images = request.data.dataset.uint8_images(request.num_images)
        out = [
            to_uint8(self.reconstruct(model, to_model_range(b).to(request.device))).cpu()
            for b in images.split(request.batch_size)
        ]
        return torch.cat(out)

    def grid_layout(self, images: torch.Tensor, data) -> tuple[torch.Tensor, int]:
        """Rows of 8 originals, each followed by the row of their reconstructions."""
        originals = data.dataset.uint8_images(len(images))
        rows = [(originals[i : i + 8], images[i : i + 8]) for i in range(0, len(images), 8)]
        return torch.cat([t for pair in rows for t in pair]), 8
