"""REPA in training (modules/training/alignment.py): a DiT aligned with a tiny DINOv2 (built from a config) resumes bit
for bit, projector included; the alignment is logged and moves the network; the saved model has no projector and
samples; what REPA does not support is refused in one line, before anything is written."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import LATENT_FASHION, TINY, assert_same, checkpoint_state, fails, in_process, read_metrics
from safetensors.torch import load_file

# A DiT at 16 px with patch 4 (4x4 tokens), aligned at its second block; every random draw of training on.
REPA_DIT = [
    *("--model", "dit_tiny", "--patch_size", 4, "--resolution", 16, "--repa_depth", 2, "--repa_projector_dim", 16),
    *("--random_flip", "--cond_drop_prob", 0.3, "--checkpointing_steps", 2, "--max_train_steps", 4),
    *("--num_sample_images", 2, "--validation_steps", 0),
]


@pytest.fixture(scope="module")
def tiny_vision_encoder(tmp_path_factory):
    """A two-layer DINOv2 with 4 px patches, saved as a transformers folder."""
    from transformers import Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    config = Dinov2Config(
        image_size=16, patch_size=4, hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48
    )
    Dinov2Model(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def repa_run(tmp_path_factory, tiny_vision_encoder):
    out = tmp_path_factory.mktemp("repa") / "run"
    in_process("train_cfm.py", "--output_dir", out, *TINY, *REPA_DIT, "--repa_encoder", tiny_vision_encoder)
    return out


def test_the_run_aligns_and_resumes_exactly(repa_run, tiny_vision_encoder, tmp_path, capsys):
    out = tmp_path / "resumed"
    shutil.copytree(repa_run / "checkpoints" / "checkpoint-2", out / "checkpoints" / "checkpoint-2")
    argv = [*TINY, *REPA_DIT, "--repa_encoder", tiny_vision_encoder, "--resume_from_checkpoint", "latest"]
    in_process("train_cfm.py", "--output_dir", out, *argv)
    assert "resumed from" in capsys.readouterr().out
    whole = checkpoint_state(repa_run / "checkpoints" / "checkpoint-4")
    assert_same(whole, checkpoint_state(out / "checkpoints" / "checkpoint-4"), "state")
    halfway = checkpoint_state(repa_run / "checkpoints" / "checkpoint-2")
    projector = [k for k in whole[0] if k.startswith("repa_projector.")]
    assert projector and any(not torch.equal(halfway[0][k], whole[0][k]) for k in projector)
    similarities = [r["repa_similarity"] for r in read_metrics(repa_run) if "repa_similarity" in r]
    assert len(similarities) == 4 and all(-1 <= s <= 1 for s in similarities)


def test_the_saved_model_has_no_projector_and_samples(repa_run, tmp_path):
    import sample

    saved = load_file(str(repa_run / "diffusion_pytorch_model.safetensors"))
    assert saved and not any(k.startswith("repa_projector") for k in saved)
    sample.main(["--model", str(repa_run), "--num_images", "2", "--output", str(tmp_path / "grid.png")])
    assert (tmp_path / "grid.png").is_file()


@pytest.mark.parametrize(
    "flags, needles",
    [
        (["--repa_depth", 9], ["--repa_depth 9: the DiT has 6 blocks"]),
        (["--objective", "meanflow"], ["--repa_encoder trains flow matching and DDPM image models", "meanflow"]),
        (["--repa_weight", "0"], ["--repa_weight and --repa_projector_dim must be positive"]),
    ],
)
def test_what_repa_cannot_do_is_refused(capsys, tmp_path, tiny_vision_encoder, flags, needles):
    out = tmp_path / "never"
    argv = [*TINY, *REPA_DIT, "--repa_encoder", tiny_vision_encoder, "--output_dir", out, *flags]
    argv = [str(a) for a in argv]
    fails(capsys, argv, *needles)
    assert not out.exists()


def test_an_encoder_whose_grid_cannot_match_is_refused(capsys, tmp_path, tiny_vision_encoder):
    from modules.evaluation.classifier import FashionMNISTClassifier
    from modules.training import alignment

    out = tmp_path / "never"
    # The classifier's grids are 16, 8 and 4: a DiT at 32 px with patch 2 has 16x16 tokens (matched), with patch 8
    # 4x4 (matched), with patch 16 2x2 (pooled); a UNet whose middle block is at 32 / 4 = 8 too. A 3x3 grid: none.
    argv = [*map(str, [*TINY, "--model", "dit_tiny", "--resolution", 24, "--patch_size", 8]), "--output_dir", str(out)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(alignment, "load_or_train_classifier", lambda: FashionMNISTClassifier().eval())
        needle = "none of which can be matched to the model's 3x3 tokens"
        fails(capsys, [*argv, "--repa_encoder", "fashion_mnist_classifier"], needle)
    assert not out.exists()


def test_repa_on_a_latent_dataset_trains_on_the_features_stored_beside_the_latents(
    tiny_vae, tiny_vision_encoder, tmp_path, capsys
):
    """encode_latents.py --repa_encoder stores each image's (and flipped image's) features on an 8x8 grid; a DiT
    with 4x4 tokens trains on them, pooled, while loading any encoder fails; another encoder is refused."""
    from modules.data.latents import read_shard
    from modules.training import alignment

    latents = tmp_path / "latents"
    argv = ["--vae", tiny_vae, "--output_dir", latents, *LATENT_FASHION, "--random_flip"]
    in_process("encode_latents.py", *argv, "--repa_encoder", tiny_vision_encoder)
    meta = json.loads((latents / "latents.json").read_text())
    assert meta["repa"] == {"encoder": str(Path(tiny_vision_encoder).resolve()), "grid": 8, "dim": 24}
    shard = read_shard(latents / meta["shards"][0], ["repa_features", "repa_flip_features"])
    assert shard["repa_features"].shape == (16, 64, 24) and shard["repa_features"].dtype.name == "float16"
    assert (shard["repa_features"] != shard["repa_flip_features"]).any()

    def no_encoder(*args, **kwargs):
        raise AssertionError("the encoder was loaded in training")

    run = tmp_path / "run"
    train = [*("--latent_dataset", latents, "--model", "dit_tiny", "--patch_size", 4, "--random_flip"), *TINY[2:]]
    train += ["--max_train_steps", 2, "--validation_steps", 0, "--repa_encoder", tiny_vision_encoder]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(alignment, "load_encoder", no_encoder)
        in_process("train_cfm.py", "--output_dir", run, *train)
    similarities = [r["repa_similarity"] for r in read_metrics(run) if "repa_similarity" in r]
    assert len(similarities) == 2 and all(-1 <= s <= 1 for s in similarities)
    other = [str(a) for a in [*train[:-1], "fashion_mnist_classifier", "--output_dir", tmp_path / "never"]]
    fails(capsys, other, "--repa_encoder fashion_mnist_classifier: the latent dataset holds", "encode_latents.py")
    assert not (tmp_path / "never").exists()
