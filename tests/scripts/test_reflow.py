"""Reflow end to end on the session's tiny flow run as the teacher: sample.py --output_pairs writes sample.py's own
noise and images as pairs, resumes and does not depend on the number of processes; a student trains on them through
train_cfm.py --pairs_dataset, resumes exactly, records its teacher and samples in one Euler step; bad input is
refused by name before anything is written."""

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import assert_same, checkpoint_state, fails, in_process, read_metrics
from PIL import Image

import sample
from modules.data.pairs import load_pairs_data
from modules.objectives.samplers import per_sample_randn, sample_generators
from modules.pixels import to_uint8

SETTINGS = ["--num_images", 16, "--batch_size", 4, "--sampler", "euler", "--num_inference_steps", 2]
STUDENT = [
    *("--base_channels", 8, "--train_batch_size", 4, "--checkpointing_steps", 2, "--validation_steps", 2),
    *("--num_sample_images", 2, "--sampler", "euler", "--num_inference_steps", 1, "--fid_num_samples", 0),
    *("--lr_warmup_steps", 0, "--logging_steps", 1),
]


def make_pairs(teacher, out, *extra):
    return in_process("sample.py", "--model", teacher, "--output_pairs", out, "--shard_size", 4, *SETTINGS, *extra)


@pytest.fixture(scope="module")
def pairs(tiny_cfm_run, tmp_path_factory):
    """16 pairs of the tiny class-conditional run in 4 shards of 4."""
    return make_pairs(tiny_cfm_run, tmp_path_factory.mktemp("pairs") / "fm")


def train_student(teacher, pairs, out, *extra):
    """4 steps of a student from the teacher's weights on the pairs, with checkpoints at steps 2 and 4."""
    argv = ["--init_from", teacher, "--pairs_dataset", pairs, "--output_dir", out, "--max_train_steps", 4]
    return in_process("train_cfm.py", *argv, *STUDENT, *extra)


@pytest.fixture(scope="module")
def student(tiny_cfm_run, pairs, tmp_path_factory):
    return train_student(tiny_cfm_run, pairs, tmp_path_factory.mktemp("student") / "run")


def shard_bytes(out) -> dict:
    return {p.name: p.read_bytes() for p in sorted((out / "data").glob("*.parquet"))}


def test_pairs_hold_sample_pys_noise_and_images(tiny_cfm_run, pairs, tmp_path):
    images = tmp_path / "images"
    sample.main(["--model", str(tiny_cfm_run), "--output", str(images), *map(str, SETTINGS)])
    train, _ = load_pairs_data(str(pairs))
    rows = train.dataset.__getitems__(list(range(16)))
    # Oracle: sample.py's images of the same seed and settings, and the noise it draws for image i.
    written = torch.stack([torch.from_numpy(np.array(Image.open(images / f"{i:06d}.png"))) for i in range(16)])
    assert torch.equal(to_uint8(rows["x0"])[:, 0], written)
    noise = torch.cat([per_sample_randn(sample_generators(0, i, 1), (1, 32, 32)) for i in range(16)])
    assert torch.equal(rows["noise"], noise)
    assert torch.equal(rows["labels"], torch.arange(16) % 10)
    meta = json.loads((pairs / "pairs.json").read_text())
    assert meta["teacher"]["model"] == str(tiny_cfm_run) and meta["teacher"]["objective"] == "flow"
    assert (meta["sampler"], meta["num_inference_steps"], meta["guidance_scale"], meta["seed"]) == ("euler", 2, 1.5, 0)
    assert (meta["shape"], meta["image_resolution"], meta["conditioning"], meta["num_classes"]) == (
        [1, 32, 32],
        32,
        "class",
        10,
    )
    assert (
        meta["columns"] == ["noise", "sample", "label"] and meta["source_data_args"]["dataset_name"] == "fashion_mnist"
    )
    card = (pairs / "README.md").read_text()
    assert card.startswith("---\n") and "python sample.py --model" in card and "--pairs_dataset" in card


def test_a_killed_run_resumes_at_its_missing_shard(tiny_cfm_run, pairs, tmp_path, capsys):
    out = tmp_path / "killed"
    shutil.copytree(pairs, out)
    # As if killed while writing shard 2: its partial file is there, pairs.json is not.
    (out / "data" / "train-00002-of-00004.parquet").rename(out / "data" / ".train-00002-of-00004.parquet.partial")
    (out / "pairs.json").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "data").glob("train-*.parquet")}
    capsys.readouterr()
    make_pairs(tiny_cfm_run, out)
    assert "resuming: 3 of 4 shards already complete" in capsys.readouterr().out
    assert {name: (out / "data" / name).stat().st_mtime_ns for name in kept} == kept  # not made again
    assert shard_bytes(out) == shard_bytes(pairs) and sorted(p.name for p in (out / "data").iterdir()) == sorted(
        shard_bytes(pairs)
    )
    assert (out / "pairs.json").read_text() == (pairs / "pairs.json").read_text().replace(str(pairs), str(out))


