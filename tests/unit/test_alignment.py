"""REPA (modules/training/alignment.py): the encoders' feature grids (the classifier's conv features, a tiny DINOv2
built from a config) matched to the model's tokens or refused, the hidden state read once per forward (also under
gradient checkpointing), the loss as defined, its gradients, and the projector left out of saved models."""

import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from modules.artifacts.model_folder import save_model
from modules.config import FlowArguments, UserError
from modules.evaluation.classifier import FashionMNISTClassifier
from modules.networks.dit import DiTModel
from modules.networks.unet import UNetModel
from modules.objectives.flow import FlowObjective
from modules.training.alignment import Alignment, ClassifierEncoder, VisionModelEncoder, alignment_site


def tiny_dit(**overrides):
    torch.manual_seed(0)
    config = dict(in_channels=1, sample_size=16, patch_size=2, hidden_size=32, depth=3, num_heads=2, num_classes=3)
    return DiTModel(**{**config, **overrides})


def tiny_unet():
    torch.manual_seed(0)
    return UNetModel(in_channels=1, sample_size=16, base_channels=8, channel_mult=(1, 2), num_res_blocks=1)


@pytest.fixture(scope="module")
def classifier_encoder():
    torch.manual_seed(0)
    return ClassifierEncoder(FashionMNISTClassifier())


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    """A DINOv2 of two layers built from a config and saved (patch 4, 24-d, one register-free class token)."""
    from transformers import Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    config = Dinov2Config(
        image_size=32, patch_size=4, hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48
    )
    Dinov2Model(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("grid, block, channels", [(16, 0, 32), (8, 1, 64), (4, 2, 128), (2, 2, 128)])
def test_classifier_features_on_the_model_grid(classifier_encoder, grid, block, channels):
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    features = classifier_encoder(images, grid)
    assert features.shape == (2, grid * grid, channels) and classifier_encoder.dim(grid) == channels
    conv_map = classifier_encoder.feature_maps(images)[block]
    expected = F.avg_pool2d(conv_map, conv_map.shape[-1] // grid).flatten(2).transpose(1, 2)
    torch.testing.assert_close(features, expected)


def test_a_grid_the_classifier_cannot_match_is_refused(classifier_encoder):
    with pytest.raises(UserError, match=re.escape("none of which can be matched to the model's 3x3 tokens")):
        classifier_encoder(torch.zeros(1, 1, 32, 32), 3)


def test_a_vision_transformer_gives_its_patch_tokens_at_the_model_grid(tiny_dinov2):
    from transformers import Dinov2Model

    encoder = VisionModelEncoder(str(tiny_dinov2), "cpu")
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    features = encoder(images, 8)  # 8x8 tokens: the images are resized to 32 px, 8 patches of 4
    assert features.shape == (2, 64, 24) and encoder.dim(8) == 24
    model = Dinov2Model.from_pretrained(tiny_dinov2).eval()
    x = F.interpolate((images + 1) / 2, size=(32, 32), mode="bicubic", antialias=True).expand(-1, 3, -1, -1)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    with torch.no_grad():
        tokens = model(pixel_values=(x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)).last_hidden_state
    torch.testing.assert_close(features, tokens[:, 1:])  # after the class token


def test_an_encoder_without_a_patch_grid_is_refused(tmp_path):
    from transformers import ResNetConfig, ResNetModel

    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1])).save_pretrained(tmp_path)
    with pytest.raises(UserError, match=re.escape("without a patch grid (no patch_size)")):
        VisionModelEncoder(str(tmp_path), "cpu")


def test_repa_depth_beyond_the_model_is_refused():
    with pytest.raises(UserError, match=re.escape("--repa_depth 4: the DiT has 3 blocks; give a depth in 1..3")):
        alignment_site(tiny_dit(), 4)
    with pytest.raises(UserError, match=re.escape("a UNet aligns its middle block; drop --repa_depth")):
        alignment_site(tiny_unet(), 2)
    site, grid, width, where = alignment_site(tiny_dit(), None)
    assert grid == 8 and width == 32 and where == "DiT block 1 of 3"
    assert alignment_site(tiny_unet(), None)[1:3] == (8, 16)


@pytest.mark.parametrize("make, depth", [(tiny_dit, 2), (tiny_unet, None)])
def test_the_loss_is_the_negative_cosine_of_the_projected_hidden_tokens(classifier_encoder, make, depth):
    model = make()
    alignment = Alignment(model, classifier_encoder, depth, weight=0.5, projector_dim=16)
    site = alignment_site(model, depth)[0]
    kept = []
    site.register_forward_hook(lambda module, inputs, output: kept.append(output))
    x0, t = torch.rand(2, 1, 16, 16) * 2 - 1, torch.rand(2)
    with alignment.capture():
        out = model(x0, t, torch.tensor([0, 1]) if model.config.get("num_classes") else None)
        loss = alignment.loss(model, x0, {})
    tokens = kept[0].flatten(2).transpose(1, 2) if kept[0].ndim == 4 else kept[0]
    expected = -0.5 * F.cosine_similarity(model.repa_projector(tokens), classifier_encoder(x0, 8), dim=-1).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()  # the alignment alone reaches the projector and the network's weights below the site
    assert model.repa_projector[0].weight.grad.abs().sum() > 0
    first = model.x_embedder if isinstance(model, DiTModel) else model.conv_in
    assert first.weight.grad.abs().sum() > 0
    assert out.shape == x0.shape
    assert alignment.log_values() == {"repa_similarity": pytest.approx(float(expected) / -0.5)}


def test_one_capture_per_forward_also_with_gradient_checkpointing(classifier_encoder):
    model = tiny_dit()
    model.enable_gradient_checkpointing()
    alignment = Alignment(model, classifier_encoder, 2, weight=1.0, projector_dim=8)
    x0 = torch.rand(2, 1, 16, 16) * 2 - 1
    for _ in range(2):  # the recomputation in backward must not leave a hidden state for the next loss
        with alignment.capture():
            loss = model(x0, torch.rand(2), torch.tensor([0, 2])).square().mean() + alignment.loss(model, x0, {})
        loss.backward()
    with alignment.capture(), pytest.raises(RuntimeError, match="one forward of the network per loss, saw 0"):
        alignment.loss(model, x0, {})


def test_saved_models_leave_the_projector_out(classifier_encoder, tmp_path):
    model = tiny_dit()
    Alignment(model, classifier_encoder, 1, weight=0.5, projector_dim=8)
    save_model(model, FlowObjective(FlowArguments()), tmp_path)
    saved = load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    assert saved and not any(k.startswith("repa_projector") for k in saved)
    assert hasattr(model, "repa_projector")  # still training with it
    assert DiTModel.from_pretrained(tmp_path).state_dict().keys() == saved.keys()
