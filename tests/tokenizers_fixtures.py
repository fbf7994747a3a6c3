"""Small, deterministic tokenizers for tests: thin wrappers around :mod:`axolotl_dskd.tiny`.

Two families that disagree on everything that makes cross-tokenizer work hard:

- ``make_bpe_tokenizer``: byte-level BPE in the GPT-2 / Qwen style (ByteLevel pre-tokenizer
  without prefix space, ByteLevel decoder, ``<|endoftext|>`` as EOS and pad, ChatML markers as
  special tokens, no BOS).
- ``make_sentencepiece_tokenizer``: sentencepiece-style Unigram (Metaspace ``▁`` with
  ``prepend_scheme="first"``, byte fallback through ``<0x00>``..``<0xFF>``), ``<s>`` BOS added
  by the post-processor, ``</s>`` EOS, ``<unk>``, in the Llama / Mistral style.

Both can represent any text (bytes), so a text survives a round trip through either. They are
trained in about a second on ``CORPUS`` (ASCII, accented Latin, CJK, emoji, chat markup) and
come out the same in every process (same vocabulary, ids and scores). The builders themselves
live in ``axolotl_dskd/tiny.py`` (one implementation for tests, quickstart and benchmarks).
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from axolotl_dskd.tiny import CHAT_SPECIAL_TOKENS, TEST_CORPUS, bpe_tokenizer, sentencepiece_tokenizer

__all__ = [
    "CORPUS",
    "CHAT_SPECIAL_TOKENS",
    "make_bpe_tokenizer",
    "make_sentencepiece_tokenizer",
]

CORPUS: list[str] = TEST_CORPUS


def _save_dir(tmp_dir: str | os.PathLike | None, name: str) -> Path | None:
    return None if tmp_dir is None else Path(tmp_dir) / name


def make_bpe_tokenizer(
    tmp_dir: str | os.PathLike | None = None, vocab_size: int = 600
) -> PreTrainedTokenizerFast:
    """Byte-level BPE, GPT-2 / Qwen style: no BOS, ``<|endoftext|>`` is EOS and pad.

    With ``tmp_dir``: saved under ``tmp_dir/bpe`` and reloaded, as a user's tokenizer arrives.
    """
    return bpe_tokenizer(CORPUS, vocab_size, chat_template=None, save_dir=_save_dir(tmp_dir, "bpe"))


def make_sentencepiece_tokenizer(
    tmp_dir: str | os.PathLike | None = None, vocab_size: int = 450
) -> PreTrainedTokenizerFast:
    """Sentencepiece-style Unigram with byte fallback; ``<s>`` added in front by the post-processor.

    ``vocab_size`` counts the trained pieces; the 256 byte pieces ``<0x00>``..``<0xFF>`` come on
    top, as ordinary vocabulary entries (not added tokens), as in Llama's tokenizer.
    """
    return sentencepiece_tokenizer(
        CORPUS, vocab_size, chat_template=None, save_dir=_save_dir(tmp_dir, "sentencepiece")
    )
