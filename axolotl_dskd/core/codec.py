"""A tokenizer's text <-> ids without special tokens, fast and exact, and the teacher's tokens of
a run of text that must decode to exactly that text (framework-free).

A run of a sample costs a few decodes and one encode. Through transformers each call first walks
the id list in Python (``to_py_obj``); for a plain fast tokenizer the Rust tokenizer gives the
same result directly, several times faster.

A sentencepiece-style teacher prepends ``▁`` to every text it encodes. That is right at the start
of a sample and wrong anywhere else, so later runs are encoded behind a sentinel (``"\\n" + text``)
whose tokens are then removed. At the start, a text that begins with a space gets one more (such a
teacher does not prepend ``▁`` there but its decoder strips one).
"""

from __future__ import annotations

from typing import Any

from axolotl_dskd.core.vocabulary import token_bytes

__all__ = ["TeacherCodec", "TokenizerCodec"]

# Texts put in front of a run so that a sentencepiece-style teacher does not prepend "▁" to it;
# the first whose tokens stay a separate prefix of the encoding is used.
_SENTINELS = ("\n", "§", "¶", "#", "a", "0")


def _is_plain_fast(tokenizer: Any) -> bool:
    """Whether the tokenizer is a Rust-backed fast tokenizer whose encode / decode transformers
    does not customise, so that calling the Rust tokenizer directly gives the same ids and text."""
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:  # pragma: no cover
        return False
    cls = type(tokenizer)
    return (
        isinstance(tokenizer, PreTrainedTokenizerFast)
        and getattr(tokenizer, "backend_tokenizer", None) is not None
        and not getattr(tokenizer, "split_special_tokens", False)
        and all(
            getattr(cls, name, None) is getattr(PreTrainedTokenizerFast, name, None)
            for name in ("decode", "_decode", "encode", "_encode_plus", "tokenize")
        )
    )


class TokenizerCodec:
    """One tokenizer's encode and decode, special tokens kept as text, and the bytes each of its
    tokens stands for (``token_bytes``: ``None`` when its vocabulary cannot be read as bytes)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.fast = _is_plain_fast(tokenizer)
        self.token_bytes = token_bytes(tokenizer)

    def decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self.fast:
            return self.tokenizer.backend_tokenizer.decode(ids, skip_special_tokens=False)
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        if self.fast:
            return self.tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
        return list(self.tokenizer.encode(text, add_special_tokens=False))


class TeacherCodec(TokenizerCodec):
    """The teacher's side: the tokens it puts in front of a sample (``prefix``: its BOS, or
    nothing) and each run's tokens without a leading space the run does not have."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer)
        self.prefix = self._default_prefix()
        # whether texts encoded one after the other decode with a space between them ("▁b▁a")
        self.invents_space = self.decode(self.encode("b") + self.encode("a")) != "ba"
        sentinels = [(s, self.encode(s)) for s in _SENTINELS]
        self._sentinels = [(s, ids, self.decode(ids)) for s, ids in sentinels if ids]

    def _default_prefix(self) -> list[int]:
        with_special = list(self.tokenizer("a")["input_ids"])
        plain = self.encode("a")
        for k in range(len(with_special) - len(plain) + 1):
            if with_special[k : k + len(plain)] == plain:
                return with_special[:k]
        bos = self.tokenizer.bos_token_id
        return [bos] if bos is not None and with_special[:1] == [bos] else []

    def encode_run(self, text: str, at_start: bool) -> list[int]:
        """Teacher tokens of one run, without a leading space the text does not have.

        At a sample start the teacher's own encoding is the natural one (``▁Hello`` for a
        sentencepiece teacher, whose decoder strips that space again). But such a teacher does not
        prepend ``▁`` to a text that starts with a space, and its decoder still strips one, so a
        leading space would be lost: then the text is encoded with one more space in front.
        """
        if not text:
            return []
        if not self.invents_space:
            return self.encode(text)
        if not at_start:
            return self._behind_sentinel(text)
        ids = self.encode(text)
        if self.decode(ids) == text:
            return ids
        for candidate in (self._behind_sentinel(text), self._behind_sentinel(" " + text)):
            if self.decode(candidate) == text:
                return candidate
        return ids

    def _behind_sentinel(self, text: str) -> list[int]:
        """Tokens of ``text`` as the teacher encodes it after other text: no ``▁`` prepended."""
        fallback: list[int] | None = None
        for sentinel, prefix, prefix_text in self._sentinels:
            ids = self.encode(sentinel + text)
            if ids[: len(prefix)] != prefix:
                continue
            rest = ids[len(prefix) :]
            if self.decode(ids) == prefix_text + text:
                return rest
            fallback = fallback if fallback is not None else rest
        return fallback if fallback is not None else self.encode(text)
