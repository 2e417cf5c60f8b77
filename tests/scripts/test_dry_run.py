"""--dry_run sizes a model without its data and without allocating it: parameters as pinned, FLOPs as counted on
a real forward and backward."""

import pytest
import torch
from helpers import DIT_PARAMS, DIT_SINGLE_PARAMS, UNET_PARAMS


def dry_run(capsys, *argv) -> dict:
    import json

    import train_cfm

    train_cfm.main(["--dry_run", *map(str, argv)])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_dry_run_counts_the_pinned_parameters_without_the_data(capsys, tmp_path):
    """DiT-XL/2 on ImageNet-256 latents (with adaLN-Zero and adaLN-single) and the DDPM CIFAR-10 UNet, sized without
    their data (not available here: the shapes are assumed and said so) and without allocating them."""
    xl = dry_run(
        capsys,
        "--model",
        "dit_xl",
        "--patch_size",
        2,
        "--latent_dataset",
        "someone/imagenet-latents",
        "--resolution",
        256,
        "--output_dir",
        tmp_path / "xl",
    )
    assert xl["parameters"] == DIT_PARAMS["dit_xl"] and xl["num_classes"] == 1000 and xl["input"] == [4, 32, 32]
    assert any("4-channel latents" in note for note in xl["assumed"])
    # --adaln single: FLOPs lower by what the modulation linears it leaves out cost, 27 blocks' (D -> 6D) and the
    # final layer's (D -> 2D), at 2 FLOPs per weight forward and 4 backward.
    argv = ["--model", "dit_xl", "--latent_dataset", "someone/imagenet-latents", "--resolution", 256]
    single = dry_run(capsys, *argv, "--adaln", "single", "--output_dir", tmp_path / "single")
    assert single["parameters"] == DIT_SINGLE_PARAMS["dit_xl"]
    D = 1152
    saved_flops = 6 * (27 * D * 6 * D + D * 2 * D)
    assert (xl["train_gflops_per_image"] - single["train_gflops_per_image"]) * 1e9 == pytest.approx(
        saved_flops, rel=1e-6
    )
    unet = dry_run(
        capsys,
        "--model",
        "unet_l",
        "--dataset_name",
        str(tmp_path / "cifar10"),
        "--num_channels",
        3,
        "--class_conditional",
        "false",
        "--output_dir",
        tmp_path / "l",
    )
    assert unet["parameters"] == UNET_PARAMS["unet_l"] and unet["input"] == [3, 32, 32]
    assert not any((tmp_path / name).exists() for name in ("xl", "single", "l"))


@pytest.mark.parametrize("model", ["unet_s", "dit_tiny"])
def test_dry_run_flops_match_a_real_forward_and_backward(capsys, model):
    """The meta-device count against FlopCounterMode on real tensors, on Fashion-MNIST's real shape, with attention
    on the math path as on the meta device (CPU's fused attention has no FLOP formula for its backward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from modules.config import FlowArguments, ModelArguments
    from modules.networks.presets import build_model
    from modules.objectives.flow import FlowObjective
    from modules.training.flops import training_flops_per_image

    sized = dry_run(capsys, "--model", model, "--patch_size", 4)
    torch.manual_seed(0)
    real = build_model(ModelArguments(model=model, patch_size=4, class_conditional=True), 1, 32, num_classes=10)
    x0, labels = torch.randn(2, 1, 32, 32), torch.tensor([1, 2])
    generator = torch.Generator().manual_seed(0)
    with sdpa_kernel(SDPBackend.MATH):
        flops = training_flops_per_image(real, FlowObjective(FlowArguments()), x0, labels, generator)
    assert sized["train_gflops_per_image"] * 1e9 == pytest.approx(flops, rel=0.05)
    assert sized["parameters"] == sum(p.numel() for p in real.parameters())