class Process:
    """One of `num` processes as modules/data/shards.py sees them, run in turn in this process: at the main
    process's barrier after it prepared the output directory (its second), `others` run whole."""

    def __init__(self, index: int, num: int, others=()):
        self.process_index, self.num_processes, self.others, self.waits = index, num, others, 0
        self.is_main_process, self.device = index == 0, torch.device("cpu")

    def wait_for_everyone(self):
        self.waits += 1
        if self.waits == 2:
            for other in self.others:
                other()

    def print(self, *args):
        print(*args)


def test_two_processes_write_what_one_writes(tiny_cfm_run, pairs, tmp_path, monkeypatch):
    out = tmp_path / "two"
    states = iter([Process(0, 2, others=[lambda: make_pairs(tiny_cfm_run, out)]), Process(1, 2)])
    monkeypatch.setattr(sample, "process_state", lambda: next(states))
    make_pairs(tiny_cfm_run, out)
    assert next(states, None) is None  # both processes ran
    assert shard_bytes(out) == shard_bytes(pairs)
    assert (
        json.loads((out / "pairs.json").read_text())["shards"]
        == json.loads((pairs / "pairs.json").read_text())["shards"]
    )


def test_the_student_trains_on_the_pairs_and_records_its_teacher(student, tiny_cfm_run, pairs, tmp_path):
    record = json.loads((student / "objective.json").read_text())
    assert record["reflow"]["teacher"]["model"] == str(tiny_cfm_run) and record["reflow"]["pairs_dataset"] == str(
        pairs
    )
    assert json.loads((student / "run_config.json").read_text())["config"]["pairs_dataset"] == str(pairs)
    rows = read_metrics(student)
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4]  # on the last pair, held out
    # One Euler step, through sample.py like any flow model.
    one_step = ["--num_images", "4", "--sampler", "euler", "--num_inference_steps", "1"]
    sample.main(["--model", str(student), "--output", str(tmp_path / "one.png"), *one_step])
    assert Image.open(tmp_path / "one.png").size[0] > 32


def test_the_student_resumes_exactly(student, tiny_cfm_run, pairs, tmp_path, capsys):
    out = tmp_path / "resumed"
    shutil.copytree(student / "checkpoints" / "checkpoint-2", out / "checkpoints" / "checkpoint-2")
    train_student(tiny_cfm_run, pairs, out, "--resume_from_checkpoint", "latest")
    assert "resumed from" in capsys.readouterr().out
    whole = checkpoint_state(student / "checkpoints" / "checkpoint-4")
    assert_same(whole, checkpoint_state(out / "checkpoints" / "checkpoint-4"), "state")
    halfway = checkpoint_state(student / "checkpoints" / "checkpoint-2")
    assert any(not torch.equal(halfway[0][k], whole[0][k]) for k in whole[0])


def test_bad_input_is_refused_before_writing(tiny_cfm_run, pairs, tmp_path, capsys):
    out = tmp_path / "never"
    student = ["--init_from", tiny_cfm_run, "--output_dir", out, "--base_channels", 8]
    fails(capsys, [*map(str, student), "--pairs_dataset", str(tmp_path)], "no pairs.json")
    argv = [*map(str, student), "--pairs_dataset", str(pairs)]
    fails(capsys, [*argv, "--resolution", "16"], "--resolution 16", "made at 32x32", "pass --resolution 32")
    fails(capsys, [*argv, "--random_flip"], "--random_flip")
    fails(capsys, [*argv, "--ot_coupling"], "--pairs_dataset: --ot_coupling")
    fails(capsys, [*argv, "--text_encoder", "minilm"], "--text_encoder", "holds no captions")
    import train_ddpm

    fails(capsys, argv, "--pairs_dataset: a ddpm model does not train on", main=train_ddpm.main)
    # Pairs of another condition, or a model of another shape, than the --init_from model.
    other = tmp_path / "unconditional"
    shutil.copytree(pairs, other)
    meta = json.loads((other / "pairs.json").read_text())
    (other / "pairs.json").write_text(json.dumps({**meta, "conditioning": "none", "num_classes": 0}))
    fails(
        capsys, [*map(str, student), "--pairs_dataset", str(other)], "is unconditional", "is class-conditional on 10"
    )
    rgb = tmp_path / "rgb"
    shutil.copytree(tiny_cfm_run, rgb, ignore=shutil.ignore_patterns("checkpoints", "samples"))
    config = json.loads((rgb / "config.json").read_text())
    (rgb / "config.json").write_text(json.dumps({**config, "in_channels": 3}))
    fails(capsys, [*argv, "--init_from", str(rgb)], "holds 1x32x32 samples", f"--init_from '{rgb}' takes 3x32x32")
    # sample.py: pairs are not images.
    made = ["--model", str(tiny_cfm_run), "--output_pairs", str(out)]
    fails(
        capsys,
        [*made, "--compute_fid"],
        "--output_pairs writes pairs, not images: drop --compute_fid",
        main=sample.main,
    )
    assert not out.exists()
