"""MeanFlow's math against closed forms: the identity and one-step sampling on a Gaussian, the JVP against finite
differences, the loss of the exact average velocity, and u(z, t, t) learned as the instantaneous velocity."""

import pytest
import torch
import torch.nn as nn

from modules.config import FlowArguments, ModelArguments, UserError
from modules.objectives.flow import FlowObjective
from modules.objectives.meanflow import MeanFlowObjective, total_derivative
from modules.objectives.samplers import meanflow_sample

MU, SIGMA = 1.5, 0.5  # data x0 ~ N(MU, SIGMA^2) per coordinate, noise N(0, 1)


def gaussian_flow(t):
    """Mean and std of z_t = (1 - t) x0 + t noise for the Gaussian data: the flow maps z_t to m(s) + s(s)/s(t) (z_t -
    m(t)), the monotone transport of one Gaussian onto another."""
    return (1 - t) * MU, ((1 - t) ** 2 * SIGMA**2 + t**2).sqrt()


def exact_velocity(z, t):
    """v(z, t) = m'(t) + s'(t) / s(t) (z - m(t))."""
    m, s = gaussian_flow(t)
    ds = ((1 - t) * -(SIGMA**2) + t) / s
    return -MU + ds / s * (z - m)


def exact_average_velocity(z, r, t):
    """u(z_t, r, t) = (z_t - z_r) / (t - r) along the flow; v(z, t) where r = t."""
    (m_t, s_t), (m_r, s_r) = gaussian_flow(t), gaussian_flow(r)
    z_r = m_r + s_r / s_t * (z - m_t)
    gap = t - r
    return torch.where(gap > 0, (z - z_r) / gap.clamp_min(1e-12), exact_velocity(z, t))


def test_exact_average_velocity_satisfies_the_meanflow_identity():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 3, generator=g, dtype=torch.float64)
    t = torch.rand(64, 1, generator=g, dtype=torch.float64) * 0.9 + 0.1
    r = t * torch.rand(64, 1, generator=g, dtype=torch.float64)
    v = exact_velocity(z, t)
    u, du_dt = total_derivative(lambda zz, tt: exact_average_velocity(zz, r, tt), z, t, v)
    torch.testing.assert_close(u, v - (t - r) * du_dt, rtol=1e-9, atol=1e-9)
    # a wrong tangent (no time derivative) breaks it, so the identity is a real check
    _, partial = torch.func.jvp(lambda zz: exact_average_velocity(zz, r, t), (z,), (v,))
    assert (u - (v - (t - r) * partial)).abs().max() > 1e-3


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_meanflow_sampler_with_the_exact_average_velocity_lands_on_the_exact_answer(steps):
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def fn(z, t, r):
        return exact_average_velocity(z, r.expand(len(z), 1), t.expand(len(z), 1))

    x0 = meanflow_sample(fn, noise, steps)
    torch.testing.assert_close(x0, MU + SIGMA * noise, rtol=1e-9, atol=1e-9)  # the transport's image of the noise


def tiny_meanflow(model="unet_s", **settings):
    objective = MeanFlowObjective(FlowArguments(objective="meanflow", **settings))
    torch.manual_seed(0)
    net = objective.build_model(ModelArguments(model=model, patch_size=4), 1, 16, 10)
    with torch.no_grad():  # away from the zero-initialised outputs, so derivatives are not trivially 0
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return objective, net


@pytest.mark.parametrize("model", ["unet_s", "dit_tiny"])
def test_jvp_equals_finite_differences(model):
    _, net = tiny_meanflow(model)
    net.double()  # the time embedding's frequencies reach 1000 per unit of t: a small step needs float64
    g = torch.Generator().manual_seed(2)
    z, v = (torch.randn(3, 1, 16, 16, generator=g, dtype=torch.float64) for _ in range(2))
    t, r = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64), torch.tensor([0.1, 0.6, 0.2], dtype=torch.float64)
    y = torch.tensor([1, 4, 10])

    def fn(zz, tt):
        return net(zz, tt, y, r=r)

    u, du_dt = total_derivative(fn, z, t, v)
    h = 1e-4
    with torch.no_grad():
        fd = (fn(z + h * v, t + h) - fn(z - h * v, t - h)) / (2 * h)
        torch.testing.assert_close(u, fn(z, t))
    assert (du_dt - fd).norm() / fd.norm() < 0.02


@pytest.mark.parametrize("model", ["unet_s", "dit_tiny"])
def test_interval_embedding_starts_at_the_instantaneous_velocity(model):
    objective = MeanFlowObjective(FlowArguments(objective="meanflow"))
    net = objective.build_model(ModelArguments(model=model, patch_size=4), 1, 16, 10)
    assert net.config.interval_embedding
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "interval" not in name:
                p.add_(0.05 * torch.randn_like(p))
        z, t = torch.randn(2, 1, 16, 16), torch.tensor([0.5, 0.8])
        torch.testing.assert_close(net(z, t, None, r=torch.tensor([0.0, 0.3])), net(z, t, None))
    flow_net = FlowObjective(FlowArguments()).build_model(ModelArguments(model=model, patch_size=4), 1, 16, 10)
    assert not flow_net.config.interval_embedding
    with pytest.raises(ValueError, match="takes no start time r"):
        flow_net(z, t, None, r=t)


