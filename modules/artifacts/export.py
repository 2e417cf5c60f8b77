"""A trained model as a diffusers pipeline folder (sample.py --export_pipeline), which
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` loads without this repository:

    model_index.json             the pipeline class (DenoiserPipeline, modules/pipeline.py), its components and its
                                 settings: objective, class names, text encoder record and prompts, latent statistics
    pipeline.py                  entry point of the pipeline class
    modules_<digest>/            the modules the pipeline and the models run, copied, their imports made relative
    unet/ or transformer/        the UNetModel or DiTModel: config.json, diffusion_pytorch_model.safetensors,
                                 <folder>_model.py (entry point of the class) and modules_<digest>/ again
    vae/                         latent models: diffusers' AutoencoderKL, or our KLVAE (with code, as the denoiser)
    text_encoder/, tokenizer/    models trained with a frozen CLIP or MiniLM text encoder (transformers)
    README.md

diffusers copies into its module cache only the files that an entry point imports relatively, and only from the
entry point's own folder; so each folder with code holds the whole package, and its entry point imports every file
of it. The package is named by a digest of its sources, so that exports of different versions of the code loaded in
one process do not share modules.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from modules.artifacts.model_folder import load_model
from modules.config import UserError
from modules.data.latents import latent_decoder
from modules.networks.text import text_encoder_from_record
from modules.networks.vae import load_vae

PIPELINE_CLASS = "DenoiserPipeline"
DENOISER_FOLDERS = {"UNetModel": "unet", "DiTModel": "transformer"}
# The package: the pipeline, the networks its components are, and every module of ours they import, recursively.
PACKAGE_ROOTS = ("modules.artifacts.pipeline", "modules.networks.presets")
_OWN_IMPORT = re.compile(r"^(\s*)from (modules(?:\.\w+)*) import (\w+)?", re.MULTILINE)


def package_sources() -> dict[str, str]:
    """{file name: source} of the package's modules, flat: each module keeps the last part of its name, and its
    imports of ours (`from modules.data.latents import x`, `from modules.data import latents`) become relative
    (`from .latents import x`, `from . import latents`)."""
    root = Path(__file__).resolve().parents[2]
    sources, paths, todo = {}, {}, list(PACKAGE_ROOTS)

    def file_of(module: str) -> Path:
        return root.joinpath(*module.split(".")).with_suffix(".py")

    def relative(match: re.Match) -> str:
        indent, module, first = match.groups()
        if file_of(module).is_file():
            todo.append(module)
            return f"{indent}from .{module.rpartition('.')[2]} import {first or ''}"
        todo.append(f"{module}.{first}")  # a module of a package: `from modules.data import latents`
        return f"{indent}from . import {first}"

    while todo:
        module = todo.pop()
        path = file_of(module)
        if path.stem in paths:
            if paths[path.stem] != path:
                raise RuntimeError(f"{paths[path.stem]} and {path} would have the same name in the exported package")
            continue
        paths[path.stem] = path
        sources[path.stem] = _OWN_IMPORT.sub(relative, path.read_text())
    for name, text in sources.items():
        if re.search(r"^\s*(from|import) modules\b", text, re.MULTILINE):
            raise RuntimeError(f"{paths[name]} imports modules in a form the export does not rewrite")
    return sources


def package_name(sources: dict[str, str]) -> str:
    return "modules_" + hashlib.sha256(json.dumps(sources, sort_keys=True).encode()).hexdigest()[:10]


def write_code(folder: Path, sources: dict[str, str], entry: str, cls: tuple[str, str]):
    """The package in `folder`, and the entry point `<entry>.py` (as model_index.json names it) that imports all of
    it and names the class `cls` (module, class name)."""
    package = package_name(sources)
    (folder / package).mkdir(parents=True)
    for name, text in sources.items():
        (folder / package / f"{name}.py").write_text(text)
    module, class_name = cls
    lines = [
        f'"""{class_name}, for diffusers\' custom code loading; the code is in {package}/."""',
        "",
        "# diffusers copies to its module cache only the files imported here: so, every file of the package.",
        *(f"from .{package}.{name} import __name__ as _  # noqa: F401" for name in sorted(sources)),
        f"from .{package}.{module} import {class_name}  # noqa: F401",
        "",
    ]
    (folder / f"{entry}.py").write_text("\n".join(lines))


