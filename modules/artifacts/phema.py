"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2): the
EMA length is chosen after training, from snapshots of two power-function EMA profiles.

A power-function EMA with exponent g averages the weights theta(tau) of steps tau <= t with density
p_t(tau) = (g + 1) tau^g / t^(g + 1): the same shape at every t, its width relative to t fixed. EDM2 names a profile
by that relative width, sigma_rel = sqrt((g + 1) / ((g + 2)^2 (g + 3))) (`--ema_phema_stds`, 0.05 and 0.10 by
default in EDM2); g > 0 needs sigma_rel < 0.2887. Training updates it as theta_hat <- beta theta_hat + (1 - beta)
theta with beta = (1 - 1/t)^(g + 1) at step t (modules/training/ema.py), and every --ema_snapshot_steps writes each
profile to <output_dir>/phema/ (`snapshot_name`).

Any other profile q is then a least-squares combination of the snapshots: the weights x minimise the L2 distance
between sum_i x_i p_i and q, which is the linear system A x = b with A_ij = <p_i, p_j> and b_i = <p_i, q>, inner
products over tau, in closed form for power profiles (`profile_correlation`). The reconstructed weights are
sum_i x_i theta_hat_i: one pass over the snapshot files, one tensor at a time (`reconstruct`).

    python -m modules.artifacts.phema RUN --ema_std 0.08     # a model folder sample.py loads (RUN/phema-0.0800)
    python sample.py --model RUN --ema_std 0.08               # the same, on the fly
    python sample.py --model RUN --ema_sweep 0.02,0.05,0.1,0.2 --compute_fid    # FID against the EMA length
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from modules.artifacts.export import directory_atomically
from modules.artifacts.model_folder import load_model
from modules.config import UserError, cli_entry, help_field, parse_args
from modules.records import OBJECTIVE_FILE

SNAPSHOT_DIR = "phema"
MAX_STD = float(np.sqrt(1 / 12))  # sigma_rel of exponent 0 (a uniform average from the start); a profile needs less
_SNAPSHOT = re.compile(r"^phema-(\d+)-(\d+\.\d+)\.safetensors$")


def std_to_exponent(std) -> np.ndarray:
    """The exponent g of a power-function profile of relative width `std` (sigma_rel): the largest real root of
    (g + 2)^2 (g + 3) = (g + 1) / std^2, i.e. g^3 + 7 g^2 + (16 - 1/std^2) g + (12 - 1/std^2) = 0."""
    std = np.asarray(std, dtype=np.float64)
    if np.any(std <= 0) or np.any(std >= MAX_STD):
        raise ValueError(f"a power-function EMA's std must be in (0, {MAX_STD:.4f}), got {std.tolist()}")
    roots = [np.roots([1.0, 7.0, 16.0 - s**-2, 12.0 - s**-2]) for s in std.reshape(-1)]
    return np.array([r[np.isreal(r)].real.max() for r in roots]).reshape(std.shape)


def exponent_to_std(exponent) -> np.ndarray:
    g = np.asarray(exponent, dtype=np.float64)
    return np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


def power_decay(step: int, exponent: float) -> float:
    """beta of a power-function EMA at optimizer step `step` (1-based): 0 at step 1, the first update a copy."""
    return (1.0 - 1.0 / step) ** (exponent + 1.0) if step > 1 else 0.0


def profile_correlation(steps_a, stds_a, steps_b, stds_b) -> np.ndarray:
    """<p_a, p_b> = integral of p_a(tau) p_b(tau) over tau for power-function profiles a (length, e.g. rows) and b
    (broadcast against a): for t_a <= t_b, (g_a + 1)(g_b + 1) (t_a / t_b)^g_b / ((g_a + g_b + 1) t_b), and the
    same with a and b swapped."""
    ta, tb = np.asarray(steps_a, dtype=np.float64), np.asarray(steps_b, dtype=np.float64)
    ga, gb = std_to_exponent(stds_a), std_to_exponent(stds_b)
    ratio_exponent = np.where(ta < tb, gb, -ga)  # (ta/tb)^gb when ta < tb, else (tb/ta)^ga = (ta/tb)^-ga
    return (ga + 1) * (gb + 1) * (ta / tb) ** ratio_exponent / ((ga + gb + 1) * np.maximum(ta, tb))


def profile_density(step: int, std: float, taus) -> np.ndarray:
    """p_t(tau) of the power-function profile of `std` at step t, at times `taus` (0 after t)."""
    g, taus = float(std_to_exponent(std)), np.asarray(taus, dtype=np.float64)
    return np.where(taus <= step, (g + 1) * (taus / step) ** g / step, 0.0)


def solve_coefficients(steps, stds, target_correlations) -> np.ndarray:
    """The least-squares weights x of the stored profiles (`steps`, `stds`, one entry per snapshot) for a target
    profile q, given b_i = <p_i, q> (`target_correlations`): A x = b, A_ij = <p_i, p_j>."""
    steps, stds = np.asarray(steps, dtype=np.float64), np.asarray(stds, dtype=np.float64)
    gram = profile_correlation(steps[:, None], stds[:, None], steps[None, :], stds[None, :])
    return np.linalg.lstsq(gram, np.asarray(target_correlations, dtype=np.float64), rcond=None)[0]


def coefficients_for_std(steps, stds, step: int, std: float) -> np.ndarray:
    """The weights of the snapshots that make the power-function profile of `std` at `step`."""
    return solve_coefficients(steps, stds, profile_correlation(steps, stds, step, std))


