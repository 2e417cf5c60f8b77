"""Each bad input is a one-line error that names the culprit, raised before anything is written."""

import dataclasses
import importlib.util
import io
import json
import re
import shutil
import zlib
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from helpers import TINY, fails
from PIL import Image

import train_cfm
import train_ddpm
from modules.config import DataArguments, UserError
from modules.data.sources import load_train_data


@pytest.fixture
def out(tmp_path):
    path = tmp_path / "run"
    yield path
    assert not path.exists(), "a failed start wrote into the run directory"


@pytest.fixture(scope="module")
def parquet_dataset(tmp_path_factory):
    """A local `datasets` dataset (parquet) with columns 'img' and 'category'."""
    root = tmp_path_factory.mktemp("pq")
    images = [Image.new("RGB", (20, 24), (i * 40, 0, 0)) for i in range(6)]
    ds = datasets.Dataset.from_dict({"img": images, "category": [0, 1, 2, 0, 1, 2]})
    ds = ds.cast_column("img", datasets.Image())
    ds.to_parquet(str(root / "train.parquet"))
    return root


def test_unknown_dataset_name(capsys, out):
    fails(
        capsys,
        ["--dataset_name", "no_such_user/no_such_dataset", "--output_dir", str(out)],
        "unknown dataset 'no_such_user/no_such_dataset'",
    )


def test_missing_image_column_lists_the_columns(capsys, out, parquet_dataset):
    fails(
        capsys,
        ["--dataset_name", str(parquet_dataset), "--output_dir", str(out)],
        "no image column 'image'",
        "columns: img, category",
    )


def test_missing_label_column_lists_the_columns(capsys, out, parquet_dataset):
    fails(
        capsys,
        [
            "--dataset_name",
            str(parquet_dataset),
            "--image_column",
            "img",
            "--label_column",
            "label",
            "--output_dir",
            str(out),
        ],
        "no label column 'label'",
        "columns: img, category",
    )


def test_class_conditional_true_without_labels(capsys, out, parquet_dataset):
    """Asked for explicitly; left unset (auto), the same data trains unconditionally (tests/unit)."""
    argv = ["--dataset_name", str(parquet_dataset), "--image_column", "img", "--class_conditional", "true"]
    fails(
        capsys,
        [*argv, "--output_dir", str(out)],
        f"--class_conditional true needs labels, but the dataset '{parquet_dataset}' has none; name them with "
        "--label_column (or one subfolder per class), or pass --class_conditional false (or leave it unset: auto)",
    )


def test_hub_style_dataset_trains_when_columns_are_named(parquet_dataset, tmp_path):
    """The same dataset with the right column names gets past every check and trains (a control for the above),
    through to the end-of-run FID against its own images."""
    run = tmp_path / "ok"
    train_cfm.main(
        [
            "--dataset_name",
            str(parquet_dataset),
            "--image_column",
            "img",
            "--label_column",
            "category",
            "--resolution",
            "16",
            "--output_dir",
            str(run),
            "--max_train_steps",
            "1",
            "--train_batch_size",
            "2",
            "--base_channels",
            "8",
            "--num_sample_images",
            "3",
            "--num_inference_steps",
            "1",
            "--fid_num_samples",
            "4",
            "--fid_reference_samples",
            "6",
            "--lr_warmup_steps",
            "0",
        ]
    )
    assert (run / "diffusion_pytorch_model.safetensors").is_file()
    fid = json.loads((run / "fid.json").read_text())
    assert fid["num_samples"] == 4 and fid["reference_samples"] == 6 and fid["fid"] > 0
    # The logged FID is the EMA model's: recomputed from the saved EMA weights it matches, from the raw ones not.
    from safetensors.torch import load_file

    from modules.artifacts.model_folder import load_model
    from modules.evaluation.fid import compute_fid
    from modules.objectives.samplers import generate_images

    model, objective, record = load_model(run)
    config = json.loads((run / "run_config.json").read_text())["config"]
    assert config["class_conditional"] is True  # auto, decided from the labels --label_column names
    key = f"{record['dataset_key']}-first6"
    no_images = lambda: pytest.fail("the reference statistics should be cached")  # noqa: E731

    def fid_of(m):
        images = generate_images(m, objective, 4, config["seed"] + 1, (3, 16, 16), class_labels=[0, 1, 2, 0])
        return compute_fid(images, key, no_images)

    assert abs(fid_of(model) - fid["fid"]) < 1e-6 * fid["fid"]
    raw = load_file(str(run / "checkpoints" / "checkpoint-1" / "model.safetensors"))
    assert any(not torch.equal(raw[k], v) for k, v in model.state_dict().items())
    model.load_state_dict(raw)
    assert abs(fid_of(model) - fid["fid"]) > 1e-3


