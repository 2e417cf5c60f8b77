"""Latent video in this process, on a tiny VAE built from config: clips encoded frame by frame (a flipped clip
flipped whole), read back as clips, drawn and normalised per element, decoded frame by frame, and trained on."""

import dataclasses
import json

import pytest
import torch
from helpers import fails, in_process, rows

import encode_latents
from modules.config import DataArguments
from modules.data.latents import latent_decoder, load_latent_data, sample_latents
from modules.data.sources import load_train_data
from modules.networks.vae import KLVAE, load_vae

CLIPS = DataArguments(dataset_name="moving_fashion_mnist", max_train_samples=6, num_frames=4, resolution=16)
ENCODE = ["--dataset_name", "moving_fashion_mnist", "--max_train_samples", 6, "--num_frames", 4, "--resolution", 16]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A random 1-channel KL-VAE, f2 with 4 latent channels, saved as encode_latents.py --vae takes it."""
    path = tmp_path_factory.mktemp("vae") / "tiny"
    torch.manual_seed(0)
    KLVAE(in_channels=1, block_out_channels=(8, 16), norm_num_groups=4, sample_size=16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def encoded(vae_dir, tmp_path_factory):
    """The 6 clips in shards of 4 and 2, with flipped latents; --batch_size 2 (frames) is less than a clip: a VAE
    pass takes one clip."""
    out = tmp_path_factory.mktemp("latents") / "clips"
    args = ["--vae", vae_dir, "--output_dir", out, *ENCODE, "--shard_size", 4, "--random_flip", "--batch_size", 2]
    encode_latents.main([str(a) for a in args])
    return out


def test_clips_are_encoded_frame_by_frame_and_flipped_whole(encoded, vae_dir):
    meta = json.loads((encoded / "latents.json").read_text())
    assert (meta["num_frames"], meta["latent_shape"], meta["num_images"]) == (4, [4, 8, 8], 6)
    assert "6 clips of 4 frames" in (encoded / "README.md").read_text()
    # The recorded source arguments find the clips again (FID's reference): they are the oracle's input.
    source = DataArguments(**meta["data_args"])
    assert source == dataclasses.replace(CLIPS, center_crop=True, random_flip=True)
    clips = load_train_data(source).dataset.__getitems__(list(range(6)))
    x = clips["pixel_values"]  # (6, 4, 1, 16, 16)
    stored = rows(encoded)
    assert stored["latent_mean"].shape == stored["flip_std"].shape == (6, 4, 4, 8, 8)
    assert torch.equal(stored["labels"], clips["labels"])
    # Oracle: the VAE on each frame alone, and on each frame of the clip flipped left-right, rounded to float16.
    vae = load_vae(str(vae_dir))
    for name, frames in (("latent_mean", x), ("flip_mean", x.flip(-1))):
        alone = torch.stack([torch.cat([vae.encode(frame[None])[0] for frame in clip]) for clip in frames])
        torch.testing.assert_close(stored[name], alone.half().float(), rtol=1e-3, atol=1e-4)


def test_latent_clips_load_as_clips_with_statistics_over_every_frame(encoded):
    data = load_latent_data(str(encoded))
    assert (data.num_frames, data.num_channels, data.resolution, data.image_resolution) == (4, 4, 8, 16)
    assert len(data.dataset) == 6
    batch = data.dataset.__getitems__([5, 0])
    assert batch["latent_mean"].shape == (2, 4, 4, 8, 8) and batch["labels"].shape == (2,)
    m, s = (rows(encoded)[k].double().transpose(1, 2).flatten(2) for k in ("latent_mean", "latent_std"))  # (N, C, -1)
    torch.testing.assert_close(data.channel_mean.double(), m.mean((0, 2)), rtol=1e-5, atol=1e-6)
    expected_std = (m.var((0, 2), unbiased=False) + s.pow(2).mean((0, 2))).sqrt()
    torch.testing.assert_close(data.channel_std.double(), expected_std, rtol=1e-5, atol=1e-6)

    # Each clip takes its own or its flipped posterior whole; channel statistics broadcast over (B, F, C, h, w).
    batch = {
        **batch,
        "latent_std": torch.zeros_like(batch["latent_std"]),
        "flip_std": torch.zeros_like(batch["flip_std"]),
    }
    z = sample_latents(batch, torch.Generator().manual_seed(0), data, flip=True)
    scale = data.channel_std.view(-1, 1, 1)
    for i in range(2):
        options = [(batch[k][i] - data.channel_mean.view(-1, 1, 1)) / scale for k in ("latent_mean", "flip_mean")]
        assert any(torch.allclose(z[i], option, atol=1e-5) for option in options)


def test_the_decoder_decodes_clips_frame_by_frame(encoded, vae_dir):
    data = load_latent_data(str(encoded))
    record = {"vae": data.vae, "channel_mean": data.channel_mean.tolist(), "channel_std": data.channel_std.tolist()}
    decode = latent_decoder(record)
    z = torch.randn(2, 4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    clips = decode(z)
    assert clips.shape == (2, 4, 1, 16, 16) and clips.abs().max() <= 1
    frames = torch.stack([decode(z[:, f]) for f in range(4)], 1)  # each frame as an image batch (B, C, h, w)
    torch.testing.assert_close(clips, frames, rtol=1e-5, atol=1e-5)
    vae, raw = load_vae(str(vae_dir)), z[1, 2] * data.channel_std.view(-1, 1, 1) + data.channel_mean.view(-1, 1, 1)
    torch.testing.assert_close(clips[1, 2], vae.decode(raw[None])[0], rtol=1e-5, atol=1e-5)


def test_a_video_model_trains_on_latent_clips_of_the_recorded_length(encoded, tmp_path, capsys):
    out = tmp_path / "run"
    tiny = ["--latent_dataset", encoded, "--model", "video_dit_tiny", "--patch_size", 2, "--train_batch_size", 2]
    tiny += ["--max_train_steps", 2, "--num_sample_images", 0, "--fid_num_samples", 0, "--resolution", 16]
    in_process("train_cfm.py", "--output_dir", out, *tiny, "--random_flip")  # flips drawn per clip
    record = json.loads((out / "objective.json").read_text())
    assert record["num_frames"] == 4 and record["latent"]["vae"]["kind"] == "KLVAE"
    assert json.loads((out / "run_config.json").read_text())["config"]["num_frames"] == 4
    assert json.loads((out / "config.json").read_text())["num_frames"] == 4
    other = ["--output_dir", tmp_path / "other", *tiny, "--num_frames", 8]
    fails(capsys, [str(a) for a in other], "--num_frames 8: the latent dataset", "holds clips of 4 frames; leave")
    assert not (tmp_path / "other").exists()  # refused before the run dir
