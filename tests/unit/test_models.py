"""Models: preset sizes, shapes, init, gradients, save/load, gradient checkpointing, conditioning helpers."""

import itertools

import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding
from helpers import DIT_PARAMS, DIT_SINGLE_PARAMS, TINY_UNET, UNET_PARAMS, num_params, perturb_

from modules.networks.conditioning import drop_labels, timestep_embedding
from modules.networks.dit import DIT_PRESETS, GATES, DiTModel, apply_rope, rope_2d_angles
from modules.networks.unet import UNET_PRESETS, UNetModel


def tiny_unet(**overrides) -> UNetModel:
    torch.manual_seed(0)  # same weights on every call, so two builds can be compared
    return UNetModel(**{**TINY_UNET, **overrides})


def tiny_dit(**overrides) -> DiTModel:
    torch.manual_seed(0)  # same weights on every call, so two builds can be compared
    config = dict(in_channels=2, sample_size=16, patch_size=2, hidden_size=32, depth=2, num_heads=2)
    return DiTModel(**{**config, **overrides})


MODEL_FACTORIES = {
    "unet": tiny_unet,
    "dit": lambda **kw: tiny_dit(qk_norm=True, pos_embed="rope", mlp="swiglu", **kw),
    "dit_single": lambda **kw: tiny_dit(adaln="single", **kw),
}


def inputs(batch: int = 3, channels: int = 2, size: int = 16, num_classes: int = 0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g)
    t = torch.rand(batch, generator=g)
    cond = torch.randint(0, num_classes + 1, (batch,), generator=g) if num_classes else None
    return x, t, cond


@pytest.mark.parametrize("name", UNET_PARAMS)
def test_unet_preset_param_count(name):
    with torch.device("meta"):
        model = UNET_PRESETS[name](in_channels=3, sample_size=32, num_classes=0)
    assert num_params(model) == UNET_PARAMS[name]


@pytest.mark.parametrize("name", DIT_PARAMS)
def test_dit_preset_param_count(name):
    with torch.device("meta"):
        model = DIT_PRESETS[name](in_channels=4, sample_size=32, patch_size=2, num_classes=1000)
    assert num_params(model) == DIT_PARAMS[name]


@pytest.mark.parametrize("name", DIT_SINGLE_PARAMS)
def test_dit_adaln_single_param_count(name):
    """Pinned, and adaLN-Zero's count less the depth + 1 modulation linears (6D^2 + 6D per block, 2D^2 + 2D in the
    final layer), plus the shared linear (6D^2 + 6D), a (6, D) table per block and the final layer's (2, D)."""
    with torch.device("meta"):
        model = DIT_PRESETS[name](in_channels=4, sample_size=32, patch_size=2, num_classes=1000, adaln="single")
    D, depth = model.config.hidden_size, model.config.depth
    expected = DIT_PARAMS[name] - (depth - 1) * (6 * D * D + 6 * D) - (2 * D * D + 2 * D) + depth * 6 * D + 2 * D
    assert num_params(model) == DIT_SINGLE_PARAMS[name] == expected


def test_adaln_single_saving_against_pixart_alpha():
    """PixArt-alpha (section 2.3): the adaLN linears are 27% of the parameters of its DiT-XL/2 with cross-attention,
    and adaLN-single replaces them by one. Our DiT-XL/2 with cross-attention to tokens of its own width (PixArt maps
    T5's tokens to that width first) and no classes has that share within half a point, and adaLN-single saves
    within a point of it. The class-conditional DiT-XL/2 has no cross-attention, so the same linears weigh more:
    adaLN-single saves 32.3% of it. Counted on the meta device: nothing is allocated."""

    def counts(**config):
        with torch.device("meta"):
            zero = DIT_PRESETS["dit_xl"](in_channels=4, sample_size=32, patch_size=2, **config)
            single = DIT_PRESETS["dit_xl"](in_channels=4, sample_size=32, patch_size=2, adaln="single", **config)
        adaln = sum(p.numel() for name, p in zero.named_parameters() if "adaLN_modulation" in name)
        return num_params(zero), num_params(single), adaln

    total, single, _ = counts(num_classes=1000)
    assert (total, single) == (DIT_PARAMS["dit_xl"], DIT_SINGLE_PARAMS["dit_xl"])
    assert 1 - single / total == pytest.approx(0.3225, abs=5e-4)
    total, single, adaln = counts(text_conditioning="cross_attn", text_dim=1152, pooled_dim=1152)
    assert (total, single) == (825_148_816, 607_510_672)
    assert adaln / total == pytest.approx(0.27, abs=0.005)
    assert 1 - single / total == pytest.approx(0.27, abs=0.01)


