"""The space-time DiT (networks/video_dit.py): preset sizes, shapes, the zero start, gradients, save/load, and what
its attention mixes: factorized space attention only within a frame, time attention only along time, full attention
everything."""

import pytest
import torch
from helpers import DIT_PARAMS, perturb_

from modules.artifacts.model_folder import load_model, save_model
from modules.config import FlowArguments
from modules.networks.dit import apply_rope
from modules.networks.presets import MODEL_CLASSES
from modules.networks.video_dit import VIDEO_DIT_PRESETS, VideoDiTModel, rope_3d_angles, sincos_3d_pos_embed
from modules.objectives.flow import FlowObjective

# Counted at in_channels=4, sample_size=32, num_frames=16, patch_size=2, temporal_patch_size=1, num_classes=1000,
# video_attention="factorized" (the presets' defaults but for the classes): clips of 16 4x32x32 latents. The
# positions are fixed buffers, so the count does not depend on num_frames or sample_size.
VIDEO_DIT_PARAMS = {"video_dit_tiny": 5_914_000, "video_dit_s": 45_277_456, "video_dit_b": 179_913_232}
# The same with adaln="single".
VIDEO_DIT_SINGLE_PARAMS = {"video_dit_tiny": 4_183_120, "video_dit_s": 30_387_856, "video_dit_b": 120_347_920}

FRAMES, SIZE, CHANNELS = 4, 8, 2  # the tiny clips: (B, 4, 2, 8, 8), a 4 x 4 x 4 token grid at tp = 1, p = 2


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tiny_video_dit(**overrides) -> VideoDiTModel:
    torch.manual_seed(0)  # same weights on every call, so two builds can be compared
    config = dict(
        in_channels=CHANNELS,
        sample_size=SIZE,
        num_frames=FRAMES,
        patch_size=2,
        hidden_size=32,
        depth=2,
        num_heads=2,
        pos_embed="rope",
    )
    return VideoDiTModel(**{**config, **overrides})


def clips(batch: int = 2, frames: int = FRAMES, size: int = SIZE, num_classes: int = 0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, frames, CHANNELS, size, size, generator=g)
    t = torch.rand(batch, generator=g)
    cond = torch.randint(0, num_classes + 1, (batch,), generator=g) if num_classes else None
    return x, t, cond


VARIANTS = [
    dict(video_attention=a, pos_embed=p, temporal_patch_size=tp)
    for a in ("factorized", "full")
    for p in ("absolute", "rope")
    for tp in (1, 2)
]


@pytest.mark.parametrize("name", VIDEO_DIT_PARAMS)
def test_video_dit_preset_param_count(name):
    """Pinned; with full attention the image DiT's count exactly (the same parameters, one token per patch); the
    factorized blocks add a time attention (4D^2 + 4D) and its three modulations (3D^2 + 3D) each; a temporal patch
    of 2 adds the second frame's patch weights and outputs. adaLN-single trades the depth + 1 modulation linears
    (9D^2 + 9D per block, 2D^2 + 2D in the final layer) for one shared 9D-wide linear and (9, D) and (2, D) tables."""
    image = name.removeprefix("video_")
    common = dict(in_channels=4, sample_size=32, num_frames=16, patch_size=2, num_classes=1000)
    with torch.device("meta"):
        factorized = VIDEO_DIT_PRESETS[name](**common)
        full = VIDEO_DIT_PRESETS[name](video_attention="full", **common)
        pairs = VIDEO_DIT_PRESETS[name](temporal_patch_size=2, **common)
        single = VIDEO_DIT_PRESETS[name](adaln="single", **common)
    D, depth, C, p = factorized.config.hidden_size, factorized.config.depth, 4, 2
    assert num_params(factorized) == VIDEO_DIT_PARAMS[name] == DIT_PARAMS[image] + depth * (7 * D * D + 7 * D)
    assert num_params(full) == DIT_PARAMS[image]
    assert num_params(pairs) == VIDEO_DIT_PARAMS[name] + C * p * p * D + p * p * C * (D + 1)
    saved = (depth - 1) * (9 * D * D + 9 * D) + 2 * D * D + 2 * D - depth * 9 * D - 2 * D
    assert num_params(single) == VIDEO_DIT_SINGLE_PARAMS[name] == VIDEO_DIT_PARAMS[name] - saved


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_output_has_the_clip_shape_and_is_zero_at_init(variant):
    model = tiny_video_dit(num_classes=3, out_channels=3, **variant)
    x, t, cond = clips(num_classes=3)
    out = model(x, t, cond)
    assert out.shape == (2, FRAMES, 3, SIZE, SIZE) and torch.equal(out, torch.zeros_like(out))
    assert perturb_(model)(x, t, cond).abs().amin(dim=(0, 2, 3, 4)).gt(0).all()  # every frame, once away from init