@pytest.mark.parametrize(
    "flags,needles",
    [
        (["--resolution", "30"], ["--resolution 30", "divisible by", "= 4"]),
        (["--model", "dit_tiny", "--patch_size", "4", "--resolution", "34"], ["--resolution 34", "--patch_size 4"]),
        (["--model", "unet_xxl"], ["unknown --model 'unet_xxl'", "unet_s"]),
        (["--learning_rate", "-0.0001"], ["--learning_rate must be positive, got -0.0001"]),
        (["--guidance_scale", "-1"], ["--guidance_scale must be >= 0"]),
        (["--cond_drop_prob", "1.5"], ["--cond_drop_prob must be in [0, 1]"]),
        (["--learning_rat", "1e-4"], ["unknown key 'learning_rat'", "did you mean 'learning_rate'"]),
        (["--dataset_split", "validation"], ["fashion_mnist has splits 'train' and 'test'"]),
        (["--train_batch_size", "128"], ["64 training images are fewer than one batch"]),
        (["--fid_num_samples", "8", "--fid_reference_samples", "100"], ["--fid_reference_samples 100 is more than"]),
        (["--eval_metrics", "fid,is"], ["--eval_metrics: unknown is"]),
        (["--guidance_interval", "0.8,0.2"], ["--guidance_interval: expected 0 <= LO < HI <= 1", "'0.8,0.2'"]),
        (["--ema_phema_stds", "0.05", "--ema_snapshot_steps", "2"], ["two or more distinct --ema_phema_stds"]),
        (["--ema_phema_stds", "0.05,0.1"], ["--ema_snapshot_steps > 0"]),
        (
            ["--ema_phema_stds", "0.05,0.3", "--ema_snapshot_steps", "2"],
            ["--ema_phema_stds '0.05,0.3'", "(0, 0.2887)"],
        ),
        (["--sampler", "meanflow"], ["--sampler 'meanflow': this flow model", "trained with --objective meanflow"]),
        (["--objective", "meanflow", "--meanflow_ratio", "1.5"], ["--meanflow_ratio must be in [0, 1], got 1.5"]),
        (["--objective", "meanflow", "--shared_noise"], ["--objective meanflow does not combine with --shared_noise"]),
        (
            ["--objective", "meanflow", "--meanflow_guidance_scale", "2", "--class_conditional", "false"],
            ["--meanflow_guidance_scale 2.0 guides toward class labels, but this model is unconditional"],
        ),
    ],
)
def test_bad_flags(capsys, out, flags, needles):
    fails(capsys, [*TINY, "--output_dir", str(out), *flags], *needles)


def test_ddpm_script_checks_too(capsys, out):
    fails(capsys, [*TINY, "--output_dir", str(out), "--resolution", "30"], "must be divisible", main=train_ddpm.main)


