"""Tiny tokenizers in the two styles real model pairs differ by, trained in about a second.

Byte-level BPE (GPT-2, Llama 3, Qwen: ``Ġ`` spaces, no BOS) and sentencepiece-style Unigram
(Llama 2, Mistral, TinyLlama: ``▁`` spaces, byte fallback, ``<s>`` BOS). Both are deterministic:
the same corpus gives the same vocabulary, ids and scores in every process (the Unigram pieces
are rescored by corpus frequency, because the trainer's own scores wobble in the last digits
from run to run).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

if TYPE_CHECKING:  # transformers loads lazily: the raw tokenizers do not need it
    from transformers import PreTrainedTokenizerFast

PathLike = str | os.PathLike

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
"""The byte-level BPE tokenizer's special tokens: EOS (and pad, unk), then the ChatML markers."""
SENTENCEPIECE_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]

TEST_CORPUS: list[str] = [
    "The quick brown fox jumps over the lazy dog.",
    (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request."
    ),
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
    (
        "<|im_start|>user\nHello, who are you?<|im_end|>\n"
        "<|im_start|>assistant\nI am a helpful assistant.<|im_end|>\n"
    ),
    "Привет, как дела? Всё хорошо.",
    "Γειά σου κόσμε. Ελληνικά.",
] * 4
"""ASCII, accented Latin, CJK, emoji and chat markup: what cross-tokenizer tests need."""


def _wrap(
    tok: Tokenizer, save_dir: PathLike | None, chat_template: str | None, **special: Any
) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    if chat_template is not None:
        special["chat_template"] = chat_template
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **special)
    if save_dir is None:
        return fast
    # through save / load, as a user's tokenizer would arrive
    fast.save_pretrained(str(save_dir))
    return PreTrainedTokenizerFast.from_pretrained(str(save_dir))


def bpe_tokenizer(
    corpus: Iterable[str],
    vocab_size: int = 600,
    *,
    min_frequency: int = 2,
    chat_template: str | None = CHATML_TEMPLATE,
    save_dir: PathLike | None = None,
) -> PreTrainedTokenizerFast:
    """Byte-level BPE in the GPT-2 / Qwen style, deterministic.

    ByteLevel pre-tokenizer without prefix space, ByteLevel decoder, no BOS,
    ``<|endoftext|>`` as EOS, pad and unk, the ChatML markers as special tokens.
    ``save_dir``: return the tokenizer as reloaded from there (as a user's would arrive).
    """
    return _wrap(
        train_bpe(corpus, vocab_size, min_frequency=min_frequency),
        save_dir,
        chat_template,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=CHAT_SPECIAL_TOKENS[1:],
    )


def train_bpe(corpus: Iterable[str], vocab_size: int = 600, *, min_frequency: int = 2) -> Tokenizer:
    """The ``tokenizers`` model behind :func:`bpe_tokenizer` (no transformers needed)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(CHAT_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    return tok


def sentencepiece_tokenizer(
    corpus: Iterable[str],
    vocab_size: int = 450,
    *,
    max_piece_length: int = 8,
    pad_token: str | None = None,
    chat_template: str | None = CHATML_TEMPLATE,
    save_dir: PathLike | None = None,
) -> PreTrainedTokenizerFast:
    """Sentencepiece-style Unigram in the Llama 2 / TinyLlama style, deterministic.

    Metaspace ``▁`` with ``prepend_scheme="first"``, byte fallback through ``<0x00>``..``<0xFF>``
    (ordinary vocabulary entries, not added tokens, as in Llama's tokenizer), ``<s>`` BOS added by
    the post-processor, ``</s>`` EOS, ``<unk>``; no pad unless ``pad_token`` names one.
    ``vocab_size`` counts the trained pieces; the 256 byte pieces come on top.
    """
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if pad_token is not None:
        special["pad_token"] = pad_token
    tok = train_unigram(corpus, vocab_size, max_piece_length=max_piece_length)
    return _wrap(tok, save_dir, chat_template, **special)


def train_unigram(corpus: Iterable[str], vocab_size: int = 450, *, max_piece_length: int = 8) -> Tokenizer:
    """The ``tokenizers`` model behind :func:`sentencepiece_tokenizer` (no transformers needed)."""
    corpus = list(corpus)
    specials = list(SENTENCEPIECE_SPECIAL_TOKENS)
    trainer_tok = Tokenizer(models.Unigram())
    trainer_tok.pre_tokenizer = _metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        unk_token="<unk>",
        show_progress=False,
        max_piece_length=max_piece_length,
    )
    trainer_tok.train_from_iterator(corpus, trainer=trainer)
    # The trainer's piece set is stable, but its scores wobble in the last digits from run to run
    # (float sums in parallel); score the pieces by their corpus frequency instead, in a fixed order.
    trained = json.loads(trainer_tok.to_str())["model"]["vocab"]  # [[piece, score], ...], specials first
    pieces = _frequency_scores(sorted(p for p, _ in trained if p not in specials), corpus)
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
    return tok


def _metaspace() -> pre_tokenizers.Metaspace:
    return pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)


def _frequency_scores(pieces: list[str], corpus: Sequence[str]) -> list[tuple[str, float]]:
    """Unigram log-probabilities from substring counts in the Metaspace form of ``corpus``."""
    text = "\n".join("▁" + line.replace(" ", "▁") for line in corpus)
    counts = [text.count(p) + 1 for p in pieces]
    total = float(sum(counts))
    return [(p, math.log(c / total)) for p, c in zip(pieces, counts)]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast | Tokenizer) -> str:
    """A hash of everything that decides how ``tokenizer`` encodes and decodes."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    return hashlib.sha256(backend.to_str().encode()).hexdigest()


def mixed_text_bpe(save_dir: PathLike | None = None, vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """:func:`bpe_tokenizer` on :data:`TEST_CORPUS` (no chat template), for cross-tokenizer tests;
    with ``save_dir``, saved and reloaded as a user's tokenizer arrives."""
    return bpe_tokenizer(TEST_CORPUS, vocab_size, chat_template=None, save_dir=save_dir)


def mixed_text_sentencepiece(
    save_dir: PathLike | None = None, vocab_size: int = 450
) -> PreTrainedTokenizerFast:
    """:func:`sentencepiece_tokenizer` on :data:`TEST_CORPUS` (no chat template, no pad): the
    256 byte pieces come on top of ``vocab_size``, as ordinary vocabulary entries."""
    return sentencepiece_tokenizer(TEST_CORPUS, vocab_size, chat_template=None, save_dir=save_dir)
