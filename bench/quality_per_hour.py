"""Quality per CPU-hour: the Fashion-MNIST recipe against a diffusers-examples-style DDPM, on the same wall clock.

    python bench/quality_per_hour.py                                    # 10 minutes of training each, 2,000 samples
    python bench/quality_per_hour.py --budget_minutes 30 --num_samples 5000 --output_dir runs/quality_30min

Ours: `train_cfm.py --config configs/fashion_mnist_unet_cfm.yaml`, stopped by `--max_train_minutes`, then finished
the way a user finishes a stopped run (`--resume_from_checkpoint latest`, with `--max_train_steps` at the step it
reached): the EMA weights sampled as the recipe samples (Heun, 20 steps, guidance 1.5) and evaluated by the script.
Intermediate grids, validation and checkpoints are off, so the budget is all training.

Baseline: what diffusers' examples/unconditional_image_generation/train_unconditional.py does, given class labels:
  model      UNet2DModel of our UNet's layout and exactly its parameter count (bench/train_throughput.py's
             unet_twin), class embedding included;
  objective  DDPMScheduler (1000 steps, linear betas), epsilon prediction, MSE, uniform timesteps;
  optimizer  AdamW with the example's betas (0.95, 0.999), weight decay 1e-6 and eps 1e-8;
  schedule   the example's cosine with linear warm-up, its horizon the time budget (the fraction of the budget spent
             stands for the fraction of steps done, which is not known in advance);
  EMA        diffusers' EMAModel with the example's warm-up (inv_gamma 1, power 3/4) and max decay 0.9999;
  sampler    DDIM, 50 steps (the example samples with 1000 DDPM steps: hours for 2,000 images on this CPU).
Learning rate, warm-up steps, batch size, flips and the data (the same in-memory Fashion-MNIST tensors) are the
recipe's, so the two differ in what each stack does, not in tuning.

Both are scored the same way (modules.evaluation.evaluate_generated): Inception FID of --num_samples images with
classes cycled in turn against the first --reference_samples training images (statistics cached on disk), and the
Frechet distance in the Fashion-MNIST classifier's features. Goal: FID ours / baseline <= --goal.
Budget and sample counts are flags; the default runs in under an hour on 2 cores.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import Goal, finish, print_setting
from bench.train_throughput import unet_twin
from modules.artifacts.visualize import save_image_grid
from modules.config import (
    DataArguments,
    FlowArguments,
    ModelArguments,
    TrainingArguments,
    UserError,
    help_field,
    parse_args,
)
from modules.data.batches import random_flip
from modules.data.sources import load_train_data
from modules.evaluation.metrics import evaluate_generated
from modules.networks.presets import build_model
from modules.pixels import to_uint8
from modules.training.checkpoint import list_checkpoints, read_state

EXAMPLE = dict(adam_betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8, ema_max_decay=0.9999, ema_power=0.75)


@dataclass
class BenchArguments:
    recipe: str = help_field("Our recipe (a train_cfm.py config).", default="configs/fashion_mnist_unet_cfm.yaml")
    budget_minutes: float = help_field("Training wall-clock minutes of each side.", default=10.0)
    num_samples: int = help_field("Generated images each side is scored on.", default=2000)
    reference_samples: int = help_field(
        "Training images of the reference statistics. Default: --num_samples.", default=0
    )
    baseline_sampling_steps: int = help_field("DDIM steps of the baseline.", default=50)
    output_dir: str = help_field("Both runs and the report go here.", default="runs/bench_quality_per_hour")
    threads: int = help_field("torch CPU threads of each side; 0: torch's default.", default=0)
    batch_size: int = help_field("Images per forward pass when sampling.", default=250)
    goal: float = help_field("Largest acceptable FID ours / baseline.", default=0.5)
    no_goals: bool = help_field("Only report: exit 0 even when the goal is missed.", default=False)
    seed: int = help_field("Seed of the baseline's weights, noise and sampling.", default=0)


def recipe_arguments(recipe: str):
    """The recipe's arguments as train_cfm.py reads them (its defaults, then the YAML)."""
    from train_cfm import DEFAULTS

    classes = (DataArguments, ModelArguments, TrainingArguments, FlowArguments)
    return parse_args(classes, ["--config", recipe], DEFAULTS)


