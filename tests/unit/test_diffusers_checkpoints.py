"""Diffusers checkpoints as models of ours (networks/diffusers_models.py, artifacts/diffusers_folder.py), held
against diffusers' own pipelines on tiny folders laid out as the Hub's (tests/helpers.py): our samplers on the
wrapped network give DDPMPipeline's, DDIMPipeline's and DiTPipeline's images from the same noise, compared as floats
in [0, 1] before any uint8 rounding; bad checkpoints are refused naming the file and key."""

import json
import shutil

import pytest
import torch
from helpers import DDPM_HUB_SCHEDULER, DIT_HUB_SCHEDULER, tiny_ddpm_pipeline, write_scheduler

from modules.artifacts.export import export_pipeline
from modules.artifacts.model_folder import load_model, save_model
from modules.config import DataArguments, DDPMArguments, ModelArguments, TrainingArguments, UserError
from modules.data.latents import latent_decoder
from modules.objectives.ddpm import DDPMObjective, ddpm_arguments_from_scheduler
from modules.objectives.samplers import per_sample_randn, sample_generators
from modules.training.sizing import dry_run

TOLERANCE = 1e-5


def ours(folder, n: int, labels=None, **settings) -> torch.Tensor:
    """Images 0..n-1 of seed 0 as sample.py makes them (generate_images' noise and generators), in [0, 1]."""
    model, objective, record = load_model(folder)
    generators = sample_generators(0, 0, n)
    noise = per_sample_randn(
        generators, (model.config.in_channels, model.config.sample_size, model.config.sample_size)
    )
    cond = None if labels is None else torch.tensor(labels)
    with torch.no_grad():
        x0 = objective.sample(model, noise, cond, generators=generators, **settings)
        images = latent_decoder(record["latent"])(x0) if "latent" in record else x0
    return (images / 2 + 0.5).clamp(0, 1)


def assert_close(a: torch.Tensor, b: torch.Tensor):
    assert a.shape == b.shape and (a - b).abs().max() <= TOLERANCE, (a - b).abs().max()
    assert b.std() > 0.05  # images, not a constant


DDPM_SCHEDULERS = {
    "epsilon, clipped (google/ddpm-*)": DDPM_HUB_SCHEDULER,
    "v-prediction, cosine": {
        "_class_name": "DDPMScheduler",
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "v_prediction",
        "clip_sample": False,
    },
}


@pytest.mark.parametrize("scheduler", DDPM_SCHEDULERS.values(), ids=DDPM_SCHEDULERS.keys())
def test_a_ddpm_pipeline_samples_as_ddpm_and_ddim_pipelines(scheduler, tmp_path):
    """Ancestral sampling: the initial noise and every step's noise come from the same per-image generators on both
    sides (DDPMScheduler.step draws from a list of generators one image at a time, as per_sample_randn does), so the
    stochastic path is compared, not only a deterministic one. DDIM (eta 0) against DDIMPipeline on the same UNet."""
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline

    folder = tiny_ddpm_pipeline(tmp_path / "ddpm", scheduler=scheduler)
    pipe = DDPMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(batch_size=3, generator=sample_generators(0, 0, 3), num_inference_steps=8, output_type="pt").images
    assert_close(ours(folder, 3, num_inference_steps=8), theirs)
    assert load_model(folder)[1].args.sampler == "ddpm"  # as DDPMPipeline samples

    ddim = DDIMPipeline(unet=pipe.unet, scheduler=DDIMScheduler.from_config(pipe.scheduler.config))
    ddim.set_progress_bar_config(disable=True)
    theirs = ddim(batch_size=3, generator=sample_generators(0, 0, 3), num_inference_steps=8, eta=0.0, output_type="pt")
    assert_close(ours(folder, 3, sampler="ddim", num_inference_steps=8), theirs.images)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_a_dit_pipeline_samples_as_dit_pipeline_and_decodes_through_its_vae(dit_pipeline, guidance_scale):
    """DDIM (eta 0, DiTPipeline's scheduler here) from the same initial noise; labels with classifier-free guidance
    against the null class 1000; the learned-sigma half dropped; latents decoded with 1 / scaling_factor."""
    from diffusers import DiTPipeline

    pipe = DiTPipeline.from_pretrained(dit_pipeline)
    pipe.set_progress_bar_config(disable=True)
    labels = [3, 7, 999]
    settings = dict(num_inference_steps=6, guidance_scale=guidance_scale)
    theirs = pipe(labels, generator=sample_generators(0, 0, 3), output_type="pt", **settings).images
    images = ours(dit_pipeline, 3, labels, **settings)
    assert_close(images, theirs)
    assert not torch.allclose(images, ours(dit_pipeline, 3, [4, 8, 0], **settings))  # the labels matter


