"""Generate images from a trained model (a training run's --output_dir).

    python sample.py --model runs/fashion_mnist_unet_cfm --output grid.png
    python sample.py --model runs/fashion_mnist_unet_cfm --class_labels 0,7,9 --num_images 30 --output samples/
    python sample.py --model runs/ddpm --sampler dpm_solver --num_inference_steps 20 --guidance_scale 2

Image i depends only on (--seed, i, its class label): the same whatever --batch_size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from modules.config import UserError, cli_entry, parse_args


@dataclass
class SampleArguments:
    model: str = field(metadata={"help": "A training run's output_dir (holds config.json and objective.json)."})
    output: str = field(default="samples.png", metadata={"help": "A .png file for a grid, or a directory for PNGs."})
    num_images: int = field(default=64, metadata={"help": "How many images."})
    batch_size: int = field(default=64, metadata={"help": "Images per forward pass (does not change the images)."})
    seed: int = field(default=0, metadata={"help": "Image i uses a generator seeded from (seed, i)."})
    sampler: str | None = field(
        default=None,
        metadata={"help": "flow: euler, heun, euler_maruyama; ddpm: ddpm, ddim, dpm_solver. Default: as trained."},
    )
    num_inference_steps: int | None = field(default=None, metadata={"help": "Sampling steps. Default: as trained."})
    guidance_scale: float | None = field(default=None, metadata={"help": "CFG scale (1: none). Default: as trained."})
    class_labels: str | None = field(
        default=None,
        metadata={"help": "Comma-separated class ids (or names) cycled over the images. Default: all classes."},
    )
    denoising_path: bool = field(
        default=False,
        metadata={"help": "Also write the first images' denoising path: <output>_denoising.png/.gif, "
                  "<output>_trajectories.png (PCA of x_t)."},
    )  # fmt: skip
    nrow: int | None = field(default=None, metadata={"help": "Images per grid row. Default: one per class."})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, ... Default: cuda when available."})
    compute_fid: bool = field(
        default=False,
        metadata={"help": "FID (Inception) of the images against the model's training data (from run_config.json)."},
    )
    fid_reference_samples: int | None = field(
        default=None, metadata={"help": "Training images for the reference statistics. Default: --num_images."}
    )
    nfe_sweep: str | None = field(
        default=None,
        metadata={"help": "Comma-separated step counts, e.g. 5,10,20,50: FID per sampler and steps, written to "
                  "<output>.md and <output>.json (implies --compute_fid)."},
    )  # fmt: skip
    samplers: str | None = field(
        default=None, metadata={"help": "Comma-separated samplers for --nfe_sweep. Default: --sampler or as trained."}
    )


def parse_class_labels(spec: str | None, num_classes: int, class_names) -> list[int] | None:
    if num_classes == 0:
        if spec:
            raise UserError("--class_labels given, but the model is not class-conditional")
        return None
    if not spec:
        return list(range(num_classes))
    names = {n.lower(): i for i, n in enumerate(class_names or [])}
    labels = []
    for item in spec.split(","):
        item = item.strip()
        label = int(item) if item.lstrip("-").isdigit() else names.get(item.lower())
        if label is None or not 0 <= label < num_classes:
            raise UserError(f"--class_labels: '{item}' is not a class id in [0, {num_classes}) or a class name")
        labels.append(label)
    return labels


@cli_entry
def main(argv=None):
    from modules.models import load_model
    from modules.samplers import generate_images
    from modules.visualize import DenoisingRecorder, save_image, save_image_grid, write_denoising_figures

    (args,) = parse_args((SampleArguments,), argv, description=__doc__)
    if args.num_images <= 0 or args.batch_size <= 0:
        raise UserError(f"--num_images and --batch_size must be positive, got {args.num_images}, {args.batch_size}")
    if args.guidance_scale is not None and args.guidance_scale < 0:
        raise UserError(f"--guidance_scale must be >= 0, got {args.guidance_scale}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, objective, record = load_model(args.model, device)
    if args.sampler and args.sampler not in objective.samplers:
        raise UserError(
            f"--sampler '{args.sampler}': this {objective.name} model samples with {', '.join(objective.samplers)}"
        )
    num_classes = model.config.num_classes
    cycle = parse_class_labels(args.class_labels, num_classes, record.get("class_names"))
    labels = [cycle[i % len(cycle)] for i in range(args.num_images)] if cycle else None
    shape = (model.config.in_channels, model.config.sample_size, model.config.sample_size)
    if args.nfe_sweep:
        return nfe_sweep(args, model, objective, shape, labels, device, Path(args.output))
    recorder = DenoisingRecorder(max_samples=min(args.num_images, 10)) if args.denoising_path else None
    images = generate_images(
        model,
        objective,
        args.num_images,
        args.seed,
        shape,
        args.batch_size,
        labels,
        device,
        progress=True,
        sampler=args.sampler,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        callback=recorder,
    )
    out = Path(args.output)
    if recorder is not None:
        written = write_denoising_figures(recorder, out.parent, out.stem)
        print("denoising path:", ", ".join(str(p) for p in written.values()))
    if out.suffix.lower() == ".png":
        save_image_grid(images, out, nrow=args.nrow or (len(cycle) if cycle and len(cycle) <= 16 else None))
    else:
        out.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            save_image(image, out / f"{i:06d}.png")
    print(f"wrote {len(images)} images to {out}")
    if args.compute_fid:
        fid = fid_against_training_data(args, images)
        print(f"FID ({len(images)} images vs {args.fid_reference_samples or len(images)} training images): {fid:.2f}")


def fid_against_training_data(args, images) -> float:
    """FID against the first training images of the run that made the model (statistics cached on disk)."""
    import dataclasses
    import json

    from modules.config import DataArguments
    from modules.data import load_train_data
    from modules.evaluation import compute_fid

    run_config = Path(args.model) / "run_config.json"
    if not run_config.is_file():
        raise UserError(f"--compute_fid needs {run_config} to know the training data")
    config = json.loads(run_config.read_text())["config"]
    data_args = DataArguments(
        **{f.name: config[f.name] for f in dataclasses.fields(DataArguments) if f.name in config}
    )
    n_ref = args.fid_reference_samples or len(images)
    data = load_train_data(dataclasses.replace(data_args, max_train_samples=n_ref))
    return compute_fid(images, f"{data.key}-first{n_ref}", lambda: data.dataset.uint8_images(n_ref))


def nfe_sweep(args, model, objective, shape, labels, device, out: Path):
    """FID for each sampler and number of steps; a markdown table and JSON at <out>.md / <out>.json."""
    import json

    from modules.samplers import generate_images

    samplers = (args.samplers or args.sampler or objective.args.sampler).split(",")
    for name in samplers:
        if name not in objective.samplers:
            raise UserError(f"--samplers: '{name}' is not one of {', '.join(objective.samplers)}")
    rows = []
    for sampler in samplers:
        for steps in (int(s) for s in args.nfe_sweep.split(",")):
            images = generate_images(model, objective, args.num_images, args.seed, shape, args.batch_size, labels,
                                     device, progress=True, sampler=sampler, num_inference_steps=steps,
                                     guidance_scale=args.guidance_scale)  # fmt: skip
            nfe = 2 * steps - 1 if sampler == "heun" else steps
            rows.append(
                {"sampler": sampler, "steps": steps, "nfe": nfe, "fid": fid_against_training_data(args, images)}
            )
            print(f"{sampler} {steps} steps (NFE {nfe}): FID {rows[-1]['fid']:.2f}")
    guidance = objective.args.guidance_scale if args.guidance_scale is None else args.guidance_scale
    n_ref = args.fid_reference_samples or args.num_images
    table = [f"FID of {args.num_images} samples vs {n_ref} training images, guidance {guidance} "
             "(NFE counts one conditional + unconditional pass as one).", "",
             "| sampler | steps | NFE | FID |", "|---|---|---|---|"]  # fmt: skip
    table += [f"| {r['sampler']} | {r['steps']} | {r['nfe']} | {r['fid']:.2f} |" for r in rows]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(table) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"guidance_scale": guidance, "rows": rows}, indent=2))
    print("\n".join(table))


if __name__ == "__main__":
    main()
