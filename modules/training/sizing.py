"""--dry_run: what a run would cost, without the data or a single real step.

The model is built on PyTorch's meta device (shapes only, no memory, no init time, so DiT-XL/2 takes a second) and
one forward and backward of the objective's loss runs there under `FlopCounterMode`, which counts the same FLOPs as
on a real device, and under a saved-tensors hook, which adds up the activations kept for the backward pass.

Memory is estimated, not measured: per parameter 4 bytes of weights, 4 of gradients, 8 of AdamW state (2 with
--use_8bit_adam) and 4 of EMA, plus the activations of one batch as the hook counts them (with
--gradient_checkpointing, only what checkpointing keeps; halved under bf16/fp16 autocast, which keeps most of them
in 16 bits; views of one tensor are counted once each, so it errs high; the parameters autograd keeps are the
weights, already counted). Allocator overhead, the recomputation of one checkpointed block and framework workspaces
come on top.

The data's shape comes from the data when it opens offline and quickly; otherwise (a Hub dataset not in the cache,
say) from the arguments, with the assumptions printed: 3 channels (or 4-channel latents at 1/8 the resolution with
--latent_dataset), 1000 classes (unless --class_conditional false or --text_encoder), and CLIP ViT-L/14's text
widths for a CLIP text encoder.

Clips are sized as the run trains on them: the input is (F, C, H, W), and FLOPs and activations are per clip, of a
video network or of the shared-noise trainer's image network over the clip's F frames.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from modules.artifacts.diffusers_folder import diffusers_network_from_config, find_diffusers_checkpoint
from modules.config import DataArguments, ModelArguments, TrainingArguments, UserError
from modules.data.sources import with_clip_length
from modules.networks.presets import is_video_model
from modules.networks.text import MINILM_SPECS, OwnTextEncoder, own_config_from_spec
from modules.training.flops import training_flops_per_image
from modules.training.setup import open_data, resolve_class_conditional

ASSUMED_CLASSES = 1000
CLIP_L_WIDTHS = (768, 768)  # token width, pooled (projected) width of openai/clip-vit-large-patch14
KNOWN_TEXT_WIDTHS = {"minilm": (384, 384)}


def data_shape(data_args: DataArguments, model_args: ModelArguments, train_args: TrainingArguments):
    """((channels, resolution, frames per clip or 0 for images), number of classes, notes on what was assumed)."""

    data_args = with_clip_length(data_args, is_video_model(model_args.model))  # as the run decides it
    try:
        opened = open_data(data_args, model_args, train_args)
    except UserError as e:
        notes = [f"data not opened ({str(e)[:120]}...): its shape is assumed"]
        if data_args.latent_dataset:
            shape = (4, data_args.resolution // 8)
            notes.append(f"4-channel latents at 1/8 of --resolution {data_args.resolution} (an SD-style VAE)")
        else:
            shape = (data_args.num_channels or 3, data_args.resolution)
            notes.append(f"{shape[0]} channels at --resolution {data_args.resolution}")
        auto = model_args.class_conditional is None and not model_args.text_encoder
        classes = ASSUMED_CLASSES if model_args.class_conditional or auto else 0
        if data_args.num_frames:
            notes.append(f"clips of {data_args.num_frames} frames (--num_frames)")
        if classes:
            notes.append(f"{classes} classes" + (" (--class_conditional auto, as for labelled data)" if auto else ""))
        return (*shape, data_args.num_frames or 0), classes, notes
    data = opened.train
    resolution = data.resolution if opened.latent else data_args.resolution
    model_args, _ = resolve_class_conditional(model_args, data)
    classes = data.num_classes if model_args.class_conditional else 0
    return (data.num_channels, resolution, data.num_frames), classes, []


def text_settings(model_args: ModelArguments, notes: list) -> dict | None:
    """The denoiser's text settings for --text_encoder (see TextConditioner.model_config), without loading weights."""
    spec = model_args.text_encoder
    if not spec:
        return None
    if spec == "own" or spec.startswith("own:"):
        with torch.device("meta"):
            encoder = OwnTextEncoder(own_config_from_spec(spec, model_args.max_text_length))
        return dict(
            text_conditioning=model_args.text_conditioning,
            text_dim=encoder.token_dim,
            pooled_dim=encoder.pooled_dim,
            text_encoder=encoder.config_record(),
        )

    if spec in MINILM_SPECS:
        widths = KNOWN_TEXT_WIDTHS["minilm"]
    else:
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(spec)
            text = getattr(config, "text_config", config)
            widths = (text.hidden_size, getattr(config, "projection_dim", None) or text.hidden_size)
        except (OSError, ValueError):
            widths = CLIP_L_WIDTHS
            notes.append(f"text encoder {spec!r} not available offline: CLIP ViT-L/14's widths {widths} assumed")
    return dict(
        text_conditioning=model_args.text_conditioning, text_dim=widths[0], pooled_dim=widths[1], text_encoder=None
    )


