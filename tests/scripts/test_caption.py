"""caption.py end to end on tiny BLIP-2 and PaliGemma models built from config: the captions are the model's own
greedy ones, the output keeps the source's rows and columns and reads back as training data, the same for any
number of processes and after a resume; templates name the class; bad captioners and templates are refused by name."""

import json
import shutil

import datasets
import numpy as np
import pytest
import torch
from helpers import CAPTION_FASHION, fashion_images, own_captions, table, tiny_tokenizer
from helpers import fails as script_fails
from PIL import Image

import caption
from modules.config import DataArguments
from modules.data.captioning import class_phrase
from modules.data.images import FASHION_MNIST_CLASSES
from modules.data.sources import load_train_data

FASHION = CAPTION_FASHION


@pytest.fixture(scope="module")
def tiny_paligemma(tmp_path_factory):
    """A random PaliGemma 2 (SigLIP on 32x32 images, 16 image tokens, Gemma 2 with one layer), processor included.
    The location and segmentation tokens its processor adds get zero embeddings, so that captions are words."""
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessor,
    )

    path = tmp_path_factory.mktemp("paligemma") / "tiny"
    image_processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    image_processor.image_seq_length = 16  # (32 / 8) ** 2 patches
    tokenizer = tiny_tokenizer("<pad>", "<eos>", "<bos>")
    num_words = len(tokenizer)
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    vocab_size = len(processor.tokenizer)  # with the location and segmentation tokens it adds
    config = PaliGemmaConfig(
        vision_config=dict(
            model_type="siglip_vision_model",
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=4,
            vision_use_head=False,
        ),
        text_config=dict(
            model_type="gemma2",
            vocab_size=vocab_size,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=64,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        ),
        image_token_index=processor.image_token_id,
        projection_dim=16,
        hidden_size=16,
        vocab_size=vocab_size,
    )
    torch.manual_seed(0)
    model = PaliGemmaForConditionalGeneration(config)
    with torch.no_grad():
        model.get_input_embeddings().weight[num_words:] = 0
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def run(*args):
    return caption.main([str(a) for a in args])


def fails(capsys, argv, *needles):
    """caption.main must exit 2 with one 'error:' line holding every needle."""
    return script_fails(capsys, [str(a) for a in argv], *needles, main=caption.main)


@pytest.fixture(scope="module")
def blip2_fashion(tiny_blip2, tmp_path_factory):
    out = tmp_path_factory.mktemp("captions") / "blip2"
    run("--captioner", "blip2", "--captioner_id", tiny_blip2, "--output_dir", out, *FASHION)
    return out


def check_fashion_output(out, expected_captions):
    rows = table(out)
    assert list(rows) == ["image", "label", "caption"]
    images, labels = fashion_images(16)
    assert rows["caption"] == expected_captions and rows["label"] == labels
    assert len(set(rows["caption"])) > 1  # the captions depend on the image
    # Read back as training data: the same 28x28 images, labels and the captions.
    back = load_train_data(DataArguments(dataset_name=str(out), caption_column="caption", resolution=28))
    source = load_train_data(DataArguments(max_train_samples=16, resolution=28))
    got, want = (d.dataset.uint8_images(16) for d in (back, source))
    assert back.num_channels == 1 and torch.equal(got, want)
    assert back.class_names == FASHION_MNIST_CLASSES and list(back.captions) == expected_captions
    hub_style = datasets.load_dataset(str(out), split="train")
    assert len(hub_style) == 16 and isinstance(hub_style.features["image"], datasets.Image)
    return json.loads((out / "captions.json").read_text())


def test_blip2_captions_are_the_models_own(blip2_fashion, tiny_blip2):
    images, _ = fashion_images(16)
    meta = check_fashion_output(blip2_fashion, own_captions(tiny_blip2, images))
    assert meta["captioner"]["model"] == str(tiny_blip2) and meta["captioner"]["prompt"] is None
    assert (meta["num_images"], meta["columns"]) == (16, ["image", "label", "caption"])
    card = (blip2_fashion / "README.md").read_text()
    assert card.startswith("---\n") and "python caption.py --captioner blip2" in card and "blip-2 model" in card


def test_paligemma_captions_without_its_prompt(tiny_paligemma, tmp_path):
    out = tmp_path / "paligemma"
    run("--captioner", "paligemma", "--captioner_id", tiny_paligemma, "--output_dir", out, *FASHION)
    images, _ = fashion_images(16)
    meta = check_fashion_output(out, own_captions(tiny_paligemma, images, text="<image>caption en"))
    assert meta["captioner"]["prompt"] == "caption en"
    assert not any(c.startswith("caption en") for c in table(out)["caption"])


