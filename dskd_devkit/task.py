"""A task whose knowledge sits in a teacher: addition in words.

``"seventeen plus twenty-five ="`` -> ``"forty-two"``, as alpaca rows, with prompts and answers
tokenized exactly as Axolotl's instruction datasets tokenize them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from axolotl_dskd.core.loss import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

WORDS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

BASE_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request."
    ),
    "### Instruction:\n### Input:\n### Response:\n",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "Café, naïve, résumé, façade, jalapeño, Größe, Ærø, crème brûlée.",
    "机器学习 知识蒸馏 学生 教师 模型 你好世界",
    "Emoji: 🙂 🚀 🎉 👍🏽 and symbols © ® ™ € £ ¥",
    (
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy "
        "eighty ninety hundred plus minus times equals"
    ),
    "user assistant system: Hello! How can I help you today? Answer the question.",
]
"""Alpaca template pieces and multilingual samples: tokenizers trained on the task see them too."""

INSTRUCTION = "Add the two numbers."
PROMPT_FORMAT = "{input} ="
"""The prompt of a task row, as the YAML's ``format:`` gives it to Axolotl (``type:`` with
``field_instruction`` / ``format``); the response is tokenized on its own and appended."""


def number_words(n: int) -> str:
    """English words for 0 <= n < 1000."""
    if n < 20:
        return WORDS[n]
    if n < 100:
        return TENS[n // 10 - 2] + ("" if n % 10 == 0 else "-" + WORDS[n % 10])
    rest = n % 100
    return WORDS[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))


def addition_row(a: int, b: int, answer: int | None = None) -> dict[str, str]:
    """One alpaca row: ``a plus b`` in words, answered ``answer`` (default: the right sum)."""
    return {
        "instruction": INSTRUCTION,
        "input": f"{number_words(a)} plus {number_words(b)}",
        "output": number_words(a + b if answer is None else answer),
    }


def arithmetic_rows(n: int, seed: int, max_operand: int = 50, max_second: int = 0) -> list[dict[str, str]]:
    """``n`` alpaca rows of the task, operands drawn uniformly below ``max_operand`` (the second
    below ``max_second`` when given)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(max_operand), rng.randrange(max_second or max_operand)
        rows.append(addition_row(a, b))
    return rows


def counting_texts(n: int, seed: int, max_number: int = 130, separators: Sequence[str] = (" ",)) -> list[str]:
    """Generic number text for a student's pretraining: runs of 3-8 consecutive numbers in words
    (``"forty-one forty-two forty-three"``), each run joined by one of ``separators``. It teaches
    the words and their order, not addition."""
    rng = random.Random(f"counting-{seed}")
    texts = []
    for _ in range(n):
        start, length = rng.randrange(max_number), rng.randint(3, 8)
        separator = separators[0] if len(separators) == 1 else rng.choice(separators)
        texts.append(separator.join(number_words(i) for i in range(start, min(start + length, 1000))))
    return texts


def task_corpus(n: int = 400, seed: int = 0, max_operand: int = 50, max_second: int = 0) -> list[str]:
    """Text for tokenizer training: the template, multilingual samples, counting, and task rows
    written the two ways Axolotl tokenizes them (alpaca text; a prompt, then its response alone)."""
    rows = arithmetic_rows(n, seed, max_operand, max_second)
    lines = [f"{r['instruction']} {r['input']} {r['output']}" for r in rows]
    lines += [PROMPT_FORMAT.format(**r) for r in rows] + [r["output"] for r in rows]
    return BASE_CORPUS * 20 + lines + counting_texts(n // 4, seed, max_operand + (max_second or max_operand))


# ------------------------------------------------------------------- tokenizing as Axolotl does


def encode_prompt(
    tokenizer: PreTrainedTokenizerFast, row: dict[str, str], fmt: str = PROMPT_FORMAT
) -> list[int]:
    """The prompt's ids as Axolotl's instruction datasets make them: the formatted prompt with
    the tokenizer's special tokens (a BOS where it adds one), no EOS."""
    return list(tokenizer(fmt.format(**row))["input_ids"])


def encode_answer(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """The response's ids as Axolotl appends them: tokenized on its own, BOS stripped, EOS added."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids + [tokenizer.eos_token_id]


def encode_row(
    tokenizer: PreTrainedTokenizerFast, row: dict[str, str], fmt: str = PROMPT_FORMAT
) -> tuple[list[int], list[int]]:
    """``input_ids`` and ``labels`` (prompt masked with -100) of one row."""
    prompt, answer = encode_prompt(tokenizer, row, fmt), encode_answer(tokenizer, row["output"])
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer
