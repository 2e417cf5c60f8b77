"""Post-hoc EMA (modules/artifacts/phema.py): its oracles. A stored profile reconstructs as itself; an EMA of another
length, power-function or fixed-decay, reconstructed from the snapshots of a known parameter sequence, matches the
same EMA computed directly; the training EMA's power profile is the one the reconstruction assumes."""

import re

import numpy as np
import pytest
import torch

from modules.artifacts.phema import (
    MAX_STD,
    coefficients_for_std,
    coefficients_for_weights,
    combine,
    exponent_to_std,
    parse_stds,
    power_decay,
    profile_correlation,
    profile_density,
    std_to_exponent,
)
from modules.config import UserError
from modules.training.ema import EMA

STEPS, EVERY, STORED = 2000, 100, (0.05, 0.10)


def parameters(steps: int) -> np.ndarray:
    """A known parameter sequence theta(t), t = 1..steps: drifting, oscillating and decaying coordinates."""
    t = np.arange(1, steps + 1, dtype=np.float64)
    return np.stack([np.sin(t / 150) + t / 1000, np.cos(t / 400), np.exp(-t / 500)], axis=1)


def power_ema(theta: np.ndarray, std: float, every: int) -> dict[int, np.ndarray]:
    """The power-function EMA of `std` tracked step by step as training does, at every `every` steps."""
    exponent, average, kept = float(std_to_exponent(std)), np.zeros(theta.shape[1]), {}
    for step in range(1, len(theta) + 1):
        beta = power_decay(step, exponent)
        average = beta * average + (1 - beta) * theta[step - 1]
        if step % every == 0:
            kept[step] = average
    return kept


@pytest.fixture(scope="module")
def snapshots():
    """(steps, stds, values) of the snapshots of both stored profiles, every EVERY steps."""
    theta = parameters(STEPS)
    tracked = {std: power_ema(theta, std, EVERY) for std in STORED}
    keys = [(step, std) for step in range(EVERY, STEPS + 1, EVERY) for std in STORED]
    values = np.stack([tracked[std][step] for step, std in keys])
    return [k[0] for k in keys], [k[1] for k in keys], values


def test_std_and_exponent_are_inverse():
    exponents = np.array([0.5, 2.0, 6.94, 16.97, 100.0])
    np.testing.assert_allclose(std_to_exponent(exponent_to_std(exponents)), exponents, rtol=1e-9)
    # EDM2's two stored profiles: sigma_rel 0.05 and 0.10 are exponents of about 16.97 and 6.94.
    np.testing.assert_allclose(std_to_exponent([0.05, 0.10]), [16.97, 6.94], atol=0.01)


def test_profile_correlation_is_the_integral_of_the_two_densities():
    taus = np.linspace(0, 700, 700_001)[1:]
    for (ta, sa), (tb, sb) in [((300, 0.05), (700, 0.1)), ((700, 0.1), (300, 0.05)), ((500, 0.2), (500, 0.03))]:
        numeric = np.trapezoid(profile_density(ta, sa, taus) * profile_density(tb, sb, taus), taus)
        assert profile_correlation(ta, sa, tb, sb) == pytest.approx(numeric, rel=1e-3)


def test_a_stored_profile_reconstructs_as_itself(snapshots):
    steps, stds, values = snapshots
    for i in (0, 7, len(steps) - 1):
        coefficients = coefficients_for_std(steps, stds, steps[i], stds[i])
        np.testing.assert_allclose(coefficients, np.eye(len(steps))[i], atol=1e-9)
        np.testing.assert_allclose(coefficients @ values, values[i], atol=1e-9)


@pytest.mark.parametrize("std", [0.03, 0.08, 0.15])
def test_a_power_ema_of_another_length_matches_the_direct_computation(snapshots, std):
    steps, stds, values = snapshots
    direct = power_ema(parameters(STEPS), std, STEPS)[STEPS]
    reconstructed = coefficients_for_std(steps, stds, STEPS, std) @ values
    np.testing.assert_allclose(reconstructed, direct, atol=2e-3)
    # Halfway through the run, from the snapshots up to then.
    half = [i for i, s in enumerate(steps) if s <= STEPS // 2]
    coefficients = coefficients_for_std([steps[i] for i in half], [stds[i] for i in half], STEPS // 2, std)
    direct = power_ema(parameters(STEPS // 2), std, STEPS // 2)[STEPS // 2]
    np.testing.assert_allclose(coefficients @ values[half], direct, atol=2e-3)


@pytest.mark.parametrize("beta", [0.99, 0.995])
def test_a_fixed_decay_ema_matches_the_direct_computation(snapshots, beta):
    steps, stds, values = snapshots
    theta = parameters(STEPS)
    weights = (1 - beta) * beta ** np.arange(STEPS - 1, -1, -1.0)
    weights[0] += beta**STEPS  # started from theta(1): the rest of the weight stays on it
    direct = weights @ theta
    reconstructed = coefficients_for_weights(steps, stds, weights) @ values
    np.testing.assert_allclose(reconstructed, direct, atol=1e-3)
    # and it is not the last weights, nor a stored profile: the reconstruction had work to do
    assert np.abs(direct - theta[-1]).max() > 0.01 and np.abs(direct - values[-1]).max() > 0.01


def test_the_training_ema_follows_the_power_profile():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, std=0.1)
    exponent = float(std_to_exponent(0.1))
    manual = [p.detach().clone() for p in model.parameters()]
    for step in range(1, 30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        beta = power_decay(step, exponent)
        manual = [beta * m + (1 - beta) * p.detach() for m, p in zip(manual, model.parameters(), strict=True)]
    for m, e in zip(manual, ema.model.parameters(), strict=True):
        torch.testing.assert_close(e, m)
    assert power_decay(1, exponent) == 0.0  # the first update copies the model


def test_combine_sums_snapshot_files(tmp_path):
    from safetensors.torch import save_file

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.safetensors")
        save_file({"w": torch.full((2,), float(i + 1)), "b": torch.tensor([i], dtype=torch.float16)}, str(paths[-1]))
    total = combine(paths, [0.5, -1.0, 2.0])
    torch.testing.assert_close(total["w"], torch.full((2,), 0.5 - 2.0 + 6.0))
    assert total["b"].dtype == torch.float16 and float(total["b"]) == -1.0 + 4.0


@pytest.mark.parametrize("spec", ["0.05,x", "", "0.05,0.3", "0,0.1", "-0.1"])
def test_stds_post_hoc_reconstruction_cannot_use_are_refused(spec):
    with pytest.raises(UserError, match=re.escape("--ema_phema_stds")) as e:
        parse_stds(spec, "--ema_phema_stds")
    assert "\n" not in str(e.value)
    assert MAX_STD == pytest.approx(0.2887, abs=1e-4)