def test_dit_ancestral_sampling_matches_dit_pipeline_with_its_global_noise(dit_pipeline, tmp_path):
    """With a DDPMScheduler, DiTPipeline draws each step's noise from the global RNG (it passes no generator to
    step): one image without guidance draws the same numbers as our generator seeded alike, so the ancestral path
    is compared too. (With guidance the pipeline also draws noise for the unconditional half.)"""
    from diffusers import DiTPipeline

    folder = tmp_path / "dit-ddpm"
    shutil.copytree(dit_pipeline, folder)
    write_scheduler(folder, {**DIT_HUB_SCHEDULER, "_class_name": "DDPMScheduler"})
    model, objective, record = load_model(folder)
    generator = torch.Generator().manual_seed(123)
    noise = per_sample_randn([generator], (4, 8, 8))
    with torch.no_grad():
        settings = dict(num_inference_steps=5, guidance_scale=1.0)
        x0 = objective.sample(model, noise, torch.tensor([5]), generators=[generator], **settings)
        images = (latent_decoder(record["latent"])(x0) / 2 + 0.5).clamp(0, 1)
    pipe = DiTPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(123)
    theirs = pipe([5], num_inference_steps=5, guidance_scale=1.0, output_type="pt").images
    assert objective.args.sampler == "ddpm" and (images - theirs).abs().max() <= TOLERANCE


def test_the_wrapper_feeds_integer_steps_the_null_class_and_keeps_the_first_half(dit_pipeline):
    model, objective, record = load_model(dit_pipeline)
    steps = torch.arange(1000)
    assert torch.equal((((steps.float() / 1000) * 1000).round()).long(), steps)  # t = step / T round-trips
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.25, 0.999])
    with torch.no_grad():
        full = model.net(x, timestep=torch.tensor([250, 999]), class_labels=torch.tensor([1000, 1000])).sample
        assert full.shape == (2, 8, 8, 8) and torch.equal(model(x, t, None), full[:, :4])
    model.train()  # diffusers' own label dropout (global RNG) is off: ours is the only one
    x, t, labels = x.repeat(32, 1, 1, 1), t.repeat(32), torch.arange(64)  # 64 labels: some would drop
    with torch.no_grad():
        assert torch.equal(model(x, t, labels), model(x, t, labels))
    assert model.config.num_classes == 1000 and record["class_names"][1] == "name1, synonym1"
    assert objective.args.guidance_scale == 4.0 and objective.args.sampler == "ddim"
    assert record["latent"]["channel_std"] == [1 / 0.18215] * 4 and record["latent"]["image_resolution"] == 16


def test_a_saved_wrapped_model_is_a_diffusers_model_folder_that_loads_again(ddpm_pipeline, tmp_path):
    from diffusers import UNet2DModel

    model, objective, _ = load_model(ddpm_pipeline)
    save_model(model, objective, tmp_path / "saved", extra={"steps": 0})
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["_class_name"] == "UNet2DModel"
    assert json.loads((tmp_path / "saved" / "objective.json").read_text())["network"]["kind"] == "diffusers_unet2d"
    again, objective_again, _ = load_model(tmp_path / "saved")
    plain = UNet2DModel.from_pretrained(tmp_path / "saved")  # diffusers reads it as it is
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 0.1])
    with torch.no_grad():
        assert torch.equal(again(x, t), model(x, t)) and torch.equal(
            plain(x, torch.tensor([500, 100])).sample, model(x, t)
        )
    assert objective_again.args == objective.args


