"""Clips through the training stack in this process: Moving Fashion-MNIST as training data, the choice of network
for clips and images, and the shared-noise frame trainer's noise, consistency term and sampling."""

import dataclasses

import pytest
import torch

from modules.config import DataArguments, DDPMArguments, FlowArguments, ModelArguments, UserError, VAEArguments
from modules.data.batches import random_flip
from modules.data.sources import load_train_data, load_validation_data
from modules.data.video import MovingFashionMNIST
from modules.objectives.autoencoder import VAEObjective
from modules.objectives.ddpm import DDPMObjective
from modules.objectives.flow import FlowObjective, flow_interpolate
from modules.objectives.samplers import sample_generators
from modules.training.setup import sample_shape

CLIPS = DataArguments(dataset_name="moving_fashion_mnist", max_train_samples=12, num_frames=4)


class Recorder(torch.nn.Module):
    """An image network that records its inputs and returns `scale` times them (0: a constant output)."""

    def __init__(self, scale: float = 0.0):
        super().__init__()
        self.scale, self.calls = scale, []
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, cond=None):
        self.calls.append((x.detach().clone(), t.detach().clone(), cond))
        return self.scale * x + self.weight


def test_moving_fashion_mnist_opens_as_clips_with_a_label_per_clip():
    data = load_train_data(CLIPS, need_labels=True)
    assert data.num_frames == 4 and data.num_channels == 1 and data.num_classes == 10 and len(data.dataset) == 12
    assert isinstance(data.dataset, MovingFashionMNIST) and "4f" in data.key and "32px" in data.key
    clips = data.dataset.clips(range(12))
    assert torch.equal(data.dataset.labels, clips.labels)
    assert torch.equal(data.dataset.uint8_images(3), clips.frames[:3])  # what FID references and validation read
    assert sample_shape(data, 32) == (4, 1, 32, 32)
    # The default clip length, and --validation_samples counted in frames.
    assert load_train_data(dataclasses.replace(CLIPS, num_frames=None)).num_frames == 16
    held_out = load_validation_data(dataclasses.replace(CLIPS, validation_samples=10))
    assert len(held_out.dataset) == 2 and held_out.key.startswith("moving_fashion_mnist-test")


@pytest.mark.parametrize(
    "args, needle",
    [
        (dict(num_frames=0), "--num_frames must be at least 1"),
        (dict(frame_stride=2), "--frame_stride 2"),
        (dict(num_moving_items=3), "--num_moving_items must be 1 or 2"),
        (dict(dataset_name="fashion_mnist"), "fashion_mnist holds images, not clips"),
    ],
)
def test_bad_clip_settings_are_one_line_errors(args, needle):
    with pytest.raises(UserError, match=needle):
        load_train_data(dataclasses.replace(CLIPS, **args))


@pytest.mark.parametrize(
    "objective, model, frames, needle",
    [
        (FlowObjective(FlowArguments()), ModelArguments(model="video_dit_tiny"), 0, "generates clips, but the data"),
        (FlowObjective(FlowArguments()), ModelArguments(model="unet_s"), 4, "is an image model, but the data"),
        (
            FlowObjective(FlowArguments()),
            ModelArguments(model="video_dit_tiny", patch_size=4, temporal_patch_size=3),
            4,
            "--num_frames 4 is not divisible by --temporal_patch_size 3",
        ),
        (FlowObjective(FlowArguments(shared_noise=True)), ModelArguments(model="unet_s"), 0, "the data are images"),
        (
            FlowObjective(FlowArguments(shared_noise=True)),
            ModelArguments(model="video_unet_s"),
            4,
            "is a video model",
        ),
        (VAEObjective(VAEArguments()), ModelArguments(), 4, "train_vae.py trains on images"),
        (FlowObjective(FlowArguments()), ModelArguments(model="dit_s", dropout=0.1), 0, "--dropout is a UNet option"),
    ],
)
def test_a_network_for_clips_needs_clips_and_an_image_network_images(objective, model, frames, needle):
    with pytest.raises(UserError, match=needle):
        objective.build_model(model, 1, 32, 10, None, frames)


def test_each_data_kind_builds_its_network():
    flow = FlowObjective(FlowArguments())
    args = ModelArguments(model="video_dit_tiny", patch_size=4, temporal_patch_size=2, video_attention="full")
    video = flow.build_model(args, 1, 16, 10, None, 4)
    assert type(video).__name__ == "VideoDiTModel" and video.config.num_frames == 4
    assert video.config.temporal_patch_size == 2 and video.config.video_attention == "full"
    unet = flow.build_model(ModelArguments(model="video_unet_s", temporal_conv=True), 1, 16, 0, None, 4)
    assert type(unet).__name__ == "VideoUNetModel" and unet.config.temporal_conv
    shared = FlowObjective(FlowArguments(shared_noise=True))
    assert type(shared.build_model(ModelArguments(model="unet_s"), 1, 16, 0, None, 4)).__name__ == "UNetModel"


