"""What sample.py does, as a diffusers pipeline: `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`
on a folder that `sample.py --export_pipeline` wrote (modules/export.py copies this file there, with the modules it
imports).

It calls the same `generate_images` as sample.py, with the same conditions, so image i depends only on (seed, i, its
label or prompt) and equals sample.py's for the same seed, sampler, steps and guidance.
"""

from __future__ import annotations

from numbers import Integral

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.models.modeling_utils import ModelMixin

from modules.data.latents import denormalize_latents
from modules.networks.text import CLIPTextEncoder, MiniLMTextEncoder, TextConditioner
from modules.networks.vae import VAE
from modules.objectives.registry import objective_from_config
from modules.objectives.samplers import generate_images

OUTPUT_TYPES = ("pil", "np", "pt")


class DenoiserPipeline(DiffusionPipeline):
    """A trained UNet (`unet`) or DiT (`transformer`) with the sampler it was trained for; `vae` decodes a latent
    model's samples, `text_encoder` and `tokenizer` encode prompts for a model trained with a frozen encoder (a
    trained "own" encoder is part of the denoiser).

    Settings, from the training run: `objective` (objective.json's name and args: the samplers and their defaults),
    `class_names`, `text_encoder_record` and `sample_prompts` of a text model, `latent_statistics` (the channel mean
    and std that latents were normalised with).
    """

    _optional_components = ["unet", "transformer", "vae", "text_encoder", "tokenizer"]

    def __init__(
        self,
        unet: ModelMixin | None = None,
        transformer: ModelMixin | None = None,
        vae: ModelMixin | None = None,
        text_encoder: torch.nn.Module | None = None,
        tokenizer=None,
        objective: dict | None = None,
        class_names: list[str] | None = None,
        text_encoder_record: dict | None = None,
        sample_prompts: list[str] | None = None,
        latent_statistics: dict | None = None,
    ):
        super().__init__()
        self.register_modules(
            unet=unet, transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer
        )
        self.register_to_config(
            objective=objective,
            class_names=class_names,
            text_encoder_record=text_encoder_record,
            sample_prompts=sample_prompts,
            latent_statistics=latent_statistics,
        )

    @property
    def denoiser(self) -> ModelMixin:
        return self.unet if self.unet is not None else self.transformer

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int] | int | None = None,
        prompt: list[str] | str | None = None,
        num_images: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str | None = None,
        seed: int = 0,
        batch_size: int = 64,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Images 0..num_images-1 of `seed`; class labels or prompts are cycled over them.

        Defaults: every class (class-conditional models) or the prompts recorded at training (text models), one
        image each (one image for an unconditional model); sampler, steps and guidance as trained. `output_type`:
        "pil" (what sample.py writes), "np" (N, H, W, C) or "pt" (N, C, H, W), floats in [0, 1].
        """
        objective = objective_from_config(self.config.objective)
        if sampler is not None and sampler not in objective.samplers:
            raise ValueError(
                f"sampler '{sampler}': this {objective.name} model samples with {', '.join(objective.samplers)}"
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type '{output_type}' is not one of {', '.join(OUTPUT_TYPES)}")
        if guidance_scale is not None and guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        device, model = self._execution_device, self.denoiser
        labels, prompts = self._class_cycle(class_labels), self._prompts(prompt)
        cycle = prompts or labels  # what the images are cycled over: as in sample.py, prompts come first
        if num_images is None:
            num_images = len(cycle) if cycle else 1
        if num_images <= 0 or batch_size <= 0:
            raise ValueError(f"num_images and batch_size must be positive, got {num_images}, {batch_size}")
        cond = [cycle[i % len(cycle)] for i in range(num_images)] if cycle else None
        null_cond = None
        if prompts is not None:
            text = TextConditioner(self._text_encoder())
            cond, null_cond = text(cond, "cpu"), text.null(device)

        decode, kept = self._latent_decoder(), []

        def decode_and_keep(x0):  # generate_images quantises to uint8: "np" and "pt" return the floats before that
            images = decode(x0) if decode is not None else x0
            kept.append(images.float().cpu())
            return images

        shape = (model.config.in_channels, model.config.sample_size, model.config.sample_size)
        progress = not getattr(self, "_progress_bar_config", {}).get("disable", False)
        images_uint8 = generate_images(
            model,
            objective,
            num_images,
            seed,
            shape,
            batch_size,
            cond,
            device,
            progress=progress,
            sampler=sampler,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            decode=decode_and_keep,
            null_cond=null_cond,
        )
        if output_type == "pil":
            images = self.numpy_to_pil(images_uint8.permute(0, 2, 3, 1).numpy() / 255.0)
        else:
            images = (torch.cat(kept) / 2 + 0.5).clamp(0, 1)  # [-1, 1] -> [0, 1]
            images = images.permute(0, 2, 3, 1).numpy() if output_type == "np" else images
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _class_cycle(self, class_labels) -> list[int] | None:
        num_classes = self.denoiser.config.num_classes
        if num_classes == 0:
            if class_labels is not None:
                raise ValueError("class_labels given, but the model is not class-conditional")
            return None
        if class_labels is None:
            return list(range(num_classes))
        labels = [class_labels] if isinstance(class_labels, Integral) else list(class_labels)
        if not labels or not all(isinstance(y, Integral) and 0 <= y < num_classes for y in labels):
            raise ValueError(f"class_labels must be class ids in [0, {num_classes}), got {class_labels!r}")
        return [int(y) for y in labels]

    def _prompts(self, prompt) -> list[str] | None:
        if self.config.text_encoder_record is None:
            if prompt is not None:
                raise ValueError("prompt given, but the model is not text-conditional")
            return None
        if prompt is None:
            return list(self.config.sample_prompts or [""])
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt is an empty list")
        return prompts

    def _text_encoder(self):
        """The encoder the model was trained with: its own (inside the denoiser), or CLIP / MiniLM as components."""
        record = self.config.text_encoder_record
        if record["kind"] == "own":
            return self.denoiser.text_model
        if record["kind"] == "clip":
            return CLIPTextEncoder(record["source"], self.text_encoder, self.tokenizer, record["max_length"])
        return MiniLMTextEncoder(self.text_encoder, self.tokenizer, record["max_length"])

    def _latent_decoder(self):
        """Normalised latents -> images in [-1, 1] for a latent model (as modules.vae.latent_decoder), else None."""
        if self.vae is None:
            return None
        vae = VAE(self.vae, source="vae")
        return lambda z: vae.decode(denormalize_latents(z, self.config.latent_statistics))