def run(command: list[str], log: Path, threads: int) -> float:
    """Run a command with its output in `log`; its wall-clock seconds. A failure raises, naming the log."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    start = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        raise RuntimeError(f"`{' '.join(command)}` failed with exit status {done.returncode}; see {log}")
    return time.perf_counter() - start


def train_ours(args: BenchArguments, out: Path, reference_samples: int) -> dict:
    """The recipe stopped by the budget, then finished from its checkpoint: its fid.json and training record."""
    out.mkdir(parents=True, exist_ok=True)
    script = [sys.executable, str(ROOT / "train_cfm.py"), "--config", args.recipe, "--output_dir", str(out)]
    quiet = ["--sample_steps", "0", "--validation_steps", "0", "--checkpointing_steps", "0"]
    budget = [
        "--fid_num_samples",
        "0",
        "--max_train_steps",
        "1000000000",
        "--max_train_minutes",
        str(args.budget_minutes),
    ]
    train_seconds = run([*script, *quiet, *budget], out / "train.log", args.threads)
    checkpoints = list_checkpoints(out)
    if not checkpoints:
        raise RuntimeError(f"our run stopped without a checkpoint; see {out / 'train.log'}")
    steps = read_state(checkpoints[-1])["step"]
    evaluation = [
        "--fid_num_samples",
        str(args.num_samples),
        "--fid_reference_samples",
        str(reference_samples),
        "--eval_metrics",
        "fid,classifier",
    ]
    eval_seconds = run(
        [*script, *quiet, *evaluation, "--max_train_steps", str(steps), "--resume_from_checkpoint", "latest"],
        out / "finish.log",
        args.threads,
    )
    record = json.loads((out / "objective.json").read_text())
    return {
        **json.loads((out / "fid.json").read_text()),
        "steps": steps,
        "images_seen": record["images_seen"],
        "train_seconds": record["train_hours"] * 3600,
        "process_seconds": train_seconds,
        "eval_seconds": eval_seconds,
    }


class Baseline:
    """UNet2DModel + DDPMScheduler + AdamW + EMAModel, trained and sampled as diffusers' example does."""

    def __init__(self, args: BenchArguments, recipe, data):
        from diffusers import DDPMScheduler
        from diffusers.training_utils import EMAModel

        data_args, model_args, train_args, _ = recipe
        self.args, self.data, self.train_args, self.flip = args, data, train_args, data_args.random_flip
        torch.manual_seed(args.seed)
        ours = build_model(model_args, data.num_channels, data_args.resolution, data.num_classes)
        self.ours_params = sum(p.numel() for p in ours.parameters())
        self.model = unet_twin(ours)  # its class embedding has our null class too: the same parameter count
        self.params = sum(p.numel() for p in self.model.parameters())
        self.scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=train_args.learning_rate,
            betas=EXAMPLE["adam_betas"],
            weight_decay=EXAMPLE["weight_decay"],
            eps=EXAMPLE["eps"],
        )
        self.ema = EMAModel(
            self.model.parameters(),
            decay=EXAMPLE["ema_max_decay"],
            use_ema_warmup=True,
            inv_gamma=1.0,
            power=EXAMPLE["ema_power"],
        )

    def learning_rate(self, step: int, progress: float) -> float:
        warmup = min(1.0, (step + 1) / max(self.train_args.lr_warmup_steps, 1))
        return self.train_args.learning_rate * warmup * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    def train(self, budget_seconds: float) -> dict:
        batch_size, dataset = self.train_args.train_batch_size, self.data.dataset
        g = torch.Generator().manual_seed(self.args.seed)
        self.model.train()
        start, step, order = time.perf_counter(), 0, torch.empty(0, dtype=torch.long)
        while (elapsed := time.perf_counter() - start) < budget_seconds:
            if len(order) < batch_size:  # a new epoch, in a new random order
                order = torch.randperm(len(dataset), generator=g)
            idx, order = order[:batch_size], order[batch_size:]
            batch = dataset.__getitems__(idx)
            clean = random_flip(batch["pixel_values"], g) if self.flip else batch["pixel_values"]
            noise = torch.randn(clean.shape, generator=g)
            timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (batch_size,), generator=g)
            noisy = self.scheduler.add_noise(clean, noise, timesteps)
            for group in self.optimizer.param_groups:
                group["lr"] = self.learning_rate(step, elapsed / budget_seconds)
            prediction = self.model(noisy, timesteps, class_labels=batch["labels"]).sample
            loss = torch.nn.functional.mse_loss(prediction, noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)  # the example's max_grad_norm
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.ema.step(self.model.parameters())
            step += 1
        seconds = time.perf_counter() - start
        return {"steps": step, "images_seen": step * batch_size, "train_seconds": seconds, "loss": loss.item()}

    @torch.no_grad()
    def sample(self, num_images: int) -> tuple[torch.Tensor, list[int]]:
        """uint8 images, classes cycled in turn, from the EMA weights with DDIM (eta 0)."""
        from diffusers import DDIMScheduler

        self.ema.copy_to(self.model.parameters())
        self.model.eval()
        ddim = DDIMScheduler.from_config(self.scheduler.config)
        ddim.set_timesteps(self.args.baseline_sampling_steps)
        labels = [i % self.data.num_classes for i in range(num_images)]
        g = torch.Generator().manual_seed(self.args.seed + 1)
        shape = (self.data.num_channels, self.model.config.sample_size, self.model.config.sample_size)
        images = []
        for first in range(0, num_images, self.args.batch_size):
            y = torch.tensor(labels[first : first + self.args.batch_size])
            x = torch.randn((len(y), *shape), generator=g)
            for t in ddim.timesteps:
                x = ddim.step(self.model(x, t, class_labels=y).sample, t, x).prev_sample
            images.append(to_uint8(x.clamp(-1, 1)))
        return torch.cat(images), labels


