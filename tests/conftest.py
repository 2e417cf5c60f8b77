"""The tests' environment and shared fixtures: every test runs offline, with caches of the test session's own, on
tiny models. Helpers that are not fixtures live in helpers.py."""

import json
import os
import shutil
import tempfile

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # before datasets/huggingface_hub are imported: no test may reach the network
os.environ.setdefault("WANDB_MODE", "offline")
# FID weights and reference statistics go to a cache of this session's own, not the user's: one folder for the
# controller of a parallel session and all its workers (they inherit its environment; files there are written whole,
# so workers that race each write a complete copy), removed when the session that made it ends.
_made_cache = "DIFFUSION_TEST_CACHE" not in os.environ
if _made_cache:
    os.environ["DIFFUSION_TEST_CACHE"] = tempfile.mkdtemp(prefix="diffusion-test-cache-")
os.environ["DIFFUSION_CACHE"] = os.environ["DIFFUSION_TEST_CACHE"]
# One thread, in this process and in every process a test starts: the workers of a parallel session share the
# cores, and a run's floating-point results depend on its thread count (reductions split differently), so a run made
# here and one made in a process of its own are the same only with the same count.
os.environ["OMP_NUM_THREADS"] = "1"
import torch  # noqa: E402 - after OMP_NUM_THREADS

torch.set_num_threads(1)

from helpers import (  # noqa: E402 - after the environment
    LATENT_FASHION,
    SIX_STEPS,
    TINY_TEXT,
    in_process,
    tiny_ddpm_pipeline,
    tiny_dit_pipeline,
    tiny_tokenizer,
    write_captioned_dataset,
)

from bench.encode_latents import tiny_vae as save_tiny_vae  # noqa: E402


def pytest_unconfigure(config):
    if _made_cache:
        shutil.rmtree(os.environ["DIFFUSION_TEST_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_cfm_run(tmp_path_factory):
    """A finished 6-step class-conditional flow run with checkpoints at steps 3 and 6."""
    out = tmp_path_factory.mktemp("cfm") / "run"
    in_process("train_cfm.py", "--output_dir", out, *SIX_STEPS)
    return out


@pytest.fixture(scope="session")
def hf_clip_tokenizer(tmp_path_factory):
    """transformers' CLIPTokenizer from vocab.json and merges.txt written from open_clip's BPE file."""
    from transformers import CLIPTokenizer

    from modules.networks.tokenizer import clip_vocab

    folder = tmp_path_factory.mktemp("clip-vocab")
    vocab, merges = clip_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizer.from_pretrained(folder)


@pytest.fixture(scope="session")
def clip_text_folder(tmp_path_factory, hf_clip_tokenizer):
    """A tiny CLIPTextModel (as Stable Diffusion's text_encoder) saved with its tokenizer."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from modules.networks.tokenizer import EOT_ID, SOT_ID

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip-text")
    CLIPTextModel(CLIPTextConfig(**TINY_TEXT, bos_token_id=SOT_ID, eos_token_id=EOT_ID)).save_pretrained(folder)
    hf_clip_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def captioned(tmp_path_factory):
    """24 Fashion-MNIST images with labels and templated captions, as a local `datasets` dataset."""
    return write_captioned_dataset(tmp_path_factory.mktemp("captioned"))


@pytest.fixture(scope="session")
def tiny_blip2(tmp_path_factory):
    """A random BLIP-2 (32x32 images, 4 query tokens, OPT with one layer), saved like the Hub's, processor included.
    Weights drawn with std 1 so that captions differ from image to image."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    path = tmp_path_factory.mktemp("blip2") / "tiny"
    tokenizer = tiny_tokenizer("<pad>", "</s>", "<s>")
    ids = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)
    config = Blip2Config(
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=4,
            initializer_range=1.0,
        ),
        qformer_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=37,
            encoder_hidden_size=32,
        ),
        text_config=dict(
            model_type="opt",
            vocab_size=len(tokenizer),
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=4,
            ffn_dim=32,
            word_embed_proj_dim=16,
            max_position_embeddings=64,
            init_std=1.0,
            **ids,
        ),
        num_query_tokens=4,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        initializer_range=1.0,
    )
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(config).save_pretrained(path)
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
    Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=4).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    """A randomly initialised 2-level AutoencoderKL (f2, 4 latent channels), saved like a Hub VAE (the benches')."""
    path = tmp_path_factory.mktemp("vae") / "tiny"
    save_tiny_vae(path)
    return path


@pytest.fixture(scope="session")
def encoded(tiny_vae, tmp_path_factory):
    """48 Fashion-MNIST images in 3 shards of 16, encoded in this process."""
    out = tmp_path_factory.mktemp("latents") / "fashion"
    in_process("encode_latents.py", "--vae", tiny_vae, "--output_dir", out, *LATENT_FASHION)
    return out


@pytest.fixture(scope="session")
def ddpm_pipeline(tmp_path_factory):
    """A tiny DDPMPipeline folder as google/ddpm-cifar10-32 holds one (3 channels, 16x16, clip_sample)."""
    return tiny_ddpm_pipeline(tmp_path_factory.mktemp("diffusers") / "ddpm")


@pytest.fixture(scope="session")
def dit_pipeline(tiny_vae, tmp_path_factory):
    """A tiny DiTPipeline folder as facebook/DiT-XL-2-256 holds one (1000 classes, learned sigma, DDIM, a VAE)."""
    return tiny_dit_pipeline(tmp_path_factory.mktemp("diffusers") / "dit", tiny_vae)


@pytest.fixture(scope="module")
def modules_cache(tmp_path_factory):
    """diffusers copies an export's code into its module cache: for the tests of a module that load exported pipelines,
    one of that module's own, not the user's."""
    from diffusers.utils import dynamic_modules_utils

    cache = tmp_path_factory.mktemp("hf-modules")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(cache))
        yield cache
