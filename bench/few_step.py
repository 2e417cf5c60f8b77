"""One- and few-step generation on the same training budget: the main recipe's flow model against MeanFlow and a
reflow student, on Fashion-MNIST.

    python bench/few_step.py                                  # 10 minutes of training each, 2,000 vs 2,000 images
    python bench/few_step.py --budget_minutes 3 --num_samples 500 --output_dir runs/few_step_3min

Each contender gets --budget_minutes of training wall clock (train_cfm.py with --max_train_minutes, then finished
from its checkpoint as a user finishes a stopped run, so the model folder holds the EMA weights):
  flow      the recipe (--recipe) as it is, sampled with Heun at --flow_steps (with the recipe's guidance: two
            network passes a step but the last, times two for guidance);
  meanflow  the recipe with --objective meanflow and training-time guidance --meanflow_guidance_scale, sampled with
            the meanflow sampler at --meanflow_steps, one pass a step (guidance is in the network);
  reflow    2-rectified flow: a teacher (the recipe) trained for --teacher_minutes, --num_pairs (noise, sample) pairs
            made with its Heun sampler at --pair_steps (sample.py --output_pairs), and a student started from the
            teacher and trained on the pairs' straight lines for what is left of the budget; sampled with Euler at
            --student_steps, one pass a step (the pairs carry the teacher's guidance).
Every row is scored the same way (sample.py's Evaluator: Inception FID of --num_samples images with classes in turn
against the first --reference_samples training images, the Fashion-MNIST classifier's Frechet distance and class
accuracy), with the network passes per image and the sampling speed (img/s, this process's threads).

Goals: MeanFlow's 1-step FID at most --goal_best times the flow model's best FID at any steps, and at most
--goal_one_step times the flow model's own 1-step FID. Exits 1 when one is missed (--no_goals: only report).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quality_per_hour import run
from bench.report import Goal, finish, print_setting
from modules.config import UserError, cli_entry, help_field, parse_args
from modules.objectives.samplers import network_evaluations
from modules.training.checkpoint import list_checkpoints, read_state


@dataclass
class BenchArguments:
    recipe: str = help_field("The flow recipe (a train_cfm.py config).", default="configs/fashion_mnist_unet_cfm.yaml")
    budget_minutes: float = help_field("Training wall-clock minutes of each contender.", default=10.0)
    num_samples: int = help_field("Generated images each row is scored on.", default=2000)
    reference_samples: int = help_field(
        "Training images of the reference statistics. Default: --num_samples.", default=0
    )
    flow_steps: str = help_field("Heun steps of the flow model's rows.", default="1,2,4,20")
    meanflow_steps: str = help_field("Steps of MeanFlow's rows.", default="1,2")
    student_steps: str = help_field("Euler steps of the reflow student's rows.", default="1,2")
    meanflow_guidance_scale: float = help_field("MeanFlow's training-time guidance omega.", default=2.0)
    meanflow_ratio: float = help_field("MeanFlow's share of pairs with r < t.", default=0.25)
    # Measured on the 2-core CPU: the teacher's finish takes about 0.5 min, and unet_s makes pairs at about 13.5 img/s
    # with Heun 4 steps and guidance, so 2,000 pairs take about 2.5 min and leave the student about 3.5 of 10 minutes.
    teacher_minutes: float = help_field("Reflow: the teacher's share of the budget, in minutes.", default=3.5)
    num_pairs: int = help_field("Reflow: (noise, sample) pairs the teacher makes.", default=2000)
    pair_steps: int = help_field("Reflow: the teacher's Heun steps for its pairs.", default=4)
    contenders: str = help_field("Which to run, of flow, meanflow, reflow.", default="flow,meanflow,reflow")
    output_dir: str = help_field("The runs and the report go here.", default="runs/bench_few_step")
    threads: int = help_field("torch CPU threads; 0: torch's default.", default=0)
    batch_size: int = help_field("Images per forward pass when sampling.", default=250)
    goal_best: float = help_field("Largest MeanFlow 1-step FID / the flow model's best FID.", default=1.5)
    goal_one_step: float = help_field("Largest MeanFlow 1-step FID / the flow model's 1-step FID.", default=0.25)
    no_goals: bool = help_field("Only report: exit 0 even when a goal is missed.", default=False)


def steps_list(spec: str, flag: str) -> list[int]:
    try:
        steps = [int(s) for s in spec.split(",")]
    except ValueError:
        raise UserError(f"--{flag}: expected comma-separated step counts, got '{spec}'") from None
    if not steps or min(steps) < 1:
        raise UserError(f"--{flag}: step counts must be positive, got '{spec}'")
    return steps


def network_passes(sampler: str, steps: int, guided: bool) -> int:
    """Network passes per image: Heun's two a step but the last, one a step otherwise; twice that under
    classifier-free guidance (the conditional and unconditional passes)."""
    passes = network_evaluations(sampler, steps)
    return 2 * passes if guided else passes


def train_for(args: BenchArguments, out: Path, minutes: float, extra: list[str]) -> dict:
    """train_cfm.py on the recipe plus `extra`, stopped after `minutes`, then finished from its checkpoint (which
    writes the model folder): the step it reached and its measured seconds."""
    out.mkdir(parents=True, exist_ok=True)
    script = [sys.executable, str(ROOT / "train_cfm.py"), "--config", args.recipe, "--output_dir", str(out), *extra]
    quiet = ["--sample_steps", "0", "--validation_steps", "0", "--checkpointing_steps", "0", "--fid_num_samples", "0"]
    budget = ["--max_train_steps", "1000000000", "--max_train_minutes", f"{minutes:.4f}"]
    train_seconds = run([*script, *quiet, *budget], out / "train.log", args.threads)
    checkpoints = list_checkpoints(out)
    if not checkpoints:
        raise RuntimeError(f"{out} stopped without a checkpoint; see {out / 'train.log'}")
    steps = read_state(checkpoints[-1])["step"]
    finish_seconds = run(
        [*script, *quiet, "--max_train_steps", str(steps), "--resume_from_checkpoint", "latest"],
        out / "finish.log",
        args.threads,
    )
    return {"steps": steps, "train_seconds": train_seconds, "finish_seconds": finish_seconds}


def make_pairs(args: BenchArguments, teacher: Path, out: Path) -> float:
    """The teacher's (noise, sample) pairs (sample.py --output_pairs); their seconds."""
    command = [sys.executable, str(ROOT / "sample.py"), "--model", str(teacher), "--output_pairs", str(out)]
    command += ["--num_images", str(args.num_pairs), "--batch_size", str(args.batch_size)]
    command += ["--sampler", "heun", "--num_inference_steps", str(args.pair_steps)]
    return run(command, out.with_suffix(".log"), args.threads)


