"""Latent diffusion end to end on tiny models: train_vae.py trains our KL-VAE through the shared loop, its latents
are encoded by encode_latents.py, a DiT trains on them, and sample.py decodes through the recorded VAE."""

import json
import math

import numpy as np
import pytest
from helpers import in_process, read_metrics
from PIL import Image

from modules.config import UserError

TINY_VAE = [
    "--max_train_samples",
    64,
    "--train_batch_size",
    8,
    "--vae_base_channels",
    8,
    "--num_sample_images",
    8,
    "--logging_steps",
    1,
    "--lr_warmup_steps",
    0,
    "--validation_samples",
    16,
]


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae") / "run"
    in_process(
        "train_vae.py",
        "--output_dir",
        out,
        "--max_train_steps",
        4,
        "--validation_steps",
        2,
        "--checkpointing_steps",
        2,
        "--fid_num_samples",
        4,
        "--fid_reference_samples",
        4,
        *TINY_VAE,
    )
    return out


@pytest.fixture(scope="module")
def latents(vae_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents") / "fashion"
    in_process(
        "encode_latents.py",
        "--vae",
        vae_run,
        "--output_dir",
        out,
        "--dataset_name",
        "fashion_mnist",
        "--max_train_samples",
        32,
        "--resolution",
        32,
        "--shard_size",
        16,
    )
    return out


def test_train_vae_writes_model_grid_psnr_and_reconstruction_fid(vae_run):
    config = json.loads((vae_run / "config.json").read_text())
    assert config["_class_name"] == "KLVAE" and config["block_out_channels"] == [8, 16, 32]
    assert json.loads((vae_run / "objective.json").read_text())["objective"] == "vae"
    records = read_metrics(vae_run)
    validation = [r for r in records if "val_psnr" in r]
    assert [r["step"] for r in validation] == [2, 4] and all(r["val_psnr"] > 0 for r in validation)
    assert json.loads((vae_run / "fid.json").read_text())["fid"] > 0
    grid = Image.open(vae_run / "samples" / "step_0000004.png")
    assert grid.size[0] > grid.size[1]  # 8 originals per row, each row followed by its reconstructions: 8 x 2
    assert (vae_run / "checkpoints" / "checkpoint-4").is_dir()


def test_a_vae_is_not_a_generator(vae_run, capsys, tmp_path):
    import sample

    with pytest.raises(SystemExit):
        sample.main(["--model", str(vae_run), "--output", str(tmp_path / "x.png")])
    assert "does not generate; use it as encode_latents.py --vae" in capsys.readouterr().err


def test_dit_trains_on_latents_and_sample_decodes(latents, tmp_path):
    """An adaLN-single DiT (adaLN-Zero's latent run is a golden run) trains, saves, and sample.py loads it."""
    run = tmp_path / "dit"
    in_process(
        "train_cfm.py",
        "--latent_dataset",
        latents,
        "--model",
        "dit_tiny",
        "--patch_size",
        2,
        "--adaln",
        "single",
        "--output_dir",
        run,
        "--max_train_steps",
        3,
        "--train_batch_size",
        8,
        "--num_sample_images",
        4,
        "--num_inference_steps",
        2,
        "--logging_steps",
        1,
        "--lr_warmup_steps",
        0,
        "--fid_num_samples",
        4,
        "--fid_reference_samples",
        4,
    )
    config = json.loads((run / "config.json").read_text())
    assert config["in_channels"] == 4 and config["sample_size"] == 8  # 32x32 images, f4 latents
    assert config["adaln"] == "single" and config["num_classes"] == 10  # --class_conditional auto: labelled latents
    assert all(math.isfinite(r["loss"]) for r in read_metrics(run) if "loss" in r)
    record = json.loads((run / "objective.json").read_text())["latent"]
    assert record["vae"]["kind"] == "KLVAE" and record["source_data_args"]["dataset_name"] == "fashion_mnist"
    fid = json.loads((run / "fid.json").read_text())
    assert fid["fid"] > 0 and fid["reference"].startswith("fashion_mnist")
    grid = np.array(Image.open(run / "samples" / "step_0000003.png"))
    assert grid.shape[0] > 32  # decoded 32x32 images, not 8x8 latents
    assert (run / "samples" / "step_0000003_denoising.png").is_file()

    out = tmp_path / "decoded"
    in_process("sample.py", "--model", run, "--num_images", 3, "--num_inference_steps", 2, "--output", out)
    images = sorted(out.glob("*.png"))
    assert len(images) == 3 and Image.open(images[0]).size == (32, 32)


def test_latent_decoder_refuses_another_vae(vae_run):
    from modules.data.latents import latent_decoder

    record = {
        "vae": {"source": str(vae_run), "kind": "KLVAE", "latent_channels": 16},
        "channel_mean": [0.0] * 16,
        "channel_std": [1.0] * 16,
    }
    with pytest.raises(UserError, match="latent_channels 4, but the latents were encoded by one with 16"):
        latent_decoder(record)


def test_latent_bad_input_stops_before_the_run_dir(latents, tmp_path, capsys):
    """Another VAE than the one that encoded the latents, and flips the dataset does not hold: named, nothing
    written."""
    from diffusers import AutoencoderKL

    import train_cfm

    other = tmp_path / "other_vae"
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4).save_pretrained(other)
    out = tmp_path / "run"
    base = [
        "--latent_dataset",
        str(latents),
        "--model",
        "dit_tiny",
        "--output_dir",
        str(out),
        "--fid_num_samples",
        "0",
    ]
    for extra, needle in [
        (["--vae", str(other)], "has kind AutoencoderKL, but the latents were encoded by one with KLVAE"),
        (["--random_flip"], "holds no flipped latents; encode it with encode_latents.py --random_flip"),
    ]:
        with pytest.raises(SystemExit):
            train_cfm.main([*base, *extra])
        assert needle in capsys.readouterr().err
        assert not out.exists()


def test_text_model_trains_on_captioned_latents(vae_run, captioned, tmp_path):
    """Captions pass through encode_latents.py and condition a DiT trained on the latents."""
    latents = tmp_path / "captioned_latents"
    in_process(
        "encode_latents.py",
        "--vae",
        vae_run,
        "--output_dir",
        latents,
        "--dataset_name",
        captioned,
        "--caption_column",
        "caption",
        "--resolution",
        32,
        "--shard_size",
        16,
    )
    run, own = tmp_path / "text", "own:width=32,layers=1,heads=2,max_length=16"
    in_process(
        "train_cfm.py",
        "--latent_dataset",
        latents,
        "--text_encoder",
        own,
        "--model",
        "dit_tiny",
        "--patch_size",
        2,
        "--output_dir",
        run,
        "--max_train_steps",
        2,
        "--train_batch_size",
        4,
        "--num_sample_images",
        4,
        "--num_inference_steps",
        2,
        "--lr_warmup_steps",
        0,
        "--fid_num_samples",
        0,
        "--class_conditional",
        "false",
    )
    record = json.loads((run / "objective.json").read_text())
    assert record["text_encoder"]["kind"] == "own" and record["sample_prompts"][0].startswith("a photo of a ")
    assert "latent" in record and (run / "samples" / "step_0000002.png").is_file()