@pytest.mark.parametrize("adaln", ["zero", "single"])
def test_every_factorized_block_starts_as_the_identity(adaln):
    """Its three gates (space, time, MLP) and its cross-attention's output projection start at zero."""
    model = tiny_video_dit(adaln=adaln, text_conditioning="cross_attn", text_dim=8, pooled_dim=8)
    g = torch.Generator().manual_seed(1)
    h, c = torch.randn(2, 64, 32, generator=g), torch.randn(2, 32, generator=g)  # (B, N, D), (B, D)
    context = (torch.randn(2, 5, 8, generator=g), torch.rand(2, 5, generator=g) < 0.8)
    _, rope = model.positions(4, 4, 4, "cpu")
    with torch.no_grad():
        for perturbed in (False, True):
            if perturbed:
                perturb_(model)
            block_c = c if adaln == "zero" else model.adaLN_shared(c).unflatten(1, (9, -1))  # (B, 9, D)
            for block in model.blocks:
                assert torch.equal(block(h, block_c, rope, context, 4), h) != perturbed


@pytest.mark.parametrize("attention, adaln", [("factorized", "zero"), ("factorized", "single"), ("full", "zero")])
def test_every_parameter_gets_a_gradient(attention, adaln):
    x, t, cond = clips(num_classes=3)
    model = tiny_video_dit(num_classes=3, video_attention=attention, adaln=adaln, temporal_patch_size=2)
    model(x, t, cond).square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    model = perturb_(tiny_video_dit(num_classes=3, video_attention=attention, adaln=adaln, temporal_patch_size=2))
    model(x, t, cond).square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()] == []


def test_save_and_load_round_trip(tmp_path):
    """save_pretrained / from_pretrained, and a model folder (save_model / load_model) finds the class by name."""
    model = perturb_(tiny_video_dit(num_classes=3, temporal_patch_size=2, adaln="single")).eval()
    x, t, cond = clips(num_classes=3)
    model.save_pretrained(tmp_path / "plain", safe_serialization=True)
    save_model(model, FlowObjective(FlowArguments()), tmp_path / "folder")
    assert MODEL_CLASSES["VideoDiTModel"] is VideoDiTModel
    public = lambda config: {k: v for k, v in config.items() if k[0] != "_"}
    with torch.no_grad():
        for loaded in (VideoDiTModel.from_pretrained(tmp_path / "plain"), load_model(tmp_path / "folder")[0]):
            assert type(loaded) is VideoDiTModel and public(loaded.config) == public(model.config)
            assert torch.equal(loaded.eval()(x, t, cond), model(x, t, cond))


def test_the_interface_is_the_image_dits():
    """Scalar t and the null label (cond=None) equal their explicit forms, text conditioning works, and gradient
    checkpointing gives the same gradients."""
    model = perturb_(tiny_video_dit(num_classes=3))
    x, _, cond = clips(num_classes=3)
    with torch.no_grad():
        torch.testing.assert_close(model(x, 0.3, cond), model(x, torch.full((2,), 0.3), cond))
        torch.testing.assert_close(model(x, 0.3), model(x, 0.3, torch.full((2,), 3)))
    text = perturb_(tiny_video_dit(text_conditioning="cross_attn", text_dim=8, pooled_dim=8))
    g = torch.Generator().manual_seed(2)
    caption = {"tokens": torch.randn(2, 5, 8, generator=g), "mask": torch.ones(2, 5, dtype=torch.bool)}
    caption["pooled"] = torch.randn(2, 8, generator=g)
    with torch.no_grad():
        assert text(x, 0.3, caption).shape == x.shape
    grads = []
    for checkpointing in (False, True):
        model = perturb_(tiny_video_dit(num_classes=3))
        if checkpointing:
            model.enable_gradient_checkpointing()
        model(x, 0.3, cond).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def changed_tokens(attend, x: torch.Tensor, token: int) -> torch.Tensor:
    """Which of the (4, 4, 4) grid's tokens `attend` (B, N, D) -> (B, N, D) changes when token `token` changes."""
    y = x.clone()
    y[:, token] += 1.0
    with torch.no_grad():
        changed = (attend(y) != attend(x)).any(dim=-1)  # (B, N)
    return changed[0].reshape(4, 4, 4)  # (t, row, col)


