"""MeanFlow (Geng et al. 2025): a network of the average velocity, for one- and few-step generation.

With flow.py's convention (x_t = (1 - t) x0 + t noise, t = 1 is noise, v = noise - x0), the average velocity of
the flow over [r, t] is

    u(z_t, r, t) = 1 / (t - r) * integral_r^t v(z_s, s) ds,    so    z_r = z_t - (t - r) u(z_t, r, t)

exactly, in one step. Differentiating (t - r) u = integral_r^t v ds in t gives the MeanFlow identity

    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),    d/dt u = v . grad_z u + partial_t u,

and the training target u_tgt = v - (t - r) (v . grad_z u + partial_t u): the total derivative is one
Jacobian-vector product of the network along the tangent (v, 0, 1) in (z, r, t), taken without gradient (the target
is stop-gradiented). With r = t the target is v itself: those pairs are flow matching, and u(z, t, t) is the
instantaneous velocity, so every flow sampler works on a MeanFlow model too.

Training-time guidance (the paper's section 4.2): a class-conditional pair learns from the guided velocity
v~ = omega v + (1 - omega) u(z_t, t, t | null class), in the target and as the JVP's tangent, so that the network
learns the guided flow and one-step samples are guided without a second pass.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from modules.config import FlowArguments, UserError
from modules.networks.conditioning import is_text, select_condition
from modules.objectives.flow import FlowObjective, flow_interpolate, flow_velocity, sample_time
from modules.objectives.samplers import MEANFLOW_SAMPLERS

ADAPTIVE_C = 1e-3  # the constant of the adaptive loss weight 1 / (error + c)^p, as in the paper


def total_derivative(fn, z: torch.Tensor, t: torch.Tensor, dz_dt: torch.Tensor):
    """(fn(z, t), d/dt fn(z_t, t)) along dz/dt = `dz_dt`, by one forward-mode Jacobian-vector product, without
    gradient. Attention runs through SDPA's math path, the one forward-mode AD is defined for on every device; and
    without autocast, which forward-mode AD does not follow (an op's tangent can come out in another dtype than its
    value): `fn` computes in its inputs' dtype."""
    precision = contextlib.nullcontext() if z.is_meta else torch.autocast(z.device.type, enabled=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), precision:
        return torch.func.jvp(fn, (z, t), (dz_dt, torch.ones_like(t)))


def refuse_sharded_weights(weight_sharding: str | None) -> None:
    """MeanFlow's no-gradient passes (the JVP, the guidance's null-class velocity) run the network itself, so that
    they start no collective: every process must hold the whole network."""
    if weight_sharding:
        raise UserError(
            f"--objective meanflow does not train under {weight_sharding}: its JVP runs the whole network on each "
            "process, apart from the others; train with DDP (the default multi-GPU launch) or DeepSpeed ZeRO-2"
        )


def plain_network(model):
    """The network itself, out of a DDP, DeepSpeed or torch.compile wrapper: what the no-gradient passes run. Sharded
    weights (FSDP2's DTensors, DeepSpeed ZeRO-3's partitions) are refused here too, for a loss taken outside the
    training loop, whose setup refuses them first (`check_launch`)."""
    from accelerate.utils import extract_model_from_parallel

    network = extract_model_from_parallel(model, keep_torch_compile=False)
    weight = next(network.parameters(), None)  # sharded with all the others, or whole with them
    refuse_sharded_weights(
        "FSDP" if hasattr(weight, "full_tensor") else "DeepSpeed ZeRO-3" if hasattr(weight, "ds_id") else None
    )
    return network