@pytest.mark.parametrize("adaln", ["zero", "single"])
def test_every_dit_block_starts_as_the_identity(adaln):
    """At init each block returns its input exactly, for random tokens, conditioning and text: its gates (and its
    cross-attention's output projection) start at zero. Away from init it does not."""
    model = tiny_dit(adaln=adaln, text_conditioning="cross_attn", text_dim=8, pooled_dim=8)
    g = torch.Generator().manual_seed(1)
    h, c = torch.randn(3, 64, 32, generator=g), torch.randn(3, 32, generator=g)  # (B, N, D), (B, D)
    context = (torch.randn(3, 5, 8, generator=g), torch.rand(3, 5, generator=g) < 0.8)
    with torch.no_grad():
        for perturbed in (False, True):
            if perturbed:
                perturb_(model)
            block_c = c if adaln == "zero" else model.adaLN_shared(c).unflatten(1, (6, -1))  # (B, 6, D)
            for block in model.blocks:
                assert torch.equal(block(h, block_c, None, context), h) != perturbed


def test_a_tiny_adaln_single_dit_learns():
    """Fifty Adam steps of the flow loss on one batch (the same noise and times each step) bring it under 60% of
    where it started, and open every block's gates (all zero at init)."""
    from modules.config import FlowArguments
    from modules.objectives.flow import FlowObjective

    model = tiny_dit(adaln="single", num_classes=5)
    x0, _, labels = inputs(batch=8, num_classes=5)
    objective, optimizer = FlowObjective(FlowArguments()), torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(50):
        loss = objective.loss(model, x0, labels, torch.Generator().manual_seed(1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    assert all(block.scale_shift_table[list(GATES)].abs().min() > 0 for block in model.blocks)


@pytest.mark.parametrize("num_classes", [0, 5])
def test_unet_forward_shapes(num_classes):
    model = perturb_(tiny_unet(out_channels=3, num_classes=num_classes))
    x, t, cond = inputs(num_classes=num_classes)
    assert model(x, t, cond).shape == (3, 3, 16, 16)
    assert model(x, 0.5, cond).shape == (3, 3, 16, 16)
    assert model(torch.randn(2, 2, 8, 24), torch.tensor(0.1)).shape == (2, 3, 8, 24)
    assert model.downsample_factor == 2
    with torch.device("meta"):
        assert UNET_PRESETS["unet_m"](sample_size=32).downsample_factor == 8


@pytest.mark.parametrize(
    "patch_size, pos_embed, qk_norm, mlp",
    list(itertools.product([2, 4, 8], ["absolute", "rope"], [False, True], ["gelu", "swiglu"])),
)
def test_dit_forward_shapes(patch_size, pos_embed, qk_norm, mlp):
    for num_classes in (0, 5):
        model = tiny_dit(
            patch_size=patch_size,
            pos_embed=pos_embed,
            qk_norm=qk_norm,
            mlp=mlp,
            num_classes=num_classes,
            out_channels=3,
        )
        perturb_(model)
        x, t, cond = inputs(num_classes=num_classes)
        assert model(x, t, cond).shape == (3, 3, 16, 16)
        assert model(x, 0.5, cond).shape == (3, 3, 16, 16)
        # Another grid than sample_size / patch_size: position embedding or RoPE angles are computed on the fly.
        assert model(torch.randn(2, 2, 8, 24), 0.5).shape == (2, 3, 8, 24)
        assert model.downsample_factor == patch_size


@pytest.mark.parametrize("kind", MODEL_FACTORIES)
def test_scalar_t_and_null_label_match_explicit_forms(kind):
    model = perturb_(MODEL_FACTORIES[kind](num_classes=5))
    x, _, cond = inputs(num_classes=5)
    with torch.no_grad():
        torch.testing.assert_close(model(x, 0.3, cond), model(x, torch.full((3,), 0.3), cond))
        torch.testing.assert_close(model(x, 0.3), model(x, 0.3, torch.full((3,), 5)))


def test_input_errors_name_the_problem():
    with pytest.raises(ValueError, match="not divisible"):
        tiny_unet()(torch.randn(1, 2, 15, 16), 0.5)
    with pytest.raises(ValueError, match="not divisible"):
        tiny_dit(patch_size=4)(torch.randn(1, 2, 16, 18), 0.5)
    with pytest.raises(ValueError, match="unconditional"):
        tiny_dit()(torch.randn(1, 2, 16, 16), 0.5, torch.tensor([0]))


@pytest.mark.parametrize("kind", MODEL_FACTORIES)
def test_output_is_zero_at_init(kind):
    model = MODEL_FACTORIES[kind](num_classes=5)
    x, t, cond = inputs(num_classes=5)
    assert torch.equal(model(x, t, cond), torch.zeros_like(x))


@pytest.mark.parametrize(
    "kind, num_classes, with_labels",
    [(k, 0, False) for k in MODEL_FACTORIES] + [(k, 5, w) for k in MODEL_FACTORIES for w in (False, True)],
)
def test_every_parameter_gets_a_gradient(kind, num_classes, with_labels):
    x, t, cond = inputs(num_classes=num_classes)
    cond = cond if with_labels else None
    # At init (what DDP without find_unused_parameters sees): every parameter is in the graph.
    model = MODEL_FACTORIES[kind](num_classes=num_classes)
    model(x, t, cond).square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    # Away from the zero init, every parameter actually influences the output.
    model = perturb_(MODEL_FACTORIES[kind](num_classes=num_classes))
    model(x, t, cond).square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()] == []


@pytest.mark.parametrize("kind", MODEL_FACTORIES)
def test_save_pretrained_round_trip(kind, tmp_path):
    model = perturb_(MODEL_FACTORIES[kind](num_classes=5)).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = type(model).from_pretrained(tmp_path).eval()
    public = lambda config: {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if k[0] != "_"}
    assert public(loaded.config) == public(model.config)
    x, t, cond = inputs(num_classes=5)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, cond), model(x, t, cond))