def coefficients_for_weights(steps, stds, weights) -> np.ndarray:
    """The weights of the snapshots that make any average of the training steps: `weights[k]` is the weight of step
    k + 1's parameters (a fixed-decay EMA's (1 - beta) beta^(T - k - 1), ...); b_i = sum_tau p_i(tau) weights[tau],
    with p_i integrated over each step's interval (tau - 1, tau]."""
    weights = np.asarray(weights, dtype=np.float64)
    edges = np.arange(len(weights) + 1, dtype=np.float64)
    correlations = []
    for step, std in zip(steps, stds, strict=True):
        g = float(std_to_exponent(std))
        upper = np.minimum(edges, step) / step  # the profile's CDF (tau / t)^(g + 1) at each step's edges
        mass = np.diff(upper ** (g + 1))
        correlations.append(float(mass @ weights))
    return solve_coefficients(steps, stds, correlations)


# --- Snapshots on disk -----------------------------------------------------------------------------------------------


def snapshot_name(step: int, std: float) -> str:
    return f"phema-{step:09d}-{std:.4f}.safetensors"


def parse_stds(spec: str, flag: str) -> list[float]:
    """`--ema_phema_stds` / `--ema_sweep`: comma-separated relative widths, each usable by a power-function profile;
    a UserError names the culprit."""
    try:
        stds = [float(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated numbers, got '{spec}'") from None
    bad = [s for s in stds if not 0 < s < MAX_STD]
    if not stds or bad:
        raise UserError(
            f"{flag} '{spec}': each std must be in (0, {MAX_STD:.4f}) (a power-function EMA's relative width; "
            f"{MAX_STD:.4f} is a plain average from the start)"
        )
    return stds


def list_snapshots(run_dir: str | Path) -> list[tuple[int, float, Path]]:
    """(step, std, file) of each snapshot of a run, by step then std."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    found = [(int(m[1]), float(m[2]), p) for p in folder.glob("phema-*.safetensors") if (m := _SNAPSHOT.match(p.name))]
    return sorted(found)


def reconstruct(run_dir: str | Path, std: float, step: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The weights of the power-function EMA of `std` at `step` (default: the last snapshot's), from the run's
    snapshots up to that step, and a record of how (the snapshots' steps and stds, and their coefficients)."""
    snapshots = list_snapshots(run_dir)
    if not snapshots:
        raise UserError(
            f"'{run_dir}' holds no post-hoc EMA snapshots ({SNAPSHOT_DIR}/phema-*.safetensors): train it with "
            "--ema_phema_stds and --ema_snapshot_steps"
        )
    step = step or snapshots[-1][0]
    used = [s for s in snapshots if s[0] <= step]
    if len({s[1] for s in used}) < 2:
        raise UserError(
            f"post-hoc EMA of '{run_dir}' at step {step}: the snapshots up to it hold {len({s[1] for s in used})} "
            "profile(s); reconstruction needs two --ema_phema_stds"
        )
    if not 0 < std < MAX_STD:
        raise UserError(f"--ema_std {std}: must be in (0, {MAX_STD:.4f})")
    coefficients = coefficients_for_std([s[0] for s in used], [s[1] for s in used], step, std)
    weights = combine([s[2] for s in used], coefficients)
    record = {
        "std": std,
        "step": step,
        "snapshots": [[s[0], s[1], float(c)] for s, c in zip(used, coefficients, strict=True)],
    }
    return weights, record


def combine(paths: list[Path], coefficients) -> dict[str, torch.Tensor]:
    """sum_i coefficients[i] * snapshot i, in float64, one file open at a time; returned in the files' dtypes."""
    from safetensors import safe_open

    total, dtypes = {}, {}
    for path, c in zip(paths, coefficients, strict=True):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                dtypes.setdefault(key, tensor.dtype)
                if key in total:
                    total[key] += float(c) * tensor.double()
                else:
                    total[key] = float(c) * tensor.double()
    return {k: v.to(dtypes[k]) for k, v in total.items()}


def load_posthoc_weights(model, run_dir: str | Path, std: float, step: int | None = None) -> dict:
    """Replace `model`'s weights by the post-hoc EMA of `std`; returns the reconstruction's record."""
    weights, record = reconstruct(run_dir, std, step)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise UserError(
            f"the post-hoc EMA snapshots of '{run_dir}' do not fit its model ({len(missing)} missing, "
            f"{len(unexpected)} unexpected parameter(s), e.g. {(missing or unexpected)[0]})"
        )
    return record


@dataclasses.dataclass
class PosthocArguments:
    run: str = help_field("A training run's output_dir, trained with --ema_phema_stds and --ema_snapshot_steps.")
    ema_std: float = help_field("The EMA length to reconstruct, as a relative width sigma_rel (EDM2: 0.05-0.15).")
    at_step: int | None = help_field("The step to reconstruct at. Default: the last snapshot's.", default=None)
    output_dir: str | None = help_field(
        "Where to save the model (as the run saves its EMA model: sample.py --model loads it). Default: "
        "<run>/phema-<std>.",
        default=None,
    )


@cli_entry
def main(argv=None):
    """Reconstruct a post-hoc EMA of a run and save it as a model folder."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):  # the run, given first without its flag
        argv = ["--run", *argv]
    (args,) = parse_args((PosthocArguments,), argv, description=__doc__)
    run = Path(args.run)
    model, _, record = load_model(run)
    posthoc = load_posthoc_weights(model, run, args.ema_std, args.at_step)
    out = Path(args.output_dir or run / f"phema-{args.ema_std:.4f}")
    if out.exists():
        raise UserError(f"--output_dir '{out}' already exists; remove it or choose another")
    with directory_atomically(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / OBJECTIVE_FILE).write_text(json.dumps({**record, "posthoc_ema": posthoc}, indent=2))
        for name in ("run_config.json",):
            if (run / name).is_file():
                shutil.copy(run / name, tmp / name)
    print(f"wrote the post-hoc EMA of std {args.ema_std} at step {posthoc['step']} to {out}")
    return out
