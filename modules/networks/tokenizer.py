"""CLIP's byte-level BPE tokenizer (Radford et al. 2021), read from the vocabulary that ships with open-clip-torch.

Text is cleaned (ftfy when installed, HTML unescaped, whitespace collapsed, lower-cased), split by CLIP's regex into
words, contractions, single digits and runs of punctuation, each word mapped byte by byte to printable unicode and
merged by BPE; the last symbol of a word carries the '</w>' suffix. A tokenized prompt is
[<|startoftext|>, ..., <|endoftext|>], padded with id 0 as open_clip pads.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
from pathlib import Path

import regex
import torch

from modules.config import UserError

SOT_ID = 49406  # <|startoftext|>
EOT_ID = 49407  # <|endoftext|>
VOCAB_SIZE = 49408
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48894: 256 bytes, 256 bytes + '</w>', the merges, two special tokens
PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def clip_bpe_path() -> Path:
    """The gzipped BPE merges file `bpe_simple_vocab_16e6.txt.gz` inside the open_clip package (not imported)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the CLIP BPE vocabulary comes with open-clip-torch, which is not installed: pip install open-clip-torch"
        )
    return Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from the 256 byte values to printable unicode characters (no whitespace)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = printable + [256 + i for i in range(len(others))]
    return {b: chr(c) for b, c in zip(printable + others, chars, strict=True)}


@functools.cache
def clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary (token -> id, 49408 entries) and its BPE merges in priority order.

    Ids: the 256 byte characters, the same with '</w>', one per merge, then <|startoftext|> and <|endoftext|>.
    These are also what transformers' CLIPTokenizer reads from vocab.json and merges.txt.
    """
    lines = gzip.open(clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is a version header
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clean_text(text: str) -> str:
    """CLIP's cleanup: fix mojibake (ftfy, if installed), unescape HTML twice, collapse whitespace, lower-case."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


def pack_token_ids(sequences: list[list[int]], max_length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Truncate each sequence to `max_length` keeping its final (end) token, then right-pad with `pad_id`.

    Returns ids (B, max_length) long, mask (B, max_length) bool (True for real tokens), number truncated.
    """
    ids = torch.full((len(sequences), max_length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), max_length, dtype=torch.bool)
    truncated = 0
    for i, seq in enumerate(sequences):
        if len(seq) > max_length:
            seq = seq[: max_length - 1] + seq[-1:]
            truncated += 1
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = True
    return ids, mask, truncated


class BPETokenizer:
    """`encode(text)` -> ids without special tokens; `tokenizer(texts, max_length)` -> padded ids (B, L), mask."""

    def __init__(self):
        self.encoder, merges = clip_vocab()
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.cache = {"<|startoftext|>": ["<|startoftext|>"], "<|endoftext|>": ["<|endoftext|>"]}

    def bpe(self, word: str) -> list[str]:
        """Merge the characters of one word (already byte-mapped), lowest-ranked adjacent pair first."""
        if word in self.cache:
            return self.cache[word]
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = list(zip(symbols, symbols[1:], strict=False))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self.cache[word] = symbols
        return symbols

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in PATTERN.findall(clean_text(text)):
            mapped = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self.bpe(mapped))
        return ids

    def decode(self, ids: list[int]) -> str:
        text = "".join(self.decoder[i] for i in ids if i not in (SOT_ID, EOT_ID))
        return bytes(self.byte_decoder[c] for c in text).decode("utf-8", "replace").replace("</w>", " ").strip()

    def tokenize(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """[SOT, ..., EOT] per text, truncated to max_length (EOT kept) and padded with 0: ids, mask, n truncated."""
        return pack_token_ids([[SOT_ID, *self.encode(t), EOT_ID] for t in texts], max_length, pad_id=0)

    def __call__(self, texts: list[str] | str, max_length: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask, _ = self.tokenize([texts] if isinstance(texts, str) else texts, max_length)
        return ids, mask


@functools.cache
def clip_tokenizer() -> BPETokenizer:
    """One shared tokenizer: building it parses 48894 merges, and its word cache is worth keeping."""
    return BPETokenizer()