class PointAverageVelocity(nn.Module):
    """The exact average velocity of data that is one point a: u(z_t, r, t) = (z_t - a) / t for every r."""

    def __init__(self, a):
        super().__init__()
        self.a = a
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, z, t, cond=None, r=None):
        return self.scale * (z - self.a) / t.view(-1, *([1] * (z.ndim - 1)))


def test_the_exact_average_velocity_has_zero_loss():
    a = torch.randn(1, 2, 4, 4)
    objective = MeanFlowObjective(FlowArguments(objective="meanflow", meanflow_ratio=0.75, meanflow_adaptive_p=0))
    x0 = a.expand(32, -1, -1, -1)
    loss = objective.loss(PointAverageVelocity(a), x0, None, torch.Generator().manual_seed(3))
    assert loss.max() < 1e-8
    wrong = PointAverageVelocity(a)
    wrong.forward = lambda z, t, cond=None, r=None: (z - a) / t.view(-1, 1, 1, 1) * (1 + (t - r).view(-1, 1, 1, 1))
    assert objective.loss(wrong, x0, None, torch.Generator().manual_seed(3)).max() > 1e-3


class TinyAverageVelocity(nn.Module):
    """An MLP of (z, t, t - r) for 1-D data."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 1))

    def forward(self, z, t, cond=None, r=None):
        r = t if r is None else r
        return self.net(torch.cat([z, t[:, None], (t - r)[:, None]], dim=1))


STEPS = 400


def test_u_at_r_equals_t_learns_the_instantaneous_velocity():
    torch.manual_seed(0)
    net = TinyAverageVelocity()
    # the plain squared error, whose minimiser is the conditional mean (the adaptive weight biases it)
    objective = MeanFlowObjective(FlowArguments(objective="meanflow", meanflow_ratio=0.5, meanflow_adaptive_p=0))
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(4)
    for _ in range(STEPS):
        x0 = MU + SIGMA * torch.randn(256, 1, generator=g)
        objective.loss(net, x0, None, g).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    for t in (0.3, 0.6, 0.9):
        tt = torch.full((41,), t)
        m, s = gaussian_flow(tt[:, None])
        z = m + s * torch.linspace(-2, 2, 41)[:, None]  # where z_t lies, within two standard deviations
        exact = exact_velocity(z, tt[:, None])
        with torch.no_grad():
            error = (net(z, tt) - exact).abs().mean()
        assert error < 0.3 < exact.abs().mean(), (t, error)  # an untrained network is off by about 1.4


def test_meanflow_sampler_is_refused_by_flow_models():
    objective = FlowObjective(FlowArguments())
    net = objective.build_model(ModelArguments(model="unet_s"), 1, 16, 0)
    with pytest.raises(UserError, match="not 'meanflow'; meanflow samples models trained with --objective meanflow"):
        objective.sample(net, torch.randn(1, 1, 16, 16), sampler="meanflow", num_inference_steps=1)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(meanflow_ratio=1.5), "--meanflow_ratio must be in"),
        (dict(meanflow_adaptive_p=-1), "--meanflow_adaptive_p must be >= 0"),
        (dict(meanflow_guidance_scale=0.5), "--meanflow_guidance_scale must be >= 1"),
        (dict(shared_noise=True), "does not combine with --shared_noise"),
    ],
)
def test_meanflow_settings_it_cannot_support_are_refused(settings, message):
    with pytest.raises(UserError, match=message):
        MeanFlowObjective(FlowArguments(objective="meanflow", **settings))


def test_training_time_guidance_folds_the_null_class_velocity_into_the_target():
    objective, net = tiny_meanflow(meanflow_guidance_scale=3.0, meanflow_ratio=0.0, meanflow_adaptive_p=0)
    g = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(4, 1, 16, 16, generator=g), torch.randn(4, 1, 16, 16, generator=g)
    t, y = torch.full((4,), 0.5), torch.tensor([1, 2, 10, 3])  # label 10: the null class (a dropped label)
    z = (1 - 0.5) * x0 + 0.5 * noise
    with torch.no_grad():
        loss = objective.mean_flow_loss(net, x0, y, noise, t, t)
        u, u_null = net(z, t, y), net(z, t, torch.full_like(y, 10))
    v = noise - x0
    guided = 3.0 * v + (1 - 3.0) * u_null
    expected = torch.stack([(u[i] - (guided[i] if y[i] != 10 else v[i])).pow(2).mean() for i in range(4)])
    torch.testing.assert_close(loss, expected)