def evaluate(args: BenchArguments, folder: Path, rows: list[tuple[str, int]], guidance: float | None) -> list[dict]:
    """Each (sampler, steps) of the model in `folder`: the metrics of --num_samples images, the network passes per
    image and the sampling speed."""
    from sample import Evaluator, SampleArguments, load_sampling

    sample_args = SampleArguments(
        model=str(folder),
        num_images=args.num_samples,
        batch_size=args.batch_size,
        guidance_scale=guidance,
        compute_fid=True,
        fid_reference_samples=args.reference_samples or args.num_samples,
        eval_metrics="fid,classifier",
        device="cpu",
    )
    sampling = load_sampling(sample_args, folder)
    evaluator = Evaluator(sample_args, sampling.record, folder, sampling.shape)
    scale = sampling.objective.args.guidance_scale if guidance is None else guidance
    results = []
    for sampler, steps in rows:
        start = time.perf_counter()
        images = sampling.generate(sample_args, sampler=sampler, num_inference_steps=steps)
        seconds = time.perf_counter() - start
        passes = network_passes(sampler, steps, scale != 1.0)
        results.append(
            {"sampler": sampler, "steps": steps, "passes": passes, "img_s": len(images) / seconds}
            | evaluator(images, sampling.labels)
        )
        print(f"{folder.name} {sampler} {steps}: " + json.dumps(results[-1]), flush=True)
    return results


def run_reflow(args: BenchArguments, out: Path) -> tuple[dict, Path]:
    """Teacher, pairs and student within the budget: the student's record (with the time each part took)."""
    teacher = train_for(args, out / "teacher", args.teacher_minutes, [])
    pairs_seconds = make_pairs(args, out / "teacher", out / "pairs")
    spent = teacher["train_seconds"] + teacher["finish_seconds"] + pairs_seconds
    left = args.budget_minutes * 60 - spent
    if left <= 0:
        raise UserError(
            f"reflow: the teacher and its pairs took {spent / 60:.1f} min of the {args.budget_minutes:g} min budget; "
            "lower --teacher_minutes, --num_pairs or --pair_steps"
        )
    student_args = ["--init_from", str(out / "teacher"), "--pairs_dataset", str(out / "pairs")]
    student_args += ["--sampler", "euler", "--guidance_scale", "1", "--cond_drop_prob", "0"]
    student = train_for(args, out / "student", left / 60, student_args)
    return {**student, "teacher": teacher, "pairs_seconds": pairs_seconds}, out / "student"