def test_unknown_recipe_key(capsys, out, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("learning_rate: 1.0e-4\nnum_train_epoch: 3\n")
    fails(capsys, ["--config", str(recipe), "--output_dir", str(out)], str(recipe), "unknown key 'num_train_epoch'")


def test_recipe_values_apply_and_flags_override(tmp_path):
    from modules.config import DataArguments, FlowArguments, ModelArguments, TrainingArguments, parse_args

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("learning_rate: 0.002\nresolution: 16\nsampler: heun\n")
    types = (DataArguments, ModelArguments, TrainingArguments, FlowArguments)
    data, _, train, flow = parse_args(types, ["--config", str(recipe), "--resolution", "24"], {"learning_rate": 1})
    assert (train.learning_rate, data.resolution, flow.sampler) == (0.002, 24, "heun")


def test_unreadable_image_is_named(capsys, out, tmp_path):
    folder = tmp_path / "images"
    for cls in ("cats", "dogs"):
        (folder / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (40, 36), (i * 50, 90, 10)).save(folder / cls / f"{i}.png")
    (folder / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    fails(
        capsys,
        ["--train_data_dir", str(folder), "--output_dir", str(out)],
        "cannot read image",
        str(folder / "dogs" / "broken.png"),
    )


def test_resume_from_a_different_model_names_the_keys(capsys, out, tiny_cfm_run, tmp_path):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_cfm_run / "checkpoints" / "checkpoint-3", checkpoint)
    fails(
        capsys,
        [*TINY, "--base_channels", "16", "--output_dir", str(out), "--resume_from_checkpoint", str(checkpoint)],
        "different model",
        "base_channels: checkpoint 8 vs now 16",
    )


def test_meanflow_under_sharded_weights_is_refused_at_setup(capsys, out, monkeypatch):
    """Once Accelerate has started, before the run writes anything: as under accelerate_configs/fsdp.yaml (its JVP
    runs the network apart from the other processes; DeepSpeed ZeRO-3 is refused alike, ZeRO-2 trains)."""
    from modules.training import setup

    monkeypatch.setattr(setup, "weight_sharding", lambda accelerator: "FSDP")
    fails(capsys, [*TINY, "--output_dir", str(out), "--objective", "meanflow"], "meanflow does not train under FSDP")


def test_meanflow_from_a_diffusers_network_is_refused(capsys, out, ddpm_pipeline):
    fails(
        capsys,
        [*TINY, "--output_dir", str(out), "--objective", "meanflow", "--init_from", str(ddpm_pipeline)],
        f"--init_from '{ddpm_pipeline}' is a diffusers network, which takes no start time r",
    )


def test_sample_py_refuses_the_meanflow_sampler_for_a_flow_model(capsys, tiny_cfm_run, tmp_path):
    import sample

    argv = ["--model", str(tiny_cfm_run), "--sampler", "meanflow", "--output", str(tmp_path / "grid.png")]
    fails(capsys, argv, "--sampler 'meanflow': this flow model samples with euler", main=sample.main)
    assert not (tmp_path / "grid.png").exists()


def test_sample_py_refuses_what_guidance_and_post_hoc_ema_cannot_use(capsys, tiny_cfm_run, tmp_path):
    """A guide of another resolution (this run's network at 8 px), a post-hoc EMA of a
    run without snapshots, and bad widths and intervals: one line each, and nothing written."""
    import sample
    from modules.artifacts.model_folder import load_model, save_model
    from modules.networks.unet import UNetModel

    model, objective, record = load_model(tiny_cfm_run)
    small = UNetModel.from_config({**model.config, "sample_size": 8})
    save_model(small, objective, tmp_path / "small", {k: record[k] for k in ("class_names",)})
    save_model(model, objective, tmp_path / "plain", {k: record[k] for k in ("class_names",)})
    grid = tmp_path / "grid.png"
    argv = ["--model", str(tiny_cfm_run), "--output", str(grid), "--num_images", "2"]
    needles = ["--guide_model", "cannot guide this model", "sample_size: 8 vs 32"]
    fails(capsys, [*argv, "--guide_model", str(tmp_path / "small")], *needles, main=sample.main)
    fails(capsys, [*argv, "--guidance_interval", "0.5"], "--guidance_interval: expected two times", main=sample.main)
    fails(capsys, [*argv, "--ema_std", "0.4"], "--ema_std '0.4'", "must be in (0, 0.2887)", main=sample.main)
    fails(capsys, [*argv, "--ema_sweep", "0.05,abc"], "--ema_sweep: expected comma-separated", main=sample.main)
    plain = ["--model", str(tmp_path / "plain"), "--output", str(grid), "--ema_std", "0.1"]
    fails(capsys, plain, "holds no post-hoc EMA snapshots", "--ema_phema_stds", main=sample.main)
    pairs = [*argv, "--guide_model", str(tiny_cfm_run), "--output_pairs", str(tmp_path / "pairs")]
    fails(capsys, pairs, "--output_pairs writes pairs, not images: drop --guide_model", main=sample.main)
    assert not grid.exists() and not (tmp_path / "pairs").exists()


def test_resume_from_a_missing_checkpoint(capsys, out, tmp_path):
    fails(
        capsys,
        [*TINY, "--output_dir", str(out), "--resume_from_checkpoint", str(tmp_path / "nope")],
        "is not a complete checkpoint",
    )


def test_report_to_a_tracker_that_is_not_installed(capsys, out, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else find_spec(name, *a)
    )
    fails(
        capsys,
        [*TINY, "--output_dir", str(out), "--report_to", "mlflow"],
        "--report_to mlflow: mlflow is not installed; pip install mlflow-skinny",
    )


def test_unreadable_fid_weights_file(capsys, out, tmp_path):
    weights = tmp_path / "inception.pth"
    weights.write_text("not weights")
    fails(
        capsys,
        [*TINY, "--output_dir", str(out), "--fid_num_samples", "4", "--fid_weights", str(weights)],
        "--fid_weights",
        "inception.pth': not a readable tensor file",
    )


def test_empty_held_out_split_warns_and_training_goes_on(parquet_dataset, tmp_path):
    """A dataset whose test split is empty: a warning, no validation loss, the run completes."""
    root = tmp_path / "with_empty_test"
    shutil.copytree(parquet_dataset, root)
    empty = datasets.Dataset.from_dict(
        {"img": [], "category": []},
        features=datasets.Features({"img": datasets.Image(), "category": datasets.Value("int64")}),
    )
    empty.to_parquet(str(root / "test.parquet"))
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"held-out data .*\[test\] is empty: no validation loss"):
        train_cfm.main(
            [
                "--dataset_name",
                str(root),
                "--image_column",
                "img",
                "--label_column",
                "category",
                "--resolution",
                "16",
                "--output_dir",
                str(run),
                "--max_train_steps",
                "1",
                "--train_batch_size",
                "2",
                "--base_channels",
                "8",
                "--num_sample_images",
                "3",
                "--num_inference_steps",
                "1",
                "--fid_num_samples",
                "0",
                "--lr_warmup_steps",
                "0",
                "--validation_steps",
                "1",
            ]
        )
    assert (run / "diffusion_pytorch_model.safetensors").is_file()
    assert not any("val_loss" in line for line in (run / "metrics.jsonl").read_text().splitlines())


