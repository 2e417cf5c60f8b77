"""Sampling loops. Every loop takes `fn(x, t) -> network output`, with t a float in [0, 1] of shape (B,), and an
optional `callback(step_index, t, x_t, x0_pred)` called before each update with the model's current estimate of x0.

Randomness comes from one torch.Generator per sample, so image i is the same whatever the batch size.
Flow samplers follow flow.py's convention (t = 1 noise -> t = 0 data, the network predicts noise - x0).
"""

from __future__ import annotations

import torch

from modules.networks.conditioning import cat_conditions, is_text
from modules.pixels import to_uint8


def per_sample_randn(generators, shape, device=None, dtype=torch.float32) -> torch.Tensor:
    """A (len(generators), *shape) standard normal tensor; row i is drawn from generators[i] alone."""
    rows = [torch.randn(shape, generator=g, device=g.device, dtype=dtype) for g in generators]
    return torch.stack(rows).to(device)


def sample_generators(seed: int, start: int, count: int, device="cpu") -> list[torch.Generator]:
    """Generators for images start..start+count-1 of a run seeded with `seed`."""
    return [torch.Generator(device=device).manual_seed(seed * 1_000_003 + i) for i in range(start, start + count)]


def parse_guidance_interval(spec) -> tuple[float, float] | None:
    """`--guidance_interval`: "LO,HI" (or a pair of numbers) with 0 <= LO < HI <= 1 -> (LO, HI); None or "" -> None.
    A ValueError says what is wrong (the caller names the flag)."""
    if spec is None or spec == "":
        return None
    try:
        parts = spec.split(",") if isinstance(spec, str) else list(spec)
        lo, hi = (float(v) for v in parts)
    except (TypeError, ValueError):
        raise ValueError(f"expected two times LO,HI in [0, 1], got {spec!r}") from None
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"expected 0 <= LO < HI <= 1 (t = 1 is noise, 0 data), got {spec!r}")
    return lo, hi


def guided_model(model, cond, guidance_scale: float = 1.0, null_cond=None, interval=None, guide=None):
    """`fn(x, t, r=None)` for the samplers, with guidance: D_bad + s (D - D_bad), where D is the model's
    conditional output and D_bad either its output for the null condition (classifier-free guidance) or, given
    `guide`, that network's conditional output (autoguidance, Karras et al. 2024: a smaller or less-trained model of
    the same kind guides this one; an unconditional model can be autoguided too).
    `r`, the start time of an average velocity, goes to the networks only when given (the meanflow sampler).

    `interval` (LO, HI): guidance only where LO <= t <= HI (Kynkaenniemi et al. 2024); at other times the conditional
    output alone, one network pass. `null_cond` defaults to the model's null class (index num_classes); text models
    must pass theirs (the empty caption's encoding, one row or one per sample)."""

    def fn(x, t, r=None):
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        start = {} if r is None else {"r": r.expand(x.shape[0]) if r.ndim == 0 else r}
        inside = None if interval is None else (t >= interval[0]) & (t <= interval[1])
        if guidance_scale == 1.0 or (cond is None and guide is None) or (inside is not None and not inside.any()):
            return model(x, t, cond, **start)
        if guide is not None:
            out_cond, out_bad = model(x, t, cond, **start), guide(x, t, cond, **start)
        else:
            if is_text(cond):
                if null_cond is None:
                    raise ValueError("classifier-free guidance of a text-conditional model needs null_cond")
                null = {k: v.expand(x.shape[0], *v.shape[1:]) for k, v in null_cond.items()}
            else:
                null = null_cond if null_cond is not None else torch.full_like(cond, model.config.num_classes)
            both = {k: torch.cat([v, v]) for k, v in start.items()}
            out = model(torch.cat([x, x]), torch.cat([t, t]), cat_conditions([cond, null]), **both)
            out_cond, out_bad = out.chunk(2)
        guided = out_bad + guidance_scale * (out_cond - out_bad)
        if inside is None or inside.all():
            return guided
        return torch.where(inside.view(-1, *[1] * (x.ndim - 1)), guided, out_cond)

    return fn


# --- Flow matching: integrate dx/dt = v from t = 1 to t = 0 ----------------------------------------------------------


def _time_grid(steps: int, device) -> torch.Tensor:
    return torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64)


def euler_sample(fn, noise, steps, generators=None, callback=None):
    """Explicit Euler: x_{t-h} = x_t - h v(x_t, t). `steps` network evaluations."""
    x, ts = noise, _time_grid(steps, noise.device)
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        v = fn(x, t.to(x.dtype))
        if callback:
            callback(i, float(t), x, x - t.to(x.dtype) * v)
        x = x + (t_next - t).to(x.dtype) * v
    return x


