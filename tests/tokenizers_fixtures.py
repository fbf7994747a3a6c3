"""Small, deterministic tokenizers for tests, built offline with the `tokenizers` library.

Two families that disagree on everything that makes cross-tokenizer work hard:

- ``make_bpe_tokenizer``: byte-level BPE in the GPT-2 / Qwen style (ByteLevel pre-tokenizer
  without prefix space, ByteLevel decoder, ``<|endoftext|>`` as EOS and pad, ChatML markers as
  special tokens, no BOS).
- ``make_sentencepiece_tokenizer``: sentencepiece-style Unigram (Metaspace ``▁`` with
  ``prepend_scheme="first"``, byte fallback through ``<0x00>``..``<0xFF>``), ``<s>`` BOS added
  by the post-processor, ``</s>`` EOS, ``<unk>``, in the Llama / Mistral style.

Both can represent any text (bytes), so a text survives a round trip through either. They are
trained in about a second on ``CORPUS`` (ASCII, accented Latin, CJK, emoji, chat markup) and
come out the same in every process (same vocabulary, ids and scores).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

__all__ = [
    "CORPUS",
    "CHAT_SPECIAL_TOKENS",
    "make_bpe_tokenizer",
    "make_sentencepiece_tokenizer",
]

CHAT_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_BASE_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.",
    "### Instruction:\nSummarize the following text.\n\n### Response:\nThe text is about distillation.",
    "Knowledge distillation trains a small student model to imitate a large teacher model.",
    "What is the capital of France? The capital of France is Paris.",
    "def add(a, b):\n    return a + b\n",
    "Numbers: 1, 2, 3, 10, 42, 100, 2024, 3.14159.",
    "Le café est très bon. Où est la bibliothèque? Voilà, c'est déjà fini.",
    "Über den Wolken muss die Freiheit wohl grenzenlos sein. Straße, Größe, schön.",
    "El niño comió una manzana. ¿Dónde está la estación? Mañana será otro día.",
    "São Paulo é uma cidade enorme. Ação, coração, informação.",
    "Zażółć gęślą jaźń. Český jazyk, ŕ, ĺ, ő, ű.",
    "我们今天学习知识蒸馏。老师模型很大,学生模型很小。",
    "東京は日本の首都です。ひらがなとカタカナ。",
    "한국어 문장도 조금 있습니다.",
    "Emoji: 😀 😃 🎉 🚀 👍🏽 ❤️ 🇫🇷 👨‍👩‍👧",
    "<|im_start|>user\nHello, who are you?<|im_end|>\n"
    "<|im_start|>assistant\nI am a helpful assistant.<|im_end|>\n",
    "Привет, как дела? Всё хорошо.",
    "Γειά σου κόσμε. Ελληνικά.",
]
CORPUS: list[str] = _BASE_CORPUS * 4


def _wrap(
    tok: Tokenizer, tmp_dir: str | os.PathLike | None, name: str, **special: str
) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **special)
    if tmp_dir is None:
        return fast
    # Through save / load, as a user's tokenizer would arrive.
    path = Path(tmp_dir) / name
    fast.save_pretrained(str(path))
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def make_bpe_tokenizer(
    tmp_dir: str | os.PathLike | None = None, vocab_size: int = 600
) -> PreTrainedTokenizerFast:
    """Byte-level BPE, GPT-2 / Qwen style: no BOS, ``<|endoftext|>`` is EOS and pad."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(CHAT_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return _wrap(
        tok,
        tmp_dir,
        "bpe",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )


def make_sentencepiece_tokenizer(
    tmp_dir: str | os.PathLike | None = None, vocab_size: int = 450
) -> PreTrainedTokenizerFast:
    """Sentencepiece-style Unigram with byte fallback; ``<s>`` added in front by the post-processor.

    ``vocab_size`` counts the trained pieces; the 256 byte pieces ``<0x00>``..``<0xFF>`` come on
    top, as ordinary vocabulary entries (not added tokens), as in Llama's tokenizer.
    """
    specials = ["<unk>", "<s>", "</s>"]
    trainer_tok = Tokenizer(models.Unigram())
    trainer_tok.pre_tokenizer = _metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        unk_token="<unk>",
        show_progress=False,
        max_piece_length=8,
    )
    trainer_tok.train_from_iterator(CORPUS, trainer=trainer)
    # The trainer's piece set is stable, but its scores wobble in the last digits from run to run
    # (float sums in parallel); score the pieces by their corpus frequency instead, in a fixed order.
    trained = json.loads(trainer_tok.to_str())["model"]["vocab"]  # [[piece, score], ...], specials first
    pieces = _frequency_scores(sorted(p for p, _ in trained if p not in specials))
    vocab = [(p, 0.0) for p in specials] + [(f"<0x{i:02X}>", -1e3) for i in range(256)] + pieces
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tok.add_special_tokens(specials)
    tok.pre_tokenizer = _metaspace()
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return _wrap(tok, tmp_dir, "sentencepiece", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _metaspace() -> pre_tokenizers.Metaspace:
    return pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)


def _frequency_scores(pieces: list[str]) -> list[tuple[str, float]]:
    """Unigram log-probabilities from substring counts in the Metaspace form of ``CORPUS``."""
    text = "\n".join("▁" + line.replace(" ", "▁") for line in CORPUS)
    counts = [text.count(p) + 1 for p in pieces]
    total = float(sum(counts))
    return [(p, math.log(c / total)) for p, c in zip(pieces, counts)]
