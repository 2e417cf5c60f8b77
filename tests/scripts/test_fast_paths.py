"""Each speed or memory flag runs, and trains like the default fp32 path on CPU: the same losses, up to the
precision the flag gives up. Their speed is measured in bench/, not here."""

import json

import pytest
from helpers import TINY, read_metrics

import train_cfm

STEPS = 3


def losses(out, *flags) -> list[float]:
    train_cfm.main(
        [
            "--output_dir",
            str(out),
            "--max_train_steps",
            str(STEPS),
            *map(str, TINY),
            "--num_sample_images",
            "0",
            "--checkpointing_steps",
            "0",
            "--validation_steps",
            "0",
            *flags,
        ]
    )
    records = read_metrics(out)
    return [r["loss"] for r in records if "loss" in r]


@pytest.fixture(scope="module")
def default(tmp_path_factory):
    return losses(tmp_path_factory.mktemp("default") / "run")


@pytest.mark.parametrize(
    "flags, rtol",
    [
        (["--gradient_checkpointing"], 1e-6),
        (["--channels_last"], 1e-5),
        (["--allow_tf32"], 0),  # no effect on CPU; on GPUs it trades matmul precision for speed
        (["--dataloader_num_workers", "2"], 0),  # the same batches, loaded in other processes
        (["--mixed_precision", "bf16"], 3e-2),
        (["--use_8bit_adam"], 1e-2),
        # aot_eager traces and differentiates the graph as inductor does, without its minutes of C++ codegen here
        (["--torch_compile", "--torch_compile_backend", "aot_eager"], 1e-5),
    ],
    ids=lambda v: v[0] if isinstance(v, list) else "",
)
def test_flag_trains_like_the_default(default, tmp_path, flags, rtol):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a process may hold one precision only
    try:
        got = losses(tmp_path / "run", *flags)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert len(got) == STEPS == len(default)
    assert got == pytest.approx(default, rel=rtol, abs=1e-7)


def test_dry_run_sizes_the_flags(capsys):
    train_cfm.main(["--dry_run", "--use_8bit_adam", "--mixed_precision", "bf16"])
    fast = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    train_cfm.main(["--dry_run"])
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert fast["estimated_state_gib"] == pytest.approx(plain["estimated_state_gib"] * 14 / 20)
    assert fast["estimated_activation_gib"] == pytest.approx(plain["estimated_activation_gib"] / 2)
    train_cfm.main(["--dry_run", "--gradient_checkpointing"])
    checkpointed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert checkpointed["estimated_activation_gib"] < 0.8 * plain["estimated_activation_gib"]
