"""The training loop, shared by every training script: the script supplies an objective, this does the rest.

    setup_run            everything before the first step (modules/training/setup.py)
    for each step:
        optimizer_step   one optimizer step over the accumulated micro-batches (modules/training/step.py)
        duties           EMA and counters, then log, checkpoint, post-hoc EMA snapshot, validate, evaluate,
                         grid, stop
                         (modules/training/boundary.py)
    finish               the last checkpoint, the EMA model, its grid and metrics, the final push

Randomness comes from generators seeded by (seed, rank, step, micro-batch) and the data order from (seed, epoch,
rank), so a run resumed from a checkpoint continues exactly where it was.
"""

from __future__ import annotations

import contextlib
import itertools

from modules.config import DataArguments, ModelArguments, TrainingArguments
from modules.objectives.protocol import Objective
from modules.training.boundary import (
    checkpoint_if_due,
    evaluate_if_due,
    finish,
    grid_if_due,
    log_if_due,
    snapshot_if_due,
    stop_early,
    update_after_step,
    validate_if_due,
)
from modules.training.setup import check_training_arguments, setup_run
from modules.training.sizing import dry_run
from modules.training.step import optimizer_step
from modules.training.stopping import StopRequest


def train(
    script: str,
    data_args: DataArguments,
    model_args: ModelArguments,
    train_args: TrainingArguments,
    objective: Objective,
    argv=None,
):
    """Train `objective` on the data and model the arguments name; writes everything under train_args.output_dir.
    SIGTERM / SIGUSR1 and --max_train_minutes end it early with a checkpoint (modules/training/stopping.py)."""
    check_training_arguments(train_args)
    if train_args.dry_run:
        return dry_run(data_args, model_args, train_args, objective)
    # The ExitStack closes the progress bar before an error is printed, so that the error starts a line.
    with StopRequest(train_args.max_train_minutes) as stop_request, contextlib.ExitStack() as cleanup:
        run = setup_run(script, data_args, model_args, train_args, objective, argv, stop_request, cleanup)
        for step in range(run.start_step, train_args.max_train_steps):
            # Forward and backward over the micro-batches, then the update (skipped if anything is not finite).
            micro_batches = itertools.islice(run.batches, train_args.gradient_accumulation_steps)
            result = optimizer_step(run, micro_batches, step)
            done = step + 1

            # Update the EMA, the learning rate and the counters.
            update_after_step(run, result, done)

            # Duties at their own intervals; each looks at the EMA model.
            log_if_due(run, done)
            checkpoint_if_due(run, done)
            snapshot_if_due(run, done)
            validate_if_due(run, done)
            evaluate_if_due(run, done)
            grid_if_due(run, done)

            # A signal or the time limit: checkpoint and exit, to resume later.
            if run.stop_reason and not run.last_step(done):
                return stop_early(run, done)
        return finish(run)
