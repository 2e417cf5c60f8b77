"""The recipes in configs/ and the launch configurations in accelerate_configs/.

Each recipe's header names its script (`# script: train_cfm.py`), its pipeline, hardware, time and result; the
recipe sizes itself with --dry_run through that script, without its data (Hub datasets are not reachable here: their
shapes are assumed) and without writing anything, and a mistyped key stops it with one line.

Each launch configuration is read by Accelerate's own launcher, as `accelerate launch` reads it, into the launcher,
processes, machines, precision and sharding it promises, down to torchrun's rendezvous and the FSDP and DeepSpeed
plugins the training processes would build. Real two-process training jobs run from cpu_2proc.yaml, fsdp.yaml and
deepspeed_zero2.yaml in tests/distributed/ (the last two on CPU processes through tests/cpu_as_gpus.py).
"""

import os
import re
import shlex

import pytest
import torch
from helpers import DIT_PARAMS, ROOT, UNET_PARAMS, fails, in_process

RECIPES = sorted((ROOT / "configs").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((ROOT / "accelerate_configs").glob("*.yaml"))
HEADER_KEYS = ("script", "data", "pipeline", "hardware", "time", "result")
SCRIPTS = ("train_cfm.py", "train_ddpm.py", "train_vae.py")
# The shapes at which tests/unit/test_models.py pins each preset's parameter count.
PINNED = {("unet", (3, 32, 32), 0, None): UNET_PARAMS, ("dit", (4, 32, 32), 1000, 2): DIT_PARAMS}
PINNED_RECIPES = {"cifar10_unet_ddpm.yaml", "imagenet256_dit_b2_cfm.yaml", "imagenet256_dit_xl2_cfm.yaml"}


def header_lines(path) -> list[str]:
    """The leading comment block, without '# ', with backslash-continued lines joined."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line[2:] if line.startswith("# ") else line[1:]
        if lines and lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1].rstrip() + " " + text.strip()
        else:
            lines.append(text)
    return lines


def header(path) -> dict[str, str]:
    """`key: value` lines of the header (keys of HEADER_KEYS), each continued by the indented lines under it."""
    fields, key = {}, None
    for line in header_lines(path):
        name, _, value = line.partition(":")
        if name in HEADER_KEYS:
            key, fields[name] = name, value.strip()
        elif key and line.startswith("  "):
            fields[key] += "\n" + line.strip()
        else:
            key = None
    return fields


def settings(path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_header_gives_script_pipeline_hardware_time_and_result(recipe):
    fields = header(recipe)
    assert set(HEADER_KEYS) <= set(fields), f"{recipe.name}: header lacks {set(HEADER_KEYS) - set(fields)}"
    assert fields["script"] in SCRIPTS
    assert f"{fields['script']} --config configs/{recipe.name}" in fields["pipeline"].replace("\n", " ")
    # Measured, or said to be an estimate: a result nobody ran is "not yet measured", with an estimated time.
    assert fields["result"].startswith(("measured", "not yet measured")), fields["result"]
    assert fields["time"].startswith(("measured", "estimate")), fields["time"]
    assert fields["time"].startswith("measured") == fields["result"].startswith("measured"), recipe.name
    dataset = settings(recipe).get("dataset_name")
    if dataset and not dataset.startswith("data/"):  # a Hub dataset (or fashion_mnist): the header names it
        assert dataset in fields["data"]


def pinned_count(result: dict, recipe: dict):
    """The parameter count tests/unit/test_models.py pins for this dry run's preset and shape, or None."""
    model = result["model"]
    family = "dit" if model.startswith("dit") else "unet" if model.startswith("unet") else None
    patch = recipe.get("patch_size", 2) if family == "dit" else None
    table = PINNED.get((family, tuple(result["input"]), result["num_classes"], patch))
    return None if table is None or recipe.get("text_encoder") else table.get(model)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_dry_run_sizes_it_without_writing_anything(recipe, tmp_path):
    out = tmp_path / "run"
    result = in_process(header(recipe)["script"], "--config", recipe, "--dry_run", "--output_dir", out)
    flops = result.get("train_gflops_per_image", result.get("train_gflops_per_clip"))  # a clip recipe's are per clip
    assert result["parameters"] > 0 and flops > 0 and result["estimated_peak_gib"] > 0
    pinned = pinned_count(result, settings(recipe))
    assert (pinned is not None) == (recipe.name in PINNED_RECIPES), (result["input"], result["num_classes"])
    if pinned is not None:
        assert result["parameters"] == pinned
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_a_mistyped_recipe_key_stops_with_one_line_naming_it(recipe, tmp_path, capsys):
    import importlib

    key = next(iter(settings(recipe)))
    typo = key[:-1]  # e.g. dataset_nam
    broken = tmp_path / recipe.name
    broken.write_text(re.sub(rf"^{key}:", f"{typo}:", recipe.read_text(), count=1, flags=re.M))
    main = importlib.import_module(header(recipe)["script"].removesuffix(".py")).main
    fails(
        capsys,
        ["--config", str(broken), "--dry_run", "--output_dir", str(tmp_path / "run")],
        f"{broken}: unknown key '{typo}'",
        f"did you mean '{key}'?",
        main=main,
    )
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ launch configurations

# What each file must give: how accelerate launch starts the processes, how many, on how many machines, in which
# precision. "torchrun": torch.distributed.run (DDP, FSDP); "deepspeed": DeepSpeed's launcher; "simple": one process.
EXPECTED = {
    "cpu_2proc.yaml": dict(launcher="torchrun", processes=2, machines=1, precision="no"),
    "single_gpu.yaml": dict(launcher="simple", processes=1, machines=1, precision="bf16"),
    "multi_gpu.yaml": dict(launcher="torchrun", processes=8, machines=1, precision="bf16"),
    "multi_node.yaml": dict(launcher="torchrun", processes=16, machines=2, precision="bf16"),
    "fsdp.yaml": dict(launcher="torchrun", processes=8, machines=1, precision="bf16"),
    "deepspeed_zero2.yaml": dict(launcher="deepspeed", processes=8, machines=1, precision="bf16"),
}


def header_commands(path) -> list[list[str]]:
    """The `accelerate launch` commands the header shows, as arguments after `launch` (without `...`)."""
    commands = []
    for line in header_lines(path):
        if line.strip().startswith("accelerate launch"):
            words = shlex.split(line.split("#")[0])
            commands.append([w for w in words[2:] if w != "..."])
    return commands


@pytest.fixture
def launch(monkeypatch):
    """`accelerate launch ARGS`, up to starting the processes: (arguments, launcher, the environment it adds, and
    for torchrun torch.distributed.run's LaunchConfig)."""
    import torch.distributed.run as distrib_run
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import launch as launch_utils

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(launch_utils, "is_port_in_use", lambda port: False)  # this machine's ports are not the test

    def run(argv):
        args, defaults, mixed_precision_from_file = _validate_launch_command(launch_command_parser().parse_args(argv))
        # The launcher accelerate.commands.launch.launch_command picks, in its order.
        if args.use_deepspeed:
            kind = "deepspeed"
            fields = [*defaults.deepspeed_config, *(["mixed_precision"] if mixed_precision_from_file else [])]
            args.deepspeed_fields_from_accelerate_config = ",".join(fields)
            command, env = launch_utils.prepare_deepspeed_cmd_env(args)
            assert command is None  # one machine: DeepSpeed runs under torchrun too
        elif args.use_fsdp or args.multi_gpu:
            kind, env = "torchrun", launch_utils.prepare_multi_gpu_env(args)
        else:
            kind = "simple"
            _, env = launch_utils.prepare_simple_launcher_cmd_env(args)
        added = {k: v for k, v in env.items() if os.environ.get(k) != v}
        config = None
        if kind != "simple":
            script = ["--training_script", args.training_script, "--training_script_args", args.training_script_args]
            torchrun = launch_utils._filter_args(args, distrib_run.get_args_parser(), script)
            config, _, _ = distrib_run.config_from_args(torchrun)
        return args, kind, added, config

    return run


def test_every_launch_configuration_is_listed():
    assert sorted(p.name for p in ACCELERATE_CONFIGS) == sorted(EXPECTED)


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_launch_configuration_gives_its_processes_machines_and_precision(path, launch):
    from accelerate.commands.config.config_args import load_config_from_file

    expected = EXPECTED[path.name]
    loaded = load_config_from_file(str(path))  # Accelerate's own reader: every field known, every value valid
    assert (loaded.num_processes, loaded.num_machines) == (expected["processes"], expected["machines"])
    commands = header_commands(path)
    assert commands and all(c[:2] == ["--config_file", f"accelerate_configs/{path.name}"] for c in commands)
    for argv in commands:
        args, kind, env, config = launch(argv)
        assert kind == expected["launcher"]
        assert (args.num_processes, args.num_machines) == (expected["processes"], expected["machines"])
        assert env["ACCELERATE_MIXED_PRECISION"] == expected["precision"]
        assert args.training_script in SCRIPTS
        if config is not None:  # torchrun: processes per machine times machines
            assert (config.min_nodes, config.max_nodes) == (expected["machines"],) * 2
            assert config.nproc_per_node * expected["machines"] == expected["processes"]


def test_multi_node_machines_meet_at_a_c10d_rendezvous_on_machine_0(launch):
    import dataclasses

    commands = header_commands(ROOT / "accelerate_configs" / "multi_node.yaml")
    assert len(commands) == 2
    (first, _, _, node0), (second, _, _, node1) = (launch(argv) for argv in commands)
    assert (first.machine_rank, second.machine_rank) == (0, 1)
    # c10d hands out the ranks, so both machines start torchrun alike (each logs to a temporary directory of its own)
    assert dataclasses.replace(node1, logs_specs=node0.logs_specs) == node0
    assert (node0.rdzv_backend, node0.rdzv_endpoint) == ("c10d", "10.0.0.1:29500")
    assert (node0.min_nodes, node0.max_nodes, node0.nproc_per_node) == (2, 2, 8)


def test_fsdp_fully_shards_each_dit_block_in_bf16(launch):
    from accelerate.utils import FullyShardedDataParallelPlugin, patch_environment
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    from modules.networks.dit import DiTBlock, dit_tiny
    from modules.networks.unet import EmbedSequential, unet_s

    argv = header_commands(ROOT / "accelerate_configs" / "fsdp.yaml")[0]
    args, _, env, _ = launch(argv)
    assert args.use_fsdp and env["ACCELERATE_USE_FSDP"] == "true"
    assert (env["FSDP_VERSION"], env["FSDP_RESHARD_AFTER_FORWARD"]) == ("2", "true")  # FSDP2's FULL_SHARD
    assert env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT" and env["FSDP_OFFLOAD_PARAMS"] == "false"
    with torch.device("meta"):
        dit, unet = dit_tiny(), unet_s()

    def wrapped(env, model):
        """The modules FSDP2 would shard as units, from the plugin the training processes build."""
        with patch_environment(**env):
            plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
        policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
        return [m for m in model.modules() if policy(m)]

    blocks = wrapped(env, dit)
    assert blocks and all(isinstance(m, DiTBlock) for m in blocks) and len(blocks) == dit.config.depth
    with pytest.raises(ValueError, match="Could not find the transformer layer class DiTBlock"):
        wrapped(env, unet)  # the file names the DiT's block: a UNet needs the edit its header describes
    _, _, unet_env, _ = launch([*argv[:2], "--fsdp_transformer_layer_cls_to_wrap", "EmbedSequential", *argv[2:]])
    units = wrapped(unet_env, unet)
    assert units and all(isinstance(m, EmbedSequential) for m in units)


def test_deepspeed_zero2_in_bf16_needs_no_deepspeed_config_file(launch):
    from accelerate.utils import DeepSpeedPlugin, patch_environment

    args, _, env, _ = launch(header_commands(ROOT / "accelerate_configs" / "deepspeed_zero2.yaml")[0])
    assert args.use_deepspeed and args.deepspeed_config_file is None
    with patch_environment(**env):
        plugin = DeepSpeedPlugin()  # what the training processes build; DeepSpeed itself is not needed for it
    config = plugin.deepspeed_config
    assert plugin.zero_stage == 2 and config["zero_optimization"]["stage"] == 2
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "none"
    assert config["gradient_clipping"] == "auto"  # filled in from --max_grad_norm
    assert config["gradient_accumulation_steps"] == "auto"  # filled in from --gradient_accumulation_steps
    assert "mixed_precision" in env["ACCELERATE_CONFIG_DS_FIELDS"] and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
