"""The video UNet: preset sizes, shapes, its temporal layers starting as the identity (an image UNet's weights give
per-frame outputs equal to the image UNet's), what the temporal layers mix, gradients, and save/load."""

import json

import pytest
import torch
from helpers import TINY_UNET, UNET_PARAMS, num_params, perturb_
from safetensors.torch import load_file

import modules.networks.video_unet as video_unet
from modules.artifacts.model_folder import load_model, save_model
from modules.config import FlowArguments, UserError
from modules.networks.unet import UNetModel
from modules.networks.video_unet import (
    VIDEO_UNET_PRESETS,
    TemporalBlock,
    VideoUNetModel,
    load_image_unet_weights,
    temporal_parameter_names,
)
from modules.objectives.flow import FlowObjective

# Video UNets at in_channels=3, sample_size=32, unconditional: the image presets' configuration (UNET_PARAMS), without
# and with temporal_conv.
VIDEO_UNET_PARAMS = {
    "video_unet_s": (1_162_163, 1_256_963),
    "video_unet_m": (11_069_763, 11_924_739),
    "video_unet_l": (42_857_603, 46_263_299),
}
TINY = TINY_UNET
TEXT = dict(text_conditioning="cross_attn", text_dim=8, pooled_dim=8)


def image_unet(**overrides) -> UNetModel:
    """A tiny image UNet with every parameter away from its init, so that no zero layer hides the rest."""
    torch.manual_seed(0)
    return perturb_(UNetModel(**{**TINY, "num_classes": 5, **overrides}))


def clips(batch: int = 2, frames: int = 3, text: bool = False, seed: int = 0):
    """Random clips (B, F, 2, 16, 16), times (B,) and a condition per clip: class labels (the null class among
    them) or text tokens, mask and pooled embedding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, frames, 2, 16, 16, generator=g)
    t = torch.rand(batch, generator=g)
    if not text:
        return x, t, torch.tensor([5, 2, 0, 4][:batch])
    tokens, pooled = torch.randn(batch, 4, 8, generator=g), torch.randn(batch, 8, generator=g)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])[:batch]
    return x, t, {"tokens": tokens, "mask": mask, "pooled": pooled}


def per_frame(unet: UNetModel, x, t, cond) -> torch.Tensor:
    """The image UNet applied to each frame of the clips on its own: (B, F, C, H, W)."""
    return torch.stack([unet(x[:, f], t, cond) for f in range(x.shape[1])], dim=1)


@pytest.mark.parametrize("name", VIDEO_UNET_PARAMS)
def test_video_unet_preset_param_count(name):
    """Pinned, and equal to the image preset's count plus each temporal block's: 4C^2 + 6C for the attention (layer
    norm, qkv, output projection) and 3C^2 + 3C for the convolution (layer norm, kernel 3), C its channels."""
    for temporal_conv, expected in zip((False, True), VIDEO_UNET_PARAMS[name], strict=True):
        with torch.device("meta"):
            model = VIDEO_UNET_PRESETS[name](in_channels=3, sample_size=32, num_classes=0, temporal_conv=temporal_conv)
        channels = [m.attention.norm.normalized_shape[0] for m in model.modules() if isinstance(m, TemporalBlock)]
        per_block = [4 * c * c + 6 * c + temporal_conv * (3 * c * c + 3 * c) for c in channels]
        assert num_params(model) == expected == UNET_PARAMS[name.removeprefix("video_")] + sum(per_block)


def test_a_temporal_block_follows_every_block_holding_a_resblock():
    """One after each down and up block with a ResBlock and the middle block, none in the Downsample blocks, and
    before the Upsample; the spatial state dict keys are the image UNet's, and at one seed so are its weights."""
    torch.manual_seed(0)
    image = UNetModel(**TINY).state_dict()
    torch.manual_seed(0)
    model = VideoUNetModel(**TINY)
    down = [i for i, block in enumerate(model.down_blocks) if hasattr(block, "temporal")]
    up = [[type(layer).__name__ for layer in block] for block in model.up_blocks]
    assert down == [0, 2] and len(model.down_blocks) == 3
    assert up[1] == ["ResBlock", "AttentionBlock", "TemporalBlock", "Upsample"] and all(
        "TemporalBlock" in u for u in up
    )
    assert list(model.mid_block.named_children())[-1][0] == "temporal"
    video = model.state_dict()
    temporal = temporal_parameter_names(model)
    assert set(video) - temporal == set(image) and all(".temporal." in k for k in temporal)
    assert all(torch.equal(video[k], v) for k, v in image.items())