@pytest.mark.parametrize("pos_embed", ["absolute", "rope"])
def test_factorized_attention_mixes_within_a_frame_then_along_time_and_full_attention_everything(pos_embed):
    """Perturb the token at (t, row, col) = (1, 2, 3): the space attention changes exactly the tokens of time step 1,
    the time attention exactly those at (row 2, col 3), and full attention every token."""
    factorized = perturb_(tiny_video_dit(pos_embed=pos_embed))
    full = perturb_(tiny_video_dit(pos_embed=pos_embed, video_attention="full"))
    x = torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(3))  # (B, N, D), N = 4 x 4 x 4
    token = 1 * 16 + 2 * 4 + 3
    t, rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), torch.arange(4), indexing="ij")
    _, rope = factorized.positions(4, 4, 4, "cpu")
    space_rope, time_rope = rope if rope is not None else (None, None)
    block = factorized.blocks[0]
    space = changed_tokens(lambda h: block.space_attention(h, space_rope, 4), x, token)
    time = changed_tokens(lambda h: block.time_attention(h, time_rope, 4), x, token)
    assert torch.equal(space, t == 1)
    assert torch.equal(time, (rows == 2) & (cols == 3))
    _, rope = full.positions(4, 4, 4, "cpu")
    assert changed_tokens(lambda h: full.blocks[0].attn(h, rope), x, token).all()


