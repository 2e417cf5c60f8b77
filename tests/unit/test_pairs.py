"""Reflow pairs in training, without a teacher: the pairs open in order with their last ones held out, bad pairs
datasets are named, and the flow objective trains and validates at each pair's own noise (which the others
refuse)."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import write_pairs_dataset

from modules.config import DDPMArguments, FlowArguments, UserError, VAEArguments
from modules.data.conditions import ConditionSource
from modules.data.pairs import load_pairs_data
from modules.objectives.autoencoder import VAEObjective
from modules.objectives.ddpm import DDPMObjective
from modules.objectives.denoising import validation_loss
from modules.objectives.flow import FlowObjective


class Linear(torch.nn.Module):
    """(x, t, cond) -> a * x + b * t: enough for a loss to depend on the noise and the times."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Parameter(torch.tensor(0.3)), torch.nn.Parameter(torch.tensor(-0.2))

    def forward(self, x, t, cond=None):
        return self.a * x + self.b * t.view(-1, *[1] * (x.ndim - 1))


def test_pairs_open_in_order_with_their_last_ones_held_out(tmp_path):
    path = write_pairs_dataset(tmp_path / "pairs", n=20)
    train, held_out = load_pairs_data(str(path), validation_samples=5)
    assert (len(train.dataset), len(held_out.dataset)) == (18, 2)  # at most a tenth is held out
    assert (train.num_channels, train.resolution, train.num_classes, train.num_frames) == (1, 4, 2, 0)
    everything, _ = load_pairs_data(str(path))
    rows = everything.dataset.__getitems__(list(range(20)))
    assert set(rows) == {"x0", "noise", "labels"} and rows["x0"].dtype == torch.float32
    # Oracle: the shards themselves, in order.
    shards = [pq.read_table(p).to_pydict() for p in sorted(path.glob("data/*.parquet"))]
    assert torch.equal(
        rows["noise"], torch.tensor(np.array([r for s in shards for r in s["noise"]]), dtype=torch.float32)
    )
    assert torch.equal(rows["labels"], torch.arange(20) % 2)
    for key in ("x0", "noise", "labels"):
        assert torch.equal(train.dataset.__getitems__(list(range(18)))[key], rows[key][:18]), key
        assert torch.equal(held_out.dataset.__getitems__([0, 1])[key], rows[key][18:]), key
    first, _ = load_pairs_data(str(path), max_samples=4, validation_samples=5)
    assert torch.equal(first.dataset.__getitems__([0, 1, 2, 3])["x0"], rows["x0"][:4])
    assert train.key != held_out.key != first.key


def test_bad_pairs_datasets_are_named(tmp_path):
    path = write_pairs_dataset(tmp_path / "pairs")
    shard = path / "data" / "train-00001-of-00002.parquet"
    table = pq.read_table(shard)
    pq.write_table(table.rename_columns(["noises", "sample", "label"]), shard)
    with pytest.raises(UserError, match=rf"{shard}: no column 'noise' \(columns: noises, sample, label\)"):
        load_pairs_data(str(path))
    pq.write_table(table.drop_columns(["label"]), shard)
    with pytest.raises(UserError, match=rf"{shard}: no column 'label'"):  # a class-conditional teacher's pairs
        load_pairs_data(str(path))
    pq.write_table(table, shard)
    meta = json.loads((path / "pairs.json").read_text())
    (path / "pairs.json").write_text(json.dumps({**meta, "shape": [1, 8, 8]}))
    with pytest.raises(UserError, match=r"column 'noise' holds arrays of shape \(1, 4, 4\), but .* says \(1, 8, 8\)"):
        load_pairs_data(str(path))
    del meta["conditioning"]
    (path / "pairs.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="pairs.json: missing keys conditioning"):
        load_pairs_data(str(path))
    (path / "pairs.json").unlink()
    with pytest.raises(UserError, match=r"is not a complete pairs dataset \(no pairs.json\).*--output_pairs"):
        load_pairs_data(str(path))


def test_the_flow_loss_takes_the_paired_noise_and_draws_the_times():
    objective, model = FlowObjective(FlowArguments()), Linear()
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 1, 4, 4, generator=g), torch.randn(4, 1, 4, 4, generator=g)
    paired = objective.loss(model, x0, None, torch.Generator().manual_seed(3), noise=noise)
    _, t = objective.draw(x0, torch.Generator().manual_seed(3))  # the times a step draws, paired or not
    torch.testing.assert_close(paired, objective.loss_at(model, x0, None, noise, t), rtol=0, atol=0)
    drawn = objective.loss(model, x0, None, torch.Generator().manual_seed(3))
    assert not torch.allclose(paired, drawn)


