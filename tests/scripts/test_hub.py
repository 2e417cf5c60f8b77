"""--push_to_hub up to the HTTP boundary: a local stand-in for the Hub (tests/hub_server.py) records what arrives.
Then sampling from the Hub id, --init_from, the command that pushes later, and a token that no written file holds."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from helpers import TINY, free_port, hub_env, run, script
from hub_server import FakeHub
from PIL import Image

from modules.artifacts.hub import check_push, model_card
from modules.artifacts.model_folder import load_model, load_pretrained_weights
from modules.config import ModelArguments, UserError
from modules.networks.presets import build_model
from modules.records import command_line

TOKEN = "hf_TestToken0123456789abcdef"
REPO = "someone/tiny-fm"


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """A 4-step run that pushes at its checkpoint (step 2) and at the end, to the local Hub."""
    tmp = tmp_path_factory.mktemp("hub")
    with FakeHub() as hub:
        out = tmp / "run"
        proc = script(
            "train_cfm.py",
            "--output_dir",
            out,
            "--max_train_steps",
            4,
            "--checkpointing_steps",
            2,
            "--push_to_hub",
            "--hub_model_id",
            REPO,
            "--hub_token",
            TOKEN,
            *TINY,
            "--fid_num_samples",
            2,
            "--fid_reference_samples",
            2,
            env=hub_env(hub.url, tmp / "home"),
        )
        yield out, hub, proc, tmp


def test_each_checkpoint_and_the_end_push_the_model_card_and_grid(pushed):
    out, hub, proc, _ = pushed
    assert [c["summary"] for c in hub.commits] == ["Checkpoint at step 2", "Final model at step 4"]
    files = hub.repos[REPO]
    assert sorted(files) == [
        "README.md",
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "objective.json",
        "run_config.json",
        "sample.png",
    ]
    assert hub.commits[0]["files"] == sorted(files)
    # The final push holds the EMA weights saved at the end, and the grid of the last step.
    assert files["diffusion_pytorch_model.safetensors"] == (out / "diffusion_pytorch_model.safetensors").read_bytes()
    assert files["sample.png"] == (out / "samples" / "step_0000004.png").read_bytes()
    card = files["README.md"].decode()
    header = card.split("---")[1]
    for needed in (
        "library_name: pytorch",
        "- flow-matching",
        "- class-conditional",
        "- unet",
        "- zalando-datasets/fashion_mnist",
    ):
        assert needed in header, needed
    assert f"python sample.py --model {REPO}" in card and "--hub_token '***'" in card
    assert "| steps | 4 |" in card and "| FID |" in card and "| training hours |" in card
    assert json.loads(files["objective.json"])["steps"] == 4
    # Every request for the run's repo carried the token, and only in its Authorization header. (Libraries may ask
    # the Hub for their own files at import, e.g. bitsandbytes for a CPU kernel when `kernels` is installed.)
    ours = [r for r in hub.requests if REPO in r["path"]]
    assert ours and all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in ours)
    assert f"pushed step 4 to {hub.url}/{REPO}" in proc.stdout
    assert not (out / ".hub").exists()  # staged snapshots are removed once uploaded


def test_a_token_given_on_the_command_line_is_in_no_written_file(pushed):
    out, hub, proc, _ = pushed
    secret = TOKEN.encode()
    written = [p for p in out.rglob("*") if p.is_file()]
    assert len(written) > 10 and not [str(p) for p in written if secret in p.read_bytes()]
    assert not [name for name, data in hub.repos[REPO].items() if secret in data]
    assert TOKEN not in proc.stdout + proc.stderr
    assert command_line("train_cfm.py", ["--hub_token", "abc", "--hub_token=def", "--seed", "1"]) == (
        "python train_cfm.py --hub_token '***' '--hub_token=***' --seed 1"
    )


def test_the_pushed_model_samples_from_its_hub_id_like_the_local_run(pushed):
    out, hub, _, tmp = pushed
    args = ["--num_images", 6, "--num_inference_steps", 2, "--seed", 3]
    with FakeHub() as mirror:  # a fresh server holding what was pushed
        mirror.repos[REPO] = dict(hub.repos[REPO])
        mirror.commits = list(hub.commits)
        env = hub_env(mirror.url, tmp / "home-sample")
        script("sample.py", "--model", REPO, "--output", tmp / "hub.png", *args, env=env)
        assert any(r["path"].endswith("/resolve/" + r["path"].split("/resolve/")[-1]) for r in mirror.requests)
        missing = script("sample.py", "--model", "someone/missing", "--output", tmp / "x.png", env=env, check=False)
    import sample

    sample.main(["--model", str(out), "--output", str(tmp / "local.png"), *map(str, args)])
    assert np.array_equal(np.asarray(Image.open(tmp / "hub.png")), np.asarray(Image.open(tmp / "local.png")))
    assert missing.returncode == 2
    assert "'someone/missing' is neither a local directory nor a model on the Hub" in missing.stderr
    assert "give the path of its directory" in missing.stderr


def test_an_unreachable_hub_does_not_stop_training_and_the_run_pushes_later(tmp_path):
    out = tmp_path / "run"
    dead = f"http://127.0.0.1:{free_port()}"
    proc = script(
        "train_cfm.py",
        "--output_dir",
        out,
        "--max_train_steps",
        2,
        "--checkpointing_steps",
        1,
        "--push_to_hub",
        "--hub_model_id",
        "someone/later",
        "--hub_token",
        TOKEN,
        *TINY,
        env=hub_env(dead, tmp_path / "home"),
    )
    assert "warning: could not push step 1 to the Hub repo 'someone/later'" in proc.stderr
    later = f"python -m modules.artifacts.hub {out} --hub_model_id someone/later"
    assert later in proc.stderr and TOKEN not in proc.stderr
    assert (out / "checkpoints" / "checkpoint-2").is_dir() and (out / "diffusion_pytorch_model.safetensors").is_file()
    with FakeHub() as hub:
        done = run(
            [
                sys.executable,
                "-m",
                "modules.artifacts.hub",
                str(out),
                "--hub_model_id",
                "someone/later",
                "--hub_token",
                TOKEN,
            ],
            env=hub_env(hub.url, tmp_path / "home"),
        )
        assert "pushed" in done.stdout and "README.md" in hub.repos["someone/later"]
        assert hub.repos["someone/later"]["config.json"] == (out / "config.json").read_bytes()


def test_no_token_or_a_malformed_repo_id_warn_before_training(tiny_cfm_run, monkeypatch, capsys):
    import huggingface_hub

    assert "is not a valid repo id" in check_push("not a/valid id!", TOKEN, tiny_cfm_run)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert check_push(REPO, None, tiny_cfm_run).startswith("no Hub token")
    assert check_push(REPO, TOKEN, tiny_cfm_run) is None


def test_init_from_copies_weights_and_refuses_another_architecture(tiny_cfm_run):
    args = ModelArguments(model="unet_s", base_channels=8, class_conditional=True)
    model = build_model(args, 1, 32, num_classes=10)
    trained, _, _ = load_model(tiny_cfm_run)
    assert not torch.equal(model.state_dict()["conv_in.weight"], trained.state_dict()["conv_in.weight"])
    load_pretrained_weights(model, str(tiny_cfm_run))
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in model.state_dict().items())
    other = build_model(ModelArguments(model="unet_s", base_channels=16), 1, 32, num_classes=10)
    with pytest.raises(UserError, match=r"does not fit the model being trained \(\d+ parameter\(s\) differ: "):
        load_pretrained_weights(other, str(tiny_cfm_run))
    with pytest.raises(UserError, match="is a UNetModel, but --model builds a DiTModel"):
        load_pretrained_weights(build_model(ModelArguments(model="dit_tiny", patch_size=4), 1, 32), str(tiny_cfm_run))
    with pytest.raises(UserError, match="no such directory"):
        load_pretrained_weights(model, "./not/here")


def test_offline_hub_id_says_how_to_get_it(capsys, tmp_path):
    import sample

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(SystemExit):
        sample.main(["--model", "someone/not-cached", "--output", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE" in err and "local path" in err and len(err.strip().splitlines()) == 1


def test_model_card_names_components_and_latent_space(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "DiTModel", "sample_size": 32, "in_channels": 4}))
    record = {
        "objective": "flow",
        "steps": 10,
        "images_seen": 640,
        "latent": {"vae": {"source": "stabilityai/sd-vae-ft-ema"}, "image_resolution": 256},
        "text_encoder": {"kind": "clip", "source": "openai/clip-vit-large-patch14"},
    }
    (tmp_path / "objective.json").write_text(json.dumps(record))
    card = model_card(tmp_path, "me/text-dit", {"command": "python train_cfm.py", "config": {}}, None)
    assert "pipeline_tag: text-to-image" in card and "- latent-diffusion" in card
    assert "- stabilityai/sd-vae-ft-ema" in card and "- openai/clip-vit-large-patch14" in card
    assert "4x32x32 latents of the VAE `stabilityai/sd-vae-ft-ema` (256px images)" in card
    assert '--prompt "a photo of a bag"' in card


def test_model_card_of_a_fine_tuned_diffusers_dit_is_class_conditional(tmp_path):
    """A diffusers DiT names its class count num_embeds_ada_norm: its card still says class-conditional."""
    config = {"_class_name": "DiTTransformer2DModel", "sample_size": 8, "in_channels": 4, "num_embeds_ada_norm": 1000}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "objective.json").write_text(json.dumps({"objective": "ddpm", "steps": 4, "images_seen": 32}))
    card = model_card(tmp_path, "me/dit-ft", {"command": "python train_ddpm.py", "config": {}}, None)
    assert "- class-conditional" in card and "--class_labels 0,1,2,3" in card and "unconditional)" not in card


def test_a_local_vae_and_text_encoder_travel_with_the_pushed_model(tiny_cfm_run, clip_text_folder, tmp_path):
    """A model trained with a VAE and a CLIP text encoder from local folders: the pushed folder holds copies of both
    (weights as safetensors only) and names them relatively, so it loads anywhere."""
    import shutil

    from diffusers import AutoencoderKL

    from modules.artifacts.hub import stage
    from modules.artifacts.model_folder import resolve_components
    from modules.networks.text import load_text_encoder
    from modules.networks.vae import load_vae

    vae_dir = tmp_path / "my_vae"
    AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        norm_num_groups=8,
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
    ).save_pretrained(vae_dir)
    (vae_dir / "checkpoints").mkdir()  # a run directory's other contents stay behind
    (vae_dir / "stray.bin").write_bytes(b"pickled")
    record = json.loads((tiny_cfm_run / "objective.json").read_text())
    record["latent"] = {"vae": {"source": str(vae_dir), "kind": "AutoencoderKL"}, "image_resolution": 32}
    record["text_encoder"] = {"kind": "clip", "source": str(clip_text_folder), "max_length": 77}

    def write_model(folder):
        for name in ("config.json", "diffusion_pytorch_model.safetensors"):
            shutil.copy2(tiny_cfm_run / name, folder / name)
        (folder / "objective.json").write_text(json.dumps(record))

    folder = stage(tmp_path / "staged", write_model, REPO, tiny_cfm_run, None)
    staged = json.loads((folder / "objective.json").read_text())
    assert staged["latent"]["vae"]["source"] == "vae" and staged["text_encoder"]["source"] == "text_encoder"
    assert sorted(p.name for p in (folder / "vae").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    text = folder / "text_encoder"
    assert sorted(p.name for p in text.iterdir()) == sorted(p.name for p in clip_text_folder.iterdir())
    moved = tmp_path / "elsewhere"
    shutil.move(folder, moved)
    resolved = resolve_components(staged, moved)
    assert resolved["latent"]["vae"]["source"] == str(moved / "vae")
    assert load_vae(resolved["latent"]["vae"]["source"]).latent_channels == 4
    assert load_text_encoder(resolved["text_encoder"]["source"]).token_dim == 32
    card = (moved / "README.md").read_text()
    assert "base_model" not in card  # local components are not Hub models