def heun_sample(fn, noise, steps, generators=None, callback=None):
    """Heun's second-order method; the last step (to t = 0) is Euler, as in EDM. 2 * steps - 1 evaluations."""
    x, ts = noise, _time_grid(steps, noise.device)
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        h = (t_next - t).to(x.dtype)
        v = fn(x, t.to(x.dtype))
        if callback:
            callback(i, float(t), x, x - t.to(x.dtype) * v)
        x_euler = x + h * v
        if t_next > 0:
            v_next = fn(x_euler, t_next.to(x.dtype))
            x = x + h * 0.5 * (v + v_next)
        else:
            x = x_euler
    return x


def euler_maruyama_sample(fn, noise, steps, generators=None, callback=None, noise_scale: float = 1.0):
    """Reverse-time SDE with the ODE's marginals, integrated by Euler-Maruyama.

    With diffusion g(t)^2 = 2 s t and score(x_t) = -eps_hat / t, where eps_hat = x_t + (1 - t) v, the reverse drift is
    v + s * eps_hat, so x_{t-h} = x_t - h (v + s eps_hat) + sqrt(2 s t h) z. The last step is deterministic."""
    if generators is None:
        raise ValueError("euler_maruyama needs one torch.Generator per sample")
    x, ts = noise, _time_grid(steps, noise.device)
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        h = (t - t_next).to(x.dtype)
        tt = t.to(x.dtype)
        v = fn(x, tt)
        if callback:
            callback(i, float(t), x, x - tt * v)
        if t_next > 0:
            eps_hat = x + (1 - tt) * v
            z = per_sample_randn(generators, x.shape[1:], x.device, x.dtype)
            x = x - h * (v + noise_scale * eps_hat) + torch.sqrt(2 * noise_scale * tt * h) * z
        else:
            x = x - h * v
    return x


FLOW_SAMPLERS = {"euler": euler_sample, "heun": heun_sample, "euler_maruyama": euler_maruyama_sample}


def meanflow_sample(fn, noise, steps, generators=None, callback=None):
    """MeanFlow's sampler, for networks of the average velocity u(z_t, r, t) over [r, t] (modules/objectives/
    meanflow.py): z_r = z_t - (t - r) u(z_t, r, t) over `steps` equal intervals from t = 1 to 0, one network
    evaluation each; with the exact average velocity every step is exact, so 1 step suffices. The callback's x0
    estimate is z_t - t u(z_t, r, t), the step's own velocity extended to t = 0."""
    x, ts = noise, _time_grid(steps, noise.device)
    for i in range(steps):
        t, r = ts[i].to(x.dtype), ts[i + 1].to(x.dtype)
        u = fn(x, t, r)
        if callback:
            callback(i, float(t), x, x - t * u)
        x = x - (t - r) * u
    return x


MEANFLOW_SAMPLERS = {**FLOW_SAMPLERS, "meanflow": meanflow_sample}


def network_evaluations(sampler: str, steps: int) -> int:
    """Network evaluations a sampler makes in `steps` steps: Heun two a step but the last, the others one (NFE; a
    guided evaluation is two passes, the conditional and the unconditional)."""
    return 2 * steps - 1 if sampler == "heun" else steps


def sampler_problem(sampler: str, name: str, samplers) -> str | None:
    """Why a `name` model, which samples with `samplers`, cannot sample with `sampler` (to follow the flag's name in
    an error); None when it can."""
    if sampler in samplers:
        return None
    hint = "; meanflow samples models trained with --objective meanflow" if sampler == "meanflow" else ""
    return f"'{sampler}': this {name} model samples with {', '.join(samplers)}{hint}"


# --- DDPM: discrete-time samplers ------------------------------------------------------------------------------------


def predict_x0_eps(x_t, output, alpha_bar, prediction_type: str):
    """Recover (x0, eps) from the network output, given x_t = sqrt(a) x0 + sqrt(1 - a) eps with a = alpha_bar."""
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction_type == "epsilon":
        eps = output
        return (x_t - s * eps) / a, eps
    if prediction_type == "sample":
        x0 = output
        return x0, (x_t - a * x0) / s
    if prediction_type == "v_prediction":  # v = a eps - s x0
        return a * x_t - s * output, s * x_t + a * output
    raise ValueError(f"unknown prediction type '{prediction_type}'")