def test_image_folder_has_no_named_splits(capsys, out, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    argv = ["--train_data_dir", str(folder), "--validation_split", "test", "--output_dir", str(out)]
    fails(capsys, [*argv, "--class_conditional", "false"], "--validation_split 'test': an image folder has no splits")


# The data half of the catalogue: corrupt files, odd image modes, small images, offline Hub ids, captions.


def _truncated_jpeg(path):
    """A JPEG cut in half: `Image.verify` passes it, decoding fails."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue()[: buffer.tell() // 2])


def _png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _parquet(root, **columns):
    """A local `datasets` dataset (train.parquet under `root`); 'img' holds raw image bytes, decoded as images."""
    root.mkdir(parents=True, exist_ok=True)
    rows = {"img": [{"bytes": b, "path": None} for b in columns.pop("img")], **columns}
    datasets.Dataset.from_dict(rows).cast_column("img", datasets.Image()).to_parquet(str(root / "train.parquet"))
    return root


@pytest.fixture(scope="module")
def corrupt_parquet(tmp_path_factory):
    """Four rows, labels 0..3; row 2's image bytes are garbage."""
    images = [_png_bytes(Image.new("RGB", (8, 8), (60 * i, 0, 0))) for i in range(4)]
    images[2] = b"these bytes are no image"
    return _parquet(tmp_path_factory.mktemp("corrupt") / "ds", img=images, label=[0, 1, 2, 3])


def _rgb_folder(root, n=4):
    for i in range(n):
        (root / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (50 * i, 90, 10)).save(root / "ab"[i % 2] / f"{i}.png")
    return root


def test_truncated_image_in_a_folder_is_named_with_the_way_out(capsys, out, tmp_path):
    folder = _rgb_folder(tmp_path / "images")
    _truncated_jpeg(folder / "b" / "cut.jpg")
    fails(
        capsys,
        ["--train_data_dir", str(folder), "--output_dir", str(out)],
        f"cannot read image {folder / 'b' / 'cut.jpg'}: OSError: image file is truncated",
        "pass --skip_corrupt_images",
    )
    with pytest.warns(
        UserWarning,
        match=re.escape(f"left out 1 of 5 images that cannot be read, the first {folder / 'b' / 'cut.jpg'}"),
    ):
        load_train_data(DataArguments(train_data_dir=str(folder), resolution=8, skip_corrupt_images=True))


def test_an_image_that_fails_only_when_decoded_stops_training_naming_it(capsys, tmp_path):
    """A PNG whose chunks check out but whose pixels do not decompress passes the start-up check; decoding it in
    training stops the run with its name and the flag that finds such images up front (a full decode at start)."""
    folder = _rgb_folder(tmp_path / "images")
    png = bytearray((folder / "b" / "1.png").read_bytes())
    at = png.find(b"IDAT")
    size = int.from_bytes(png[at - 4 : at], "big")
    pixels = bytes(png[at + 4 : at + 4 + size])
    pixels = pixels[:2] + bytes(len(pixels) - 2)  # zlib header kept, deflate stream zeroed
    png[at + 4 : at + 8 + size] = pixels + zlib.crc32(b"IDAT" + pixels).to_bytes(4, "big")
    (folder / "b" / "cut.png").write_bytes(png)
    run = tmp_path / "run"
    fails(
        capsys,
        [
            "--train_data_dir",
            str(folder),
            "--output_dir",
            str(run),
            "--max_train_steps",
            "2",
            "--train_batch_size",
            "5",
            "--base_channels",
            "8",
            "--num_sample_images",
            "0",
            "--fid_num_samples",
            "0",
        ],
        f"cannot read image {folder / 'b' / 'cut.png'}",
        "pass --skip_corrupt_images",
    )
    assert not (run / "checkpoints").exists() and not (run / "config.json").exists()


def test_corrupt_image_in_a_dataset_names_row_and_column(capsys, out, corrupt_parquet):
    fails(
        capsys,
        ["--dataset_name", str(corrupt_parquet), "--image_column", "img", "--output_dir", str(out)],
        f"cannot read image {corrupt_parquet}[train][2].img: not an image format PIL recognises",
        "pass --skip_corrupt_images",
    )


def test_skip_corrupt_images_leaves_dataset_rows_out(corrupt_parquet, tmp_path):
    args = DataArguments(dataset_name=str(corrupt_parquet), image_column="img", resolution=8, skip_corrupt_images=True)
    with pytest.warns(
        UserWarning,
        match=re.escape(f"left out 1 of 4 images that cannot be read, the first {corrupt_parquet}[train][2].img"),
    ):
        data = load_train_data(args)
    assert len(data.dataset) == 3 and list(data.dataset.labels) == [0, 1, 3]
    red = [data.dataset[i]["pixel_values"][0, 0, 0].item() for i in range(3)]
    assert red == pytest.approx([-1.0, 60 / 127.5 - 1, 180 / 127.5 - 1])  # rows 0, 1, 3, with their labels
    assert data.dataset.names(2) == f"{corrupt_parquet}[train][3].img"
    only = _parquet(tmp_path / "only_garbage", img=[b"garbage", b"more garbage"], label=[0, 1])
    with pytest.raises(UserError, match=r"none of the 2 images can be read, the first .*\[train\]\[0\]\.img"):
        load_train_data(dataclasses.replace(args, dataset_name=str(only)))


def test_skip_corrupt_images_trains_on_a_folder_of_mixed_and_small_images(tmp_path, capsys):
    """Every kind of bad-but-usable folder at once: a truncated file (left out), grey, transparent, CMYK and 16-bit
    images (converted to RGB), and one smaller than --resolution (upscaled). Training goes through."""
    folder = tmp_path / "mixed"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    Image.new("L", (8, 8), 90).save(folder / "a" / "grey.png")
    Image.new("RGBA", (8, 8), (200, 10, 10, 0)).save(folder / "a" / "clear.png")
    Image.new("CMYK", (8, 8), (10, 20, 30, 40)).save(folder / "b" / "cmyk.jpg")
    Image.fromarray(np.full((6, 6), 40000, np.uint16)).save(folder / "b" / "deep.tif")
    _truncated_jpeg(folder / "b" / "cut.jpg")
    run = tmp_path / "run"
    with pytest.warns(UserWarning) as record:
        train_cfm.main(
            [
                "--train_data_dir",
                str(folder),
                "--skip_corrupt_images",
                "--resolution",
                "8",
                "--output_dir",
                str(run),
                "--max_train_steps",
                "1",
                "--train_batch_size",
                "2",
                "--base_channels",
                "8",
                "--num_sample_images",
                "0",
                "--fid_num_samples",
                "0",
                "--lr_warmup_steps",
                "0",
            ]
        )
    messages = [str(w.message) for w in record]
    assert f"left out 1 of 5 images that cannot be read, the first {folder / 'b' / 'cut.jpg'}" in " ".join(messages)
    small = [m for m in messages if "smaller than --resolution" in m]
    assert small == [
        f"1 of 4 images are smaller than --resolution 8 (the first, {folder / 'b' / 'deep.tif'}, is "
        "6x6): they are upscaled"
    ]
    assert (run / "diffusion_pytorch_model.safetensors").is_file()
    assert "4 images" in capsys.readouterr().out


def _white_under(image):
    """PIL's own compositing of `image` over opaque white."""
    return Image.alpha_composite(Image.new("RGBA", image.size, (255,) * 4), image.convert("RGBA")).convert("RGB")


def test_mixed_modes_convert_like_pil(tmp_path):
    """Each mode becomes RGB (or L) as PIL converts it, except: transparency is composited onto white, and 16-bit
    values keep their high byte (PIL's convert clips them at 255)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    alpha[0, 0] = 0
    deep = rng.integers(0, 65536, (8, 8), dtype=np.uint16)
    high_byte = Image.fromarray((deep >> 8).astype(np.uint8))
    folder = tmp_path / "modes"
    folder.mkdir()
    cases = {
        "L.png": (Image.fromarray(rgb[..., 0]), lambda im: im.convert("RGB")),
        "RGB.jpg": (Image.fromarray(rgb), lambda im: im),
        "RGBA.png": (Image.fromarray(np.dstack([rgb, alpha])), _white_under),
        "LA.png": (Image.fromarray(np.dstack([rgb[..., 0], alpha])), _white_under),
        "P.png": (Image.fromarray(rgb).quantize(16), lambda im: im.convert("RGB")),
        "P_clear.png": (Image.fromarray(rgb).quantize(16), _white_under),  # colour 0 transparent (tRNS)
        "CMYK.jpg": (Image.fromarray(rgb).convert("CMYK"), lambda im: im.convert("RGB")),
        "I16.png": (Image.fromarray(deep), lambda im: high_byte.convert("RGB")),
        "I16.tif": (Image.fromarray(deep), lambda im: high_byte.convert("RGB")),
    }
    for file, (image, _) in cases.items():
        image.save(folder / file, **({"transparency": 0} if file == "P_clear.png" else {}))
    modes = {file: Image.open(folder / file).mode for file in cases}
    assert modes["P.png"] == "P" and modes["CMYK.jpg"] == "CMYK" and modes["I16.png"] == modes["I16.tif"] == "I;16"
    data = load_train_data(DataArguments(train_data_dir=str(folder), resolution=8))
    assert data.num_channels == 3  # not all grey
    got = dict(
        zip(
            [Path(data.dataset.names(i)).name for i in range(len(cases))],
            data.dataset.uint8_images(len(cases)),
            strict=True,
        )
    )
    for file, (_, expected) in cases.items():
        want = np.asarray(expected(Image.open(folder / file))).transpose(2, 0, 1)  # (C, H, W)
        assert np.array_equal(got[file].numpy(), want), file
    assert got["RGBA.png"][:, 0, 0].tolist() == [255, 255, 255]  # fully transparent: white
    grey = load_train_data(DataArguments(train_data_dir=str(folder), resolution=8, num_channels=1))
    got = {Path(grey.dataset.names(i)).name: grey.dataset.uint8_images(len(cases))[i, 0] for i in range(len(cases))}
    assert np.array_equal(got["RGB.jpg"].numpy(), np.asarray(Image.open(folder / "RGB.jpg").convert("L")))
    assert np.array_equal(got["I16.tif"].numpy(), np.asarray(high_byte))
    for file in ("RGB.jpg", "RGBA.png", "P.png", "P_clear.png", "CMYK.jpg"):
        (folder / file).unlink()
    assert load_train_data(DataArguments(train_data_dir=str(folder), resolution=8)).num_channels == 1  # all grey


def test_small_images_are_upscaled_with_one_warning(tmp_path):
    folder = tmp_path / "small"
    folder.mkdir()
    for i in range(3):
        Image.new("L", (6 + i, 8), 40 * i).save(folder / f"{i}.png")
    Image.new("L", (16, 20)).save(folder / "big.png")
    with pytest.warns(UserWarning) as record:
        data = load_train_data(DataArguments(train_data_dir=str(folder), resolution=16))
    small = [str(w.message) for w in record if "smaller than" in str(w.message)]
    assert small == [
        f"3 of 4 images are smaller than --resolution 16 (the first, {folder / '0.png'}, is 6x8): they are upscaled"
    ]
    assert data.dataset[0]["pixel_values"].shape == (1, 16, 16)


def test_hub_id_while_offline_says_how_to_get_it(capsys, out):
    fails(
        capsys,
        ["--dataset_name", "someone/some_images", "--output_dir", str(out)],
        "unknown dataset 'someone/some_images'",
        "HF_HUB_OFFLINE=1",
        "unset HF_HUB_OFFLINE to download it, or give a local path",
        "hf download someone/some_images --repo-type dataset --local-dir DIR",
    )


@pytest.fixture(scope="module")
def captions_parquet(tmp_path_factory):
    """Four images whose captions are: text, empty, text, blank."""
    images = [_png_bytes(Image.new("L", (8, 8), 60 * i)) for i in range(4)]
    return _parquet(tmp_path_factory.mktemp("captions") / "ds", img=images, caption=["a cat", "", "a dog", " "])


def test_misnamed_caption_column_suggests_the_close_one(capsys, out, captions_parquet):
    argv = ["--dataset_name", str(captions_parquet), "--image_column", "img", "--class_conditional", "false"]
    fails(
        capsys,
        [*argv, "--caption_column", "captions", "--output_dir", str(out)],
        "no caption column 'captions' (columns: img, caption); did you mean 'caption'?",
    )


def test_no_caption_column_for_a_text_model(capsys, out, captions_parquet):
    argv = ["--dataset_name", str(captions_parquet), "--image_column", "img", "--caption_column", "none"]
    argv += ["--text_encoder", "minilm", "--class_conditional", "false", "--resolution", "8"]
    fails(capsys, [*argv, "--output_dir", str(out)], "--text_encoder needs captions")


def test_empty_captions_are_counted_in_one_warning(captions_parquet):
    with pytest.warns(
        UserWarning,
        match=re.escape(
            f"caption column 'caption': 2 of 4 captions are empty (the first: {captions_parquet}[train][1].caption)"
        ),
    ):
        data = load_train_data(DataArguments(dataset_name=str(captions_parquet), image_column="img", resolution=8))
    assert list(data.captions) == ["a cat", "", "a dog", " "]


def test_caption_that_is_not_a_string_is_named(capsys, out, tmp_path):
    folder = tmp_path / "captioned"
    folder.mkdir()
    rows = [{"file_name": f"{i}.png", "caption": c} for i, c in enumerate(["a cat", None, "a dog"])]
    for row in rows:
        Image.new("RGB", (8, 8)).save(folder / row["file_name"])
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    argv = ["--train_data_dir", str(folder), "--class_conditional", "false", "--resolution", "8"]
    fails(
        capsys,
        [*argv, "--output_dir", str(out)],
        f"caption column 'caption': {folder / 'metadata.jsonl'} (1.png) holds None (NoneType), not a string",
        "--caption_column none",
    )
    listed = _parquet(tmp_path / "listed", img=[_png_bytes(Image.new("L", (8, 8)))] * 2, text=[["a", "b"], ["c"]])
    with pytest.raises(
        UserError,
        match=re.escape(f"caption column 'text': {listed}[train][0].text holds ['a', 'b'] (list), not a string"),
    ):
        load_train_data(DataArguments(dataset_name=str(listed), image_column="img", resolution=8))
