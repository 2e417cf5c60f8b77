"""What sample.py does, as a diffusers pipeline: `DiffusionPipeline.from_pretrained(folder or Hub id,
trust_remote_code=True)` on a folder that `sample.py --export_pipeline` or `save_pretrained` wrote, called as
diffusers' own pipelines are called (docs/hub.md).

It calls the same `generate_images` as sample.py, with the same conditions: with `seed=s`, image i depends only on
(s, i, its label or prompt) and equals sample.py's `--seed s` image i for the same sampler, steps and guidance. A
model of clips (a video network, or an image network trained with --shared_noise) generates clips, returned as
`.frames` as diffusers' video pipelines return them; clip i is sample.py's clip i.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from PIL import Image

from modules.artifacts.remote_code import own_module, this_package, write_code
from modules.data.latents import denormalize_latents
from modules.networks.text import CLIPTextEncoder, MiniLMTextEncoder, TextConditioner
from modules.networks.vae import VAE
from modules.objectives.registry import objective_from_config
from modules.objectives.samplers import generate_images, parse_guidance_interval, sampler_problem

OUTPUT_TYPES = ("pil", "np", "pt")
SEED_RANGE = 2**32  # a seed drawn from a torch.Generator; seed * 1_000_003 + i must stay a valid manual_seed


@dataclass
class ClipPipelineOutput(BaseOutput):
    """The clips of a model of clips, as diffusers' video pipelines return them (TextToVideoSDPipelineOutput):
    `frames` is a list of clips, each a list of PIL images ("pil"), or floats in [0, 1] of shape (B, F, H, W, C)
    ("np") or (B, F, C, H, W) ("pt")."""

    frames: list[list[Image.Image]] | np.ndarray | torch.Tensor


class DenoiserPipeline(DiffusionPipeline):
    """A trained UNet (`unet`) or DiT (`transformer`) with the sampler it was trained for; `vae` decodes a latent
    model's samples, `text_encoder` and `tokenizer` encode prompts for a model trained with a frozen encoder (a
    trained "own" encoder is part of the denoiser). `guide`, optional, is a smaller or less-trained denoiser of
    the same kind that guides this one in place of its unconditional pass (autoguidance, `sample.py --guide_model`).

    Settings, from the training run: `objective` (objective.json's name and args: the samplers and their defaults),
    `id2label` ({"0": class name, ...}, as DiTPipeline's), `text_conditioning` of a text model ({"encoder": its
    record, "sample_prompts": the captions previews used}), `latent_statistics` (the channel mean and std that
    latents were normalised with), `num_frames` of a model of clips (None for images: a video network's clip length,
    or that of the clips an image network learnt with shared noise, whose settings are in `objective`). None of them
    is a list: diffusers reads a list in model_index.json as a component.
    """

    _optional_components = ["unet", "transformer", "vae", "text_encoder", "tokenizer", "guide"]

    def __init__(
        self,
        unet: ModelMixin | None = None,
        transformer: ModelMixin | None = None,
        vae: ModelMixin | None = None,
        text_encoder: torch.nn.Module | None = None,
        tokenizer=None,
        guide: ModelMixin | None = None,
        objective: dict | None = None,
        id2label: dict[str, str] | None = None,
        text_conditioning: dict | None = None,
        latent_statistics: dict | None = None,
        num_frames: int | None = None,
    ):
        super().__init__()
        self.register_modules(
            unet=unet, transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, guide=guide
        )
        self.register_to_config(
            objective=objective,
            id2label=id2label,
            text_conditioning=text_conditioning,
            latent_statistics=latent_statistics,
            num_frames=num_frames,
        )
        self.labels = {name: int(i) for i, name in (id2label or {}).items()}  # class name -> id, as DiTPipeline's

    @property
    def denoiser(self) -> ModelMixin:
        return self.unet if self.unet is not None else self.transformer

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Class names -> the ids `class_labels` takes, as DiTPipeline.get_label_ids."""
        names = [label] if isinstance(label, str) else list(label)
        unknown = [name for name in names if name not in self.labels]
        if unknown:
            raise ValueError(f"unknown class name(s) {unknown}; the classes are {list(self.labels)}")
        return [self.labels[name] for name in names]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        class_labels: int | list[int] | None = None,
        batch_size: int | None = None,
        num_images_per_prompt: int = 1,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_interval: str | tuple[float, float] | None = None,
        sampler: str | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | None = None,
        max_batch_size: int = 64,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Generate images, called as diffusers' pipelines are.

        How many, and of what: `class_labels` (a list, or one int) gives one image per label, as DiTPipeline;
        `prompt` (a str or a list) gives `num_images_per_prompt` images per prompt, each prompt's together, as the
        Stable Diffusion pipelines; `batch_size` is the number of images, as DDPMPipeline: without labels or prompts
        it cycles over every class (a class-conditional model) or the prompts recorded at training (a text model).
        Given with labels or prompts, it must equal their number of images. Defaults: one image per class, per
        recorded prompt, or one image (an unconditional model). Sampler, steps and guidance default to the trained.
        `guidance_interval` (LO, HI): guide only at times t in [LO, HI] (t = 1 is noise), one pass elsewhere. A
        pipeline with a `guide` guides with it (autoguidance) in place of the unconditional pass.

        Randomness, reproducible in each form:
        - `seed=s`: image i is drawn from its own generator seeded by (s, i): it equals sample.py's `--seed s` image i,
          whatever the other images and `max_batch_size`.
        - `generator`, one torch.Generator: one number drawn from it is the seed, as above. The same generator state
          gives the same images (`torch.Generator().manual_seed(0)` every call), and the generator advances.
        - `generator`, a list of one torch.Generator per image: image i draws all its noise from generator i alone.
        - neither: the seed is drawn from torch's global generator (`torch.manual_seed` fixes it), as diffusers does.
        `generator` and `seed` together are refused: one of them says where the randomness comes from.

        `max_batch_size`: images sampled at once (memory; the images do not depend on it). `output_type`: "pil"
        (what sample.py writes), "np" (N, H, W, C) or "pt" (N, C, H, W), floats in [0, 1]. Returns an
        ImagePipelineOutput (`.images`), or the tuple `(images,)` when `return_dict=False`.

        A model of clips (`num_frames` set) makes clips, counted and seeded as images (clip i is sample.py's clip i),
        as a ClipPipelineOutput (`.frames`, as diffusers' video pipelines; see ClipPipelineOutput), or `(frames,)`.
        """
        objective = objective_from_config(self.config.objective)
        guidance = (guidance_scale, guidance_interval)
        _check_settings(objective, sampler, num_inference_steps, guidance, max_batch_size, output_type)
        num_images, conditions = self._conditions(prompt, class_labels, batch_size, num_images_per_prompt)
        seed, generators = _randomness(generator, seed, num_images)
        device, model = self._execution_device, self.denoiser
        cond, null_cond = conditions, None
        if self.config.text_conditioning is not None:
            text = TextConditioner(self._text_encoder())
            cond, null_cond = text(conditions, "cpu"), text.null(device)

        decode, kept = self._latent_decoder(), []

        def decode_and_keep(x0):  # generate_images quantises to uint8: "np" and "pt" return the floats before that
            images = decode(x0) if decode is not None else x0
            kept.append(images.float().cpu())
            return images

        steps = num_inference_steps or objective.args.num_inference_steps
        settings = dict(sampler=sampler, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        settings.update(guidance_interval=guidance_interval, guide_model=self.guide, null_cond=null_cond)
        with self.progress_bar(total=-(-num_images // max_batch_size) * steps) as bar:
            images_uint8 = generate_images(
                *(model, objective, num_images, seed, self.sample_shape, max_batch_size, cond, device),
                generators=generators,
                decode=decode_and_keep,
                callback=lambda *_: bar.update(),
                **settings,
            )
        self.maybe_free_model_hooks()
        return self._output(images_uint8, kept, output_type, return_dict)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """What one sample is: an image (C, H, W), or a clip (F, C, H, W) of a video network or of shared-noise
        frames."""
        config = self.denoiser.config
        image = (config.in_channels, config.sample_size, config.sample_size)
        return (self.config.num_frames, *image) if self.config.num_frames else image

    def _output(self, images_uint8: torch.Tensor, floats: list[torch.Tensor], output_type: str, return_dict: bool):
        """PIL images (sample.py's PNGs; a list of them per clip), or for "np" and "pt" the floats in [0, 1] before
        they were quantised, channels last for "np"; in an ImagePipelineOutput, or a ClipPipelineOutput for clips."""
        if output_type == "pil":
            pixels = images_uint8.movedim(-3, -1).numpy() / 255.0  # (N, [F,] H, W, C)
            clips = self.config.num_frames
            images = [self.numpy_to_pil(clip) for clip in pixels] if clips else self.numpy_to_pil(pixels)
        else:
            images = (torch.cat(floats) / 2 + 0.5).clamp(0, 1)  # [-1, 1] -> [0, 1]
            images = images.movedim(-3, -1).numpy() if output_type == "np" else images
        if not return_dict:
            return (images,)
        return ClipPipelineOutput(frames=images) if self.config.num_frames else ImagePipelineOutput(images=images)

    def _conditions(self, prompt, class_labels, batch_size, num_images_per_prompt) -> tuple[int, list | None]:
        """(number of images, the label or prompt of each image; None for an unconditional model)."""
        if batch_size is not None and not (isinstance(batch_size, Integral) and batch_size > 0):
            raise ValueError(f"batch_size is the number of images: a positive int, got {batch_size!r}")
        if not (isinstance(num_images_per_prompt, Integral) and num_images_per_prompt > 0):
            raise ValueError(f"num_images_per_prompt must be a positive int, got {num_images_per_prompt!r}")
        text, num_classes = self.config.text_conditioning, self.denoiser.config.num_classes
        kind = "text-conditional" if text else "class-conditional" if num_classes else "unconditional"
        if prompt is not None and text is None:
            raise ValueError(f"prompt given, but the model is not text-conditional (it is {kind})")
        if class_labels is not None and (text is not None or not num_classes):  # a text model samples from prompts
            raise ValueError(f"class_labels given, but the model is not class-conditional (it is {kind})")
        if num_images_per_prompt != 1 and text is None:
            raise ValueError(
                f"num_images_per_prompt is for text-conditional models (this one is {kind}): use batch_size"
            )
        if text is not None:
            explicit = prompt is not None or num_images_per_prompt != 1
            prompts = _prompt_list(prompt) if prompt is not None else list(text["sample_prompts"] or [""])
            cycle = [p for p in prompts for _ in range(num_images_per_prompt)]  # each prompt's images together
            what = "len(prompt) x num_images_per_prompt"
        elif num_classes:
            explicit, what = class_labels is not None, "len(class_labels)"
            cycle = _label_list(class_labels, num_classes) if explicit else list(range(num_classes))
        else:
            return batch_size or 1, None
        if batch_size is None:
            return len(cycle), cycle
        if explicit and batch_size != len(cycle):
            raise ValueError(f"batch_size={batch_size} contradicts {what} = {len(cycle)} images: give one of them")
        return batch_size, [cycle[i % len(cycle)] for i in range(batch_size)]

    def _text_encoder(self):
        """The encoder the model was trained with: its own (inside the denoiser), or CLIP / MiniLM as components."""
        record = self.config.text_conditioning["encoder"]
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

    # --- Saving: diffusers' save_pretrained, with the code that loads the folder again -------------------------------

    def _own_components(self) -> list[str]:
        """The components whose class is ours: they need their code in their folder."""
        names = ("unet", "transformer", "vae", "guide")
        return [n for n in names if getattr(self, n) is not None and own_module(type(getattr(self, n)))]

    def save_config(self, save_directory, **kwargs):
        """The last step of diffusers' save_pretrained, before any upload: model_index.json, and the code
        (modules/artifacts/remote_code.py) in the folder and in each component folder of ours."""
        folder, package = Path(save_directory), this_package()
        own = {name: type(getattr(self, name)) for name in self._own_components()}
        for name, cls in own.items():
            write_code(folder / name, package, f"{name}_model", cls)
        write_code(folder, package, "pipeline", type(self), own)
        super().save_config(save_directory, **kwargs)

    def to_json_string(self) -> str:
        """model_index.json as diffusers writes it, with this class and our components named by the entry points
        that from_pretrained(trust_remote_code=True) loads them from."""
        index = json.loads(super().to_json_string())
        index["_class_name"] = ["pipeline", type(self).__name__]
        for name in self._own_components():
            index[name] = [f"{name}_model", type(getattr(self, name)).__name__]
        return json.dumps(index, indent=2, sort_keys=True) + "\n"


def _check_settings(objective, sampler, num_inference_steps, guidance, max_batch_size, output_type):
    guidance_scale, guidance_interval = guidance
    if sampler is not None and (problem := sampler_problem(sampler, objective.name, objective.samplers)):
        raise ValueError(f"sampler {problem}")
    if num_inference_steps is not None and not (isinstance(num_inference_steps, Integral) and num_inference_steps > 0):
        raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
    if guidance_scale is not None and guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
    try:
        parse_guidance_interval(guidance_interval)
    except ValueError as e:
        raise ValueError(f"guidance_interval: {e}") from None
    if not (isinstance(max_batch_size, Integral) and max_batch_size > 0):
        raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type '{output_type}' is not one of {', '.join(OUTPUT_TYPES)}")


def _label_list(class_labels, num_classes: int) -> list[int]:
    if isinstance(class_labels, torch.Tensor):
        class_labels = class_labels.tolist()
    labels = [class_labels] if isinstance(class_labels, Integral) else list(class_labels)
    if not labels or not all(isinstance(y, Integral) and 0 <= y < num_classes for y in labels):
        raise ValueError(f"class_labels must be class ids in [0, {num_classes}), got {class_labels!r}")
    return [int(y) for y in labels]


def _prompt_list(prompt) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt must be a str or a non-empty list of str, got {prompt!r}")
    return prompts


def _randomness(generator, seed, num_images: int) -> tuple[int | None, list[torch.Generator] | None]:
    """(the seed, None), or (None, one generator per image): see DenoiserPipeline.__call__."""
    if generator is not None and seed is not None:
        raise ValueError("generator and seed both given: pass one of them (seed=s is sample.py's --seed s)")
    if isinstance(generator, (list, tuple)):
        if len(generator) != num_images or not all(isinstance(g, torch.Generator) for g in generator):
            raise ValueError(
                f"generator is a list of {len(generator)}, for {num_images} images: give one torch.Generator per "
                "image, or a single one"
            )
        return None, list(generator)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")
        return int(torch.randint(SEED_RANGE, (), generator=generator, device=generator.device)), None
    if seed is None:
        return int(torch.randint(SEED_RANGE, ())), None
    if not isinstance(seed, Integral):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return int(seed), None
