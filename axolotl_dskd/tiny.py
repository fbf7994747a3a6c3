"""Tiny local models, tokenizers and task data: the offline quickstart, tests and benchmarks.

Nothing here downloads anything. Tokenizers are trained in seconds with the ``tokenizers``
library in the two styles real model pairs differ by: byte-level BPE (GPT-2, Llama 3, Qwen)
and sentencepiece-style Unigram with ``▁`` and byte fallback (Llama 2, Mistral, TinyLlama).
Models are random-weight ``Qwen2``/``Llama`` configs small enough to train on a laptop CPU.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterable, Literal

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

BASE_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\n",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "Café, naïve, résumé, façade, jalapeño, Größe, Ærø, crème brûlée.",
    "机器学习 知识蒸馏 学生 教师 模型 你好世界",
    "Emoji: 🙂 🚀 🎉 👍🏽 and symbols © ® ™ € £ ¥",
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy "
    "eighty ninety hundred plus minus times equals",
    "user assistant system: Hello! How can I help you today? Answer the question.",
]

WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """English words for 0 <= n < 1000."""
    if n < 20:
        return WORDS[n]
    if n < 100:
        return TENS[n // 10 - 2] + ("" if n % 10 == 0 else "-" + WORDS[n % 10])
    rest = n % 100
    return WORDS[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))


def task_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Text for tokenizer training: the template, multilingual samples and task examples."""
    rows = arithmetic_rows(n, seed)
    return BASE_CORPUS * 20 + [f"{r['instruction']} {r['input']} {r['output']}" for r in rows]


def arithmetic_rows(n: int, seed: int, max_operand: int = 50) -> list[dict[str, str]]:
    """Alpaca rows of a rule-governed task: add two numbers written in words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(max_operand), rng.randrange(max_operand)
        rows.append(
            {
                "instruction": "Add the two numbers.",
                "input": f"{number_words(a)} plus {number_words(b)}",
                "output": number_words(a + b),
            }
        )
    return rows


def bpe_tokenizer(corpus: Iterable[str], vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer in the GPT-2 / Qwen style (``Ġ`` spaces, ChatML markers)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=special[1:],
        chat_template=CHATML_TEMPLATE,
    )


def sentencepiece_tokenizer(corpus: Iterable[str], vocab_size: int = 700) -> PreTrainedTokenizerFast:
    """A Unigram tokenizer in the Llama 2 / TinyLlama style: ``▁``, byte fallback, ``<s>`` BOS."""
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        unk_token="<unk>",
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    spec = json.loads(tok.to_str())
    known = {piece for piece, _ in spec["model"]["vocab"]}
    spec["model"]["vocab"] += [[b, 0.0] for b in byte_tokens if b not in known]
    spec["model"]["byte_fallback"] = True
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {
        "type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False
    }
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    tok = Tokenizer.from_str(json.dumps(spec))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        chat_template=CHATML_TEMPLATE,
    )


def tiny_model(
    family: Literal["llama", "qwen2"],
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_layers: int = 2,
    max_position_embeddings: int = 512,
    seed: int = 0,
) -> PreTrainedModel:
    """A random-weight causal LM for ``tokenizer``, with untied LM head."""
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    import torch

    torch.manual_seed(seed)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    return Qwen2ForCausalLM(Qwen2Config(**common))


def save_pair(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_jsonl(rows: Iterable[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def make_assets(root: Path, seed: int = 0) -> dict[str, Path]:
    """Teacher (Qwen2-style, BPE), same-vocab student (Llama, BPE), cross student (Llama,
    sentencepiece-style) and an alpaca dataset, under ``root``; reused when present."""
    root = Path(root)
    paths = {
        "teacher": root / "teacher",
        "student": root / "student",
        "student_sp": root / "student_sp",
        "data": root / "data" / "arithmetic.jsonl",
    }
    if all(p.exists() for p in paths.values()):
        return paths
    corpus = task_corpus(seed=seed)
    bpe = bpe_tokenizer(corpus)
    sp = sentencepiece_tokenizer(corpus)
    save_pair(tiny_model("qwen2", bpe, hidden_size=128, seed=seed), bpe, paths["teacher"])
    save_pair(tiny_model("llama", bpe, seed=seed + 1), bpe, paths["student"])
    save_pair(tiny_model("llama", sp, seed=seed + 2), sp, paths["student_sp"])
    write_jsonl(arithmetic_rows(64, seed), paths["data"])
    return paths


if __name__ == "__main__":
    import sys

    for name, path in make_assets(Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/tiny")).items():
        print(f"{name}: {path}")
