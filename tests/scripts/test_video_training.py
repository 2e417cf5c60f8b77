"""Training on clips end to end: a video DiT on Moving Fashion-MNIST resumes bit for bit, writes its clips as a frame
grid, a GIF and an MP4 with their metrics, and sample.py makes the same clips; the shared-noise trainer does the
same with an image UNet."""

import json
import shutil

import av
import numpy as np
import pytest
import torch
from helpers import assert_same, brief_classifier, checkpoint_state, in_process, read_metrics
from PIL import Image

# Four-frame clips of one item at 16 px; everything that draws random numbers in training, for the resume test.
CLIPS = [
    "--dataset_name",
    "moving_fashion_mnist",
    "--resolution",
    16,
    "--num_frames",
    4,
    "--max_train_samples",
    16,
    "--train_batch_size",
    4,
    "--num_inference_steps",
    2,
    "--logging_steps",
    1,
    "--random_flip",
    "--cond_drop_prob",
    0.3,
    "--validation_steps",
    4,
    "--validation_samples",
    8,
]
VIDEO_DIT = ["--model", "video_dit_tiny", "--patch_size", 4, "--temporal_patch_size", 2]


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    """4 steps of a video DiT with checkpoints at 2 and 4, 3 sample clips, and clip metrics of 3 clips at the end
    (with a briefly trained classifier standing in for the cached one)."""
    import modules.evaluation.metrics as metrics

    out = tmp_path_factory.mktemp("clips") / "run"
    classifier = brief_classifier(1000, epochs=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(metrics, "load_or_train_classifier", lambda: classifier)
        in_process(
            "train_cfm.py",
            "--output_dir",
            out,
            "--max_train_steps",
            4,
            "--checkpointing_steps",
            2,
            "--num_sample_images",
            3,
            "--fid_num_samples",
            3,
            "--fid_reference_samples",
            3,
            "--eval_metrics",
            "fid,classifier",
            *VIDEO_DIT,
            *CLIPS,
        )
    return out


def test_resume_on_clips_is_exact(clip_run, tmp_path, capsys):
    """From the whole run's checkpoint-2, two more steps in a new run give its checkpoint-4, bit for bit."""
    out = tmp_path / "resumed"
    shutil.copytree(clip_run / "checkpoints" / "checkpoint-2", out / "checkpoints" / "checkpoint-2")
    common = ["--output_dir", out, "--num_sample_images", 0, "--fid_num_samples", 0, *VIDEO_DIT, *CLIPS]
    in_process("train_cfm.py", "--max_train_steps", 4, "--resume_from_checkpoint", "latest", *common)
    assert "resumed from" in capsys.readouterr().out
    whole = checkpoint_state(clip_run / "checkpoints" / "checkpoint-4")
    assert_same(whole, checkpoint_state(out / "checkpoints" / "checkpoint-4"), "state")
    halfway = checkpoint_state(clip_run / "checkpoints" / "checkpoint-2")
    assert any(not torch.equal(halfway[0][k], whole[0][k]) for k in whole[0])


def test_a_clip_run_records_its_clips_metrics_and_samples(clip_run):
    record = json.loads((clip_run / "objective.json").read_text())
    assert record["num_frames"] == 4 and json.loads((clip_run / "config.json").read_text())["num_frames"] == 4
    rows = read_metrics(clip_run)
    (val,) = [r for r in rows if "val_loss" in r]
    assert val["step"] == 4 and val["val_loss"] > 0
    (final,) = [r for r in rows if "fid" in r]
    for key in ("fid", "fd_classifier", "class_consistency", "accel_ratio", "frame_diff_ratio"):
        assert np.isfinite(final[key]), key
    assert 0 <= final["class_consistency"] <= 1
    fid = json.loads((clip_run / "fid.json").read_text())
    assert fid["fid"] == final["fid"] and fid["num_samples"] == 3
    # The frame grid: 3 clips in rows, 4 frames in columns; the GIF and the MP4 play its columns.
    base = clip_run / "samples" / "step_0000004"
    grid = np.array(Image.open(base.with_suffix(".png")))
    gif = Image.open(base.with_suffix(".gif"))
    assert gif.n_frames == 4 and grid.shape[0] > grid.shape[1] / 4 * 2
    with av.open(str(base.with_suffix(".mp4"))) as container:
        assert len([frame for frame in container.decode(video=0)]) == 4


def test_sample_py_writes_the_same_clips_whatever_the_batch_size(clip_run, tmp_path):
    import sample

    grids = []
    for batch_size in (1, 3):
        out = tmp_path / f"bs{batch_size}.png"
        sample.main(
            ["--model", str(clip_run), "--num_images", "3", "--batch_size", str(batch_size), "--output", str(out)]
        )
        grids.append(np.array(Image.open(out)))
        assert out.with_suffix(".gif").is_file() and out.with_suffix(".mp4").is_file()
    assert np.array_equal(*grids)


def test_the_shared_noise_trainer_trains_an_image_unet_on_frames_and_samples_clips(tmp_path):
    import sample

    out = tmp_path / "shared"
    in_process(
        "train_cfm.py",
        "--output_dir",
        out,
        "--max_train_steps",
        2,
        "--model",
        "unet_s",
        "--base_channels",
        8,
        "--shared_noise",
        "--reg_weight",
        0.1,
        "--num_sample_images",
        2,
        "--fid_num_samples",
        0,
        *CLIPS,
    )
    config, record = (json.loads((out / name).read_text()) for name in ("config.json", "objective.json"))
    assert config["_class_name"] == "UNetModel" and record["num_frames"] == 4
    assert record["args"]["shared_noise"] and record["args"]["reg_weight"] == 0.1
    sample.main(["--model", str(out), "--num_images", "2", "--output", str(tmp_path / "clips.png")])
    grid = np.array(Image.open(tmp_path / "clips.png"))
    assert grid.shape[1] > grid.shape[0]  # 2 clips in rows, 4 frames in columns


def test_init_from_an_image_unet_run_starts_a_video_unet_at_its_per_frame_outputs(tiny_cfm_run):
    """--init_from the session's image UNet run: the video UNet's frames are then denoised as the image UNet does
    each alone (its temporal layers start as the identity)."""
    from modules.artifacts.model_folder import load_model, load_pretrained_weights
    from modules.config import ModelArguments
    from modules.networks.presets import build_model

    image, _, _ = load_model(tiny_cfm_run, "cpu")
    video = build_model(ModelArguments(model="video_unet_s", base_channels=8), 1, 32, 10, num_frames=3)
    load_pretrained_weights(video, str(tiny_cfm_run))
    clips, t = torch.randn(2, 3, 1, 32, 32), torch.tensor([0.3, 0.7])
    labels = torch.tensor([1, 4])
    with torch.no_grad():
        frames = image(clips.flatten(0, 1), t.repeat_interleave(3), labels.repeat_interleave(3))
        torch.testing.assert_close(video(clips, t, labels), frames.view(clips.shape), atol=1e-5, rtol=1e-5)
