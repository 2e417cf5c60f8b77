"""The KL-VAE, its objective, and `load_vae` over our KLVAE and diffusers' AutoencoderKL, on tiny models offline."""

import re

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DModel

from modules.config import UserError, VAEArguments
from modules.data.images import load_fashion_mnist
from modules.networks.vae import KLVAE, VAE, VAE_PRESETS, load_vae
from modules.objectives.autoencoder import VAEObjective, kl_divergence, psnr
from modules.pixels import resize_uint8, to_model_range


def tiny_autoencoder_kl(**overrides) -> AutoencoderKL:
    torch.manual_seed(0)
    config = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=0.5,
        shift_factor=0.25,
    )
    return AutoencoderKL(**{**config, **overrides})


def tiny_klvae(**overrides) -> KLVAE:
    torch.manual_seed(0)
    return KLVAE(**{**dict(block_out_channels=(8, 16), norm_num_groups=4), **overrides})


def images(n=2, channels=3, size=32, seed=0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("name, params", [("vae_f4", 2_701_995), ("vae_f8", 3_884_203)])
def test_preset_parameter_counts(name, params):
    assert sum(p.numel() for p in VAE_PRESETS[name](in_channels=3).parameters()) == params


@pytest.mark.parametrize("name, factor", [("vae_f4", 4), ("vae_f8", 8)])
def test_preset_shapes(name, factor):
    model = VAE_PRESETS[name](in_channels=1, latent_channels=3)
    x = images(2, 1, 32)
    rec, mean, logvar = model(x, generator=torch.Generator().manual_seed(0))
    assert model.downsample_factor == factor
    assert rec.shape == x.shape and mean.shape == logvar.shape == (2, 3, 32 // factor, 32 // factor)
    # A sampled latent decodes differently from the mean, reproducibly from the generator.
    again = model(x, generator=torch.Generator().manual_seed(0))[0]
    assert torch.equal(rec, again) and not torch.equal(rec, model(x)[0])


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_klvae(in_channels=1).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = KLVAE.from_pretrained(tmp_path).eval()
    x = images(2, 1)
    for a, b in zip(model(x), loaded(x), strict=True):
        assert torch.equal(a, b)
    vae = load_vae(str(tmp_path))
    assert (vae.kind, vae.in_channels, vae.latent_channels, vae.downsample_factor) == ("KLVAE", 1, 4, 2)
    assert (vae.scaling_factor, vae.shift_factor) == (1.0, 0.0)
    mean, std = vae.encode(x)
    assert torch.equal(mean, model.encode(x)[0]) and torch.equal(std, (0.5 * model.encode(x)[1]).exp())


def test_gradient_checkpointing_gives_the_same_gradients():
    model, x = tiny_klvae(), images()
    objective = VAEObjective(VAEArguments())

    def grads():
        model.zero_grad()
        objective.loss(model, x, None, torch.Generator().manual_seed(0)).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.enable_gradient_checkpointing()
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(a, b)


def test_kl_divergence_closed_form():
    mean, logvar = torch.tensor([[0.5, -1.0]]), torch.tensor([[0.0, 2.0]])
    expected = 0.5 * (0.25 + 1 - 1 - 0) + 0.5 * (1 + torch.e**2 - 1 - 2)
    torch.testing.assert_close(kl_divergence(mean, logvar), torch.tensor([expected]))
    assert kl_divergence(torch.zeros(3, 4), torch.zeros(3, 4)).eq(0).all()


def test_psnr():
    x = torch.zeros(2, 1, 4, 4)
    torch.testing.assert_close(psnr(x, x + 0.2), torch.full((2,), 10 * torch.log10(torch.tensor(4 / 0.04)).item()))


@pytest.mark.parametrize("layout", ["model", "pipeline"])
def test_load_autoencoder_kl(tmp_path, layout):
    model = tiny_autoencoder_kl().eval()
    saved = tmp_path / "pipe" / "vae" if layout == "pipeline" else tmp_path / "vae"
    model.save_pretrained(saved, safe_serialization=True)
    directory = saved.parent if layout == "pipeline" else saved
    vae = load_vae(str(directory))
    assert (vae.kind, vae.in_channels, vae.latent_channels, vae.downsample_factor) == ("AutoencoderKL", 3, 4, 2)
    assert (vae.scaling_factor, vae.shift_factor) == (0.5, 0.25)
    assert vae.config_record()["source"] == str(directory)

    x = images(2, 3, 16)
    mean, std = vae.encode(x)
    assert mean.shape == std.shape == (2, 4, 8, 8) and mean.dtype == std.dtype == torch.float32
    assert (std > 0).all()
    dist = model.encode(x).latent_dist
    torch.testing.assert_close(mean, dist.mean)
    torch.testing.assert_close(std, dist.std)
    decoded = vae.decode(mean)
    assert decoded.shape == x.shape and decoded.dtype == torch.float32
    assert decoded.min() >= -1 and decoded.max() <= 1
    # Gray images go in as gray RGB.
    torch.testing.assert_close(vae.encode(x[:, :1])[0], vae.encode(x[:, :1].repeat(1, 3, 1, 1))[0])


def test_bf16_encode_returns_float32(tmp_path):
    tiny_klvae().save_pretrained(tmp_path, safe_serialization=True)
    vae = load_vae(str(tmp_path), dtype=torch.bfloat16)
    mean, std = vae.encode(images())
    assert vae.dtype == torch.bfloat16 and mean.dtype == std.dtype == vae.decode(mean).dtype == torch.float32


def test_bad_inputs(tmp_path):
    tiny_klvae(in_channels=1).save_pretrained(tmp_path / "gray", safe_serialization=True)
    vae = load_vae(str(tmp_path / "gray"))
    with pytest.raises(UserError, match=rf"3 channels .*'{re.escape(str(tmp_path / 'gray'))}' takes 1"):
        vae.encode(images(1, 3))
    with pytest.raises(UserError, match=r"\(1, 1, 15, 15\)"):
        vae.encode(images(1, 1, 15))
    with pytest.raises(UserError, match="do not fit"):
        vae.decode(torch.zeros(1, 3, 4, 4))


def test_load_errors(tmp_path, monkeypatch):
    blocks = dict(down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, block_out_channels=(8, 8))
    UNet2DModel(sample_size=8, norm_num_groups=4, layers_per_block=1, **blocks).save_config(tmp_path)
    with pytest.raises(UserError, match="is a UNet2DModel, not an autoencoder"):
        load_vae(str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no config.json"):
        load_vae(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for missing in [str(tmp_path / "missing"), "nobody-here/no-such-vae"]:
        with pytest.raises(UserError, match="is not a local directory and could not be loaded from the Hub"):
            load_vae(missing)


def test_hub_pipeline_loads_its_vae_subfolder(tmp_path, monkeypatch):
    """The Hub path with the Hub stubbed by a local copy: a pipeline repo has no root config.json, only vae/."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    tiny_autoencoder_kl().save_pretrained(tmp_path / "vae", safe_serialization=True)
    downloads, loads = [], []

    def download(repo_id, filename, subfolder=None, revision=None, **kwargs):
        downloads.append((repo_id, subfolder, revision))
        if subfolder != "vae":
            raise LocalEntryNotFoundError(f"{filename} is not in the repo")
        return str(tmp_path / subfolder / filename)

    load_local = AutoencoderKL.from_pretrained.__func__

    def from_pretrained(cls, name, subfolder=None, revision=None, **kwargs):
        loads.append((name, subfolder, revision, kwargs.get("use_safetensors")))
        return load_local(cls, tmp_path / subfolder, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(AutoencoderKL, "from_pretrained", classmethod(from_pretrained))
    vae = load_vae("someone/tiny-pipeline", revision="v1")
    assert downloads == [("someone/tiny-pipeline", None, "v1"), ("someone/tiny-pipeline", "vae", "v1")]
    assert loads == [("someone/tiny-pipeline", "vae", "v1", True)]
    record = vae.config_record()
    assert record["source"] == "someone/tiny-pipeline" and record["revision"] == "v1"
    assert record["kind"] == "AutoencoderKL" and record["scaling_factor"] == 0.5


def test_random_autoencoder_kl_beats_noise():
    vae, x = VAE(tiny_autoencoder_kl(), "tiny"), images(4, 3, 32)
    decoded = vae.decode(vae.encode(x)[0])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    assert (decoded - x).pow(2).mean() < (noise - x).pow(2).mean()


def test_training_learns_to_reconstruct():
    """100 steps of 16 on 256 Fashion-MNIST images at 16x16, into 8x8x1 latents (a quarter of the pixel values, as
    vae_f4 keeps at 32x32 with 4 channels): held-out PSNR 21.1 dB, from 8.2 untrained and 11.9 for the mean training
    image; 50 steps reach 18.2, 20 steps 14.3, and kl_weight 1 instead of 1e-6 gives 16.8 (measured; ~3 s on one
    CPU core)."""
    train = to_model_range(resize_uint8(load_fashion_mnist("train")[0][:256, None], 16))
    test = to_model_range(resize_uint8(load_fashion_mnist("test")[0][:128, None], 16))
    torch.manual_seed(0)
    model = KLVAE(in_channels=1, block_out_channels=(8, 16), latent_channels=1, norm_num_groups=4, sample_size=16)
    objective = VAEObjective(VAEArguments())
    untrained = psnr(objective.reconstruct(model, test), test).mean()
    baseline = psnr(train.mean(0, keepdim=True).expand_as(test), test).mean()

    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        batch = train[torch.randint(0, len(train), (16,), generator=generator)]
        loss = objective.loss(model, batch, None, generator)
        assert loss.shape == (16,) and loss.dtype == torch.float32
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
    trained = psnr(objective.reconstruct(model, test), test).mean()
    assert trained > 19.0 and trained > baseline + 7 and trained > untrained + 10, (untrained, baseline, trained)
