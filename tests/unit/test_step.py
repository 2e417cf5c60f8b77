"""The optimizer step on a tiny model, in this process: it is the plain PyTorch step it stands for, it accumulates,
it skips a non-finite step on the model and the optimizer alike, and it reports a stop request."""

import copy
import math

import pytest
import torch
from accelerate import Accelerator

from modules.config import DataArguments, FlowArguments, ModelArguments, TrainingArguments
from modules.data.conditions import ConditionSource
from modules.data.images import TensorImageDataset, TrainData
from modules.data.order import step_generator
from modules.objectives.flow import FlowObjective
from modules.training.run import Run, RunData
from modules.training.step import optimizer_step
from modules.training.stopping import StopRequest


class TinyDenoiser(torch.nn.Module):
    """(x, t, cond) -> x-shaped output: one linear map of the pixels and t."""

    def __init__(self, pixels: int):
        super().__init__()
        self.linear = torch.nn.Linear(pixels + 1, pixels)

    def forward(self, x, t, cond=None):
        h = torch.cat([x.flatten(1), t.view(-1, 1).to(x.dtype)], dim=1)
        return self.linear(h).view_as(x)


def batches(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.rand(4, 1, 4, 4, generator=g) * 2 - 1} for _ in range(n)]


@pytest.fixture
def make_run():
    runs = []

    def make(accumulation: int = 1, max_grad_norm: float = 1.0) -> Run:
        torch.manual_seed(0)
        model = TinyDenoiser(16)
        train_args = TrainingArguments(gradient_accumulation_steps=accumulation, max_grad_norm=max_grad_norm)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
        model, optimizer = accelerator.prepare(model, optimizer)
        data = TrainData(TensorImageDataset(torch.zeros(8, 1, 4, 4, dtype=torch.uint8), None), 1, 0, None, "tiny")
        stop_request = StopRequest()
        run = Run(
            data_args=DataArguments(),
            model_args=ModelArguments(),
            train_args=train_args,
            objective=FlowObjective(FlowArguments()),
            data=RunData(data),
            conditions=ConditionSource(data, 0),
            stop_request=stop_request,
            accelerator=accelerator,
            model=model,
            optimizer=optimizer,
        )
        runs.append(run)
        return run

    yield make
    for run in runs:
        run.stop_request.close()


def reference_step(model, batch_list, step: int, max_grad_norm: float):
    """The step in plain PyTorch: each micro-batch's loss with its own generator (and a pairs batch's noise),
    averaged, clipped, AdamW."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    objective = FlowObjective(FlowArguments())
    for micro, batch in enumerate(batch_list):
        generator = step_generator(0, 0, step, micro, torch.device("cpu"))
        x0 = batch["x0"] if "x0" in batch else batch["pixel_values"]
        paired = {"noise": batch["noise"]} if "noise" in batch else {}
        loss = objective.loss(model, x0, None, generator, **paired).mean() / len(batch_list)
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    return model


def test_a_step_is_the_plain_pytorch_step(make_run):
    run = make_run()
    before = copy.deepcopy(run.model)
    result = optimizer_step(run, batches(1), step=7)
    expected = reference_step(before, batches(1), 7, 1.0)
    assert not result.skipped and not result.stop
    assert math.isfinite(float(result.loss)) and float(result.grad_norm) > 0
    for p, q in zip(run.model.parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert all(p.grad is None for p in run.model.parameters())


def test_micro_batches_accumulate_into_one_update(make_run):
    run = make_run(accumulation=2)
    before = copy.deepcopy(run.model)
    result = optimizer_step(run, batches(2), step=3)
    assert not result.skipped
    expected = reference_step(before, batches(2), 3, 1.0)
    for p, q in zip(run.model.parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert run.optimizer.state_dict()["state"][0]["step"] == 1  # one AdamW update for the two micro-batches


def test_a_nonfinite_step_leaves_model_and_optimizer_as_they_were(make_run):
    run = make_run()
    optimizer_step(run, batches(1), step=0)
    weights = copy.deepcopy(run.model.state_dict())
    adam = copy.deepcopy(run.optimizer.state_dict())
    bad = batches(1)
    bad[0]["pixel_values"][0, 0, 0, 0] = float("nan")
    result = optimizer_step(run, bad, step=1)
    assert result.skipped and not math.isfinite(float(result.loss))
    for name, value in run.model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    assert run.optimizer.state_dict()["state"][0]["step"] == adam["state"][0]["step"]
    assert all(p.grad is None for p in run.model.parameters())
    assert not optimizer_step(run, batches(1, seed=2), step=2).skipped  # and the next finite step trains


def test_a_stop_request_is_reported_and_the_step_still_trains(make_run):
    run = make_run()
    before = copy.deepcopy(run.model.state_dict())
    run.stop_request.received = "SIGTERM"
    result = optimizer_step(run, batches(1), step=0)
    assert result.stop and not result.skipped
    assert any(not torch.equal(v, before[k]) for k, v in run.model.state_dict().items())


def test_a_pairs_batch_trains_on_its_own_noise(make_run):
    """A reflow batch (x0 with the noise the teacher made it from) trains at that noise, not at noise drawn afresh."""
    run = make_run()
    before = copy.deepcopy(run.model)
    g = torch.Generator().manual_seed(5)
    pairs = [{"x0": torch.rand(4, 1, 4, 4, generator=g) * 2 - 1, "noise": torch.randn(4, 1, 4, 4, generator=g)}]
    assert not optimizer_step(run, pairs, step=7).skipped
    paired = reference_step(before, pairs, 7, 1.0)
    drawn = reference_step(before, [{"x0": pairs[0]["x0"]}], 7, 1.0)
    for p, q, r in zip(run.model.parameters(), paired.parameters(), drawn.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(p, r, rtol=1e-6, atol=1e-7)
