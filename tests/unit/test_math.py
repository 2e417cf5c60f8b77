"""Closed-form truths and library oracles for the diffusion math (flow.py, ddpm.py, samplers.py)."""

import pytest
import torch

from modules.config import DDPMArguments, FlowArguments
from modules.objectives.ddpm import (
    BETA_SCHEDULES,
    DDPMObjective,
    add_noise,
    make_scheduler,
    min_snr_weight,
    training_target,
)
from modules.objectives.flow import FlowObjective, flow_interpolate, flow_velocity, ot_pair, sample_time
from modules.objectives.samplers import ddim_step, per_sample_randn, predict_x0_eps, sample_generators


class DeltaFlowVelocity(torch.nn.Module):
    """The exact marginal velocity when the data is the single point x0: v(x, t) = (x - x0) / t."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def forward(self, x, t, cond=None):
        return (x - self.x0) / t.view(-1, 1, 1, 1)


class DeltaEpsilon(torch.nn.Module):
    """The exact noise prediction for a single data point x0 under a DDPM schedule (any prediction type)."""

    def __init__(self, x0, alphas_cumprod, num_train_timesteps, prediction_type):
        super().__init__()
        self.x0, self.alphas, self.T, self.kind = x0, alphas_cumprod.double(), num_train_timesteps, prediction_type

    def forward(self, x, t, cond=None):
        a = self.alphas[(t * self.T).round().long()].view(-1, 1, 1, 1).to(x.dtype)
        eps = (x - a.sqrt() * self.x0) / (1 - a).sqrt()
        if self.kind == "epsilon":
            return eps
        if self.kind == "sample":
            return self.x0.expand_as(x)
        return a.sqrt() * eps - (1 - a).sqrt() * self.x0


def test_flow_exact_velocity_recovers_x0_in_one_euler_step():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 3, 8, 8, generator=g).expand(4, -1, -1, -1)
    noise = torch.randn(4, 3, 8, 8, generator=g)
    objective = FlowObjective(FlowArguments())
    out = objective.sample(DeltaFlowVelocity(x0), noise, num_inference_steps=1, sampler="euler")
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sampler", ["euler", "heun", "euler_maruyama"])
def test_flow_samplers_reach_a_single_data_point(sampler):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, 1, 4, 4, generator=g)
    noise = torch.randn(3, 1, 4, 4, generator=g)
    out = FlowObjective(FlowArguments()).sample(
        DeltaFlowVelocity(x0), noise, num_inference_steps=10, sampler=sampler, generators=sample_generators(0, 0, 3)
    )
    torch.testing.assert_close(out, x0.expand(3, -1, -1, -1), atol=1e-4, rtol=0)


def test_flow_interpolation_convention():
    x0, noise = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2)
    torch.testing.assert_close(flow_interpolate(x0, noise, torch.zeros(2)), x0)
    torch.testing.assert_close(flow_interpolate(x0, noise, torch.ones(2)), noise)
    # d x_t / dt by finite differences equals the target velocity
    t = torch.tensor([0.3, 0.7])
    fd = (flow_interpolate(x0, noise, t + 1e-3) - flow_interpolate(x0, noise, t - 1e-3)) / 2e-3
    torch.testing.assert_close(fd, flow_velocity(x0, noise), atol=1e-3, rtol=1e-3)


def test_flow_loss_is_zero_for_the_exact_conditional_velocity():
    # With x0 a single point repeated, (x - x0) / t is exactly noise - x0 at every x_t on the path.
    x0 = torch.randn(1, 1, 4, 4).expand(8, -1, -1, -1)
    loss = FlowObjective(FlowArguments()).loss(DeltaFlowVelocity(x0), x0, None, torch.Generator().manual_seed(0))
    assert loss.shape == (8,) and loss.max() < 1e-8


def test_logit_normal_time_sampling_is_in_unit_interval_and_centred():
    t = sample_time(20000, torch.Generator().manual_seed(0), "logit_normal", 0.0, 1.0)
    assert 0 < t.min() and t.max() < 1 and abs(t.median() - 0.5) < 0.02
    u = sample_time(20000, torch.Generator().manual_seed(0), "uniform")
    assert abs(u.mean() - 0.5) < 0.01


def test_ot_pairing_never_increases_transport_cost():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(16, 2, 4, 4, generator=g), torch.randn(16, 2, 4, 4, generator=g)
    paired = ot_pair(x0, noise)
    cost = lambda a, b: (a - b).pow(2).sum()
    assert cost(x0, paired) <= cost(x0, noise)
    # a permutation of the noise, not new noise
    assert sorted(paired.flatten().tolist()) == sorted(noise.flatten().tolist())


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_prediction_conversions_round_trip(prediction_type):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 2, 3, 3, generator=g), torch.randn(5, 2, 3, 3, generator=g)
    alpha_bar = torch.rand(5, generator=g).clamp(0.05, 0.95).double()
    x0, eps = x0.double(), eps.double()
    x_t = add_noise(x0, eps, alpha_bar)
    output = training_target(x0, eps, alpha_bar, prediction_type)
    x0_hat, eps_hat = predict_x0_eps(x_t, output, alpha_bar.view(-1, 1, 1, 1), prediction_type)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)


@pytest.mark.parametrize("beta_schedule", sorted(BETA_SCHEDULES))
def test_add_noise_matches_diffusers(beta_schedule):
    scheduler = make_scheduler(DDPMArguments(beta_schedule=beta_schedule))
    x0, noise = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    t = torch.tensor([0, 10, 500, 999])
    ours = add_noise(x0, noise, scheduler.alphas_cumprod[t])
    torch.testing.assert_close(ours, scheduler.add_noise(x0, noise, t), atol=1e-6, rtol=1e-5)


def test_v_target_matches_diffusers_velocity():
    scheduler = make_scheduler(DDPMArguments())
    x0, noise, t = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.tensor([1, 400, 900])
    ours = training_target(x0, noise, scheduler.alphas_cumprod[t], "v_prediction")
    torch.testing.assert_close(ours, scheduler.get_velocity(x0, noise, t), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_step_equals_diffusers(prediction_type, eta):
    from diffusers import DDIMScheduler

    args = DDPMArguments(prediction_type=prediction_type)
    ddim = DDIMScheduler.from_config(make_scheduler(args).config)
    ddim.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    x_t, output, noise = (torch.randn(2, 3, 8, 8, generator=g) for _ in range(3))
    for t in [int(ddim.timesteps[0]), int(ddim.timesteps[25]), int(ddim.timesteps[-1])]:
        expected = ddim.step(output, t, x_t, eta=eta, variance_noise=noise).prev_sample
        prev = t - ddim.config.num_train_timesteps // 50
        a_prev = ddim.alphas_cumprod[prev] if prev >= 0 else ddim.final_alpha_cumprod
        ours = ddim_step(x_t, output, ddim.alphas_cumprod[t], torch.as_tensor(a_prev), prediction_type, eta, noise)
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm_solver"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_samplers_reach_a_single_data_point(sampler, prediction_type):
    args = DDPMArguments(prediction_type=prediction_type, beta_schedule="cosine")
    objective = DDPMObjective(args)
    x0 = torch.rand(1, 1, 4, 4) - 0.5
    model = DeltaEpsilon(x0, objective.alphas_cumprod, args.num_train_timesteps, prediction_type)
    noise = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    out = objective.sample(
        model, noise, num_inference_steps=20, sampler=sampler, generators=sample_generators(0, 0, 2)
    )
    torch.testing.assert_close(out.float(), x0.expand(2, -1, -1, -1), atol=2e-3, rtol=0)


def test_ddpm_loss_is_zero_for_the_exact_noise():
    objective = DDPMObjective(DDPMArguments(snr_gamma=5.0))
    x0 = torch.randn(1, 1, 4, 4).expand(6, -1, -1, -1)
    model = DeltaEpsilon(x0, objective.alphas_cumprod, 1000, "epsilon")
    loss = objective.loss(model, x0, None, torch.Generator().manual_seed(0))
    assert loss.shape == (6,) and loss.max() < 1e-6


def test_min_snr_weights():
    alpha_bar = torch.tensor([0.5, 0.9, 0.99])  # SNR 1, 9, 99
    torch.testing.assert_close(min_snr_weight(alpha_bar, 5.0, "epsilon"), torch.tensor([1.0, 5 / 9, 5 / 99]))
    torch.testing.assert_close(min_snr_weight(alpha_bar, 5.0, "v_prediction"), torch.tensor([0.5, 0.5, 5 / 100]))


def test_per_sample_noise_does_not_depend_on_batch_split():
    whole = per_sample_randn(sample_generators(3, 0, 8), (1, 4, 4))
    parts = torch.cat([per_sample_randn(sample_generators(3, i, 1), (1, 4, 4)) for i in range(8)])
    assert torch.equal(whole, parts)


def test_zero_terminal_snr_schedule():
    scheduler = make_scheduler(DDPMArguments(rescale_betas_zero_snr=True))
    assert scheduler.alphas_cumprod[-1] < 1e-6


@pytest.mark.parametrize(
    "objective,sampler", [("flow", "euler"), ("flow", "heun"), ("ddpm", "ddim"), ("ddpm", "dpm_solver")]
)
def test_sampler_callback_sees_the_x0_estimate(objective, sampler):
    """With the exact model the x0 estimate is x0 at every step; times run from noise to data."""
    x0 = torch.rand(1, 1, 4, 4) - 0.5
    if objective == "flow":
        obj, model = FlowObjective(FlowArguments()), DeltaFlowVelocity(x0)
    else:
        obj = DDPMObjective(DDPMArguments())
        model = DeltaEpsilon(x0, obj.alphas_cumprod, 1000, "epsilon")
    frames = []
    obj.sample(
        model,
        torch.randn(2, 1, 4, 4, dtype=torch.float64),
        num_inference_steps=5,
        sampler=sampler,
        callback=lambda i, t, x, x0_pred: frames.append((i, t, x0_pred)),
    )
    assert [f[0] for f in frames] == list(range(5))
    times = [f[1] for f in frames]
    assert times == sorted(times, reverse=True) and 0 <= times[-1] < times[0] <= 1
    for _, _, x0_pred in frames:
        torch.testing.assert_close(x0_pred.float(), x0.expand(2, -1, -1, -1), atol=2e-3, rtol=0)
