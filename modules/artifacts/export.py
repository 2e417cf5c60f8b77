"""A trained model as a diffusers pipeline folder (sample.py --export_pipeline), which
`DiffusionPipeline.from_pretrained(folder or Hub id, trust_remote_code=True)` loads without this repository. It is the
DenoiserPipeline (modules/artifacts/pipeline.py) of the model, written by its save_pretrained:

    model_index.json             the pipeline class, its components and its settings: objective (with the shared-noise
                                 settings of a frame trainer), id2label (class names), text_conditioning (encoder
                                 record and prompts), latent_statistics, num_frames (a model of clips)
    pipeline.py, *_<digest>.py   the entry point of the pipeline class, and the package of our modules it runs
                                 (modules/artifacts/remote_code.py)
    unet/ or transformer/        the UNetModel or DiTModel (VideoUNetModel or VideoDiTModel for clips): config.json,
                                 diffusion_pytorch_model.safetensors, <folder>_model.py (entry point of the class) and
                                 the modules of the package it needs
    vae/                         latent models: diffusers' AutoencoderKL, or our KLVAE (with code, as the denoiser)
    text_encoder/, tokenizer/    models trained with a frozen CLIP or MiniLM text encoder (transformers)
    guide/                       with --guide_model: the network that guides the denoiser (autoguidance), with code
    README.md
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from modules.artifacts.model_folder import load_guide, load_model
from modules.artifacts.pipeline import DenoiserPipeline
from modules.config import UserError
from modules.data.latents import latent_decoder
from modules.networks.text import text_encoder_from_record
from modules.networks.vae import load_vae

DENOISER_FOLDERS = {
    "UNetModel": "unet",
    "DiTModel": "transformer",
    "VideoUNetModel": "unet",
    "VideoDiTModel": "transformer",
}


@contextlib.contextmanager
def directory_atomically(path: Path):
    """Yield a temporary sibling of `path` to fill, renamed to `path` at the end: a reader never sees half a folder.
    On error it is removed. `path` may exist only as an empty folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; a pipeline folder is meant to be shared
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_pipeline(model_dir: str | Path, out_dir: str | Path, guide: str | None = None) -> Path:
    """Write the pipeline folder `out_dir` (see the module docstring) for the model in `model_dir` (a training
    run's output_dir), with `guide` (as sample.py --guide_model takes it) as its autoguidance guide; the images (or
    clips) it generates are sample.py's for the same settings."""
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise UserError(f"--export_pipeline '{out}' already exists; remove it or choose another folder")
    model, objective, record = load_model(model_dir)
    if not objective.samplers:
        raise UserError(
            f"--model '{model_dir}' is a {objective.name} model, which does not generate: there is no pipeline to "
            "export (use it as encode_latents.py --vae)"
        )
    if type(model).__name__ not in DENOISER_FOLDERS:  # a diffusers network: already loadable by diffusers
        raise UserError(
            f"--export_pipeline: '{model_dir}' is a diffusers {model.config.network_class}, which diffusers loads as "
            f"it is ({model.config.network_class}.from_pretrained); this export writes models of ours"
        )
    components = {DENOISER_FOLDERS[type(model).__name__]: model}
    if guide:
        components["guide"] = load_guide(guide, model, record)
        if type(components["guide"]).__name__ not in DENOISER_FOLDERS:
            raise UserError(f"--guide_model '{guide}' is a diffusers network; the pipeline's guide is a model of ours")
    if "latent" in record:
        components["vae"] = _vae(record["latent"])
    text = record.get("text_encoder")
    if (text or {}).get("kind") in ("clip", "minilm"):  # a frozen encoder; an "own" one is part of the denoiser
        encoder = text_encoder_from_record(text)
        components.update(text_encoder=encoder.model, tokenizer=encoder.tokenizer)
    latent, class_names = record.get("latent"), record.get("class_names")
    pipe = DenoiserPipeline(
        **components,
        objective={"objective": record["objective"], "args": record["args"]},
        id2label={str(i): name for i, name in enumerate(class_names)} if class_names else None,
        text_conditioning={"encoder": text, "sample_prompts": record.get("sample_prompts")} if text else None,
        latent_statistics={k: latent[k] for k in ("channel_mean", "channel_std")} if latent else None,
        num_frames=record.get("num_frames"),
    )
    with directory_atomically(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "README.md").write_text(_model_card(record, type(model).__name__))
    return out


def _vae(latent: dict):
    """The VAE that encoded the latents, refused (as sample.py refuses it) if it is no longer that one."""
    latent_decoder(latent)  # only for its check that the recorded VAE still is the one
    return load_vae(latent["vae"]["source"], revision=latent["vae"].get("revision")).model


def _model_card(record: dict, denoiser: str) -> str:
    args, frames, output, clips = record["args"], record.get("num_frames"), "images", ""
    if frames:
        denoiser += f" for clips of {frames} frames"
        denoiser += " (the image network of the shared-noise frame trainer)" if args.get("shared_noise") else ""
        output = "frames"
        clips = f'`.frames` holds a list of {frames} PIL images per clip (`output_type="np"`: (B, F, H, W, C))'
        clips += "; clips are seeded as images are.\n\n"
    return f"""---
library_name: diffusers
---

A {denoiser} trained with the {record["objective"]} objective on `{record.get("dataset_key")}` for \
{record.get("steps")} steps. Sampling defaults: {args["sampler"]}, {args["num_inference_steps"]} steps, guidance \
{args["guidance_scale"]}.

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("path/to/this/folder", trust_remote_code=True)  # or its Hub id
{output} = pipe(batch_size=8, seed=0).{output}  # or class_labels=[...], or prompt=[...], as the model is conditioned
```

{clips}Image i is seeded from (seed, i), whatever the other images; `generator=` takes a torch.Generator, or one per
image. Needs torch, diffusers, transformers, pyyaml and regex; a model with its own text encoder also
open-clip-torch, whose CLIP vocabulary its tokenizer reads.
"""
