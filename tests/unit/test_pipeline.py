"""The pipeline class of an export (modules/artifacts/pipeline.py), built in-process on an unconditional tiny DiT:
how many images a call gives and which arguments it refuses. tests/scripts/test_export.py calls exported ones."""

import re

import pytest
import torch

from modules.artifacts.pipeline import DenoiserPipeline
from modules.networks.dit import DiTModel


@pytest.fixture(scope="module")
def unconditional():
    torch.manual_seed(0)
    model = DiTModel(in_channels=1, sample_size=8, patch_size=2, hidden_size=16, depth=1, num_heads=2)
    objective = {"objective": "flow", "args": {"sampler": "euler_maruyama", "num_inference_steps": 2}}
    pipe = DenoiserPipeline(transformer=model, objective=objective)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_an_unconditional_model_makes_batch_size_images(unconditional):
    assert unconditional(output_type="pt", seed=0).images.shape == (1, 1, 8, 8)
    images = unconditional(batch_size=3, output_type="np", seed=0).images
    assert images.shape == (3, 8, 8, 1) and images.std() > 0
    again = unconditional(
        batch_size=3, output_type="np", generator=[torch.Generator().manual_seed(i) for i in range(3)]
    )
    assert again.images.shape == (3, 8, 8, 1)


@pytest.mark.parametrize(
    "bad, needle",
    [
        (dict(class_labels=[0]), "class_labels given, but the model is not class-conditional (it is unconditional)"),
        (dict(prompt="a bag"), "prompt given, but the model is not text-conditional (it is unconditional)"),
        (dict(num_images_per_prompt=2), "num_images_per_prompt is for text-conditional models"),
        (dict(batch_size=2, generator=[torch.Generator()] * 3), "a list of 3, for 2 images"),
        (dict(generator=0), "generator must be a torch.Generator or a list of them, got int"),
        (dict(seed=1.5), "seed must be an int, got 1.5"),
        (dict(num_inference_steps=0), "num_inference_steps must be a positive int"),
        (dict(guidance_scale=-1.0), "guidance_scale must be >= 0"),
    ],
)
def test_arguments_that_do_not_fit_the_model_are_refused(unconditional, bad, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        unconditional(**bad)
