"""DDPM (Ho et al. 2020) objective on diffusers' noise schedules.

Forward process: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, with a_t = alpha_bar_t = prod_{s<=t} (1 - beta_s) and integer
t in [0, T). The network sees the float time t / T. It predicts eps, x0 ("sample") or v = sqrt(a) eps - sqrt(1 - a) x0.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch

from modules.config import DDPMArguments, UserError
from modules.objectives.denoising import DenoisingObjective
from modules.objectives.samplers import ddim_sample, predict_x0_eps, scheduler_sample

# Our names for diffusers' beta schedules.
BETA_SCHEDULES = {
    "linear": "linear",
    "scaled_linear": "scaled_linear",
    "cosine": "squaredcos_cap_v2",
    "sigmoid": "sigmoid",
}
DDPM_SAMPLERS = ("ddpm", "ddim", "dpm_solver")
# The settings of a diffusers scheduler that DDPMArguments holds; any other must have its default.
SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_schedule",
    "beta_start",
    "beta_end",
    "prediction_type",
    "rescale_betas_zero_snr",
    "clip_sample",
    "clip_sample_range",
)
# A diffusers scheduler class -> the sampler and steps its pipeline samples with by default (None: every step).
SCHEDULER_SAMPLING = {"DDPMScheduler": ("ddpm", None), "DDIMScheduler": ("ddim", 50)}


def make_scheduler(args: DDPMArguments, kind: str = "ddpm"):
    """The diffusers scheduler for this schedule: DDPMScheduler (training, ancestral sampling) or the
    DPM-Solver++ multistep scheduler on the same betas."""
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    scheduler = DDPMScheduler(
        num_train_timesteps=args.num_train_timesteps,
        beta_schedule=BETA_SCHEDULES[args.beta_schedule],
        beta_start=args.beta_start,
        beta_end=args.beta_end,
        prediction_type=args.prediction_type,
        rescale_betas_zero_snr=args.rescale_betas_zero_snr,
        clip_sample=args.clip_sample,
        clip_sample_range=args.clip_sample_range,
    )
    if kind == "dpm_solver":
        return DPMSolverMultistepScheduler.from_config(
            scheduler.config, algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero"
        )
    return scheduler


def ddpm_arguments_from_scheduler(config: dict, where: str) -> DDPMArguments:
    """Our settings for a diffusers DDPMScheduler or DDIMScheduler config (a pipeline's scheduler_config.json): the
    same betas, prediction type and clipping, sampled as its pipeline samples by default (DDPMPipeline: ancestral,
    every step; DiTPipeline: 50 DDIM steps). A setting we do not express (trained_betas, thresholding, another
    timestep_spacing or variance_type, ...) is an error that names the key in `where`, unless it has its default."""
    from diffusers import DDIMScheduler, DDPMScheduler

    name = config.get("_class_name")
    classes = {"DDPMScheduler": DDPMScheduler, "DDIMScheduler": DDIMScheduler}
    if name not in classes:
        raise UserError(
            f"{where}: _class_name {name!r} is not supported; a DDPMScheduler or DDIMScheduler config is (other "
            "schedulers are samplers of the same schedule: copy its betas into one of those)"
        )
    signature = inspect.signature(classes[name].__init__).parameters.values()
    defaults = {p.name: p.default for p in signature if p.default is not inspect.Parameter.empty}
    settings = {**defaults, **{k: v for k, v in config.items() if k in defaults}}
    for key, value in settings.items():
        if key not in SCHEDULE_KEYS and value != defaults[key]:
            raise UserError(f"{where}: {key} {value!r} is not supported (only the default, {defaults[key]!r})")
    beta_schedule = {v: k for k, v in BETA_SCHEDULES.items()}.get(settings["beta_schedule"])
    if beta_schedule is None:
        raise UserError(f"{where}: beta_schedule {settings['beta_schedule']!r} is not supported")
    if settings["prediction_type"] not in ("epsilon", "sample", "v_prediction"):
        raise UserError(f"{where}: prediction_type {settings['prediction_type']!r} is not supported")
    sampler, steps = SCHEDULER_SAMPLING[name]
    schedule = {k: settings[k] for k in SCHEDULE_KEYS}
    return DDPMArguments(
        **{**schedule, "beta_schedule": beta_schedule},
        sampler=sampler,
        num_inference_steps=steps or settings["num_train_timesteps"],
    )


def with_schedule_of(args: DDPMArguments, other: DDPMArguments) -> DDPMArguments:
    """`args` with the noise schedule of `other` (what a network was trained for), its sampling settings kept."""
    return dataclasses.replace(args, **{k: getattr(other, k) for k in SCHEDULE_KEYS})


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a) x0 + sqrt(1 - a) eps, with alpha_bar of shape (B,) broadcast."""
    a = alpha_bar.view(-1, *([1] * (x0.ndim - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def training_target(x0, noise, alpha_bar, prediction_type: str) -> torch.Tensor:
    """What the network should output: eps, x0, or v = sqrt(a) eps - sqrt(1 - a) x0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        a = alpha_bar.view(-1, *([1] * (x0.ndim - 1)))
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    raise ValueError(f"unknown prediction type '{prediction_type}'")


def min_snr_weight(alpha_bar: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), SNR = a / (1 - a), expressed for each prediction type:
    eps: min(SNR, g) / SNR, v: min(SNR, g) / (SNR + 1), x0: min(SNR, g)."""
    snr = alpha_bar / (1 - alpha_bar).clamp_min(1e-20)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr.clamp_min(1e-20)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


class DDPMObjective(DenoisingObjective):
    """DDPM noise-prediction loss (eps / x0 / v) and its samplers (DDPM ancestral, DDIM, DPM-Solver++)."""

    name = "ddpm"
    samplers = DDPM_SAMPLERS

    def __init__(self, args: DDPMArguments):
        super().__init__(args)
        self.scheduler = make_scheduler(args)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.clone().float()
        if args.snr_gamma is not None and args.snr_gamma <= 0:
            raise UserError(f"--snr_gamma must be positive, got {args.snr_gamma}")

    def draw(self, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise like x0 and uniform integer steps, as times t = step / T."""
        device = generator.device
        t = torch.randint(0, self.args.num_train_timesteps, (x0.shape[0],), generator=generator, device=device)
        noise = torch.randn(x0.shape, generator=generator, device=device).to(x0)
        return noise, t.to(x0.device).float() / self.args.num_train_timesteps

    def loss_and_estimate(self, model, x0, cond, noise, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample (optionally Min-SNR weighted) MSE to the target, in fp32, for given noise and times t in
        [0, 1) (B,), i.e. integer steps round(t T); and the x0 estimate."""
        a = self.args
        steps = (t * a.num_train_timesteps).round().long().clamp(0, a.num_train_timesteps - 1)
        alpha_bar = self.alphas_cumprod.to(x0.device)[steps]
        x_t = add_noise(x0, noise, alpha_bar.to(x0.dtype))
        out = model(x_t, steps.float() / a.num_train_timesteps, cond)
        target = training_target(x0.float(), noise.float(), alpha_bar, a.prediction_type)
        loss = (out.float() - target).pow(2).flatten(1).mean(1)
        if a.snr_gamma is not None:
            loss = loss * min_snr_weight(alpha_bar, a.snr_gamma, a.prediction_type)
        a_t = alpha_bar.view(-1, *([1] * (x0.ndim - 1))).to(out.dtype)
        return loss, predict_x0_eps(x_t, out, a_t, a.prediction_type)[0]

    def run_sampler(self, sampler, fn, noise, steps, generators, callback):
        """The reverse process from t = T to 0."""
        if sampler == "ddim":
            return ddim_sample(fn, noise, self.scheduler, steps, self.args.ddim_eta, generators, callback)
        return scheduler_sample(fn, noise, make_scheduler(self.args, sampler), steps, generators, callback)