@pytest.mark.parametrize("temporal_conv", [False, True])
def test_forward_shape(temporal_conv):
    model = VideoUNetModel(**TINY, out_channels=3, num_classes=5, temporal_conv=temporal_conv)
    x, t, labels = clips(frames=4)
    with torch.no_grad():
        assert model(x, t, labels).shape == (2, 4, 3, 16, 16)
        assert model(x[:, :1], 0.5).shape == (2, 1, 3, 16, 16)  # one frame, one t for all, the null class
    with pytest.raises(ValueError, match=r"clips of shape \(B, F, C, H, W\), got shape \(2, 2, 16, 16\)"):
        model(x[:, 0], t, labels)
    with pytest.raises(ValueError, match=r"not divisible by the UNet's downsample factor 2"):
        model(x[..., :15], t, labels)


@pytest.mark.parametrize("temporal_conv", [False, True])
@pytest.mark.parametrize("text", [False, True])
def test_an_image_unet_loaded_into_the_video_unet_denoises_each_frame_alone(temporal_conv, text):
    """With an image UNet's weights and its temporal layers at init, the video UNet's output for each frame is the
    image UNet's for that frame alone (to float rounding: the image UNet's convolutions round differently at another
    batch size), for random clips, times and labels or text; and exactly the image UNet's blocks on the clips'
    frames as one batch."""
    unet = image_unet(**(TEXT if text else {}))
    model = VideoUNetModel.from_image_unet(unet, temporal_conv=temporal_conv)
    x, t, cond = clips(text=text)
    with torch.no_grad():
        out = model(x, t, cond)
        expected = per_frame(unet, x, t, cond)
        emb, context = unet.embed_condition(t, cond, 2, x.dtype)
        context = context and tuple(c.repeat_interleave(3, dim=0) for c in context)
        folded = unet.apply_blocks(x.flatten(0, 1), emb.repeat_interleave(3, dim=0), context).unflatten(0, (2, 3))
    assert expected.abs().mean() > 0.1  # not trivially zero
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert torch.equal(out, folded)


def test_init_from_a_saved_image_unet(tmp_path):
    """The image UNet's folder (config.json and safetensors, what --init_from reads) gives the same video UNet as
    the image UNet in memory; the temporal layers keep their init."""
    unet = image_unet()
    unet.save_pretrained(tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    torch.manual_seed(1)
    model = VideoUNetModel(**TINY, num_classes=5, temporal_conv=True)
    temporal = {k: v.clone() for k, v in model.state_dict().items() if k in temporal_parameter_names(model)}
    load_image_unet_weights(
        model, load_file(tmp_path / "diffusion_pytorch_model.safetensors"), config, "--init_from x"
    )
    x, t, labels = clips()
    with torch.no_grad():
        assert torch.equal(model(x, t, labels), VideoUNetModel.from_image_unet(unet)(x, t, labels))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in temporal.items())


def test_weights_that_do_not_fit_are_refused_naming_them():
    model = VideoUNetModel(**TINY, num_classes=5)
    state, config = image_unet().state_dict(), {"_class_name": "UNetModel", **TINY, "num_classes": 5}
    with pytest.raises(UserError, match=r"^--init_from 'd' is a DiTModel, but only an image UNet \(UNetModel\) loads"):
        load_image_unet_weights(model, state, {"_class_name": "DiTModel"}, "--init_from 'd'")
    with pytest.raises(
        UserError, match=r"^w has num_head_channels 4, but the video UNet has 8; build it with the same"
    ):
        load_image_unet_weights(model, state, {**config, "num_head_channels": 4}, "w")
    wide = image_unet(base_channels=16).state_dict()
    with pytest.raises(
        UserError, match=r"^w does not fit the video UNet's spatial layers \(\d+ parameter\(s\) differ: "
    ):
        load_image_unet_weights(model, wide, {**config, "base_channels": 16}, "w")
    video_state = model.state_dict()  # a video UNet's weights are not an image UNet's
    with pytest.raises(
        UserError, match=r"\(42 parameter\(s\) differ: down_blocks\.0\.temporal\.attention\.norm\.weight"
    ):
        load_image_unet_weights(model, video_state, config, "w")
    with pytest.raises(TypeError, match="takes an image UNetModel, got a VideoUNetModel"):
        VideoUNetModel.from_image_unet(model)