class MeanFlowObjective(FlowObjective):
    """The MeanFlow loss, its network (the preset with an interval embedding of t - r) and sampler (`meanflow`,
    besides the flow samplers, which use u(z, t, t))."""

    name = "meanflow"
    samplers = tuple(MEANFLOW_SAMPLERS)
    interval_embedding = True

    def __init__(self, args: FlowArguments):
        super().__init__(args)
        if not 0.0 <= args.meanflow_ratio <= 1.0:
            raise UserError(f"--meanflow_ratio must be in [0, 1], got {args.meanflow_ratio}")
        if args.meanflow_adaptive_p < 0:
            raise UserError(f"--meanflow_adaptive_p must be >= 0, got {args.meanflow_adaptive_p}")
        if args.meanflow_guidance_scale < 1:
            raise UserError(f"--meanflow_guidance_scale must be >= 1 (1: none), got {args.meanflow_guidance_scale}")
        if args.shared_noise:
            raise UserError(
                "--objective meanflow does not combine with --shared_noise (the shared-noise frame trainer is "
                "flow matching's and DDPM's); train a video model on the clips instead"
            )

    def check_launch(self, weight_sharding: str | None) -> None:
        refuse_sharded_weights(weight_sharding)

    def build_model(self, model_args, in_channels, resolution, num_classes=0, text=None, num_frames=0):
        """The preset with an interval embedding; training-time guidance is refused unless the data has classes."""
        omega = self.args.meanflow_guidance_scale
        if omega != 1 and (text or not num_classes):
            raise UserError(
                f"--meanflow_guidance_scale {omega} guides toward class labels, but this model is "
                f"{'text-conditional' if text else 'unconditional'}; train it with --meanflow_guidance_scale 1"
            )
        return super().build_model(model_args, in_channels, resolution, num_classes, text, num_frames)

    def run_sampler(self, sampler, fn, noise, steps, generators, callback):
        return MEANFLOW_SAMPLERS[sampler](fn, noise, steps, generators=generators, callback=callback)

    def draw_start(self, t: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(r, t) with r <= t: for a --meanflow_ratio share of the pairs, t and a second time from
        --time_sampling, ordered; for the others r = t, the t given."""
        a = self.args
        other = sample_time(t.shape[0], generator, a.time_sampling, a.logit_mean, a.logit_std).to(t)
        keep = torch.rand(t.shape[0], generator=generator, device=generator.device).to(t.device) < a.meanflow_ratio
        return torch.where(keep, torch.minimum(t, other), t), torch.where(keep, torch.maximum(t, other), t)

    def loss(self, model, x0: torch.Tensor, cond, generator: torch.Generator, noise=None) -> torch.Tensor:
        """Per-sample MeanFlow loss at noise, times t and starts r drawn from `generator`, or at the `noise` paired
        with x0 (a reflow pairs dataset: the average velocity of the pairs' straight lines)."""
        drawn, t = self.draw(x0, generator)
        r, t = self.draw_start(t, generator)
        return self.mean_flow_loss(model, x0, cond, drawn if noise is None else noise, t, r)

    def mean_flow_loss(self, model, x0, cond, noise, t, r) -> torch.Tensor:
        """The adaptively weighted squared error (B,) between u(z_t, r, t) and the stop-gradiented target
        v~ - (t - r) d/dt u, in fp32."""
        z = flow_interpolate(x0, noise, t)
        network = plain_network(model)
        v = self.guided_velocity(network, z, t, flow_velocity(x0, noise), cond)
        u_tgt = v - (t - r).view(-1, *([1] * (x0.ndim - 1))) * self.derivative(network, z, t, r, v, cond)
        u = model(z, t, cond, r=r)
        error = (u.float() - u_tgt.float()).pow(2).flatten(1).mean(1)
        if self.args.meanflow_adaptive_p == 0:
            return error
        return error / (error.detach() + ADAPTIVE_C).pow(self.args.meanflow_adaptive_p)

    def derivative(self, network, z, t, r, v, cond) -> torch.Tensor:
        """d/dt u(z_t, r, t) along dz/dt = v, computed for the pairs with r < t only (the others' target does not
        use it) and zero elsewhere. On the meta device (FLOP counting), for the expected share of the batch."""
        if z.is_meta:
            rows = torch.arange(round(self.args.meanflow_ratio * z.shape[0]), device=z.device)
        else:
            rows = (r < t).nonzero().flatten()
        du_dt = torch.zeros_like(z)
        if len(rows):
            c, start, dtype = select_condition(cond, rows), r[rows], next(network.parameters()).dtype
            # The class's forward, not the mixed-precision wrapper Accelerate puts on the instance (autocast inside):
            # the JVP runs in the weights' dtype, without autocast (see total_derivative).
            forward = type(network).forward
            _, derivative = total_derivative(
                lambda zz, tt: forward(network, zz, tt, c, r=start), z[rows].to(dtype), t[rows], v[rows].to(dtype)
            )
            du_dt[rows] = derivative.to(du_dt.dtype)
        return du_dt

    def guided_velocity(self, network, z, t, v, cond) -> torch.Tensor:
        """The training target's velocity: v, or under --meanflow_guidance_scale omega, for pairs with a class
        label, omega v + (1 - omega) u(z_t, t, t | null class)."""
        omega = self.args.meanflow_guidance_scale
        if omega == 1.0 or cond is None:
            return v
        if is_text(cond):
            raise UserError("--meanflow_guidance_scale takes class labels; text-conditional models train with 1")
        null_class = network.config.num_classes
        with torch.no_grad():
            unconditional = network(z, t, torch.full_like(cond, null_class)).to(v.dtype)
        guided = (cond != null_class).view(-1, *([1] * (v.ndim - 1)))
        return torch.where(guided, omega * v + (1 - omega) * unconditional, v)
