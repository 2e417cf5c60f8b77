"""Guidance: the guidance interval (CFG only for t in [LO, HI], one pass elsewhere) and autoguidance (a weaker model of
the same kind in place of the unconditional pass), on toy networks whose outputs are known, and the guide's loading
from a run or one of its checkpoints, with the refusals of guides that cannot guide."""

import json
import re
from types import SimpleNamespace

import pytest
import torch
from helpers import TINY_UNET, perturb_
from safetensors.torch import save_file

from modules.artifacts.model_folder import load_guide, save_model
from modules.config import DDPMArguments, FlowArguments, UserError
from modules.networks.unet import UNetModel
from modules.objectives.ddpm import DDPMObjective
from modules.objectives.flow import FlowObjective
from modules.objectives.samplers import euler_sample, guided_model, heun_sample, parse_guidance_interval
from modules.records import CHECKPOINT_EMA_FILE, CHECKPOINT_STATE_FILE


class Toy(torch.nn.Module):
    """out = scale * x + (label + 1) * t, with label num_classes (the null class) giving 0 * t: conditional and
    unconditional outputs differ by a known amount. Records the batch size of every call."""

    def __init__(self, scale=1.0, num_classes=3):
        super().__init__()
        self.scale, self.calls = scale, []
        self.config = SimpleNamespace(num_classes=num_classes)

    def forward(self, x, t, cond, r=None):
        self.calls.append(x.shape[0])
        weight = torch.zeros(x.shape[0]) if cond is None else (cond != self.config.num_classes) * (cond + 1.0)
        return self.scale * x + (weight * t).view(-1, 1, 1, 1)


def test_guided_model_applies_cfg_only_inside_the_interval_with_one_pass_outside():
    x, cond = torch.randn(4, 1, 2, 2), torch.tensor([0, 1, 2, 1])
    model = Toy()
    fn = guided_model(model, cond, guidance_scale=3.0, interval=(0.3, 0.6))
    inside, outside = torch.tensor(0.5), torch.tensor(0.8)
    unconditional = x
    conditional = x + ((cond + 1.0) * 0.5).view(-1, 1, 1, 1)
    torch.testing.assert_close(fn(x, inside), unconditional + 3.0 * (conditional - unconditional))
    assert model.calls == [8]  # the conditional and unconditional passes as one batch
    conditional_at_08 = x + ((cond + 1.0) * 0.8).view(-1, 1, 1, 1)
    torch.testing.assert_close(fn(x, outside), conditional_at_08)
    assert model.calls == [8, 4]  # one pass
    # Rows at different times (not what the samplers pass, but allowed): each row guided or not by its own t.
    t = torch.tensor([0.5, 0.8, 0.3, 0.61])
    out = fn(x, t)
    plain = x + ((cond + 1.0) * t).view(-1, 1, 1, 1)
    guided = x + 3.0 * ((cond + 1.0) * t).view(-1, 1, 1, 1)
    torch.testing.assert_close(out[[0, 2]], guided[[0, 2]])
    torch.testing.assert_close(out[[1, 3]], plain[[1, 3]])


def test_a_sampler_makes_two_passes_per_step_only_inside_the_interval():
    x, cond = torch.randn(2, 1, 2, 2), torch.tensor([0, 1])
    model = Toy()
    # Euler in 10 steps visits t = 1.0, 0.9, ..., 0.1: guidance at 0.5, 0.4, 0.3 (the interval [0.25, 0.55]).
    euler_sample(guided_model(model, cond, 2.0, interval=(0.25, 0.55)), x, 10)
    assert model.calls == [2] * 5 + [4] * 3 + [2] * 2
    model.calls.clear()
    heun_sample(guided_model(model, cond, 2.0, interval=(0.0, 1.0)), x, 3)  # the whole range: CFG at every pass
    assert model.calls == [4] * 5
    model.calls.clear()
    heun_sample(guided_model(model, cond, 2.0), x, 3)
    assert model.calls == [4] * 5  # no interval: as before


def test_autoguidance_mixes_the_two_conditional_outputs():
    x, cond = torch.randn(3, 1, 2, 2), torch.tensor([0, 2, 1])
    good, bad = Toy(scale=1.0), Toy(scale=0.5)
    fn = guided_model(good, cond, guidance_scale=2.5, guide=bad)
    t = torch.tensor(0.7)
    d_good, d_bad = good(x, t.expand(3), cond), bad(x, t.expand(3), cond)
    good.calls.clear(), bad.calls.clear()
    torch.testing.assert_close(fn(x, t), d_bad + 2.5 * (d_good - d_bad))
    assert good.calls == [3] and bad.calls == [3]  # both conditional, no null-class pass
    # An unconditional model is autoguided too (CFG has nothing to guide it with).
    fn = guided_model(good, None, guidance_scale=2.0, guide=bad)
    torch.testing.assert_close(fn(x, t), 2.0 * x - 0.5 * x)
    # Outside the interval the guide is not called.
    bad.calls.clear()
    fn = guided_model(good, cond, guidance_scale=2.0, interval=(0.0, 0.5), guide=bad)
    torch.testing.assert_close(fn(x, t), good(x, t.expand(3), cond))
    assert bad.calls == []


