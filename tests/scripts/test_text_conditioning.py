"""Text-to-image training: each conditioning mode with each kind of text encoder, caption dropout for guidance, the
denoisers' text layers, and sample.py --prompt."""

import json

import numpy as np
import pytest
import torch
from helpers import TINY_OWN, train_text_model
from PIL import Image

import train_cfm
from modules.networks.conditioning import cat_conditions
from modules.networks.dit import dit_tiny
from modules.networks.unet import unet_s


@pytest.mark.parametrize("mode", ["pooled", "cross_attn"])
@pytest.mark.parametrize("kind", ["minilm", "clip", "own"])
def test_each_mode_trains_with_each_encoder(captioned, clip_text_folder, tmp_path, kind, mode):
    encoder = {"minilm": "minilm", "clip": clip_text_folder, "own": TINY_OWN}[kind]
    config = train_text_model(captioned, tmp_path / "run", encoder, mode)
    assert config["text_conditioning"] == mode and config["pooled_dim"] > 0
    assert (config["text_encoder"] is not None) == (kind == "own")  # only a trained encoder lives in the model
    record = json.loads((tmp_path / "run" / "objective.json").read_text())
    assert record["text_encoder"]["kind"] == kind and len(record["sample_prompts"]) > 0
    assert (tmp_path / "run" / "samples" / "step_0000002.png").is_file()


def test_dit_with_own_encoder_and_sample_prompts(captioned, tmp_path):
    import sample

    run = tmp_path / "dit"
    config = train_text_model(captioned, run, TINY_OWN, "cross_attn", "--model", "dit_tiny", "--patch_size", "8")
    assert config["_class_name"] == "DiTModel"
    sample.main(
        [
            "--model",
            str(run),
            "--prompt",
            "a photo of a bag",
            "--prompt",
            "a photo of a sneaker",
            "--num_images",
            "4",
            "--num_inference_steps",
            "2",
            "--guidance_scale",
            "3",
            "--output",
            str(tmp_path / "grid.png"),
        ]
    )
    assert Image.open(tmp_path / "grid.png").size[0] > 32
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a coat\n\na photo of a dress\n")
    sample.main(
        [
            "--model",
            str(run),
            "--prompt_file",
            str(prompts),
            "--num_images",
            "2",
            "--num_inference_steps",
            "1",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    assert len(list((tmp_path / "out").glob("*.png"))) == 2


@pytest.mark.parametrize("make", [unet_s, lambda **kw: dit_tiny(patch_size=4, **kw)])
def test_text_layers_start_as_identity_and_learn(make):
    """Cross-attention starts at zero (the model ignores the tokens at init) yet gets gradients."""
    torch.manual_seed(0)
    model = make(in_channels=1, sample_size=16, text_conditioning="cross_attn", text_dim=12, pooled_dim=6)
    x, t = torch.randn(2, 1, 16, 16), torch.rand(2)
    cond = {
        "tokens": torch.randn(2, 5, 12),
        "mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool(),
        "pooled": torch.randn(2, 6),
    }
    other = dict(cond, tokens=torch.randn(2, 5, 12))
    assert torch.equal(model(x, t, cond), model(x, t, other))
    model(x, t, cond).square().mean().backward()
    cross = [m for m in model.modules() if type(m).__name__ == "CrossAttention"]
    assert cross and all(m.proj.weight.grad is not None for m in cross)


def test_padding_tokens_are_masked_and_conditions_concatenate():
    a = {"tokens": torch.randn(1, 3, 4), "mask": torch.ones(1, 3, dtype=torch.bool), "pooled": torch.randn(1, 2)}
    b = {"tokens": torch.randn(2, 5, 4), "mask": torch.ones(2, 5, dtype=torch.bool), "pooled": torch.randn(2, 2)}
    both = cat_conditions([a, b])
    assert both["tokens"].shape == (3, 5, 4) and not both["mask"][0, 3:].any()
    torch.manual_seed(0)
    model = unet_s(in_channels=1, sample_size=16, text_conditioning="cross_attn", text_dim=4, pooled_dim=2)
    for m in model.modules():
        if type(m).__name__ == "CrossAttention":
            torch.nn.init.normal_(m.proj.weight)
    x, t = torch.randn(1, 1, 16, 16), torch.rand(1)
    padded = {k: v[:1] for k, v in both.items()}
    padded["tokens"][:, 3:] = 100.0  # what padding holds must not matter
    np.testing.assert_allclose(model(x, t, a).detach(), model(x, t, padded).detach(), atol=1e-5)


def test_text_needs_captions(capsys, tmp_path):
    with pytest.raises(SystemExit):
        train_cfm.main(
            ["--text_encoder", "minilm", "--class_conditional", "false", "--output_dir", str(tmp_path / "r")]
        )
    assert "--text_encoder needs captions" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_frozen_embeddings_are_cached_per_caption_and_equal_a_batch_encoding(monkeypatch):
    from modules.networks.text import TextConditioner, load_text_encoder

    encoder = load_text_encoder("minilm")
    text = TextConditioner(encoder)
    captions = ["a photo of a bag", "a sneaker", "a photo of a bag", ""]
    calls = []
    real = encoder.forward
    monkeypatch.setattr(encoder, "forward", lambda prompts: calls.append(list(prompts)) or real(prompts))
    cond = text(captions)
    again = text(captions[::-1])
    assert calls == [["a photo of a bag", "a sneaker", ""]]  # each distinct caption encoded once
    direct = real(captions)
    np.testing.assert_allclose(cond["pooled"], direct.pooled, atol=1e-5)
    length = cond["tokens"].shape[1]
    np.testing.assert_allclose(cond["tokens"][cond["mask"]], direct.tokens[:, :length][cond["mask"]], atol=1e-5)
    assert torch.equal(cond["mask"], direct.mask[:, :length]) and torch.equal(again["pooled"][0], cond["pooled"][3])


def test_repeated_prompt_flags_all_count():
    import sample
    from modules.config import parse_args

    (args,) = parse_args((sample.SampleArguments,), ["--model", "m", "--prompt", "a bag", "--prompt", "a coat"])
    assert args.prompt == ["a bag", "a coat"]
    (args,) = parse_args((sample.SampleArguments,), ["--model", "m", "--prompt", "a bag", "a coat", "--prompt", "x"])
    assert args.prompt == ["a bag", "a coat", "x"]