def pretrained_network(model_args: ModelArguments, notes: list):
    """The diffusers network of a local --init_from folder, built from its config (no weights), or None: --model's
    preset is sized for our own models (--init_from needs the same architecture), and for a Hub id, which is not
    downloaded for a dry run (noted)."""
    if not model_args.init_from:
        return None
    path = Path(model_args.init_from).expanduser()
    if not path.is_dir():
        notes.append(f"--init_from {model_args.init_from} is not read (no download): --model is sized")
        return None
    checkpoint = find_diffusers_checkpoint(path)
    return diffusers_network_from_config(checkpoint) if checkpoint is not None else None


def meta_condition(text: dict | None, num_classes: int, batch: int, max_text_length: int | None):
    if text is None:
        return torch.zeros(batch, dtype=torch.long, device="meta") if num_classes else None
    if text["text_encoder"] is not None:  # the own encoder inside the model takes token ids
        length = text["text_encoder"]["max_length"]
        return {
            "input_ids": torch.zeros(batch, length, dtype=torch.long, device="meta"),
            "input_mask": torch.ones(batch, length, dtype=torch.bool, device="meta"),
        }
    length = max_text_length or 77
    return {
        "tokens": torch.zeros(batch, length, text["text_dim"], device="meta"),
        "mask": torch.ones(batch, length, dtype=torch.bool, device="meta"),
        "pooled": torch.zeros(batch, text["pooled_dim"], device="meta"),
    }


def activation_bytes(model, objective, x0, cond) -> int:
    """Bytes of the tensors autograd keeps for backward, over one forward of the loss on `x0`. The parameters it
    keeps (a linear layer's weight, or a view of it) are the weights themselves, counted once apart: not here, where
    bytes scale with the batch."""
    total, weights = 0, {id(p) for p in model.parameters()}

    def pack(t):
        nonlocal total
        if id(t) not in weights and id(t._base) not in weights:
            total += t.numel() * t.element_size()
        return t

    generator = torch.Generator().manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        objective.loss(model, x0, cond, generator).mean()
    return total


def dry_run(data_args: DataArguments, model_args: ModelArguments, train_args: TrainingArguments, objective) -> dict:
    """Print and return the run's size: parameters, FLOPs per image (per clip for clips), estimated peak memory."""

    (channels, resolution, frames), classes, notes = data_shape(data_args, model_args, train_args)
    text = text_settings(model_args, notes)
    with torch.device("meta"):
        model = objective.build_model(model_args, channels, resolution, classes, text, frames)
        pretrained = pretrained_network(model_args, notes)
    if pretrained is not None:  # a diffusers network is fine-tuned as it is, whatever --model says
        model, channels, resolution = pretrained, pretrained.config.in_channels, pretrained.config.sample_size
        classes = pretrained.config.num_classes if classes else 0
    if train_args.gradient_checkpointing and getattr(model, "_supports_gradient_checkpointing", False):
        model.enable_gradient_checkpointing()
    params = sum(p.numel() for p in model.parameters())
    probe = 2  # images (or clips) in the meta batch: costs do not depend on the values
    shape = (frames, channels, resolution, resolution) if frames else (channels, resolution, resolution)
    x0 = torch.zeros(probe, *shape, device="meta")
    cond = meta_condition(text, classes, probe, model_args.max_text_length)
    flops = training_flops_per_image(model, objective, x0, cond, torch.Generator().manual_seed(0))
    per_sample = activation_bytes(model, objective, x0, cond) / probe
    half = train_args.mixed_precision in ("bf16", "fp16")
    batch = train_args.train_batch_size
    state_bytes = params * (4 + 4 + (2 if train_args.use_8bit_adam else 8) + 4)
    activations = per_sample * batch * (0.5 if half else 1.0)
    result = {
        "model": model_args.model if pretrained is None else model_args.init_from,
        "class": type(model).__name__,
        "input": list(shape),
        **({"num_frames": frames} if frames else {}),
        "num_classes": classes,
        "parameters": params,
        f"train_gflops_per_{'clip' if frames else 'image'}": flops / 1e9,
        "batch_per_process": batch,
        "precision": train_args.mixed_precision or "no",
        "estimated_state_gib": state_bytes / 2**30,
        "estimated_activation_gib": activations / 2**30,
        "estimated_peak_gib": (state_bytes + activations) / 2**30,
        "assumed": notes,
    }
    print_dry_run(result, flops, text is not None)
    return result


def print_dry_run(result: dict, flops: float, text: bool):
    """The dry run's summary for a reader, then `result` as one JSON line (the last line printed)."""
    unit = "clip " if "num_frames" in result else "image"
    classes, params = result["num_classes"], result["parameters"]
    print(
        f"dry run: {result['model']} ({result['class']}) on {'x'.join(map(str, result['input']))}"
        f"{f', {classes} classes' if classes else ''}{', text' if text else ''}\n"
        f"  parameters                {params:,} ({params / 1e6:.2f}M)\n"
        f"  training FLOPs per {unit}  {flops / 1e9:.3f} GFLOPs (forward + backward)\n"
        f"  estimated peak memory     {result['estimated_peak_gib']:.2f} GiB per process at batch "
        f"{result['batch_per_process']}, precision {result['precision']}: {result['estimated_state_gib']:.2f} GiB "
        f"weights, gradients, AdamW and EMA + {result['estimated_activation_gib']:.2f} GiB activations"
        + "".join(f"\n  assumed: {n}" for n in result["assumed"])
    )
    print(json.dumps(result))
