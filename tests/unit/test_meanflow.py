"""MeanFlow's math against closed forms: the identity and one-step sampling on a Gaussian, the JVP against finite
differences, the loss of the exact average velocity, and u(z, t, t) learned as the instantaneous velocity. Then what
surrounds it: a flow network starting a MeanFlow one as it was, the validation loss, text-conditioned latents, and
the launches and settings it refuses."""

from types import MethodType, SimpleNamespace

import pytest
import torch
import torch.nn as nn
from helpers import perturb_

from modules.artifacts.model_folder import load_pretrained_weights
from modules.config import FlowArguments, ModelArguments, UserError, VAEArguments
from modules.objectives.autoencoder import VAEObjective
from modules.objectives.flow import FlowObjective
from modules.objectives.meanflow import MeanFlowObjective, plain_network, total_derivative
from modules.objectives.samplers import meanflow_sample
from modules.training.setup import weight_sharding

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
    """When sampling, and as the objective's own sampler when it is made (train_cfm.py's start, not its first grid)."""
    objective = FlowObjective(FlowArguments())
    net = objective.build_model(ModelArguments(model="unet_s"), 1, 16, 0)
    with pytest.raises(UserError, match="meanflow samples models trained with --objective meanflow"):
        objective.sample(net, torch.randn(1, 1, 16, 16), sampler="meanflow", num_inference_steps=1)
    with pytest.raises(UserError, match="--sampler 'meanflow': this flow model samples with euler, heun"):
        FlowObjective(FlowArguments(sampler="meanflow"))


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


@pytest.mark.parametrize("model", ["unet_s", "dit_tiny", "video_unet_s"])
def test_a_flow_network_starts_a_meanflow_network_as_it_was(model, tmp_path):
    """--init_from a flow run with --objective meanflow: the saved weights, and the interval embedding as built (its
    last layer zero), so u(z, r, t) is the flow network's v(z, t) exactly, for every r; an image UNet's into a video
    UNet's spatial layers too. The reverse is refused: dropping a trained interval embedding changes u(z, t, t)."""
    image = "unet_s" if model == "video_unet_s" else model
    torch.manual_seed(0)
    flow_net = perturb_(
        FlowObjective(FlowArguments()).build_model(ModelArguments(model=image, patch_size=4), 1, 16, 10)
    )
    flow_net.save_pretrained(tmp_path / "flow")
    objective, frames = MeanFlowObjective(FlowArguments(objective="meanflow")), 2 if model != image else 0
    net = objective.build_model(ModelArguments(model=model, patch_size=4), 1, 16, 10, None, frames)
    load_pretrained_weights(net, str(tmp_path / "flow"))
    g = torch.Generator().manual_seed(0)
    z, t, y = (
        torch.randn(2, *([frames] if frames else []), 1, 16, 16, generator=g),
        torch.tensor([0.5, 0.9]),
        torch.tensor([2, 10]),
    )
    with torch.no_grad():
        v = flow_net(z, t, y) if not frames else torch.stack([flow_net(z[:, f], t, y) for f in range(frames)], 1)
        for r in (torch.tensor([0.0, 0.2]), t):
            torch.testing.assert_close(net(z, t, y, r=r), v, rtol=0, atol=0 if not frames else 1e-6)
    if frames:  # and the video UNet trains on clips: the JVP along clips, the loss per clip
        assert torch.isfinite(objective.loss(net, z, y, g)).all()
    else:
        perturb_(net).save_pretrained(tmp_path / "meanflow")
        with pytest.raises(UserError, match="is a MeanFlow network .*; fine-tune it with --objective meanflow"):
            load_pretrained_weights(flow_net, str(tmp_path / "meanflow"))