def test_resume_skips_finished_shards_and_equals_an_uninterrupted_run(blip2_fashion, tiny_blip2, tmp_path, capsys):
    out = tmp_path / "killed"
    shutil.copytree(blip2_fashion, out)
    # As if killed while writing the last shard: its partial file is there, captions.json is not.
    last = out / "data" / "train-00001-of-00002.parquet"
    last.rename(last.with_name(f".{last.name}.partial"))
    (out / "captions.json").unlink()
    first = out / "data" / "train-00000-of-00002.parquet"
    before = first.stat().st_mtime_ns
    capsys.readouterr()
    run("--captioner", "blip2", "--captioner_id", tiny_blip2, "--output_dir", out, *FASHION)
    assert "resuming: 1 of 2 shards already complete" in capsys.readouterr().out
    assert first.stat().st_mtime_ns == before  # not redone
    assert sorted(p.name for p in (out / "data").iterdir()) == [first.name, last.name]
    assert table(out) == table(blip2_fashion)
    # Other arguments are refused by name, before anything is touched.
    fails(
        capsys,
        ["--captioner", "blip2", "--captioner_id", tiny_blip2, "--output_dir", out, *FASHION, "--max_new_tokens", 5],
        "other arguments",
        "max_new_tokens",
    )
    assert (out / "captions.json").is_file()


def test_templates_name_the_class_and_vary_by_seed(tmp_path, capsys):
    assert class_phrase("T-shirt/top") == "t-shirt or top" and class_phrase("ankle boot") == "ankle boot"
    argv = [
        "--captioner",
        "template",
        "--dataset_name",
        "fashion_mnist",
        "--max_train_samples",
        40,
        "--template",
        "a photo of a {label}",
        "--template",
        "a {label}|{label}, studio shot",
    ]
    run(*argv, "--output_dir", tmp_path / "a")
    rows = table(tmp_path / "a")
    variants = ["a photo of a {label}", "a {label}", "{label}, studio shot"]
    used = set()
    for text, label in zip(rows["caption"], rows["label"], strict=True):
        phrase = class_phrase(FASHION_MNIST_CLASSES[label])
        used |= {v for v in variants if v.format(label=phrase) == text}
    assert used == set(variants)  # every caption is a variant with its class, and all three occur
    assert "t-shirt or top" in " ".join(rows["caption"])
    run(*argv, "--output_dir", tmp_path / "b")
    assert table(tmp_path / "b") == rows  # deterministic
    run(*argv, "--seed", 1, "--output_dir", tmp_path / "c")
    assert table(tmp_path / "c")["caption"] != rows["caption"]

    out = tmp_path / "bad"
    fails(capsys, [*argv, "--label_column", "none", "--output_dir", out], "no labels")
    fails(
        capsys,
        ["--captioner", "template", "--template", "a {labels}", "--output_dir", out],
        "unknown placeholder {labels}",
        "'a {labels}'",
    )
    fails(capsys, ["--captioner", "template", "--template", "a {} thing", "--output_dir", out], "placeholder {}")
    fails(capsys, ["--captioner", "template", "--template", "a {label", "--output_dir", out], "'a {label'")
    fails(capsys, ["--captioner", "template", "--output_dir", out], "needs --template")
    fails(capsys, [*argv, "--prompt", "a photo", "--output_dir", out], "--prompt is for model captioners")
    fails(capsys, ["--template", "a {label}", "--output_dir", out], "--template is for --captioner template")
    assert not out.exists()


def test_empty_captions_are_counted(tiny_blip2, tmp_path, capsys, monkeypatch):
    from modules.data.captioning import ModelCaptioner

    model_call = ModelCaptioner.__call__
    monkeypatch.setattr(ModelCaptioner, "__call__", lambda self, inputs: ["", *model_call(self, inputs)[1:]])
    out = tmp_path / "empty"
    run("--captioner", tiny_blip2, "--output_dir", out, *FASHION)
    assert "warning: the captioner gave 4 empty captions (of 16)" in capsys.readouterr().err
    assert json.loads((out / "captions.json").read_text())["num_empty_captions"] == 4
    assert "4 captions are empty" in (out / "README.md").read_text()


