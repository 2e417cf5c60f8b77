"""Clip outputs (artifacts/clips.py): the frame grid's layout, the GIF and MP4 decoded back and compared with the
frames they were made from, and no half-written file when writing fails."""

import av
import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from modules.artifacts.clips import animation_frames, clip_grid, save_clips_gif, save_clips_mp4, write_clips
from modules.artifacts.visualize import image_grid
from modules.data.video import load_moving_fashion_mnist

PADDING = 2


def random_clips(n=3, frames=4, channels=1, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, frames, channels, size, size), dtype=torch.uint8, generator=g)


def real_clips(n=5, resolution=33, num_channels=1):
    """Moving Fashion-MNIST: the flat, sharp frames the outputs are for; 33 px makes the animation's sides odd."""
    dataset = load_moving_fashion_mnist("test", resolution=resolution, num_clips=n, num_channels=num_channels)
    return dataset.uint8_clips(n)


@pytest.mark.parametrize("channels", [1, 3])
def test_grid_has_clips_in_rows_and_frames_in_columns(channels):
    clips = random_clips(n=3, frames=5, channels=channels, size=6)
    grid = clip_grid(clips)
    assert grid.dtype == torch.uint8 and grid.shape == (channels, 3 * 8 + PADDING, 5 * 8 + PADDING)
    for r in range(3):
        for f in range(5):
            y, x = PADDING + r * (6 + PADDING), PADDING + f * (6 + PADDING)
            assert torch.equal(grid[:, y : y + 6, x : x + 6], clips[r, f])
    assert (grid[:, :PADDING] == 255).all() and (grid[:, :, :PADDING] == 255).all()


def test_animation_frame_f_is_the_grid_of_every_clip_at_f():
    clips = random_clips(n=5, frames=3, size=8)
    frames = animation_frames(clips, nrow=2)
    enlarged = clips.repeat_interleave(12, -2).repeat_interleave(12, -1)  # 8 px enlarged to MIN_GIF_CELL_PX = 96
    assert frames.shape == (3, 1, 3 * (96 + PADDING) + PADDING, 2 * (96 + PADDING) + PADDING)
    for f in range(3):
        assert torch.equal(frames[f], image_grid(enlarged[:, f], nrow=2))
    with pytest.raises(ValueError, match=r"uint8 \(N, F, C, H, W\)"):
        animation_frames(clips[0])


@pytest.mark.parametrize("channels", [1, 3])
def test_gif_decodes_to_the_animation_frames(tmp_path, channels):
    clips = real_clips(num_channels=channels)
    path = tmp_path / "clips.gif"
    save_clips_gif(clips, path, nrow=3, fps=10)
    expected = animation_frames(clips, nrow=3)  # (F, C, H, W)
    with Image.open(path) as gif:
        assert gif.n_frames == clips.shape[1] and gif.info["loop"] == 0
        decoded = [np.array(frame.convert("RGB")) for frame in ImageSequence.Iterator(gif)]
        durations = [frame.info["duration"] for frame in ImageSequence.Iterator(gif)]
    assert durations == [100] * clips.shape[1]
    for f, frame in enumerate(decoded):  # the GIF palette holds every grey level: exact
        assert np.array_equal(frame, expected[f].expand(3, -1, -1).permute(1, 2, 0).numpy())


@pytest.mark.parametrize("channels", [1, 3])
def test_mp4_decodes_to_the_animation_frames_within_compression(tmp_path, channels):
    clips = real_clips(num_channels=channels)
    path = tmp_path / "clips.mp4"
    save_clips_mp4(clips, path, nrow=3, fps=8)
    expected = animation_frames(clips, nrow=3).float()  # (F, C, 203, 305): odd sides, padded to even in the file
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.average_rate == 8
        decoded = [torch.from_numpy(frame.to_ndarray(format="rgb24")) for frame in container.decode(stream)]
    assert len(decoded) == clips.shape[1]
    height, width = expected.shape[-2:]
    assert decoded[0].shape == (height + height % 2, width + width % 2, 3)
    for f, frame in enumerate(decoded):
        frame = frame[:height, :width].permute(2, 0, 1).float()  # (3, H, W)
        error = (frame - expected[f]).abs()
        assert error.mean() < 1.5 and error.quantile(0.99) < 12  # lossy (measured 0.4 and 4), but close
        others = (frame - expected[(f + 1) % len(decoded)]).abs().mean()
        assert others > 3 * error.mean()  # and it is this frame, not its neighbour


def test_write_clips_writes_the_three_files(tmp_path):
    clips = real_clips(n=2)[:, :4]
    paths = write_clips(clips, tmp_path / "out" / "step-10.ema")
    assert {kind: p.name for kind, p in paths.items()} == {
        "png": "step-10.ema.png",
        "gif": "step-10.ema.gif",
        "mp4": "step-10.ema.mp4",
    }
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths.values())
    with Image.open(paths["png"]) as png:
        assert png.mode == "L" and np.array_equal(np.array(png), clip_grid(clips)[0].numpy())
    with Image.open(paths["gif"]) as gif:
        assert gif.n_frames == 4


def test_nothing_half_written_when_encoding_fails(tmp_path, monkeypatch):
    clips = real_clips(n=2)[:, :6]
    path = tmp_path / "clips.mp4"
    path.write_bytes(b"the previous video")
    made, from_ndarray = [], av.VideoFrame.from_ndarray

    def fails_on_the_third_frame(array, format):
        made.append(1)
        if len(made) == 3:
            raise RuntimeError("encoder gave up")
        return from_ndarray(array, format=format)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", staticmethod(fails_on_the_third_frame))
    with pytest.raises(RuntimeError, match="encoder gave up"):
        save_clips_mp4(clips, path)
    assert len(made) == 3 and path.read_bytes() == b"the previous video"  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["clips.mp4"]  # and no temporary file left
    with pytest.raises(ValueError, match="uint8"):
        write_clips(clips.float(), tmp_path / "bad")
    assert [p.name for p in tmp_path.iterdir()] == ["clips.mp4"]
