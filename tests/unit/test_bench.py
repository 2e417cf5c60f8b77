"""The benchmark baselines are what their docstrings say: bench/quality_per_hour.py's diffusers-examples-style DDPM."""

import dataclasses
import math
import sys

import pytest
import torch
from helpers import ROOT

sys.path.insert(0, str(ROOT))

from bench.quality_per_hour import Baseline, BenchArguments, recipe_arguments  # noqa: E402
from modules.data.sources import load_train_data


@pytest.fixture(scope="module")
def baseline():
    recipe = recipe_arguments(str(ROOT / "configs/fashion_mnist_unet_cfm.yaml"))
    data_args = dataclasses.replace(recipe[0], max_train_samples=100)
    data = load_train_data(data_args, need_labels=True)
    args = BenchArguments(baseline_sampling_steps=2, batch_size=7)
    return Baseline(args, (data_args, *recipe[1:]), data)


def test_baseline_has_the_recipe_model_size_and_settings(baseline):
    assert baseline.params == baseline.ours_params == 1_034_641  # class-conditional unet_s, as README says
    group = baseline.optimizer.param_groups[0]
    assert group["betas"] == (0.95, 0.999) and group["weight_decay"] == 1e-6
    config = baseline.scheduler.config
    assert config.prediction_type == "epsilon" and config.num_train_timesteps == 1000


def test_baseline_schedule_warms_up_then_follows_a_cosine_over_the_budget(baseline):
    lr, warmup = baseline.train_args.learning_rate, baseline.train_args.lr_warmup_steps
    assert baseline.learning_rate(0, 0.0) == pytest.approx(lr / warmup)
    assert baseline.learning_rate(warmup - 1, 0.0) == pytest.approx(lr)
    assert baseline.learning_rate(10 * warmup, 0.5) == pytest.approx(lr / 2)
    assert baseline.learning_rate(10 * warmup, 1.2) == 0.0


def test_baseline_trains_its_ema_and_samples_balanced_classes(baseline):
    before = [p.detach().clone() for p in baseline.model.parameters()]
    record = baseline.train(budget_seconds=0.5)
    assert record["steps"] >= 1 and math.isfinite(record["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, baseline.model.parameters(), strict=True))
    images, labels = baseline.sample(12)
    assert images.dtype == torch.uint8 and images.shape == (12, 1, 32, 32)
    assert labels == [i % 10 for i in range(12)]
    # sampling runs on the EMA weights
    ema = baseline.ema.shadow_params
    assert all(torch.equal(a, b) for a, b in zip(ema, baseline.model.parameters(), strict=True))


def test_few_step_counts_network_passes_per_image():
    """bench/few_step.py's passes: Heun two a step but the last, others one a step, doubled under guidance."""
    from bench.few_step import network_passes, steps_list

    assert [network_passes("heun", k, True) for k in (1, 2, 4, 20)] == [2, 6, 14, 78]
    assert [network_passes("meanflow", k, False) for k in (1, 2)] == [1, 2]
    assert network_passes("euler", 2, False) == 2
    assert steps_list("1,2,4", "flow_steps") == [1, 2, 4]
    from modules.config import UserError

    with pytest.raises(UserError, match="--flow_steps: step counts must be positive"):
        steps_list("0,2", "flow_steps")
