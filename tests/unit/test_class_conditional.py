"""--class_conditional is true, false or auto (the default): parsed from flags and recipes, decided from the data
(auto is on when the training data has labels and the model is not text-conditional), said in the start-up line;
true on data without labels stops with an error naming the flag to change."""

import contextlib

import pytest
import torch
from accelerate import Accelerator
from helpers import write_latent_dataset

from modules.config import (
    SCRIPT_DEFAULTS,
    DataArguments,
    FlowArguments,
    ModelArguments,
    TrainingArguments,
    UserError,
    parse_args,
)
from modules.data.conditions import ConditionSource
from modules.objectives.flow import FlowObjective
from modules.training.run import Run
from modules.training.setup import open_data, resolve_class_conditional, start_logging

TYPES = (DataArguments, ModelArguments, TrainingArguments, FlowArguments)
NO_EVALUATION = TrainingArguments(validation_steps=0, fid_num_samples=0)


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], None),
        (["--class_conditional"], True),
        (["--class_conditional", "auto"], None),
        (["--class_conditional", "true"], True),
        (["--class_conditional", "false"], False),
        (["--class_conditional=False", "--model", "dit_tiny"], False),
    ],
)
def test_flag_values(argv, expected):
    assert parse_args(TYPES, argv, SCRIPT_DEFAULTS)[1].class_conditional is expected


@pytest.mark.parametrize("value, expected", [("auto", None), ("true", True), ("false", False), ("null", None)])
def test_recipe_values_and_flags_over_them(tmp_path, value, expected):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"class_conditional: {value}\n")
    assert parse_args(TYPES, ["--config", str(recipe)], SCRIPT_DEFAULTS)[1].class_conditional is expected
    for flag, asked in (("auto", None), ("true", True), ("false", False)):
        argv = ["--config", str(recipe), "--class_conditional", flag]
        assert parse_args(TYPES, argv, SCRIPT_DEFAULTS)[1].class_conditional is asked


def test_another_value_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(TYPES, ["--class_conditional", "maybe"])
    assert (
        "--class_conditional" in (err := capsys.readouterr().err)
        and "expected auto, true or false, got 'maybe'" in err
    )


@pytest.fixture(scope="module")
def latent_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    return {
        labelled: write_latent_dataset(root / f"labelled-{labelled}", labels=labelled) for labelled in (True, False)
    }


@pytest.fixture(scope="module")
def open_once():
    """open_data, run once per data and per whether --class_conditional true asks for labels (Fashion-MNIST takes
    most of a second to read); what fails is not kept."""
    opened = {}

    def open_(data_args: DataArguments, model_args: ModelArguments):
        key = (repr(data_args), model_args.class_conditional is True)
        if key not in opened:
            opened[key] = open_data(data_args, model_args, NO_EVALUATION)
        return opened[key]

    return open_


def data_arguments(kind: str, labelled: bool, latent_sets) -> tuple[DataArguments, str, int]:
    """The data arguments of Fashion-MNIST (with its 10 labels, or --label_column none) or of a latent dataset (with
    2 labels or none), the name the error gives it, and its number of classes."""
    if kind == "images":
        args = DataArguments(max_train_samples=16, label_column=None if labelled else "none")
        return args, "the dataset 'fashion_mnist'", 10
    path = str(latent_sets[labelled])
    return DataArguments(latent_dataset=path, resolution=16), f"the latent dataset '{path}'", 2


@pytest.mark.parametrize("kind", ["images", "latents"])
@pytest.mark.parametrize("labelled", [True, False])
@pytest.mark.parametrize("asked", [None, True, False])
def test_decided_from_the_data(kind, labelled, asked, latent_sets, open_once):
    data_args, source, classes = data_arguments(kind, labelled, latent_sets)
    model_args = ModelArguments(class_conditional=asked)
    if asked and not labelled:
        with pytest.raises(UserError) as error:
            open_once(data_args, model_args)
        message = str(error.value)
        assert message.startswith(f"--class_conditional true needs labels, but {source} has none; ")
        assert message.endswith("pass --class_conditional false (or leave it unset: auto)")
        return
    data = open_once(data_args, model_args)
    resolved, condition = resolve_class_conditional(model_args, data.train)
    on = labelled if asked is None else asked
    assert resolved.class_conditional is on and model_args.class_conditional is asked
    expected = f"class-conditional on {classes} classes" if on else "unconditional"
    if asked is None:
        expected += f" (--class_conditional auto: the data has {'labels' if labelled else 'no labels'})"
    assert condition == expected


def test_text_conditioning_turns_auto_off_and_refuses_true(latent_sets):
    data = open_data(
        DataArguments(latent_dataset=str(latent_sets[True]), resolution=16), ModelArguments(), NO_EVALUATION
    )
    resolved, condition = resolve_class_conditional(ModelArguments(text_encoder="minilm"), data.train)
    assert resolved.class_conditional is False
    assert condition == "text-conditional (--class_conditional auto: off with --text_encoder)"
    with pytest.raises(UserError, match=r"--text_encoder and --class_conditional true: choose one .* false"):
        open_data(DataArguments(), ModelArguments(text_encoder="minilm", class_conditional=True), NO_EVALUATION)


@pytest.mark.parametrize("labelled", [True, False])
def test_the_start_up_line_says_which(labelled, tmp_path, capsys, latent_sets, open_once):
    data_args, _, _ = data_arguments("images", labelled, latent_sets)
    data = open_once(data_args, ModelArguments())
    model_args, condition = resolve_class_conditional(ModelArguments(), data.train)
    model = torch.nn.Linear(2, 2)
    run = Run(
        data_args=data_args,
        model_args=model_args,
        train_args=TrainingArguments(max_train_steps=5),
        objective=FlowObjective(FlowArguments()),
        data=data,
        conditions=ConditionSource(data.train, data.train.num_classes),
        stop_request=None,
        accelerator=Accelerator(cpu=True),
        model=model,
        optimizer=None,
        unwrapped=model,
        out=tmp_path,
        condition=condition,
        images_per_step=8,
    )
    with contextlib.ExitStack() as cleanup:
        start_logging(run, {"script": "train_cfm.py"}, [], cleanup)
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("unet_s: "))
    said = "class-conditional on 10 classes (--class_conditional auto: the data has labels)"
    if not labelled:
        said = "unconditional (--class_conditional auto: the data has no labels)"
    assert f"16 images (fashion_mnist-train-32px-1ch) | {said} | 1 process(es)" in line
