"""What each token of a vocabulary stands for, as bytes of text (framework-free).

Two tokenizers agree on text, not on ids: Llama 2's ``▁the`` and Qwen's ``Ġthe`` are both " the".
The teacher-token builder measures where tokens end in a shared text with :func:`token_bytes`;
the projector initialization pairs the two vocabularies with :func:`shared_vocabulary`. Read from
the serialized Rust tokenizer: GPT-2's byte alphabet for byte-level BPE, the ``▁`` marker and
``<0xHH>`` byte-fallback pieces for sentencepiece-style vocabularies. The plugin warns about
control tokens one side reads as plain text (:func:`special_token_differences`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_INVALID = "\U0010ffff"
"""Translation of characters outside the byte-level alphabet: not Latin-1, so encoding fails."""


@lru_cache(maxsize=1)
def _byte_level_table() -> dict[int, str]:
    """``str.translate`` table from GPT-2's bytes-to-unicode alphabet back to Latin-1 characters
    (one per byte); every other character below 256 maps to a non-Latin-1 one, so that
    ``.encode("latin-1")`` rejects tokens that are not byte-level strings."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[256 + shifted] = chr(b)
            shifted += 1
    for c in range(256):
        if c not in printable:
            table[c] = _INVALID
    return table


def _walk(state: Any) -> Iterator[dict]:
    """Every JSON object in a tokenizer component's serialized state, nested ones included."""
    if isinstance(state, dict):
        yield state
        for value in state.values():
            yield from _walk(value)
    elif isinstance(state, list):
        for value in state:
            yield from _walk(value)


def _component_states(tokenizer: Any) -> list[dict]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    states = []
    for name in ("decoder", "pre_tokenizer", "normalizer"):
        component = getattr(backend, name, None)
        if component is not None:
            states.extend(_walk(json.loads(component.__getstate__())))
    return states


def _text_scheme(tokenizer: Any) -> tuple[str, str]:
    """How a vocabulary entry spells its text: ``("byte_level", "")`` (GPT-2 alphabet) or
    ``("metaspace", marker)`` (the marker stands for a space; the rest is literal text), from the
    backend's decoder, pre-tokenizer and normalizer."""
    states = _component_states(tokenizer)
    if any(s.get("type") == "ByteLevel" for s in states):
        return "byte_level", ""
    for s in states:
        if s.get("type") == "Metaspace" and s.get("replacement"):
            return "metaspace", s["replacement"]
        # a decoder's Replace(marker -> " "); a normalizer's (" " -> marker) has content != " "
        pattern = s.get("pattern") if s.get("type") == "Replace" and s.get("content") == " " else None
        if isinstance(pattern, dict) and pattern.get("String"):
            return "metaspace", pattern["String"]
    return "metaspace", "▁"  # sentencepiece's marker; harmless for a vocabulary without it


def _model_vocab(tokenizer: Any) -> dict[str, int]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.get_vocab(with_added_tokens=False)
    return tokenizer.get_vocab()


def _pieces(tokenizer: Any) -> Iterator[tuple[int, bytes, bool]]:
    """``(id, bytes, byte_fallback)`` of each entry of the model's vocabulary: the bytes it
    contributes to a decoded text (a byte-level token may hold part of a character)."""
    scheme, marker = _text_scheme(tokenizer)
    table = _byte_level_table()
    for piece, i in _model_vocab(tokenizer).items():
        if scheme == "byte_level":
            try:
                yield i, piece.translate(table).encode("latin-1"), False
            except UnicodeError:  # not in the byte alphabet
                continue
        elif _BYTE_FALLBACK.fullmatch(piece):
            yield i, bytes([int(piece[3:5], 16)]), True
        else:
            yield i, piece.replace(marker, " ").encode(), False