@cli_entry
def main(argv=None):
    (args,) = parse_args((BenchArguments,), argv, description=__doc__)
    if args.budget_minutes <= 0 or args.num_samples < 2:
        raise UserError("--budget_minutes must be positive and --num_samples at least 2")
    contenders = args.contenders.split(",")
    if unknown := set(contenders) - {"flow", "meanflow", "reflow"}:
        raise UserError(f"--contenders: unknown {', '.join(sorted(unknown))} (flow, meanflow, reflow)")
    if "reflow" in contenders and not 0 < args.teacher_minutes < args.budget_minutes:
        raise UserError(
            f"--teacher_minutes {args.teacher_minutes:g} must be positive and below --budget_minutes "
            f"{args.budget_minutes:g}: the reflow student's budget holds the teacher's training, its pairs and itself"
        )
    flow_steps = steps_list(args.flow_steps, "flow_steps")
    meanflow_steps = steps_list(args.meanflow_steps, "meanflow_steps")
    student_steps = steps_list(args.student_steps, "student_steps")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {}

    def save():  # after each contender, so that a later failure keeps what was measured
        (out / "results.json").write_text(json.dumps({"args": dataclasses.asdict(args), **results}, indent=2))

    if "flow" in contenders:
        training = train_for(args, out / "flow", args.budget_minutes, [])
        results["flow"] = training | {"rows": evaluate(args, out / "flow", [("heun", k) for k in flow_steps], None)}
        save()
    if "meanflow" in contenders:
        mf = ["--objective", "meanflow", "--sampler", "meanflow", "--guidance_scale", "1"]
        mf += ["--meanflow_guidance_scale", str(args.meanflow_guidance_scale)]
        mf += ["--meanflow_ratio", str(args.meanflow_ratio)]
        training = train_for(args, out / "meanflow", args.budget_minutes, mf)
        rows = [("meanflow", k) for k in meanflow_steps]
        results["meanflow"] = training | {"rows": evaluate(args, out / "meanflow", rows, None)}
        save()
    if "reflow" in contenders:
        try:
            training, student = run_reflow(args, out / "reflow")
        except UserError as e:  # the teacher and its pairs used up the budget: report the others
            print(f"reflow not scored: {e}")
        else:
            rows = [("euler", k) for k in student_steps]
            results["reflow"] = training | {"rows": evaluate(args, student, rows, None)}
            save()
    report(args, argv, results)


def report(args: BenchArguments, argv, results: dict):
    """The table of every row, then the goals (those whose contenders ran)."""
    print_setting(__file__, argv, torch.device("cpu"))
    reference = args.reference_samples or args.num_samples
    print(
        f"recipe {args.recipe}; {args.budget_minutes:g} min of training each (reflow: teacher, pairs and student "
        f"together); {args.num_samples} samples against {reference} training images\n"
    )
    headers = ["contender", "steps trained", "sampler", "steps", "passes / image", "img/s", "FID", "FD classifier"]
    headers.append("class acc.")
    rows = []
    for name, result in results.items():
        for r in result["rows"]:
            rows.append(
                [name, f"{result['steps']:,}", r["sampler"], r["steps"], r["passes"], f"{r['img_s']:.1f}"]
                + [f"{r['fid']:.2f}", f"{r['fd_classifier']:.2f}", f"{r['class_accuracy']:.1%}"]
            )
    goals = []
    if "flow" in results and "meanflow" in results:
        flow = {r["steps"]: r["fid"] for r in results["flow"]["rows"]}
        meanflow = {r["steps"]: r["fid"] for r in results["meanflow"]["rows"]}
        if 1 in meanflow:
            goals.append(
                Goal(
                    "MeanFlow 1-step FID / flow's best FID",
                    meanflow[1] / min(flow.values()),
                    args.goal_best,
                    at_least=False,
                )
            )
            if 1 in flow:
                goals.append(
                    Goal(
                        "MeanFlow 1-step FID / flow's 1-step FID",
                        meanflow[1] / flow[1],
                        args.goal_one_step,
                        at_least=False,
                    )
                )
    finish(headers, rows, torch.device("cpu"), goals, args.no_goals)


if __name__ == "__main__":
    main()