def main(argv=None):

    (args,) = parse_args((BenchArguments,), argv, description=__doc__)
    if args.budget_minutes <= 0 or args.num_samples < 2:
        raise UserError("--budget_minutes must be positive and --num_samples at least 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = recipe_arguments(args.recipe)
    reference_samples = args.reference_samples or args.num_samples
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_train_data(recipe[0], need_labels=True)

    baseline = Baseline(args, recipe, data)
    params = baseline.ours_params, baseline.params
    base = baseline.train(args.budget_minutes * 60)
    start = time.perf_counter()
    images, labels = baseline.sample(args.num_samples)
    save_image_grid(images[:100], out / "baseline_samples.png", nrow=10)
    base.update(evaluate_generated(images, labels, data, reference_samples, ["fid", "classifier"]))
    base["eval_seconds"] = time.perf_counter() - start
    del baseline, images

    ours = train_ours(args, out / "ours", reference_samples)

    print_setting(__file__, argv, torch.device("cpu"))
    print(
        f"recipe {args.recipe}; budget {args.budget_minutes:g} min of training each; {args.num_samples} samples "
        f"against {reference_samples} training images; baseline sampled with DDIM "
        f"{args.baseline_sampling_steps} steps; grids: {out}/baseline_samples.png, {out}/ours/samples/\n"
    )
    rows = []
    for name, r in (("ours (recipe)", ours), ("baseline (diffusers example)", base)):
        rows.append(
            [
                name,
                f"{r['steps']:,}",
                f"{r['images_seen']:,}",
                f"{r['train_seconds'] / 60:.1f}",
                f"{r['images_seen'] / r['train_seconds']:.0f}",
                f"{r['fid']:.2f}",
                f"{r['fd_classifier']:.2f}",
                f"{r['class_accuracy']:.1%}",
                f"{r['eval_seconds'] / 60:.1f}",
            ]
        )
    headers = [
        "",
        "steps",
        "images seen",
        "train min",
        "img/s",
        "FID",
        "FD classifier",
        "class acc.",
        "sample + eval min",
    ]
    (out / "results.json").write_text(
        json.dumps({"args": dataclasses.asdict(args), "ours": ours, "baseline": base}, indent=2)
    )
    goals = [Goal("FID ours / baseline", ours["fid"] / base["fid"], args.goal, at_least=False)]
    print(f"parameters: ours {params[0]:,}, baseline {params[1]:,}\n")
    finish(headers, rows, torch.device("cpu"), goals, args.no_goals)


if __name__ == "__main__":
    main()