def _added_texts(tokenizer: Any) -> dict[int, str]:
    """Id -> the text each added token stands for: its content, where a sentencepiece-style
    vocabulary's marker is a space, as its decoder spells it (Gemma's runs of spaces ``▁▁`` are
    added tokens, not text with the marker in it)."""
    scheme, marker = _text_scheme(tokenizer)
    added = getattr(tokenizer, "added_tokens_decoder", {})
    if scheme == "byte_level":
        return {i: token.content for i, token in added.items()}
    return {i: token.content.replace(marker, " ") for i, token in added.items()}


PROBE_TEXT = "Hello, world! 123"


def encodes_text(tokenizer: Any) -> bool:
    """Whether the tokenizer turns text into tokens at all: transformers builds an empty one,
    which gives no tokens for any text, for a model folder without tokenizer files."""
    return bool(tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"])


def token_bytes(tokenizer: Any) -> dict[int, bytes] | None:
    """Id -> the bytes the token stands for in a decoded text (added tokens: their text), or
    ``None`` for a tokenizer without a Rust backend, whose vocabulary cannot be read this way."""
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        return None
    table = {i: data for i, data, _ in _pieces(tokenizer)}
    table.update((i, text.encode()) for i, text in _added_texts(tokenizer).items())
    return table


def token_texts(tokenizer: Any) -> dict[str, int]:
    """Text -> id of the tokens that stand for a complete UTF-8 text on their own.

    Left out: special tokens, sentencepiece byte-fallback pieces (``<0x41>``), byte-level tokens
    holding part of a character, and all but the lowest id of tokens that spell the same text.
    Added tokens that are not special (Qwen's ``<think>``, Gemma's ``▁▁``) stand for their text
    (``<think>``, two spaces).
    """
    added = getattr(tokenizer, "added_tokens_decoder", {})
    excluded = set(getattr(tokenizer, "all_special_ids", [])) | {
        i for i, token in added.items() if token.special
    }
    texts: dict[int, str] = {}
    for i, data, byte_fallback in _pieces(tokenizer):
        if i in excluded or i in added or byte_fallback:
            continue
        try:
            texts[i] = data.decode("utf-8")
        except UnicodeError:  # a partial character
            continue
    for i, text in _added_texts(tokenizer).items():
        if i not in excluded:
            texts[i] = text
    by_text: dict[str, int] = {}
    for i in sorted(texts):
        by_text.setdefault(texts[i], i)
    by_text.pop("", None)
    return by_text


def shared_vocabulary(student_tokenizer: Any, teacher_tokenizer: Any) -> tuple[Tensor, Tensor]:
    """``(student_ids, teacher_ids)``: the tokens of both vocabularies that stand for the same text
    (so Llama 2's ``▁the`` pairs with Qwen's ``Ġthe``), one to one, in increasing student id."""
    student, teacher = token_texts(student_tokenizer), token_texts(teacher_tokenizer)
    pairs = sorted((i, teacher[text]) for text, i in student.items() if text in teacher)
    ids = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
    return ids[:, 0].contiguous(), ids[:, 1].contiguous()


def special_token_differences(student_tokenizer: Any, teacher_tokenizer: Any) -> list[str]:
    """Control tokens of one model that are plain text to the other, each with an example.

    BOS, EOS, pad and unk are mapped or dropped by the builder; any other special token (chat
    markers) keeps its text, so a marker the other model reads as ordinary characters changes
    what the two models see, not only the ids.
    """
    mapped = {"bos_token", "eos_token", "pad_token", "unk_token"}
    notes = []
    for side, this, other in (("student", student_tokenizer, teacher_tokenizer),
                              ("teacher", teacher_tokenizer, student_tokenizer)):  # fmt: skip
        skip = {getattr(this, attr, None) for attr in mapped}
        for token in this.all_special_tokens:
            if token in skip:
                continue
            ids = other.encode(token, add_special_tokens=False)
            if len(ids) == 1 and ids[0] in other.all_special_ids:
                continue
            pieces = other.convert_ids_to_tokens(ids)
            notes.append(
                f"the {side}'s special token {token!r} is plain text to the other model "
                f"({len(ids)} tokens: {pieces})"
            )
    return notes