def class_path(obj) -> tuple[str, str]:
    """(module name in the package, class name) of a model of ours."""
    return type(obj).__module__.rpartition(".")[2], type(obj).__name__


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


def export_pipeline(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the pipeline folder `out_dir` (see the module docstring) for the model in `model_dir` (a training
    run's output_dir); the images it generates are sample.py's for the same settings."""
    import diffusers

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
    sources = package_sources()
    index = {"_class_name": ["pipeline", PIPELINE_CLASS], "_diffusers_version": diffusers.__version__}
    with directory_atomically(out) as tmp:
        name = DENOISER_FOLDERS[type(model).__name__]
        model.save_pretrained(tmp / name, safe_serialization=True)
        write_code(tmp / name, sources, f"{name}_model", class_path(model))
        index[name] = [f"{name}_model", type(model).__name__]
        if "latent" in record:
            index["vae"] = _write_vae(tmp / "vae", record["latent"], sources)
        if (record.get("text_encoder") or {}).get("kind") in ("clip", "minilm"):
            index.update(_write_text_encoder(tmp, record["text_encoder"]))
        write_code(tmp, sources, "pipeline", ("pipeline", PIPELINE_CLASS))
        latent = record.get("latent")
        index.update(
            objective={"objective": record["objective"], "args": record["args"]},
            class_names=record.get("class_names"),
            text_encoder_record=record.get("text_encoder"),
            sample_prompts=record.get("sample_prompts"),
            latent_statistics={k: latent[k] for k in ("channel_mean", "channel_std")} if latent else None,
        )
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        (tmp / "README.md").write_text(_model_card(record, index))
    return out


def _write_vae(folder: Path, latent: dict, sources: dict[str, str]) -> list[str]:
    """The VAE that encoded the latents, refused (as sample.py refuses it) if it is no longer that one."""

    latent_decoder(latent)  # only for its check that the recorded VAE still is the one
    vae = load_vae(latent["vae"]["source"], revision=latent["vae"].get("revision")).model
    vae.save_pretrained(folder, safe_serialization=True)
    if type(vae).__name__ == "AutoencoderKL":
        return ["diffusers", "AutoencoderKL"]
    write_code(folder, sources, "vae_model", class_path(vae))
    return ["vae_model", "KLVAE"]


def _write_text_encoder(folder: Path, record: dict) -> dict:
    """A frozen text encoder and its tokenizer (transformers classes) as the components text_encoder, tokenizer."""

    encoder = text_encoder_from_record(record)
    encoder.model.save_pretrained(folder / "text_encoder", safe_serialization=True)
    encoder.tokenizer.save_pretrained(folder / "tokenizer")
    return {
        "text_encoder": ["transformers", type(encoder.model).__name__],
        "tokenizer": ["transformers", type(encoder.tokenizer).__name__],
    }


def _model_card(record: dict, index: dict) -> str:
    denoiser = next(index[k][1] for k in DENOISER_FOLDERS.values() if k in index)
    args = record["args"]
    return f"""---
library_name: diffusers
---

A {denoiser} trained with the {record["objective"]} objective on `{record.get("dataset_key")}` for \
{record.get("steps")} steps. Sampling defaults: {args["sampler"]}, {args["num_inference_steps"]} steps, guidance \
{args["guidance_scale"]}.

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("path/to/this/folder", trust_remote_code=True)
images = pipe(num_images=8, seed=0).images  # and class_labels=[...] or prompt=[...], as the model is conditioned
```

Image i is seeded from (seed, i), whatever the batch size. Needs torch, diffusers, transformers, pyyaml and regex;
a model with its own text encoder also open-clip-torch, whose CLIP vocabulary its tokenizer reads.
"""
