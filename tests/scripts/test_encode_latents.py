"""encode_latents.py end to end on a tiny VAE: the stored latents are the VAE's, in image order, the same for any
number of processes and after a resume; bad input is refused by name; captions and flipped latents pass through."""

import json
import shutil
import sys
import zlib

import datasets
import pyarrow.parquet as pq
import pytest
import torch
from helpers import LATENT_FASHION, assert_same_rows, rows
from helpers import fails as script_fails
from PIL import Image

import encode_latents
from modules.config import DataArguments, UserError
from modules.data.latents import denormalize_latents, load_latent_data, sample_latents
from modules.data.sources import load_train_data
from modules.networks.vae import load_vae

FASHION = LATENT_FASHION


def encode(*args):
    return encode_latents.main([str(a) for a in args])


def fails(capsys, argv, *needles):
    """encode_latents.main must exit 2 with one 'error:' line holding every needle."""
    return script_fails(capsys, [str(a) for a in argv], *needles, main=encode_latents.main)


def test_latents_are_the_vaes_in_image_order(encoded, tiny_vae):
    data = load_latent_data(str(encoded))
    assert (len(data.dataset), data.num_channels, data.resolution, data.image_resolution) == (48, 4, 16, 32)
    assert data.num_classes == 10 and data.class_names[9] == "ankle boot" and data.vae["source"] == str(tiny_vae)
    batch = rows(encoded)
    images = load_train_data(DataArguments(max_train_samples=48)).dataset.__getitems__(list(range(48)))
    assert torch.equal(batch["labels"], images["labels"])
    # Oracle: the VAE itself on the same images, rounded to the stored float16.
    mean, std = load_vae(str(tiny_vae)).encode(images["pixel_values"])
    torch.testing.assert_close(batch["latent_mean"], mean.half().float(), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(batch["latent_std"], std.half().float(), rtol=1e-3, atol=1e-4)

    meta = json.loads((encoded / "latents.json").read_text())
    assert (meta["num_images"], meta["latent_shape"], meta["columns"]) == (48, [4, 16, 16], ["mean", "std", "label"])
    assert [(encoded / s).is_file() for s in meta["shards"]] == [True] * 3
    m, s = batch["latent_mean"].double(), batch["latent_std"].double()
    expected_std = (m.var((0, 2, 3), unbiased=False) + s.pow(2).mean((0, 2, 3))).sqrt()  # the variance of z
    torch.testing.assert_close(data.channel_mean.double(), m.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(data.channel_std.double(), expected_std, rtol=1e-5, atol=1e-6)
    # The recorded source arguments find the original images again (e.g. for FID).
    source = load_train_data(DataArguments(**meta["data_args"])).dataset.__getitems__(list(range(48)))
    assert torch.equal(source["pixel_values"], images["pixel_values"])

    # Normalisation: with std = 0, z is the normalised mean, and denormalize_latents inverts it.
    z = sample_latents({**batch, "latent_std": torch.zeros_like(s, dtype=torch.float32)}, torch.Generator(), data)
    torch.testing.assert_close(z.mean((0, 2, 3)), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(denormalize_latents(z, meta), batch["latent_mean"], rtol=1e-5, atol=1e-5)
    decoded = load_vae(str(tiny_vae)).decode(denormalize_latents(z, data))
    assert decoded.shape == (48, 3, 32, 32) and decoded.abs().max() <= 1

    card = (encoded / "README.md").read_text()
    assert card.startswith("---\n") and str(tiny_vae) in card and "python encode_latents.py --vae" in card
    hub_style = datasets.load_dataset(str(encoded), split="train")
    assert len(hub_style) == 48 and hub_style.features["mean"].shape == (4, 16, 16)


def test_latents_too_large_for_memory_are_read_lazily(encoded, monkeypatch):
    in_memory = rows(encoded)
    monkeypatch.setattr("modules.data.latents.MEMORY_FRACTION", 0)
    data = load_latent_data(str(encoded), max_samples=20)
    assert not isinstance(data.dataset.rows, dict) and len(data.dataset) == 20
    batch = data.dataset.__getitems__([19, 0, 7])
    assert_same_rows(batch, {k: v[[19, 0, 7]] for k, v in in_memory.items()})


def test_resume_skips_finished_shards_and_equals_an_uninterrupted_run(encoded, tiny_vae, tmp_path, capsys):
    out = tmp_path / "killed"
    shutil.copytree(encoded, out)
    # As if killed while writing the last shard: its partial file is there, latents.json is not.
    (out / "data" / "train-00002-of-00003.parquet").rename(out / "data" / ".train-00002-of-00003.parquet.partial")
    (out / "latents.json").unlink()
    with pytest.raises(UserError, match=r"is not a complete latent dataset \(no latents.json\).*rerun encode_latents"):
        load_latent_data(str(out))
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "data").glob("train-*.parquet")}
    assert len(finished) == 2

    capsys.readouterr()
    encode("--vae", tiny_vae, "--output_dir", out, *FASHION)
    assert "resuming: 2 of 3 shards already complete" in capsys.readouterr().out
    assert {p: (out / "data" / p).stat().st_mtime_ns for p in finished} == finished  # not rewritten
    assert sorted(p.name for p in (out / "data").iterdir()) == [f"train-0000{k}-of-00003.parquet" for k in range(3)]
    assert_same_rows(rows(out), rows(encoded))


def test_rerun_with_other_arguments_names_the_key(encoded, tiny_vae, tmp_path, capsys):
    out = tmp_path / "other"
    shutil.copytree(encoded, out)
    other_vae = tmp_path / "other_vae"
    shutil.copytree(tiny_vae, other_vae)
    fails(capsys, ["--vae", other_vae, "--output_dir", out, *FASHION], "other arguments", f"vae: '{tiny_vae}' then")
    fails(
        capsys, ["--vae", tiny_vae, "--output_dir", out, *FASHION, "--resolution", 16], "resolution: 32 then, 16 now"
    )
    assert (out / "latents.json").is_file()  # refused before touching anything
    encode("--vae", tiny_vae, "--output_dir", out, *FASHION, "--resolution", 16, "--overwrite")
    assert load_latent_data(str(out)).resolution == 8
    assert len(list((out / "data").iterdir())) == 3


def test_bad_latent_datasets_are_named(encoded, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(encoded, bad)
    shard = bad / "data" / "train-00001-of-00003.parquet"
    table = pq.read_table(shard)
    pq.write_table(table.rename_columns(["means", "std", "label"]), shard)
    with pytest.raises(UserError, match=rf"{shard}: no column 'mean' \(columns: means, std, label\)"):
        load_latent_data(str(bad))
    pq.write_table(table, shard)
    meta = json.loads((bad / "latents.json").read_text())
    (bad / "latents.json").write_text(json.dumps({**meta, "latent_shape": [4, 8, 8]}))
    with pytest.raises(UserError, match=r"latents of shape \(4, 16, 16\), but .* says \(4, 8, 8\)"):
        load_latent_data(str(bad))
    del meta["channel_std"]
    (bad / "latents.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="latents.json: missing keys channel_std"):
        load_latent_data(str(bad))


def _folder(root, n=6, metadata=None):
    root.mkdir()
    for i in range(n):
        Image.new("RGB", (40, 36 + i), (40 * i, 90, 200 - 30 * i)).save(root / f"{i}.png")
    if metadata is not None:
        (root / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in metadata))
    return root


def test_bad_input_is_refused_before_writing(tiny_vae, tmp_path, capsys):
    folder = _folder(tmp_path / "images")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out = tmp_path / "out"
    fails(
        capsys,
        ["--vae", tiny_vae, "--train_data_dir", folder, "--output_dir", out],
        "cannot read image",
        str(folder / "broken.png"),
    )
    assert not out.exists()
    fails(capsys, ["--vae", tiny_vae, "--output_dir", out, "--batch_size", 0], "--batch_size must be positive")
    fails(
        capsys, ["--vae", tiny_vae, "--output_dir", out, "--latent_dataset", "x"], "--latent_dataset is for training"
    )
    fails(capsys, ["--vae", tiny_vae, "--output_dir", out, *FASHION, "--resolution", 31], "not a multiple of 2")
    fails(capsys, ["--vae", tmp_path / "nope", "--output_dir", out, *FASHION], f"VAE '{tmp_path / 'nope'}'")
    assert not out.exists()
    fails(capsys, ["--vae", tiny_vae, "--output_dir", folder, *FASHION], "not written by encode_latents.py")


def test_image_that_fails_to_decode_is_named_and_the_data_stays_incomplete(tiny_vae, tmp_path, capsys):
    """A PNG whose chunks check out (so the up-front verify passes) but whose pixels do not decompress; it is read in
    a DataLoader worker, and the error still comes out as one line."""
    folder = _folder(tmp_path / "images")
    png = bytearray((folder / "3.png").read_bytes())
    at = png.find(b"IDAT")
    size = int.from_bytes(png[at - 4 : at], "big")
    pixels = bytes(png[at + 4 : at + 4 + size])
    pixels = pixels[:2] + bytes(len(pixels) - 2)  # zlib header kept, deflate stream zeroed
    png[at + 4 : at + 8 + size] = pixels + zlib.crc32(b"IDAT" + pixels).to_bytes(4, "big")
    (folder / "3.png").write_bytes(png)
    out = tmp_path / "out"
    argv = ["--vae", tiny_vae, "--train_data_dir", folder, "--output_dir", out, "--dataloader_num_workers", 1]
    fails(capsys, argv, "cannot read image", str(folder / "3.png"))
    assert not (out / "latents.json").exists()


def test_captions_pass_through(tiny_vae, tmp_path, capsys):
    captions = [f"a swatch of colour number {i}" for i in range(6)]
    folder = _folder(
        tmp_path / "captioned", metadata=[{"file_name": f"{i}.png", "caption": c} for i, c in enumerate(captions)]
    )
    with pytest.raises(UserError, match=r"no caption column 'alt_text' \(columns: caption\)"):
        load_train_data(DataArguments(train_data_dir=str(folder), caption_column="alt_text"))
    out = tmp_path / "out"
    # Offline, the push fails with a warning; the dataset is complete anyway and the token is nowhere.
    encode(
        "--vae",
        tiny_vae,
        "--train_data_dir",
        folder,
        "--output_dir",
        out,
        "--shard_size",
        4,
        "--push_to_hub",
        "--hub_dataset_id",
        "someone/latents",
        "--hub_token",
        "hf_secret123",
    )
    err = capsys.readouterr().err
    assert "warning: could not push to the Hub" in err and "hf upload someone/latents" in err
    meta = json.loads((out / "latents.json").read_text())
    assert meta["columns"] == ["mean", "std", "caption"] and meta["num_classes"] == 0
    stored = [c for s in meta["shards"] for c in pq.read_table(out / s, columns=["caption"])["caption"].to_pylist()]
    assert stored == captions
    with pytest.raises(UserError, match="needs labels, but the latent dataset .* has none"):
        load_latent_data(str(out), need_labels=True)
    assert not any("hf_secret123" in p.read_text() for p in out.iterdir() if p.is_file()) and "hf_secret123" not in err
    # Hub-style datasets: a 'text' column is found by default.
    hub = tmp_path / "hub"
    hub.mkdir()
    ds = datasets.Dataset.from_dict({"img": [Image.new("L", (8, 8))] * 2, "text": ["one", "two"]})
    ds.cast_column("img", datasets.Image()).to_parquet(str(hub / "train.parquet"))
    assert list(load_train_data(DataArguments(dataset_name=str(hub), image_column="img")).captions) == ["one", "two"]


def test_random_flip_stores_flipped_latents_that_sample_latents_uses(encoded, tiny_vae, tmp_path):
    out = tmp_path / "flip"
    encode("--vae", tiny_vae, "--output_dir", out, *FASHION, "--max_train_samples", 16, "--random_flip")
    data = load_latent_data(str(out))
    batch = data.dataset.__getitems__(list(range(16)))
    images = load_train_data(DataArguments(max_train_samples=16)).dataset.__getitems__(list(range(16)))
    flip_mean, _ = load_vae(str(tiny_vae)).encode(images["pixel_values"].flip(-1))
    torch.testing.assert_close(batch["flip_mean"], flip_mean.half().float(), rtol=1e-3, atol=1e-4)
    assert not torch.equal(batch["flip_mean"], batch["latent_mean"])

    no_noise = {k: torch.zeros_like(v) if k.endswith("std") else v for k, v in batch.items()}
    z = sample_latents(no_noise, torch.Generator().manual_seed(0), data, flip=True)
    assert torch.equal(z, sample_latents(no_noise, torch.Generator().manual_seed(0), data, flip=True))
    normalised = {
        k: (batch[k] - data.channel_mean[:, None, None]) / data.channel_std[:, None, None]
        for k in ("latent_mean", "flip_mean")
    }
    took = [torch.allclose(z[i], normalised["flip_mean"][i], atol=1e-5) for i in range(16)]
    kept = [torch.allclose(z[i], normalised["latent_mean"][i], atol=1e-5) for i in range(16)]
    assert all(a != b for a, b in zip(took, kept, strict=True)) and 0 < sum(took) < 16
    with pytest.raises(UserError, match="holds no flipped latents"):
        sample_latents(rows(encoded), torch.Generator(), load_latent_data(str(encoded)), flip=True)


def test_sigkill_midway_then_rerun_equals_an_uninterrupted_run(tiny_vae, tmp_path, capsys):
    """A real kill: SIGKILL the encoder once two of its 20 shards exist, rerun, compare with a run never killed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from helpers import ROOT

    args = [
        "--vae",
        tiny_vae,
        "--dataset_name",
        "fashion_mnist",
        "--max_train_samples",
        800,
        "--resolution",
        32,
        "--shard_size",
        40,
        "--batch_size",
        1,
    ]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "encode_latents.py"), *map(str, args), "--output_dir", str(killed)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while len(list(killed.glob("data/train-*.parquet"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in killed.glob("data/train-*.parquet")}
    assert 2 <= len(done) < 20 and not (killed / "latents.json").exists(), "the run was not stopped midway"
    with pytest.raises(UserError, match="is not a complete latent dataset"):
        load_latent_data(str(killed))

    encode(*args, "--output_dir", killed)
    assert f"resuming: {len(done)} of 20 shards already complete" in capsys.readouterr().out
    assert {name: (killed / "data" / name).stat().st_mtime_ns for name in done} == done  # not redone
    encode(*args, "--output_dir", whole)
    assert_same_rows(rows(killed), rows(whole))


def test_text_embeddings_are_stored_and_training_never_loads_the_encoder(
    tiny_vae, captioned, clip_text_folder, tmp_path, capsys, monkeypatch
):
    import train_cfm
    from modules.networks import text as text_module
    from modules.networks.text import TextConditioner, load_text_encoder

    out = tmp_path / "latents"
    encode(
        "--vae",
        tiny_vae,
        "--dataset_name",
        captioned,
        "--resolution",
        32,
        "--shard_size",
        8,
        "--output_dir",
        out,
        "--text_encoder",
        clip_text_folder,
        "--max_text_length",
        6,
    )
    meta = json.loads((out / "latents.json").read_text())
    assert meta["columns"] == ["mean", "std", "label", "caption", "text_tokens", "text_pooled"]
    assert meta["text_encoder"]["source"] == str(clip_text_folder) and meta["text_encoder"]["max_length"] == 6
    # 'a photo of a t-shirt/top' is longer than 6 tokens; the others ('a photo of a bag': 5 + 2) are not.
    captions = load_latent_data(str(out)).captions
    encoder = load_text_encoder(str(clip_text_folder), max_length=6)
    assert meta["text_truncated"] == encoder.tokenize(captions)[2] > 0

    # Oracle: the encoder run on the captions now, rounded to the stored float16.
    data = load_latent_data(str(out))
    stored = TextConditioner.from_stored(data.text_encoder, data.text_embeddings())
    assert sorted(stored.stored) == sorted({*captions, ""})
    live = TextConditioner(encoder)
    for query in (captions[:5], ["", captions[3]]):
        a, b = stored(query), live(query)
        assert torch.equal(a["mask"], b["mask"])
        torch.testing.assert_close(a["tokens"], b["tokens"].half().float(), rtol=0, atol=0)
        torch.testing.assert_close(a["pooled"], b["pooled"].half().float(), rtol=0, atol=0)

    def refuse(*args, **kwargs):
        raise AssertionError("training loaded the text encoder")

    # Wherever a module of ours took these loaders in by name.
    loaders = ("load_text_encoder", "text_encoder_from_record")
    users = [m for name, m in list(sys.modules.items()) if name.startswith("modules.") and hasattr(m, loaders[0])]
    assert text_module in users and any(m.__name__.startswith("modules.training.") for m in users)
    for module in users:
        for loader in loaders:
            if hasattr(module, loader):
                monkeypatch.setattr(module, loader, refuse)
    run = tmp_path / "run"
    train_cfm.main(
        [
            "--latent_dataset",
            str(out),
            "--text_encoder",
            str(clip_text_folder),
            "--class_conditional",
            "false",
            "--model",
            "dit_tiny",
            "--patch_size",
            "4",
            "--output_dir",
            str(run),
            "--max_train_steps",
            "2",
            "--train_batch_size",
            "4",
            "--num_sample_images",
            "2",
            "--num_inference_steps",
            "1",
            "--lr_warmup_steps",
            "0",
            "--fid_num_samples",
            "0",
            "--cond_drop_prob",
            "0.5",
            "--checkpointing_steps",
            "0",
        ]
    )
    assert "the text encoder is not loaded" in capsys.readouterr().out
    record = json.loads((run / "objective.json").read_text())
    assert record["text_encoder"] == meta["text_encoder"]  # sample.py encodes prompts with the same encoder

    # Another encoder than the stored one: it runs, with a warning.
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="stores text embeddings of .*, not of --text_encoder 'minilm'"):
        train_cfm.main(
            [
                "--latent_dataset",
                str(out),
                "--text_encoder",
                "minilm",
                "--class_conditional",
                "false",
                "--model",
                "dit_tiny",
                "--patch_size",
                "4",
                "--output_dir",
                str(tmp_path / "minilm"),
                "--max_train_steps",
                "1",
                "--train_batch_size",
                "4",
                "--num_sample_images",
                "0",
                "--fid_num_samples",
                "0",
                "--checkpointing_steps",
                "0",
                "--lr_warmup_steps",
                "0",
            ]
        )


def test_text_embeddings_bad_input(tiny_vae, captioned, tmp_path, capsys):
    out = tmp_path / "out"
    fails(
        capsys,
        ["--vae", tiny_vae, "--output_dir", out, *FASHION, "--text_encoder", "minilm"],
        "--text_encoder needs captions",
    )
    fails(
        capsys,
        ["--vae", tiny_vae, "--output_dir", out, "--dataset_name", captioned, "--text_encoder", "own"],
        "own text encoder trains with the denoiser",
    )
    fails(capsys, ["--vae", tiny_vae, "--output_dir", out, *FASHION, "--max_text_length", 8], "needs --text_encoder")
    assert not out.exists()


def test_stored_text_matches_only_the_same_encoder(clip_text_folder):
    from modules.networks.text import stored_text_matches

    clip = {"kind": "clip", "source": str(clip_text_folder), "max_length": 77}
    assert stored_text_matches(clip, str(clip_text_folder)) and stored_text_matches(clip, clip_text_folder, 77)
    assert not stored_text_matches(clip, str(clip_text_folder), 32) and not stored_text_matches(clip, "minilm")
    minilm = {"kind": "minilm", "source": "minilm", "max_length": 128}
    assert stored_text_matches(minilm, "sentence-transformers/all-MiniLM-L6-v2") and not stored_text_matches(
        minilm, "own"
    )