def test_held_out_pairs_validate_at_their_own_noise(tmp_path):
    _, held_out = load_pairs_data(str(write_pairs_dataset(tmp_path / "pairs", n=20)), validation_samples=2)
    x0, labels, noise = ConditionSource(held_out, 2).held_out(held_out)
    rows = held_out.dataset.__getitems__([0, 1])
    assert torch.equal(x0, rows["x0"]) and torch.equal(noise, rows["noise"]) and torch.equal(labels, rows["labels"])
    objective, model = FlowObjective(FlowArguments()), Linear()
    values = objective.validation(model, x0, labels, 0, 2, noise=noise)
    # Oracle: the loss at each bin's centre t with the pairs' noise, averaged over the pairs and the bins; without
    # pairs, with noise drawn for each bin from (seed, bin).
    drawn = [torch.randn(x0.shape, generator=torch.Generator().manual_seed(j)) for j in (0, 1)]
    with torch.no_grad():
        at = [objective.loss_at(model, x0, labels, noise, torch.full((2,), t)).mean() for t in (0.25, 0.75)]
        fresh = [
            objective.loss_at(model, x0, labels, e, torch.full((2,), t)).mean()
            for e, t in zip(drawn, (0.25, 0.75), strict=True)
        ]
    assert values["val_loss_t0.25"] == pytest.approx(float(at[0]), rel=1e-6)
    assert values["val_loss"] == pytest.approx(float(sum(at) / 2), rel=1e-6)
    in_ones = validation_loss(model, objective, x0, labels, 0, 2, batch_size=1, noise=noise)  # a batch per pair
    assert in_ones["val_loss_bins"] == pytest.approx([float(v) for v in at], rel=1e-6)
    unpaired = validation_loss(model, objective, x0, labels, 0, 2, batch_size=1)
    assert unpaired["val_loss_bins"] == pytest.approx([float(v) for v in fresh], rel=1e-6)


def test_only_a_flow_objective_without_ot_coupling_trains_on_pairs():
    assert FlowObjective(FlowArguments()).refuses_pairs() is None
    assert "--ot_coupling" in FlowObjective(FlowArguments(ot_coupling=True)).refuses_pairs()
    assert "a ddpm model does not train on" in DDPMObjective(DDPMArguments()).refuses_pairs()
    assert "a VAE" in VAEObjective(VAEArguments()).refuses_pairs()


def test_held_out_pairs_are_not_validated_with_validation_steps_0():
    """Pairs always hold some out; --validation_steps 0 (never) must then skip validation, at any step."""
    from types import SimpleNamespace

    from modules.training.boundary import validate_if_due

    def run_with(every):
        calls = []
        ema = SimpleNamespace(gather=lambda: calls.append("gathered"))
        run = SimpleNamespace(
            data=SimpleNamespace(held_out=object()), train_args=SimpleNamespace(validation_steps=every)
        )
        run.ema, run.last_step = ema, lambda done: done == 10
        return run, calls

    for done in (3, 10):
        run, calls = run_with(0)
        validate_if_due(run, done)
        assert calls == []
    run, calls = run_with(5)
    try:
        validate_if_due(run, 10)  # due: it goes on to validate (and fails on the bare stand-in after gathering)
    except AttributeError:
        pass
    assert calls == ["gathered"]
