"""Clips from video files, frame folders and a `datasets` column (modules/data/video_files.py), on tiny videos
written here with PyAV: frame i of a clip is a flat grey of brightness 10 + 15 i, so its mean says which it is."""

import json

import av
import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from modules.config import DataArguments, UserError
from modules.data.video_files import is_video_folder, load_video_data
from modules.pixels import to_uint8


def brightness(i: int) -> int:
    return 10 + 15 * i


def write_video(path, codec: str, pix_fmt: str, num_frames: int = 12, size=(24, 16), **options):
    """A video of `num_frames` flat frames of size (width, height) whose brightness encodes their index."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4" if codec == "libx264" else None) as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = *size, pix_fmt
        stream.options = options
        for i in range(num_frames):
            array = np.full((size[1], size[0], 3), brightness(i), np.uint8)  # (H, W, 3)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())
    return path


def mp4(path, num_frames=12):
    return write_video(path, "libx264", "yuv420p", num_frames, crf="0")  # lossless, up to YUV <-> RGB rounding


def gif(path, num_frames=12, size=(16, 16)):
    return write_video(path, "gif", "gray", num_frames, size)


def frame_folder(path, num_frames=12, sizes=None):
    path.mkdir(parents=True)
    for i in range(num_frames):
        size = sizes[i] if sizes else (20, 16)
        Image.new("L", size, brightness(i)).save(path / f"{i:03d}.png")
    return path


def clip_means(pixel_values: torch.Tensor) -> list[float]:
    """The mean uint8 brightness of each frame of a clip (F, C, H, W) in [-1, 1]."""
    return to_uint8(pixel_values).float().mean(dim=(1, 2, 3)).tolist()


def load(path, **kwargs):
    kwargs = {"resolution": 16, "validation_split": "none", **kwargs}
    return load_video_data(DataArguments(train_data_dir=str(path), **kwargs))


@pytest.fixture
def video_folder(tmp_path):
    root = tmp_path / "clips"
    root.mkdir()
    frame_folder(root / "a_frames")
    gif(root / "b.gif")
    mp4(root / "c.mp4")
    rows = [("a_frames", 2, "steps"), ("b.gif", 0, "a gif"), ("c.mp4", 1, "a film")]
    lines = [json.dumps({"file_name": f, "label": label, "caption": c}) for f, label, c in rows]
    (root / "metadata.jsonl").write_text("\n".join(lines))
    return root


def test_a_folder_of_a_frame_folder_a_gif_and_an_mp4_with_metadata(video_folder):
    data = load(video_folder, num_frames=4, frame_stride=3)
    assert (len(data.dataset), data.num_frames, data.num_channels, data.num_classes) == (3, 4, 3, 3)
    assert data.captions == ["steps", "a gif", "a film"]
    assert "-3-4f-stride3-16px-3ch" in data.key
    wanted = [brightness(i) for i in (0, 3, 6, 9)]  # frames 0, stride, 2 stride, 3 stride
    for i, (label, tolerance) in enumerate([(2, 0), (0, 0), (1, 3)]):  # the mp4 is lossy through YUV
        item = data.dataset[i]
        assert item["pixel_values"].shape == (4, 3, 16, 16) and item["pixel_values"].dtype == torch.float32
        assert -1 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1
        assert item["labels"] == label and item["labels"].dtype == torch.int64
        assert np.allclose(clip_means(item["pixel_values"]), wanted, atol=tolerance), (i, item["pixel_values"])
    clips = data.dataset.uint8_clips(2)
    assert clips.shape == (2, 4, 3, 16, 16) and clips.dtype == torch.uint8
    grey = load(video_folder, num_frames=2, frame_stride=5, num_channels=1)
    assert grey.dataset[1]["pixel_values"].shape == (2, 1, 16, 16)
    assert clip_means(grey.dataset[1]["pixel_values"]) == [brightness(0), brightness(5)]


def test_subfolders_are_classes_and_a_random_crop_is_one_for_all_frames(tmp_path):
    root = tmp_path / "classes"
    gif(root / "cats" / "x.gif")
    strip = Image.fromarray(np.tile(np.arange(0, 256, 8, dtype=np.uint8), (16, 1)))  # 32x16, brighter to the right
    (root / "dogs" / "y").mkdir(parents=True)
    for i in range(12):
        strip.save(root / "dogs" / "y" / f"{i:02d}.png")
    data = load(root, num_frames=4, center_crop=False)
    assert data.class_names == ("cats", "dogs") and [int(data.dataset[i]["labels"]) for i in (0, 1)] == [0, 1]
    crops = [data.dataset[1]["pixel_values"] for _ in range(8)]
    assert all(torch.equal(c[0], c[f]) for c in crops for f in range(4))  # every frame of a clip cropped alike
    assert len({float(c[0].mean()) for c in crops}) > 1  # while the crop itself is random


@pytest.mark.parametrize("stored_as", ["Video feature", "bytes and path"])
def test_a_dataset_saved_to_disk_with_video_bytes(tmp_path, stored_as):
    files = [mp4(tmp_path / "a.mp4", 6), gif(tmp_path / "b.gif", 6)]
    values = [{"bytes": f.read_bytes(), "path": f.name} for f in files]
    ds = datasets.Dataset.from_dict({"clip": values, "label": [1, 0], "text": ["one", "two"]})
    if stored_as == "Video feature":
        ds = ds.cast_column("clip", datasets.Video())
    ds.save_to_disk(str(tmp_path / "saved"))
    args = DataArguments(
        dataset_name=str(tmp_path / "saved"), video_column="clip", num_frames=3, frame_stride=2, resolution=16
    )
    data = load_video_data(args)
    assert (len(data.dataset), data.num_classes, data.captions) == (2, 2, ["one", "two"])
    assert data.dataset.uint8_clips(2).shape == (2, 3, 3, 16, 16)
    for i in range(2):
        assert int(data.dataset[i]["labels"]) == 1 - i
        assert np.allclose(clip_means(data.dataset[i]["pixel_values"]), [brightness(i) for i in (0, 2, 4)], atol=3)
    with pytest.raises(UserError, match=r"no video column 'video' \(columns: clip, label, text\)"):
        load_video_data(DataArguments(dataset_name=str(tmp_path / "saved"), num_frames=3))


def test_a_short_clip_names_its_length_and_what_is_needed(tmp_path):
    root = tmp_path / "short"
    root.mkdir()
    gif(root / "long.gif", 15)
    short = gif(root / "short.gif", 9)
    with pytest.raises(UserError, match=f"^{short}: 9 frames, but --num_frames 8 --frame_stride 2 needs 15; "):
        load(root, num_frames=8, frame_stride=2)
    with pytest.warns(UserWarning, match=f"left out 1 of 2 clips shorter than the 15 frames .* the first {short}"):
        data = load(root, num_frames=8, frame_stride=2, skip_short_clips=True)
    assert len(data.dataset) == 1 and clip_means(data.dataset[0]["pixel_values"])[-1] == brightness(14)
    with pytest.raises(UserError, match="none of the 2 clips has the 17 frames --num_frames 9 --frame_stride 2 needs"):
        load(root, num_frames=9, frame_stride=2, skip_short_clips=True)


def test_a_video_that_cannot_be_decoded_is_named(tmp_path):
    root = tmp_path / "broken"
    root.mkdir()
    gif(root / "a.gif")
    (root / "b.mp4").write_bytes(b"not a video" * 20)
    with pytest.raises(UserError, match=f"^{root / 'b.mp4'}: cannot decode video \\(.+\\)$"):
        load(root, num_frames=2)
    truncated = mp4(tmp_path / "whole.mp4").read_bytes()[:-300]  # without its index (the moov box, at the end)
    (root / "b.mp4").write_bytes(truncated)
    with pytest.raises(UserError, match=f"^{root / 'b.mp4'}: cannot decode video"):
        load(root, num_frames=2)


def test_a_frame_folder_of_mixed_sizes_or_a_broken_frame_is_named(tmp_path):
    root = tmp_path / "mixed"
    folder = frame_folder(root / "clip", 4, sizes=[(16, 16), (20, 16), (16, 16), (16, 16)])
    with pytest.raises(UserError, match=f"^{folder}: frame 001.png is 20x16, but 000.png is 16x16$"):
        load(root, num_frames=4)
    assert len(load(root, num_frames=1).dataset) == 1  # frames the clip does not read are not checked
    (folder / "002.png").write_bytes((folder / "002.png").read_bytes()[:30])  # cut short
    with pytest.raises(UserError, match=f"^{folder}: cannot read frame 002.png \\(.+\\)$"):
        load(root, num_frames=2, frame_stride=2)  # frames 000 and 002: 001, of another size, is skipped


def test_folders_without_clips_and_bad_counts(tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.new("RGB", (16, 16)).save(loose / "a.png")
    with pytest.raises(UserError, match=f"'{loose}' holds images, not clips .* leave --num_frames unset"):
        load(loose, num_frames=4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no clips under .*empty'; a clip is a video file"):
        load(tmp_path / "empty")
    with pytest.raises(UserError, match="--frame_stride must be at least 1, got 0"):
        load(loose, frame_stride=0)
    with pytest.raises(UserError, match="--num_frames must be at least 1, got 0"):
        load(loose, num_frames=0)
    gif(tmp_path / "videos" / "deep" / "x.gif")
    frame_folder(tmp_path / "frames" / "clip", 2)
    assert is_video_folder(tmp_path / "videos") and is_video_folder(tmp_path / "frames")
    assert not is_video_folder(loose) and not is_video_folder(tmp_path / "empty")
    assert not is_video_folder(tmp_path / "missing") and not is_video_folder(loose / "a.png")