@pytest.mark.parametrize("model", ["unet_s", "dit_tiny"])
def test_mixed_precision_takes_the_jvp_in_the_weights_dtype(model):
    """Under autocast (as Accelerate wraps the network's forward for --mixed_precision bf16) forward-mode AD gives a
    GroupNorm's value and tangent different dtypes; the JVP runs without it, so the loss is the float32 one up to
    bf16 rounding. With bf16 weights (DeepSpeed's bf16) it runs in bf16."""
    objective, net = tiny_meanflow(model, meanflow_ratio=1.0, meanflow_guidance_scale=2.0)
    x0, y = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(8)), torch.tensor([1, 10, 3, 4])
    exact = objective.loss(net, x0, y, torch.Generator().manual_seed(9))
    net.forward = MethodType(torch.autocast("cpu", dtype=torch.bfloat16)(type(net).forward), net)
    torch.testing.assert_close(objective.loss(net, x0, y, torch.Generator().manual_seed(9)), exact, rtol=0.02, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = objective.loss(net.bfloat16(), x0, y, torch.Generator().manual_seed(9))
    loss.mean().backward()
    assert torch.isfinite(loss).all() and net.cond_embed.interval.mlp[0].weight.grad is not None


def test_the_validation_loss_is_the_flow_loss_of_u_at_r_equals_t():
    objective, net = tiny_meanflow()
    g = torch.Generator().manual_seed(6)
    x0, y = torch.randn(4, 1, 16, 16, generator=g), torch.tensor([0, 3, 10, 9])
    with torch.no_grad():
        ours = objective.validation(net, x0, y, seed=1, num_bins=2)
        flow = FlowObjective(FlowArguments()).validation(net, x0, y, seed=1, num_bins=2)
    assert ours == flow and ours["val_loss"] > 0


def test_text_conditioned_latents_train_and_sample():
    """A DiT of 4-channel 8x8 latents with cross-attention to text: loss and backward (the JVP picks the rows of a
    text condition), and one-step sampling with guidance from the empty caption."""
    text = dict(text_conditioning="cross_attn", text_dim=8, pooled_dim=8, text_encoder=None)
    objective = MeanFlowObjective(FlowArguments(objective="meanflow", meanflow_ratio=1.0))
    torch.manual_seed(0)
    net = perturb_(objective.build_model(ModelArguments(model="dit_tiny", patch_size=2), 4, 8, 0, text))
    g = torch.Generator().manual_seed(7)
    cond = {"tokens": torch.randn(3, 5, 8, generator=g), "mask": torch.rand(3, 5, generator=g) < 0.8}
    cond["pooled"] = torch.randn(3, 8, generator=g)
    loss = objective.loss(net, torch.randn(3, 4, 8, 8, generator=g), cond, g)
    loss.mean().backward()
    assert loss.shape == (3,) and torch.isfinite(loss).all()
    assert net.cond_embed.interval.mlp[0].weight.grad.abs().sum() > 0  # r reached the loss
    null = {k: v[:1] * 0 for k, v in cond.items()}
    with torch.no_grad():
        x0 = objective.sample(net, torch.randn(3, 4, 8, 8, generator=g), cond, guidance_scale=2.0, null_cond=null)
    assert x0.shape == (3, 4, 8, 8) and torch.isfinite(x0).all()
    guided = MeanFlowObjective(FlowArguments(objective="meanflow", meanflow_guidance_scale=2.0))
    with pytest.raises(UserError, match="guides toward class labels, but this model is text-conditional"):
        guided.build_model(ModelArguments(model="dit_tiny", patch_size=2), 4, 8, 0, text)


def test_sharded_weights_are_refused():
    """Under FSDP and DeepSpeed ZeRO-3 (each process holds a shard of the weights) at setup, from what Accelerate
    says of the launch; and by the loss, from the parameters, outside the loop. Other objectives train there."""

    def accelerator(kind, stage=None):
        state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage))
        return SimpleNamespace(distributed_type=SimpleNamespace(name=kind), state=state)

    launches = [accelerator("NO"), accelerator("MULTI_GPU"), accelerator("DEEPSPEED", 2)]
    assert [weight_sharding(a) for a in launches] == [None, None, None]
    assert weight_sharding(accelerator("FSDP")) == "FSDP"
    assert weight_sharding(accelerator("DEEPSPEED", 3)) == "DeepSpeed ZeRO-3"
    objective = MeanFlowObjective(FlowArguments(objective="meanflow"))
    objective.check_launch(None)
    for sharding in ("FSDP", "DeepSpeed ZeRO-3"):
        FlowObjective(FlowArguments()).check_launch(sharding)
        VAEObjective(VAEArguments()).check_launch(sharding)
        with pytest.raises(UserError, match=f"meanflow does not train under {sharding}: its JVP"):
            objective.check_launch(sharding)
    for attribute, sharding in (("full_tensor", "FSDP"), ("ds_id", "DeepSpeed ZeRO-3")):
        net = nn.Linear(1, 1)
        setattr(net.weight, attribute, None)  # how FSDP2's DTensors and ZeRO-3's partitions show
        with pytest.raises(UserError, match=f"does not train under {sharding}"):
            plain_network(net)
    assert plain_network(nn.Linear(1, 1)) is not None