@pytest.mark.parametrize("layer", ["attention.proj", "conv.conv"])
def test_frames_interact_only_once_a_temporal_layer_is_away_from_init(layer):
    """Changing frame 1 leaves frame 0's output exactly as it was while the temporal layers are at init; once one
    temporal layer's output projection (or convolution) is perturbed, frame 0's output changes with frame 1."""
    model = VideoUNetModel.from_image_unet(image_unet(), temporal_conv=True)
    x, t, labels = clips()
    changed = x.clone()
    changed[:, 1] += torch.randn(changed[:, 1].shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for perturbed in (False, True):
            if perturbed:
                perturb_(model.mid_block.temporal.get_submodule(layer))
            a, b = model(x, t, labels), model(changed, t, labels)
            assert torch.equal(a[:, 0], b[:, 0]) != perturbed
            assert not torch.equal(a[:, 1], b[:, 1])


def test_temporal_layers_mix_only_along_time_at_one_position(monkeypatch):
    """A temporal block (attention and convolution, all weights perturbed) given a change at one (clip, frame,
    position) changes its output at that clip and position in every frame, and nowhere else; attended in batches of
    at most 5 positions, the output is the same."""
    torch.manual_seed(0)
    block = perturb_(TemporalBlock(8, num_head_channels=4, temporal_conv=True))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * 4, 8, 5, 6, generator=g)  # 2 clips of 4 frames, (B*F, C, H, W)
    changed = x.clone()
    changed[1 * 4 + 2, :, 3, 1] += 1.0  # clip 1, frame 2, position (3, 1)
    with torch.no_grad():
        out, out_changed = block(x, 4), block(changed, 4)
        monkeypatch.setattr(video_unet, "MAX_ATTENTION_BATCH", 5)
        torch.testing.assert_close(block(x, 4), out, atol=1e-6, rtol=0)
    differs = (out - out_changed).abs().amax(dim=1).unflatten(0, (2, 4)) > 0  # (B, F, H, W)
    expected = torch.zeros_like(differs)
    expected[1, :, 3, 1] = True
    assert torch.equal(differs, expected)
    with pytest.raises(ValueError, match="a batch of 8 frames is not whole clips of 3 frames"):
        block(x, 3)


def test_gradients_reach_the_temporal_layers():
    """At init the temporal output projections and convolutions get gradients (the rest of each temporal layer
    waits behind their zeros); once those are non-zero, every temporal parameter does. Gradient checkpointing gives
    the same gradients."""
    model = VideoUNetModel.from_image_unet(image_unet(), temporal_conv=True)
    x, t, labels = clips()

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(x, t, labels).square().mean().backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if ".temporal." in k}

    grads = gradients()
    assert all(grads[k].abs().sum() > 0 for k in grads if k.endswith(("proj.weight", "conv.conv.weight")))
    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, TemporalBlock):
                perturb_(block.attention.proj)
                perturb_(block.conv.conv)
    grads = gradients()
    assert len(grads) == 7 * 10 and all(g.abs().sum() > 0 for g in grads.values())
    model.enable_gradient_checkpointing()
    checkpointed = gradients()
    assert all(torch.equal(checkpointed[k], grads[k]) for k in grads)


def test_save_and_load_round_trip(tmp_path):
    """save_pretrained/from_pretrained, and the model folder of a run (save_model/load_model, which find the class
    by its name in MODEL_CLASSES), give back the same config and the same outputs."""
    model = perturb_(VideoUNetModel(**TINY, num_classes=5, temporal_conv=True))
    model.save_pretrained(tmp_path / "plain", safe_serialization=True)
    save_model(model, FlowObjective(FlowArguments()), tmp_path / "run")
    x, t, labels = clips()
    with torch.no_grad():
        expected = model(x, t, labels)
        for loaded in (VideoUNetModel.from_pretrained(tmp_path / "plain"), load_model(tmp_path / "run")[0]):
            assert type(loaded) is VideoUNetModel and loaded.config.temporal_conv
            assert torch.equal(loaded(x, t, labels), expected)
