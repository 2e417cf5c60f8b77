"""sample.py --export_pipeline: the folder loads with diffusers' DiffusionPipeline (trust_remote_code) and generates
sample.py's images, to the float, for each kind of model, and a model of clips sample.py's clips as `.frames`; it is
called as diffusers' pipelines are; save_pretrained writes it again; it loads where this repository cannot be
imported, from a folder or by its Hub id."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    TINY,
    TINY_CLIPS,
    TINY_OWN,
    assert_same_as_sample_py,
    export_and_load,
    hub_env,
    in_process,
    keeping_floats,
    load,
    perturb_,
    sample_py,
    sample_py_flags,
    train_text_model,
)
from hub_server import FakeHub

import sample
import train_ddpm
from modules.artifacts.model_folder import load_model, save_model
from modules.config import FlowArguments, parse_args
from modules.objectives.flow import FlowObjective

REPO = "someone/latent-pipeline"


pytestmark = pytest.mark.usefixtures("modules_cache")  # diffusers copies an export's code there


def sample_py_clips(run, **settings) -> tuple[torch.Tensor, torch.Tensor]:
    """sample.py's clips for the pipeline's `settings`, as its Sampling generates them (whatever files it writes):
    the floats in [-1, 1] it quantises, and the uint8 clips (N, F, C, H, W)."""
    (args,) = parse_args((sample.SampleArguments,), ["--model", str(run), *sample_py_flags(settings)])
    with keeping_floats() as kept:
        sampling = sample.load_sampling(args, Path(args.model))
        clips = sampling.generate(args, sampler=args.sampler, num_inference_steps=args.num_inference_steps)
    return torch.cat(kept), clips


def assert_round_trip(pipe, folder, **settings):
    """save_pretrained writes a folder that loads again, with its code, and generates the same images."""
    pipe.save_pretrained(folder)
    again = load(folder)
    assert type(again).__name__ == type(pipe).__name__ and again.config.objective == pipe.config.objective
    assert torch.equal(again(**settings, output_type="pt").images, pipe(**settings, output_type="pt").images)
    return again


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    """A class-conditional adaLN-single DiT on the latents of a tiny KL-VAE of ours, weights random but not zero, as
    training would save it; the SDE sampler draws noise from the per-image generators on the way."""
    from modules.networks.dit import DiTModel
    from modules.networks.vae import KLVAE, VAE

    root = tmp_path_factory.mktemp("latent")
    torch.manual_seed(0)
    vae = KLVAE(in_channels=1, latent_channels=2, block_out_channels=(8, 8), norm_num_groups=4, sample_size=16)
    vae.save_pretrained(root / "vae")
    model = DiTModel(
        in_channels=2, sample_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=3, adaln="single"
    )
    for p in model.parameters():  # DiT starts with a zero output, which would hide wrong weights
        torch.nn.init.normal_(p, std=0.1)
    latent = {
        "vae": VAE(vae, str(root / "vae")).config_record(),
        "channel_mean": [0.1, -0.2],
        "channel_std": [1.5, 0.5],
    }
    objective = FlowObjective(FlowArguments(sampler="euler_maruyama", num_inference_steps=2, guidance_scale=2.0))
    save_model(model, objective, root / "run", {"latent": latent, "class_names": ["a", "b", "c"]})
    return root / "run"


@pytest.fixture(scope="module")
def own_text_run(captioned, tmp_path_factory):
    run = tmp_path_factory.mktemp("own_text") / "run"
    train_text_model(captioned, run, TINY_OWN, "cross_attn")
    return run


@pytest.fixture(scope="module")
def clip_runs(tmp_path_factory):
    """Two models of clips as training saves them (two steps, then weights perturbed: the video DiT starts with a zero
    output, which would hide wrong weights): a class-conditional video DiT, and a UNet of the shared-noise frame
    trainer whose SDE sampler draws noise on the way."""
    root = tmp_path_factory.mktemp("clips")
    shared_noise = ["--shared_noise", "--reg_weight", 0.1, "--sampler", "euler_maruyama"]
    settings = {
        "video": ["--model", "video_dit_tiny", "--patch_size", 4],
        "shared_noise": ["--model", "unet_s", "--base_channels", 8, *shared_noise],
    }
    runs = {}
    for kind, flags in settings.items():
        runs[kind] = root / kind
        in_process("train_cfm.py", "--output_dir", runs[kind], *TINY_CLIPS, *flags)
        perturb_(load_model(runs[kind])[0]).save_pretrained(runs[kind], safe_serialization=True)
    return runs


@pytest.fixture(scope="module")
def cfm_pipe(tiny_cfm_run, tmp_path_factory):
    return export_and_load(tiny_cfm_run, tmp_path_factory.mktemp("cfm_pipe") / "pipe")


def test_class_conditional_flow_unet(cfm_pipe, tiny_cfm_run, tmp_path):
    pipe = cfm_pipe
    assert type(pipe).__name__ == "DenoiserPipeline" and type(pipe.unet).__name__ == "UNetModel"
    assert pipe.config.id2label["0"] == "T-shirt/top" and pipe.get_label_ids(["bag", "T-shirt/top"]) == [8, 0]
    assert_same_as_sample_py(
        pipe,
        tiny_cfm_run,
        tmp_path,
        class_labels=[3, 0, 7, 3],
        seed=1,
        sampler="heun",
        num_inference_steps=2,
        guidance_scale=2.0,
        max_batch_size=3,
    )


def test_guidance_interval_and_autoguidance_as_sample_py(cfm_pipe, tiny_cfm_run, tmp_path):
    """An export with a guide (the run's checkpoint at step 3) guides as sample.py --guide_model does, and with
    guidance only for t in [0.3, 0.8] as sample.py --guidance_interval; each setting changes the images."""
    guide = tiny_cfm_run / "checkpoints" / "checkpoint-3"
    folder = tmp_path / "guided_pipe"
    sample.main(["--model", str(tiny_cfm_run), "--export_pipeline", str(folder), "--guide_model", str(guide)])
    pipe = load(folder)
    assert type(pipe.guide).__name__ == "UNetModel" and (folder / "guide" / "config.json").is_file()
    settings = dict(class_labels=[3, 0, 7], seed=1, sampler="heun", num_inference_steps=3, guidance_scale=2.0)
    interval = dict(settings, guidance_interval="0.3,0.8")
    floats, _ = sample_py(tiny_cfm_run, tmp_path / "auto", **interval, guide_model=guide)
    images = pipe(**interval, output_type="pt").images
    assert (images - (floats / 2 + 0.5).clamp(0, 1)).abs().max() < 1e-5
    cfg = assert_same_as_sample_py(cfm_pipe, tiny_cfm_run, tmp_path, **interval)  # CFG in the interval
    assert (cfg - images).abs().max() > 1e-3
    full = cfm_pipe(**settings, output_type="pt").images
    assert (cfg - full).abs().max() > 1e-3


def test_diffusers_call_conventions(cfm_pipe, capsys):
    """batch_size counts images (cycling over the classes), class_labels gives one image per label, generator takes
    one torch.Generator or one per image, output_type and return_dict and the progress bar are diffusers'."""
    from modules.objectives.samplers import sample_generators

    def images(**settings):
        return cfm_pipe(num_inference_steps=1, output_type="pt", **settings).images

    by_count = images(batch_size=4, seed=3)
    assert by_count.shape == (4, 1, 32, 32) and torch.equal(by_count, images(class_labels=[0, 1, 2, 3], seed=3))
    assert len(images(class_labels=[5, 5, 1], seed=0)) == 3 and len(images(class_labels=4, seed=0)) == 1
    assert len(images(seed=0)) == 10  # one image per class
    once = images(class_labels=[3, 4], generator=torch.Generator().manual_seed(0))
    assert torch.equal(once, images(class_labels=[3, 4], generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(once, images(class_labels=[3, 4], generator=torch.Generator().manual_seed(1)))
    with torch.random.fork_rng():  # no generator, no seed: torch's global generator, as in diffusers
        torch.manual_seed(7)
        unseeded = images(class_labels=[3, 4])
        torch.manual_seed(7)
        assert torch.equal(unseeded, images(class_labels=[3, 4]))
    # A list: image i draws from generator i alone, so seed's own per-image generators give seed's images.
    assert torch.equal(
        images(class_labels=[3, 4], generator=sample_generators(5, 0, 2)), images(class_labels=[3, 4], seed=5)
    )
    assert cfm_pipe(class_labels=[1, 2], num_inference_steps=1, output_type="np").images.shape == (2, 32, 32, 1)
    (pil,) = cfm_pipe(class_labels=[1], num_inference_steps=1, return_dict=False)
    assert pil[0].size == (32, 32)
    capsys.readouterr()
    cfm_pipe.set_progress_bar_config(disable=False)
    images(class_labels=[1, 2, 3], max_batch_size=2, seed=0)  # two batches of one step
    cfm_pipe.set_progress_bar_config(disable=True)
    assert "2/2" in capsys.readouterr().err
    images(class_labels=[1], seed=0)
    assert capsys.readouterr().err == ""


def test_contradicting_or_bad_arguments_are_refused(cfm_pipe):
    for bad, needle in [
        (dict(prompt="a bag"), "prompt given, but the model is not text-conditional (it is class-conditional)"),
        (dict(class_labels=[10]), "[0, 10)"),
        (dict(class_labels=[1, 2], batch_size=3), "batch_size=3 contradicts len(class_labels) = 2 images"),
        (dict(num_images_per_prompt=2), "num_images_per_prompt is for text-conditional models"),
        (dict(class_labels=[1, 2], generator=[torch.Generator()]), "a list of 1, for 2 images"),
        (dict(generator=torch.Generator(), seed=0), "generator and seed both given"),
        (dict(batch_size=0), "batch_size is the number of images"),
        (dict(max_batch_size=0), "max_batch_size must be a positive int"),
        (dict(sampler="ddim"), "samples with euler, heun, euler_maruyama"),
        (dict(output_type="latent"), "output_type 'latent' is not one of pil, np, pt"),
    ]:
        with pytest.raises(ValueError, match=re.escape(needle)):
            cfm_pipe(num_inference_steps=1, **bad)
    with pytest.raises(ValueError, match=re.escape("unknown class name(s) ['cat']")):
        cfm_pipe.get_label_ids("cat")


def test_ddpm_each_sampler(tmp_path):
    run = tmp_path / "ddpm"
    train_ddpm.main(
        [
            "--output_dir",
            str(run),
            "--max_train_steps",
            "2",
            "--validation_steps",
            "0",
            "--checkpointing_steps",
            "0",
            *TINY,
        ]
    )
    pipe = export_and_load(run, tmp_path / "pipe")
    assert pipe.config.objective["objective"] == "ddpm"
    for sampler in ("ddpm", "ddim", "dpm_solver"):
        assert_same_as_sample_py(
            pipe,
            run,
            tmp_path / sampler,
            class_labels=[2, 5],
            seed=3,
            sampler=sampler,
            num_inference_steps=2,
        )


@pytest.mark.parametrize("vae_class", ["KLVAE", "AutoencoderKL"])
def test_latent_dit_with_its_vae(latent_run, tmp_path, vae_class):
    run = latent_run
    if vae_class == "AutoencoderKL":  # the same DiT, decoded by a diffusers autoencoder (a native component)
        from diffusers import AutoencoderKL

        from modules.networks.vae import VAE

        torch.manual_seed(1)
        vae = AutoencoderKL(
            in_channels=1,
            out_channels=1,
            latent_channels=2,
            block_out_channels=(8, 8),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=4,
            sample_size=16,
        )
        vae.save_pretrained(tmp_path / "vae")
        record = json.loads((latent_run / "objective.json").read_text())
        record["latent"]["vae"] = VAE(vae, str(tmp_path / "vae")).config_record()
        run = tmp_path / "run"
        run.mkdir()
        for name in ("config.json", "diffusion_pytorch_model.safetensors"):
            (run / name).write_bytes((latent_run / name).read_bytes())
        (run / "objective.json").write_text(json.dumps(record))
    pipe = export_and_load(run, tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["transformer"] == ["transformer_model", "DiTModel"]
    assert (
        index["vae"] == {"KLVAE": ["vae_model", "KLVAE"], "AutoencoderKL": ["diffusers", "AutoencoderKL"]}[vae_class]
    )
    assert index["latent_statistics"] == {"channel_mean": [0.1, -0.2], "channel_std": [1.5, 0.5]}
    images = assert_same_as_sample_py(pipe, run, tmp_path, batch_size=3, seed=2, max_batch_size=2)
    assert images.shape == (3, 1, 16, 16) and images.std() > 0.01
    # The SDE sampler draws noise on the way: one generator per image, whatever the batches (to float rounding).
    again = assert_round_trip(pipe, tmp_path / "saved", class_labels=[2, 0], seed=6)
    by_one = again(class_labels=[2, 0], seed=6, max_batch_size=1, output_type="pt").images
    assert (by_one - pipe(class_labels=[2, 0], seed=6, output_type="pt").images).abs().max() < 1e-5


def test_text_model_with_its_own_encoder(own_text_run, tmp_path):
    pipe = export_and_load(own_text_run, tmp_path / "pipe")
    assert pipe.text_encoder is None and pipe.config.text_conditioning["encoder"]["kind"] == "own"
    assert_same_as_sample_py(
        pipe,
        own_text_run,
        tmp_path,
        prompt=["a photo of a bag", "a sneaker"],
        num_images_per_prompt=2,
        seed=0,
        num_inference_steps=2,
        guidance_scale=3.0,
    )
    assert len(pipe(prompt="a coat", num_inference_steps=1, seed=0).images) == 1
    for bad, needle in [
        (
            dict(class_labels=[1]),
            "class_labels given, but the model is not class-conditional (it is text-conditional)",
        ),
        (dict(prompt=["a", "b"], batch_size=3), "batch_size=3 contradicts len(prompt) x num_images_per_prompt = 2"),
        (dict(prompt=[]), "prompt must be a str or a non-empty list of str"),
    ]:
        with pytest.raises(ValueError, match=re.escape(needle)):
            pipe(num_inference_steps=1, **bad)
    assert_round_trip(pipe, tmp_path / "saved", prompt="a sneaker", num_inference_steps=1, seed=0)


@pytest.mark.parametrize("kind", ["clip", "minilm"])
def test_text_model_with_a_frozen_encoder(captioned, clip_text_folder, tmp_path, kind):
    run = tmp_path / kind
    train_text_model(captioned, run, clip_text_folder if kind == "clip" else kind, "pooled")
    pipe = export_and_load(run, tmp_path / "pipe")
    assert type(pipe.text_encoder).__name__ == {"clip": "CLIPTextModel", "minilm": "BertModel"}[kind]
    assert pipe.tokenizer is not None
    # No prompt: the captions recorded at training, as sample.py takes them.
    assert_same_as_sample_py(pipe, run, tmp_path, batch_size=2, seed=0, num_inference_steps=2, guidance_scale=2.0)


@pytest.mark.parametrize("kind", ["video", "shared_noise"])
def test_a_model_of_clips_gives_sample_py_clips_as_frames(clip_runs, tmp_path, kind):
    """The pipeline of a video network, or of the shared-noise trainer's image network with its settings, generates
    sample.py's clips of the same seed as `.frames`, in the shapes of diffusers' video pipelines."""
    run = clip_runs[kind]
    pipe = export_and_load(run, tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["num_frames"] == 4
    if kind == "video":
        assert index["transformer"] == ["transformer_model", "VideoDiTModel"]
        assert any((tmp_path / "pipe" / "transformer").glob("video_dit_*.py"))
    else:
        assert index["unet"] == ["unet_model", "UNetModel"]
        assert index["objective"]["args"]["shared_noise"] and index["objective"]["args"]["reg_weight"] == 0.1
    settings = dict(class_labels=[3, 0, 7], seed=1, max_batch_size=2)
    floats, clips = sample_py_clips(run, **settings)
    assert clips.shape == (3, 4, 1, 16, 16) and floats.shape == clips.shape
    as_pt = pipe(**settings, output_type="pt")
    assert type(as_pt).__name__ == "ClipPipelineOutput" and as_pt.frames.shape == clips.shape
    assert (as_pt.frames - (floats / 2 + 0.5).clamp(0, 1)).abs().max() < 1e-5
    as_np = pipe(**settings, output_type="np").frames
    assert as_np.shape == (3, 4, 16, 16, 1) and np.array_equal(as_np, as_pt.frames.movedim(2, -1).numpy())
    pil = pipe(**settings).frames
    assert [len(clip) for clip in pil] == [4, 4, 4] and pil[0][0].size == (16, 16)
    assert np.array_equal(np.stack([[np.array(frame) for frame in clip] for clip in pil]), clips[:, :, 0].numpy())
    (first,) = pipe(class_labels=[3], seed=1, output_type="pt", return_dict=False)
    assert (first - as_pt.frames[:1]).abs().max() < 1e-5
    if kind == "video":  # frames of their own; the shared-noise trainer's image network sees one input per clip
        assert (clips[:, 1:] != clips[:, :1]).any()


def test_the_export_loads_without_this_repository_from_a_folder_or_the_hub(
    latent_run, own_text_run, clip_runs, tmp_path
):
    """A process that cannot import `modules` loads four exports (custom code in two components; a tokenizer of
    our own; a video network; the shared-noise trainer) and, by its Hub id, one saved again by save_pretrained and
    uploaded to the local Hub; they generate sample.py's images and clips."""
    from huggingface_hub import HfApi, constants

    settings = [
        (latent_run, dict(class_labels=[2, 1], seed=4)),
        (own_text_run, dict(prompt=["a photo of a coat"], num_images_per_prompt=2, seed=0, num_inference_steps=2)),
        (clip_runs["video"], dict(class_labels=[5, 1], seed=2)),
        (clip_runs["shared_noise"], dict(class_labels=[8], seed=3)),
        (latent_run, dict(class_labels=[0, 2, 2], seed=5)),
    ]
    names = [f"pipe{i}" for i in range(len(settings) - 1)] + [REPO]
    for name, (run, _) in zip(names[:-1], settings[:-1], strict=True):
        sample.main(["--model", str(run), "--export_pipeline", str(tmp_path / name)])
    load(tmp_path / "pipe0").save_pretrained(tmp_path / "saved")
    code = f"""
import importlib.util, torch
from diffusers import DiffusionPipeline
assert importlib.util.find_spec("modules") is None, "this repository is importable"
for i, (name, settings) in enumerate(zip({names!r}, {[s for _, s in settings]!r})):
    pipe = DiffusionPipeline.from_pretrained(name, trust_remote_code=True)
    torch.save(pipe(**settings, output_type="pt")[0], f"images{{i}}.pt")  # .images, or .frames of clips
"""
    with FakeHub() as hub, pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_OFFLINE", False)  # the session is offline but for this Hub
        api = HfApi(endpoint=hub.url, token="hf_test")
        api.create_repo(REPO)
        api.upload_folder(folder_path=tmp_path / "saved", repo_id=REPO)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(hub_env(hub.url, tmp_path / "home"), HF_MODULES_CACHE=str(tmp_path / "hf-modules"))
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any("/transformer/dit_" in r["path"] for r in hub.requests)  # the component's code came from the Hub
    for i, (run, s) in enumerate(settings):
        clips = run in clip_runs.values()
        floats, _ = sample_py_clips(run, **s) if clips else sample_py(run, tmp_path / f"sample_py{i}", **s)
        assert (torch.load(tmp_path / f"images{i}.pt") - (floats / 2 + 0.5).clamp(0, 1)).abs().max() < 1e-5


def test_refusals_leave_nothing_behind(tmp_path, capsys, monkeypatch, latent_run):
    from modules.artifacts import export
    from modules.config import VAEArguments
    from modules.networks.vae import KLVAE
    from modules.objectives.autoencoder import VAEObjective

    vae_run = tmp_path / "vae_run"
    save_model(
        KLVAE(block_out_channels=(8, 8), norm_num_groups=4, sample_size=8), VAEObjective(VAEArguments()), vae_run
    )
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("")
    for run, out, needle in [
        (vae_run, "pipe", "is a vae model, which does not generate: there is no pipeline"),
        (latent_run, "taken", "taken' already exists; remove it or choose another folder"),
    ]:
        with pytest.raises(SystemExit):
            sample.main(["--model", str(run), "--export_pipeline", str(tmp_path / out)])
        assert needle in capsys.readouterr().err
    monkeypatch.setattr(export, "_model_card", lambda *a: 1 / 0)  # fails after everything else is written
    with pytest.raises(ZeroDivisionError):
        export.export_pipeline(latent_run, tmp_path / "pipe")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken", "vae_run"]  # no half folder, no temporary one