def ddim_step(x_t, output, alpha_bar_t, alpha_bar_prev, prediction_type: str, eta: float = 0.0, noise=None, clip=None):
    """One DDIM step (Song et al. 2021, eq. 12):

    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z,
    sigma = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).

    `clip`: x0 is clipped to [-clip, clip] first and eps kept, as diffusers' DDIMScheduler does with clip_sample."""
    x0, eps = predict_x0_eps(x_t, output, alpha_bar_t, prediction_type)
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)).sqrt()
    x_prev = alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev - sigma**2).sqrt() * eps
    if eta > 0:
        x_prev = x_prev + sigma * noise
    return x_prev


def ddim_sample(fn, noise, scheduler, steps, eta=0.0, generators=None, callback=None):
    """DDIM with the timesteps of diffusers' DDIMScheduler built from the training schedule."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    alphas = ddim.alphas_cumprod.to(noise.device, torch.float64)
    final = torch.tensor(float(ddim.final_alpha_cumprod), dtype=torch.float64, device=noise.device)
    num_train = ddim.config.num_train_timesteps
    clip = ddim.config.clip_sample_range if ddim.config.clip_sample else None
    x = noise
    for i, t in enumerate(ddim.timesteps):
        t = int(t)
        prev = t - num_train // steps
        a_t, a_prev = alphas[t], alphas[prev] if prev >= 0 else final
        out = fn(x, torch.tensor(t / num_train, device=x.device, dtype=x.dtype))
        if callback:
            x0 = predict_x0_eps(x, out, a_t.to(x.dtype), ddim.config.prediction_type)[0]
            callback(i, t / num_train, x, x0)
        z = per_sample_randn(generators, x.shape[1:], x.device, x.dtype) if eta > 0 else None
        x = ddim_step(x, out, a_t.to(x.dtype), a_prev.to(x.dtype), ddim.config.prediction_type, eta, z, clip)
    return x


def scheduler_sample(fn, noise, scheduler, steps, generators=None, callback=None):
    """Sample with a diffusers scheduler's own `step` (DDPM ancestral, DPM-Solver++)."""
    scheduler.set_timesteps(steps, device=noise.device)
    num_train = scheduler.config.num_train_timesteps
    x = noise
    for i, t in enumerate(scheduler.timesteps):
        out = fn(x, (t.float() / num_train).to(x.dtype))
        if callback:
            alpha_bar = scheduler.alphas_cumprod[int(t)].to(x.device, x.dtype)
            callback(i, int(t) / num_train, x, predict_x0_eps(x, out, alpha_bar, scheduler.config.prediction_type)[0])
        x = scheduler.step(out, t, x, generator=generators).prev_sample
    return x


# --- From a trained model to images ----------------------------------------------------------------------------------


@torch.no_grad()
def sample_batches(
    model,
    objective,
    num_images: int,
    seed: int,
    shape,
    batch_size: int = 64,
    class_labels=None,
    device="cpu",
    start: int = 0,
    progress: bool = False,
    generators: list[torch.Generator] | None = None,
    **sample_kwargs,
):
    """Images start..start+num_images-1 of `seed`, a batch at a time: (the noise each starts from, what the model
    makes of it), both in the model's space (latents for a latent model). Image i depends only on (seed, i, label i).
    `generators` (one per image, which image i draws all its noise from) replace `seed`'s.

    `class_labels`: one label per image, or for text models a text dict with one row per image (and then
    `null_cond=` the empty caption's encoding, for guidance)."""
    from tqdm.auto import tqdm

    batches = range(start, start + num_images, batch_size)
    for first in tqdm(batches, desc="sampling", disable=not progress, leave=False):
        n = min(batch_size, start + num_images - first)
        if generators is None:
            chunk = sample_generators(seed, first, n)
        else:
            chunk = generators[first - start : first - start + n]
        noise = per_sample_randn(chunk, shape, device)
        cond = None
        if isinstance(class_labels, dict):  # text embeddings, one row per image (modules/conditioning.py)
            cond = {k: v[first - start : first - start + n].to(device) for k, v in class_labels.items()}
        elif class_labels is not None:
            cond = torch.as_tensor(class_labels[first - start : first - start + n], dtype=torch.long, device=device)
        yield noise, objective.sample(model, noise, cond, generators=chunk, **sample_kwargs)


@torch.no_grad()
def generate_images(model, objective, num_images: int, seed: int, shape, *args, decode=None, **kwargs) -> torch.Tensor:
    """Images start..start+num_images-1 of `seed` as uint8 (N,C,H,W), as `sample_batches` (which takes the other
    arguments) makes them. `decode` maps what the model generates to images in [-1, 1] (a VAE's decoder for latent
    models)."""
    batches = sample_batches(model, objective, num_images, seed, shape, *args, **kwargs)
    return torch.cat([to_uint8(decode(x0) if decode is not None else x0).cpu() for _, x0 in batches])