def test_bad_captioners_are_named(tiny_blip2, tiny_paligemma, tmp_path, capsys):
    from diffusers import UNet2DModel
    from transformers import GPT2Config

    unet, gpt2, out = tmp_path / "unet", tmp_path / "gpt2", tmp_path / "out"
    blocks = dict(down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1, **blocks).save_config(
        unet
    )
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(gpt2)
    base = [*FASHION, "--output_dir", out]
    fails(capsys, ["--captioner", unet, *base], f"'{unet}'", "diffusers UNet2DModel, not an image-to-text model")
    fails(capsys, ["--captioner", gpt2, *base], f"'{gpt2}'", "not an image-to-text model", "model_type 'gpt2'")
    fails(capsys, ["--captioner", "blip2", "--captioner_id", tiny_paligemma, *base], "is a paligemma model")
    fails(capsys, ["--captioner", "nobody/no-such-captioner", *base], "'nobody/no-such-captioner'")
    fails(capsys, ["--captioner", tiny_blip2, "--template", "a", *base], "--template is for --captioner template")
    fails(capsys, ["--captioner", tiny_blip2, *base, "--batch_size", 0], "--batch_size must be positive")
    fails(capsys, ["--captioner", tiny_blip2, "--captioner_id", tiny_blip2, *base], "--captioner_id is for")
    assert not out.exists()


def test_folders_and_datasets_keep_their_columns(tiny_blip2, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for i in range(5):
        Image.new("RGB", (40 + i, 30), (50 * i, 90, 200 - 30 * i)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "caption": f"swatch {i}", "source": "studio" if i % 2 else None})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    out = tmp_path / "folder_out"
    # Offline, the push fails with a warning; the dataset is complete anyway and the token is nowhere.
    run(
        "--captioner",
        tiny_blip2,
        "--train_data_dir",
        folder,
        "--output_dir",
        out,
        "--shard_size",
        2,
        "--push_to_hub",
        "--hub_dataset_id",
        "someone/captions",
        "--hub_token",
        "hf_secret123",
    )
    err = capsys.readouterr().err
    assert "warning: could not push to the Hub" in err and "hf upload someone/captions" in err
    assert not any("hf_secret123" in p.read_text() for p in out.iterdir() if p.is_file()) and "hf_secret123" not in err
    got = table(out)
    assert list(got) == ["image", "file_name", "original_caption", "source", "caption"]
    assert got["file_name"] == [f"{i}.png" for i in range(5)] and got["original_caption"][1] == "swatch 1"
    assert got["caption"] == own_captions(tiny_blip2, [Image.open(folder / f"{i}.png") for i in range(5)])
    assert [b["bytes"] for b in got["image"]] == [(folder / f"{i}.png").read_bytes() for i in range(5)]
    back = load_train_data(DataArguments(dataset_name=str(out), caption_column="caption"))
    assert list(back.captions) == got["caption"] and back.num_classes == 0

    # A `datasets` dataset keeps every column as it is; a template reads its ClassLabel names.
    hub = tmp_path / "hub"
    hub.mkdir()
    features = datasets.Features(
        {
            "img": datasets.Image(),
            "text": datasets.Value("string"),
            "kind": datasets.ClassLabel(names=["Ankle_Boot", "Bag"]),
        }
    )
    ds = datasets.Dataset.from_dict(
        {"img": [Image.new("L", (8, 8), 30 * i) for i in range(4)], "text": list("abcd"), "kind": [0, 1, 1, 0]},
        features=features,
    )
    ds.to_parquet(str(hub / "train.parquet"))
    out = tmp_path / "hub_out"
    run(
        "--captioner",
        "template",
        "--template",
        "{label}",
        "--dataset_name",
        hub,
        "--image_column",
        "img",
        "--label_column",
        "kind",
        "--max_train_samples",
        3,
        "--shard_size",
        2,
        "--output_dir",
        out,
    )
    got = datasets.load_dataset(str(out), split="train")
    assert got.column_names == ["img", "text", "kind", "caption"] and got.features["kind"] == features["kind"]
    assert got["caption"] == ["ankle boot", "bag", "bag"] and got["text"] == list("abc")
    assert [np.asarray(im).tolist() for im in got["img"]] == [np.asarray(im).tolist() for im in ds["img"][:3]]

    # Bad sources: a column that holds no images, an unreadable image.
    datasets.Dataset.from_dict({"image": [1, 2]}).to_parquet(str(tmp_path / "ints.parquet"))
    (tmp_path / "ints").mkdir()
    shutil.move(tmp_path / "ints.parquet", tmp_path / "ints" / "train.parquet")
    bad = tmp_path / "bad"
    fails(
        capsys,
        ["--captioner", tiny_blip2, "--dataset_name", tmp_path / "ints", "--output_dir", bad],
        "column 'image' holds",
        "not images",
    )
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken, ignore=shutil.ignore_patterns("metadata.jsonl"))
    (broken / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    fails(
        capsys,
        ["--captioner", tiny_blip2, "--train_data_dir", broken, "--output_dir", bad],
        "cannot read image",
        str(broken / "3.png"),
    )
    assert not bad.exists()
