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


def test_dry_run_sizes_clips(capsys):
    """Clips (F, C, H, W): a video DiT's parameters are the real model's and its FLOPs per clip those of a real
    forward and backward on real clips; the shared-noise trainer runs its image network once per frame, so a clip
    costs exactly F times an image of the same size in FLOPs (the count is of matmuls and convolutions), and about
    F times in activations."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from modules.config import FlowArguments, ModelArguments
    from modules.networks.presets import build_model
    from modules.objectives.flow import FlowObjective
    from modules.training.flops import training_flops_per_image

    data = ["--dataset_name", "moving_fashion_mnist", "--resolution", 16, "--max_train_samples", 8]
    video = dry_run(capsys, *data, "--num_frames", 4, "--model", "video_dit_tiny", "--patch_size", 4)
    assert video["input"] == [4, 1, 16, 16] and video["num_frames"] == 4 and "train_gflops_per_image" not in video
    torch.manual_seed(0)
    real = build_model(ModelArguments(model="video_dit_tiny", patch_size=4), 1, 16, num_classes=10, num_frames=4)
    assert video["parameters"] == sum(p.numel() for p in real.parameters())
    clips, labels = torch.randn(2, 4, 1, 16, 16), torch.tensor([1, 2])
    with sdpa_kernel(SDPBackend.MATH):
        flops = training_flops_per_image(real, FlowObjective(FlowArguments()), clips, labels, torch.Generator())
    assert video["train_gflops_per_clip"] * 1e9 == pytest.approx(flops, rel=0.05)

    unet = ["--model", "unet_s", "--base_channels", 8]
    shared = dry_run(capsys, *data, "--num_frames", 3, *unet, "--shared_noise", "--reg_weight", 0.1)
    image = dry_run(capsys, "--resolution", 16, "--max_train_samples", 8, *unet)
    assert shared["input"] == [3, 1, 16, 16] and shared["class"] == image["class"] == "UNetModel"
    assert shared["parameters"] == image["parameters"] and image["input"] == [1, 16, 16]
    assert shared["train_gflops_per_clip"] == pytest.approx(3 * image["train_gflops_per_image"], rel=1e-12)
    # Activations too (the frames' own, and the few small tensors of the consistency term); the weights that
    # autograd keeps are not activations: counted per image, they would make a clip cost 2.4 images here.
    assert shared["estimated_activation_gib"] == pytest.approx(3 * image["estimated_activation_gib"], rel=0.01)
