"""Each bad input is a one-line error that names the culprit, raised before anything is written."""

import json
import shutil

import datasets
import pytest
import torch
from conftest import TINY
from PIL import Image

import train_cfm
import train_ddpm


def _fails(capsys, argv, *needles, main=train_cfm.main):
    """Run a script's main in-process; it must exit 2 with one 'error:' line containing every needle."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in errors[0], err
    return errors[0]


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
    _fails(
        capsys,
        ["--dataset_name", "no_such_user/no_such_dataset", "--output_dir", str(out)],
        "unknown dataset 'no_such_user/no_such_dataset'",
    )


def test_missing_image_column_lists_the_columns(capsys, out, parquet_dataset):
    _fails(
        capsys,
        ["--dataset_name", str(parquet_dataset), "--output_dir", str(out)],
        "no image column 'image'",
        "columns: img, category",
    )


def test_missing_label_column_lists_the_columns(capsys, out, parquet_dataset):
    _fails(
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


def test_class_conditional_without_labels(capsys, out, parquet_dataset):
    _fails(
        capsys,
        ["--dataset_name", str(parquet_dataset), "--image_column", "img", "--output_dir", str(out)],
        "--class_conditional needs labels",
    )


def test_hub_style_dataset_trains_when_columns_are_named(parquet_dataset, tmp_path):
    """The same dataset with the right column names gets past every check and trains (a control for the above),
    through to the end-of-run FID against its own images."""
    run = tmp_path / "ok"
    train_cfm.main(["--dataset_name", str(parquet_dataset), "--image_column", "img", "--label_column", "category",
                    "--resolution", "16", "--output_dir", str(run), "--max_train_steps", "1", "--train_batch_size",
                    "2", "--base_channels", "8", "--num_sample_images", "3", "--num_inference_steps", "1",
                    "--fid_num_samples", "4", "--fid_reference_samples", "6", "--lr_warmup_steps", "0"])  # fmt: skip
    assert (run / "diffusion_pytorch_model.safetensors").is_file()
    fid = json.loads((run / "fid.json").read_text())
    assert fid["num_samples"] == 4 and fid["reference_samples"] == 6 and fid["fid"] > 0
    # The logged FID is the EMA model's: recomputed from the saved EMA weights it matches, from the raw ones not.
    from safetensors.torch import load_file

    from modules.evaluation import compute_fid
    from modules.models import load_model
    from modules.samplers import generate_images

    model, objective, record = load_model(run)
    config = json.loads((run / "run_config.json").read_text())["config"]
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
    ],
)
def test_bad_flags(capsys, out, flags, needles):
    _fails(capsys, [*TINY, "--output_dir", str(out), *flags], *needles)


def test_ddpm_script_checks_too(capsys, out):
    _fails(capsys, [*TINY, "--output_dir", str(out), "--resolution", "30"], "must be divisible", main=train_ddpm.main)


def test_unknown_recipe_key(capsys, out, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("learning_rate: 1.0e-4\nnum_train_epoch: 3\n")
    _fails(capsys, ["--config", str(recipe), "--output_dir", str(out)], str(recipe), "unknown key 'num_train_epoch'")


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
    _fails(
        capsys,
        ["--train_data_dir", str(folder), "--output_dir", str(out)],
        "cannot read image",
        str(folder / "dogs" / "broken.png"),
    )


def test_resume_from_a_different_model_names_the_keys(capsys, out, tiny_cfm_run, tmp_path):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_cfm_run / "checkpoints" / "checkpoint-3", checkpoint)
    _fails(
        capsys,
        [*TINY, "--base_channels", "16", "--output_dir", str(out), "--resume_from_checkpoint", str(checkpoint)],
        "different model",
        "base_channels: checkpoint 8 vs now 16",
    )


def test_resume_from_a_missing_checkpoint(capsys, out, tmp_path):
    _fails(
        capsys,
        [*TINY, "--output_dir", str(out), "--resume_from_checkpoint", str(tmp_path / "nope")],
        "is not a complete checkpoint",
    )


def test_unreadable_fid_weights_file(capsys, out, tmp_path):
    weights = tmp_path / "inception.pth"
    weights.write_text("not weights")
    _fails(capsys, [*TINY, "--output_dir", str(out), "--fid_num_samples", "4", "--fid_weights", str(weights)],
           "--fid_weights", "inception.pth': not a readable tensor file")  # fmt: skip


def test_empty_held_out_split_warns_and_training_goes_on(parquet_dataset, tmp_path):
    """A dataset whose test split is empty: a warning, no validation loss, the run completes."""
    root = tmp_path / "with_empty_test"
    shutil.copytree(parquet_dataset, root)
    empty = datasets.Dataset.from_dict({"img": [], "category": []}, features=datasets.Features(
        {"img": datasets.Image(), "category": datasets.Value("int64")}))  # fmt: skip
    empty.to_parquet(str(root / "test.parquet"))
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"held-out data .*\[test\] is empty: no validation loss"):
        train_cfm.main(["--dataset_name", str(root), "--image_column", "img", "--label_column", "category",
                        "--resolution", "16", "--output_dir", str(run), "--max_train_steps", "1",
                        "--train_batch_size", "2", "--base_channels", "8", "--num_sample_images", "3",
                        "--num_inference_steps", "1", "--fid_num_samples", "0", "--lr_warmup_steps", "0",
                        "--validation_steps", "1"])  # fmt: skip
    assert (run / "diffusion_pytorch_model.safetensors").is_file()
    assert not any("val_loss" in line for line in (run / "metrics.jsonl").read_text().splitlines())


def test_image_folder_has_no_named_splits(capsys, out, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    argv = ["--train_data_dir", str(folder), "--validation_split", "test", "--output_dir", str(out)]
    _fails(capsys, [*argv, "--class_conditional", "false"], "--validation_split 'test': an image folder has no splits")