@pytest.mark.parametrize("objective", [FlowArguments, DDPMArguments])
def test_shared_noise_gives_every_frame_of_a_clip_the_same_noise_and_t(objective):
    args = objective(shared_noise=True)
    obj = FlowObjective(args) if objective is FlowArguments else DDPMObjective(args)
    x0 = torch.rand(3, 4, 1, 8, 8) * 2 - 1
    model = Recorder()
    loss = obj.loss(model, x0, torch.tensor([1, 2, 3]), torch.Generator().manual_seed(0))
    ((x_t, t, cond),) = model.calls
    assert loss.shape == (3,) and x_t.shape == (12, 1, 8, 8)
    assert torch.equal(cond, torch.tensor([1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]))
    t = t.view(3, 4)
    assert torch.equal(t, t[:, :1].expand(3, 4)) and len(t[:, 0].unique()) == 3  # one t per clip
    frames = x0.flatten(0, 1)
    if objective is FlowArguments:  # x_t = (1 - t) x0 + t noise  ->  noise = (x_t - (1 - t) x0) / t
        tt = t.reshape(-1, 1, 1, 1)
        noise = ((x_t - (1 - tt) * frames) / tt).view(3, 4, 1, 8, 8)
    else:  # x_t = sqrt(a) x0 + sqrt(1 - a) noise
        steps = (t.reshape(-1) * obj.args.num_train_timesteps).round().long()
        a = obj.alphas_cumprod[steps].view(-1, 1, 1, 1)
        noise = ((x_t - a.sqrt() * frames) / (1 - a).sqrt()).view(3, 4, 1, 8, 8)
    torch.testing.assert_close(noise, noise[:, :1].expand_as(noise), atol=1e-4, rtol=0)
    assert not torch.allclose(noise[0, 0], noise[1, 0])  # clips differ


def test_the_consistency_term_is_the_frame_difference_of_the_estimates_minus_the_data():
    """With v = 0 the flow estimate of x0 is x_t itself, so the term is computable by hand."""
    x0 = torch.rand(2, 3, 1, 4, 4) * 2 - 1
    noise, t = torch.randn(2, 1, 4, 4), torch.tensor([0.3, 0.8])
    plain = FlowObjective(FlowArguments(shared_noise=True)).loss_at(Recorder(), x0, None, noise, t)
    weighted = FlowObjective(FlowArguments(shared_noise=True, reg_weight=0.5)).loss_at(Recorder(), x0, None, noise, t)
    x_t = flow_interpolate(x0.flatten(0, 1), noise.repeat_interleave(3, 0), t.repeat_interleave(3)).view(x0.shape)
    term = (x_t.diff(dim=1) - x0.diff(dim=1)).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(weighted - plain, 0.5 * term)
    per_frame = (noise[:, None] - x0).pow(2).flatten(2).mean(2).mean(1)  # the velocity loss with v = 0
    torch.testing.assert_close(plain, per_frame)


@pytest.mark.parametrize("sampler", ["euler_maruyama", "heun"])
def test_shared_noise_sampling_starts_every_frame_from_one_noise_and_shares_every_draw(sampler):
    """A network that ignores its input leaves the frames of a clip equal only if they start from the same noise
    and draw the same noise on the way; different clips stay different."""
    objective = FlowObjective(FlowArguments(shared_noise=True, sampler=sampler, num_inference_steps=4))
    generators = sample_generators(0, 0, 2)
    noise = torch.randn(2, 3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    clips = objective.sample(Recorder(), noise, torch.tensor([0, 1]), generators=generators, guidance_scale=1.0)
    assert clips.shape == noise.shape
    torch.testing.assert_close(clips, clips[:, :1].expand_as(clips), atol=0, rtol=0)
    assert not torch.allclose(clips[0, 0], clips[1, 0])
    torch.testing.assert_close(clips[:, 0], noise[:, 0], atol=0, rtol=0) if sampler == "heun" else None


def test_a_clip_is_flipped_whole():
    clips = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 1, 1, 4).expand(2, 3, 1, 2, 4)
    flipped = random_flip(clips, torch.Generator().manual_seed(0))
    for clip, out in zip(clips, flipped, strict=True):
        assert torch.equal(out, clip) or torch.equal(out, clip.flip(-1))