def test_factorized_attention_is_attention_over_each_frame_and_each_location_with_their_3d_rope():
    """The space attention of frame t is the block's attention over that frame's tokens alone, rotated by their own
    3-D angles; the time attention at a location likewise over that location's tokens: the 2-D and 1-D slices of
    the angles that the factorized blocks use give the same scores."""
    model = perturb_(tiny_video_dit())
    block = model.blocks[0]
    x = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(4))  # (B, N, D), N = 4 x 4 x 4
    angles = rope_3d_angles(16, 4, 4, 4)  # every token's own angles
    _, (space_rope, time_rope) = model.positions(4, 4, 4, "cpu")
    with torch.no_grad():
        space, time = block.space_attention(x, space_rope, 4), block.time_attention(x, time_rope, 4)
        for group in range(4):
            frame, location = torch.arange(16) + 16 * group, torch.arange(4) * 16 + 5 * group
            for out, attention, tokens in ((space, block.attn, frame), (time, block.temporal_attn, location)):
                rope = (angles[tokens].cos(), angles[tokens].sin())
                torch.testing.assert_close(out[:, tokens], attention(x[:, tokens], rope), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temporal_patch_size", [1, 2])
def test_a_still_clip_stays_still_without_absolute_time(temporal_patch_size):
    """With RoPE and factorized attention time enters only as the offsets between time steps in the time attention,
    which averages values that are all equal when the frames are: a clip of one repeated frame comes out as one
    repeated output (per temporal patch). With the absolute 3-D embedding, or RoPE under full attention (where a
    token's offsets to the whole clip depend on its own time step), the frames come out different."""
    tp = temporal_patch_size
    x, t, cond = clips(num_classes=3, frames=8)
    still = x[:, :1].expand_as(x).contiguous()  # (B, F, C, H, W), one frame repeated
    for variant, stays_still in (
        (dict(pos_embed="rope"), True),
        (dict(pos_embed="absolute"), False),
        (dict(pos_embed="rope", video_attention="full"), False),
    ):
        model = perturb_(tiny_video_dit(num_classes=3, num_frames=8, temporal_patch_size=tp, **variant))
        with torch.no_grad():
            out = model(still, t, cond)
        # Frame f and frame f + tp are the same frame of neighbouring temporal patches.
        gap = (out[:, tp:] - out[:, :-tp]).abs().max().item()
        assert (gap < 1e-5) == stays_still, (variant, gap)
        assert out.abs().max() > 1e-2


@pytest.mark.parametrize("pos_embed", ["absolute", "rope"])
def test_clips_of_another_length_and_size_get_the_positions_of_their_grid(pos_embed):
    """A model built for 4 frames of 8x8, given 8 frames of 16x16, computes what a model built for those gives."""
    small = perturb_(tiny_video_dit(pos_embed=pos_embed, num_classes=3))
    large = tiny_video_dit(pos_embed=pos_embed, num_classes=3, num_frames=8, sample_size=16)
    large.load_state_dict(small.state_dict())
    x, t, cond = clips(num_classes=3, frames=8, size=16)
    with torch.no_grad():
        assert torch.equal(small(x, t, cond), large(x, t, cond))


def test_3d_positions_split_channels_between_time_row_and_column():
    """RoPE scores depend only on the offset (dt, drow, dcol). The first quarter of the channels (of the RoPE angles'
    head_dim / 2 pairs, of the sin-cos embedding's D) is a function of the time step alone, the next 3/8 of the row,
    the last 3/8 of the column."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 1, 1, 16, generator=g).unbind(0)  # (1, 1, 1, d) each
    angles = rope_3d_angles(16, 3, 4, 5)  # (60, d / 2) in (t, row, col) order
    assert angles.shape == (60, 8)
    rq = apply_rope(q.expand(1, 1, 60, 16), angles.cos(), angles.sin())[0, 0]  # (N, d)
    rk = apply_rope(k.expand(1, 1, 60, 16), angles.cos(), angles.sin())[0, 0]
    index = lambda t, r, c: t * 20 + r * 5 + c
    score = lambda a, b: rq[index(*a)] @ rk[index(*b)]
    torch.testing.assert_close(score((0, 1, 2), (1, 3, 0)), score((1, 0, 3), (2, 2, 1)))
    for moved in ((2, 3, 0), (1, 2, 0), (1, 3, 1)):  # the offset changed along one axis
        assert not torch.allclose(score((0, 1, 2), (1, 3, 0)), score((0, 1, 2), moved))
    for table, (t_end, row_end) in ((angles, (2, 5)), (sincos_3d_pos_embed(32, 3, 4, 5), (8, 20))):
        grid = table.reshape(3, 4, 5, -1)  # (t, row, col, channels)
        time, row, col = grid[..., :t_end], grid[..., t_end:row_end], grid[..., row_end:]
        assert torch.equal(time, time[:, :1, :1].expand_as(time)) and not torch.equal(time[0], time[1])
        assert torch.equal(row, row[:1, :, :1].expand_as(row)) and not torch.equal(row[:, 0], row[:, 1])
        assert torch.equal(col, col[:1, :1].expand_as(col)) and not torch.equal(col[..., 0, :], col[..., 1, :])


def test_bad_settings_and_inputs_name_the_problem():
    with pytest.raises(ValueError, match=r"num_frames \(6\) must be divisible by temporal_patch_size \(4\)"):
        tiny_video_dit(num_frames=6, temporal_patch_size=4)
    model = tiny_video_dit(temporal_patch_size=2)
    with pytest.raises(ValueError, match=r"num_frames \(3\) is not divisible by temporal_patch_size \(2\)"):
        model(torch.randn(1, 3, CHANNELS, SIZE, SIZE), 0.5)
    with pytest.raises(ValueError, match=r"clips \(B, F, C, H, W\), got shape \(1, 2, 8, 8\)"):
        model(torch.randn(1, CHANNELS, SIZE, SIZE), 0.5)
    with pytest.raises(ValueError, match="not divisible by the DiT patch size"):
        model(torch.randn(1, 4, CHANNELS, SIZE, 9), 0.5)
    with pytest.raises(ValueError, match="video_attention must be one of"):
        tiny_video_dit(video_attention="divided")
    with pytest.raises(ValueError, match="RoPE needs hidden_size / num_heads divisible by 16"):
        tiny_video_dit(hidden_size=48, num_heads=2)