@pytest.mark.parametrize("kind", MODEL_FACTORIES)
def test_gradient_checkpointing_gives_the_same_gradients(kind):
    x, t, cond = inputs(num_classes=5)
    grads = []
    for checkpointing in (False, True):
        model = perturb_(MODEL_FACTORIES[kind](num_classes=5))
        if checkpointing:
            model.enable_gradient_checkpointing()
            assert model.is_gradient_checkpointing
        model(x, t, cond).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_timestep_embedding_matches_diffusers_at_integer_steps():
    steps = torch.tensor([0, 1, 17, 500, 999])
    ours = timestep_embedding(steps / 1000, 64)
    # diffusers' convention [cos, sin] with frequencies max_period^(-i / half) is flip_sin_to_cos, shift 0.
    ref = get_timestep_embedding(steps, 64, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    assert timestep_embedding(0.5, 33).shape == (33,)
    assert timestep_embedding(torch.rand(4), 32).shape == (4, 32)


def test_rope_scores_depend_only_on_relative_position():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 1, 16, generator=g).unbind(0)  # (1, 1, d) each
    angles = rope_2d_angles(16, 6, 6)  # (36, d / 2), row-major grid

    def score(i: int, j: int) -> torch.Tensor:
        rq = apply_rope(q[:, :, None].expand(1, 1, 36, 16), angles.cos(), angles.sin())[0, 0, i]
        rk = apply_rope(k[:, :, None].expand(1, 1, 36, 16), angles.cos(), angles.sin())[0, 0, j]
        return rq @ rk

    # Tokens (row 1, col 2) and (row 3, col 0) vs. the same offset shifted by (+2, +3).
    torch.testing.assert_close(score(1 * 6 + 2, 3 * 6 + 0), score(3 * 6 + 5, 5 * 6 + 3))
    assert not torch.allclose(score(1 * 6 + 2, 3 * 6 + 0), score(1 * 6 + 2, 3 * 6 + 1))


def test_drop_labels_is_reproducible_and_drops_at_the_given_rate():
    labels = torch.randint(0, 10, (20_000,), generator=torch.Generator().manual_seed(1))
    a = drop_labels(labels, 0.1, 10, torch.Generator().manual_seed(0))
    b = drop_labels(labels, 0.1, 10, torch.Generator().manual_seed(0))
    c = drop_labels(labels, 0.1, 10, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    dropped = a == 10
    assert abs(dropped.float().mean().item() - 0.1) < 0.01  # binomial std is 0.002
    assert torch.equal(a[~dropped], labels[~dropped])
    assert torch.equal(drop_labels(labels, 0.0, 10, torch.Generator()), labels)
    assert (drop_labels(labels, 1.0, 10, torch.Generator()) == 10).all()


def test_adaln_single_is_a_dit_option():
    from modules.config import ModelArguments, UserError
    from modules.networks.presets import build_model

    model = build_model(ModelArguments(model="dit_tiny", patch_size=4, adaln="single"), 1, 32, num_classes=10)
    assert model.config.adaln == "single" and model.adaLN_shared is not None
    with pytest.raises(UserError, match="--adaln single is a DiT option, but --model unet_s is a UNet"):
        build_model(ModelArguments(model="unet_s", adaln="single"), 1, 32)


def test_checkpoints_from_before_adaln_resume_as_adaln_zero(tmp_path):
    """A checkpoint's model_config without `adaln` (made before the option) is adaLN-Zero's: compatible with it,
    refused for adaLN-single, naming the key."""
    import json

    from modules.config import UserError
    from modules.training.checkpoint import STATE_FILE, check_compatible

    zero, single = tiny_dit(), tiny_dit(adaln="single")
    recorded = {k: v for k, v in dict(zero.config).items() if k != "adaln"}
    (tmp_path / STATE_FILE).write_text(json.dumps({"model_config": recorded}))
    check_compatible(tmp_path, zero)
    with pytest.raises(UserError, match="adaln: checkpoint 'zero' vs now 'single'"):
        check_compatible(tmp_path, single)


def test_init_from_another_adaln_names_the_flag(tmp_path):
    from modules.artifacts.model_folder import load_pretrained_weights
    from modules.config import UserError

    perturb_(tiny_dit(adaln="single")).save_pretrained(tmp_path)
    with pytest.raises(
        UserError, match="is a DiT with --adaln single, but this run builds --adaln zero; pass --adaln"
    ):
        load_pretrained_weights(tiny_dit(), str(tmp_path))
    model = tiny_dit(adaln="single")
    load_pretrained_weights(model, str(tmp_path))
    assert torch.equal(
        model.blocks[0].scale_shift_table, perturb_(tiny_dit(adaln="single")).blocks[0].scale_shift_table
    )
