"""MeanFlow end to end, on one tiny class-conditional run with training-time guidance: it resumes bit for bit, its
grid and validation loss come through the objective, and sample.py's one- and two-step images, in a sweep too, are
the exported pipeline's."""

import json
import shutil

import pytest
from helpers import (
    TINY_MEANFLOW,
    assert_same,
    assert_same_as_sample_py,
    checkpoint_state,
    export_and_load,
    in_process,
    perturb_,
    read_metrics,
)
from safetensors.torch import load_file

from modules.artifacts.model_folder import load_model

pytestmark = pytest.mark.usefixtures("modules_cache")  # diffusers copies an export's code there

# A UNet with dropout and flips: with the times, the starts r and the label dropout, every random number a MeanFlow
# run draws, for the resume test.
UNET = ["--base_channels", 8, "--dropout", 0.1, "--random_flip", "--max_train_steps", 4, "--checkpointing_steps", 2]


@pytest.fixture(scope="module")
def meanflow_run(tmp_path_factory):
    """4 steps with checkpoints at 2 and 4, the grid and the validation loss at the end."""
    out = tmp_path_factory.mktemp("meanflow") / "run"
    in_process("train_cfm.py", "--output_dir", out, *UNET, *TINY_MEANFLOW)
    return out


@pytest.fixture(scope="module")
def perturbed_run(meanflow_run, tmp_path_factory):
    """The run's model with its weights perturbed: after 4 steps the interval embedding of t - r is still almost
    zero (as it starts), which would hide a sampler that does not pass r."""
    out = tmp_path_factory.mktemp("perturbed")
    for name in ("objective.json", "run_config.json"):  # how it samples; its data, for the sweep's reference
        shutil.copy(meanflow_run / name, out / name)
    perturb_(load_model(meanflow_run)[0]).save_pretrained(out, safe_serialization=True)
    return out


def test_the_run_trains_r_and_resumes_exactly(meanflow_run, tmp_path, capsys):
    """From the whole run's checkpoint-2, two more steps in a new run give its checkpoint-4, bit for bit; the
    interval embedding, zero at the start, has learnt."""
    out = tmp_path / "resumed"
    shutil.copytree(meanflow_run / "checkpoints" / "checkpoint-2", out / "checkpoints" / "checkpoint-2")
    resume = ["--num_sample_images", 0, "--validation_steps", 0, "--resume_from_checkpoint", "latest"]
    in_process("train_cfm.py", "--output_dir", out, *UNET, *TINY_MEANFLOW, *resume)
    assert "resumed from" in capsys.readouterr().out
    whole = checkpoint_state(meanflow_run / "checkpoints" / "checkpoint-4")
    assert_same(whole, checkpoint_state(out / "checkpoints" / "checkpoint-4"), "state")
    assert whole[0]["cond_embed.interval.mlp.2.weight"].abs().max() > 0


def test_the_grid_and_validation_come_through_the_objective(meanflow_run):
    record = json.loads((meanflow_run / "objective.json").read_text())
    assert record["objective"] == "meanflow" and record["args"]["sampler"] == "meanflow"
    assert json.loads((meanflow_run / "config.json").read_text())["interval_embedding"] is True
    assert (meanflow_run / "samples" / "step_0000004.png").is_file()
    (val,) = [r for r in read_metrics(meanflow_run) if "val_loss" in r]
    assert val["step"] == 4 and val["val_loss"] > 0
    saved = load_file(str(meanflow_run / "diffusion_pytorch_model.safetensors"))
    assert "cond_embed.interval.mlp.0.weight" in saved


def test_sample_py_and_the_exported_pipeline_make_the_same_few_step_images(perturbed_run, tmp_path):
    """One step as trained, and two steps with guidance on top (the conditional and null passes batched, r with
    them); the meanflow sampler's one step is not Euler's, so r reaches the network."""
    pipe = export_and_load(perturbed_run, tmp_path / "pipe")
    assert pipe.config.objective["objective"] == "meanflow"
    settings = dict(class_labels=[3, 0, 7], seed=1, max_batch_size=2)
    one = assert_same_as_sample_py(pipe, perturbed_run, tmp_path / "one", **settings)
    two = assert_same_as_sample_py(
        pipe, perturbed_run, tmp_path / "two", **settings, num_inference_steps=2, guidance_scale=2.0
    )
    euler = pipe(**settings, sampler="euler", output_type="pt").images
    assert one.std() > 0.01 and (one - two).abs().max() > 1e-3 and (one - euler).abs().max() > 1e-3


def test_nfe_sweep_takes_the_meanflow_sampler(perturbed_run, tmp_path, monkeypatch):
    """The sweep's rows and table for the meanflow sampler beside a flow sampler (the metrics are faked: they are
    tested on their own; here the sweep is)."""
    import sample

    def fake_metrics(images, *args, **kwargs):
        return {"fd_classifier": float(images.float().std())}

    monkeypatch.setattr(sample, "evaluate_generated", fake_metrics)
    prefix = tmp_path / "sweep"
    sample.main(
        [
            *("--model", str(perturbed_run), "--num_images", "2", "--output", str(prefix)),
            *("--nfe_sweep", "1,2", "--samplers", "meanflow,euler", "--eval_metrics", "classifier"),
        ]
    )
    rows = json.loads(prefix.with_suffix(".json").read_text())["rows"]
    assert [(r["sampler"], r["steps"], r["nfe"]) for r in rows] == [
        ("meanflow", 1, 1),
        ("meanflow", 2, 2),
        ("euler", 1, 1),
        ("euler", 2, 2),
    ]
    assert "| meanflow | 1 | 1 |" in prefix.with_suffix(".md").read_text()