def test_the_scheduler_configs_of_the_hub_checkpoints_map_onto_ddpm_settings():
    ddpm = ddpm_arguments_from_scheduler(DDPM_HUB_SCHEDULER, "ddpm")
    assert (ddpm.beta_schedule, ddpm.beta_start, ddpm.beta_end, ddpm.num_train_timesteps) == (
        "linear",
        1e-4,
        0.02,
        1000,
    )
    assert ddpm.clip_sample and ddpm.prediction_type == "epsilon"
    assert (ddpm.sampler, ddpm.num_inference_steps) == ("ddpm", 1000)  # DDPMPipeline's defaults
    dit = ddpm_arguments_from_scheduler(DIT_HUB_SCHEDULER, "dit")
    assert not dit.clip_sample and (dit.sampler, dit.num_inference_steps) == ("ddim", 50)  # DiTPipeline's
    cosine = ddpm_arguments_from_scheduler({"_class_name": "DDIMScheduler", "beta_schedule": "squaredcos_cap_v2"}, "x")
    assert cosine.beta_schedule == "cosine" and cosine.clip_sample  # DDIMScheduler's own default


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"thresholding": True}, "thresholding True is not supported"),
        ({"trained_betas": [0.1, 0.2]}, "trained_betas [0.1, 0.2] is not supported"),
        ({"variance_type": "learned_range"}, "variance_type 'learned_range' is not supported"),
        ({"timestep_spacing": "trailing"}, "timestep_spacing 'trailing' is not supported"),
        ({"_class_name": "EulerDiscreteScheduler"}, "_class_name 'EulerDiscreteScheduler' is not supported"),
    ],
)
def test_an_unsupported_scheduler_setting_is_named(ddpm_pipeline, tmp_path, change, needle):
    folder = tmp_path / "pipe"
    shutil.copytree(ddpm_pipeline, folder)
    write_scheduler(folder, {**DDPM_HUB_SCHEDULER, **change})
    with pytest.raises(UserError) as e:
        load_model(folder)
    assert str(e.value).startswith(str(folder / "scheduler" / "scheduler_config.json")) and needle in str(e.value)


def test_checkpoints_that_are_neither_ours_nor_supported_are_named(ddpm_pipeline, tmp_path):
    def fails(folder, *needles):
        with pytest.raises(UserError) as e:
            load_model(folder)
        assert all(n in str(e.value) for n in needles), str(e.value)

    sd = tmp_path / "sd"
    (sd / "unet").mkdir(parents=True)
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["x", "y"]}))
    (sd / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    fails(sd, str(sd / "unet" / "config.json"), "'UNet2DConditionModel' is not a supported diffusers model")
    fails(sd / "unet", str(sd / "unet" / "config.json"), "neither a model of ours", "'UNet2DConditionModel'")

    bare = tmp_path / "bare"
    shutil.copytree(ddpm_pipeline / "unet", bare)
    fails(bare, str(bare / "config.json"), "nothing that says how it samples", "scheduler_config.json")
    shutil.copy(ddpm_pipeline / "scheduler" / "scheduler_config.json", bare)
    assert load_model(bare)[1].args.clip_sample  # a scheduler config next to it is enough
    assert load_model(ddpm_pipeline / "unet")[2]["diffusers_checkpoint"] == str(ddpm_pipeline.resolve())

    (bare / "diffusion_pytorch_model.safetensors").rename(bare / "diffusion_pytorch_model.bin")
    fails(bare, "no diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin, which are pickled")

    with pytest.raises(UserError, match="is a diffusers UNet2DModel, which diffusers loads as it is"):
        export_pipeline(ddpm_pipeline, tmp_path / "export")
    assert not (tmp_path / "export").exists()

    conditional = tmp_path / "conditional"
    shutil.copytree(ddpm_pipeline, conditional)
    config = json.loads((conditional / "unet" / "config.json").read_text())
    (conditional / "unet" / "config.json").write_text(json.dumps({**config, "num_class_embeds": 10}))
    fails(conditional, str(conditional / "unet" / "config.json"), "num_class_embeds 10")


def test_a_dry_run_sizes_the_diffusers_network_of_a_local_init_from(ddpm_pipeline, capsys):
    model, _, _ = load_model(ddpm_pipeline)
    data = DataArguments(max_train_samples=8, validation_split="none")
    result = dry_run(
        data, ModelArguments(init_from=str(ddpm_pipeline)), TrainingArguments(), DDPMObjective(DDPMArguments())
    )
    assert result["class"] == "DiffusersDenoiser" and result["input"] == [3, 16, 16]
    assert result["parameters"] == sum(p.numel() for p in model.parameters())