@pytest.mark.parametrize(
    "spec, expected",
    [(None, None), ("", None), ("0.2,0.8", (0.2, 0.8)), ("0,1", (0.0, 1.0)), ((0.1, 0.4), (0.1, 0.4))],
)
def test_interval_specs(spec, expected):
    assert parse_guidance_interval(spec) == expected


@pytest.mark.parametrize("spec", ["0.5", "0.8,0.2", "0.3,0.3", "-0.1,0.5", "0.2,1.5", "a,b", "0.1,0.2,0.3"])
def test_bad_interval_is_refused_in_one_line(spec):
    with pytest.raises(UserError, match=re.escape("--guidance_interval: expected")):
        FlowObjective(FlowArguments(guidance_interval=spec))


def test_the_objective_samples_with_its_interval_unless_told_otherwise():
    torch.manual_seed(0)
    model = perturb_(UNetModel(**{**TINY_UNET, "num_classes": 3})).eval()
    noise, cond = torch.randn(2, TINY_UNET["in_channels"], 16, 16), torch.tensor([0, 2])
    args = FlowArguments(sampler="heun", num_inference_steps=3, guidance_scale=3.0, guidance_interval="0.4,0.7")
    objective = FlowObjective(args)
    with torch.no_grad():
        trained = objective.sample(model, noise, cond)
        direct = heun_sample(guided_model(model, cond, 3.0, interval=(0.4, 0.7)), noise, 3)
        everywhere = objective.sample(model, noise, cond, guidance_interval="0,1")
        cfg = heun_sample(guided_model(model, cond, 3.0), noise, 3)
    assert torch.equal(trained, direct) and torch.equal(everywhere, cfg)
    assert not torch.allclose(trained, cfg)


# --- Loading a guide -------------------------------------------------------------------------------------------------


def saved_run(root, objective=None, **overrides):
    """A run's output_dir as training leaves it, with one checkpoint (checkpoint-2) whose EMA is other weights."""
    torch.manual_seed(0)
    model = perturb_(UNetModel(**{**TINY_UNET, "num_classes": 3, **overrides}))
    objective = objective or FlowObjective(FlowArguments())
    save_model(model, objective, root, {"class_names": ["a", "b", "c"]})
    checkpoint = root / "checkpoints" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    early = perturb_(UNetModel(**{**TINY_UNET, "num_classes": 3, **overrides}), seed=1)
    save_file(early.state_dict(), str(checkpoint / CHECKPOINT_EMA_FILE))
    state = {"step": 2, "model_config": json.loads(json.dumps(dict(early.config)))}
    (checkpoint / CHECKPOINT_STATE_FILE).write_text(json.dumps(state))
    return model, early


def assert_same_weights(a, b):
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_a_guide_loads_from_a_run_or_from_one_of_its_checkpoints(tmp_path):
    model, early = saved_run(tmp_path / "run")
    record = json.loads((tmp_path / "run" / "objective.json").read_text())
    guide = load_guide(str(tmp_path / "run" / "checkpoints" / "checkpoint-2"), model, record)
    assert type(guide) is UNetModel and not guide.training
    assert all(
        torch.equal(a, b) for a, b in zip(guide.state_dict().values(), early.state_dict().values(), strict=True)
    )
    other, _ = saved_run(tmp_path / "other")
    guide = load_guide(str(tmp_path / "other"), model, record)
    assert all(
        torch.equal(a, b) for a, b in zip(guide.state_dict().values(), other.state_dict().values(), strict=True)
    )
    # A smaller network of the same kind guides too.
    smaller, _ = saved_run(tmp_path / "smaller", base_channels=8)
    assert load_guide(str(tmp_path / "smaller"), model, record).config.base_channels == 8


@pytest.mark.parametrize(
    "overrides, objective, needle",
    [
        ({"sample_size": 8}, None, "sample_size: 8 vs 16"),
        ({"num_classes": 0}, None, "num_classes: 0 vs 3"),
        ({}, DDPMObjective(DDPMArguments()), "objective: 'ddpm' vs 'flow'"),
    ],
)
def test_a_guide_of_another_kind_resolution_or_conditioning_is_refused(tmp_path, overrides, objective, needle):
    model, _ = saved_run(tmp_path / "run")
    record = json.loads((tmp_path / "run" / "objective.json").read_text())
    saved_run(tmp_path / "guide", objective, **overrides)
    for guide in (tmp_path / "guide", tmp_path / "guide" / "checkpoints" / "checkpoint-2"):
        with pytest.raises(UserError, match=re.escape(needle)) as e:
            load_guide(str(guide), model, record)
        assert "cannot guide this model" in str(e.value) and "\n" not in str(e.value)
