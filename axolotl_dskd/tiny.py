"""Tiny local models, tokenizers and task data: the offline quickstart, tests and benchmarks.

Nothing here downloads anything, and nothing here imports Axolotl (torch, ``tokenizers`` and
``transformers`` only), so tests and benchmarks can build their inputs without it.

- **Tokenizers**, trained in about a second with the ``tokenizers`` library, in the two styles
  real model pairs differ by: byte-level BPE (GPT-2, Llama 3, Qwen: ``Ġ`` spaces, no BOS) and
  sentencepiece-style Unigram (Llama 2, Mistral, TinyLlama: ``▁`` spaces, byte fallback, ``<s>``
  BOS). Both are deterministic: the same corpus gives the same vocabulary, ids and scores in
  every process (the Unigram pieces are rescored by corpus frequency, because the trainer's own
  scores wobble in the last digits from run to run).
- **Models**: random-weight ``Qwen2`` / ``Llama`` configs small enough to train on a laptop CPU.
- **A task whose knowledge sits in a teacher**: arithmetic in words (``"seventeen plus
  twenty-five"`` -> ``"forty-two"``). :func:`train_teacher` trains a tiny Qwen2 on plenty of clean
  rows with a plain torch loop; students get a few noisy rows (:func:`task_split`).
- **Assets** (:func:`make_assets`): teacher, same-vocabulary student, cross-tokenizer student and
  datasets under one folder, rebuilt only when their settings change (:func:`cached_assets`
  keys that folder by a hash of the settings under ``.cache/tiny/``).
- **Evaluation** of the task (:func:`evaluate_task`): greedy exact match and answer-token NLL,
  with prompts tokenized exactly as Axolotl's instruction datasets tokenize them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

if TYPE_CHECKING:  # transformers (and torch) load lazily: the raw tokenizers need neither
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

PathLike = str | os.PathLike

# ------------------------------------------------------------------------------------ tokenizers

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
    special = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
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


# ------------------------------------------------------------------------------------------ task

WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()

BASE_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.",
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


# ---------------------------------------------------------------------------------------- models


def tiny_model(
    family: Literal["llama", "qwen2"],
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_layers: int = 2,
    max_position_embeddings: int = 512,
    seed: int = 0,
    *,
    intermediate_size: int | None = None,
    num_heads: int = 4,
    num_kv_heads: int = 2,
) -> PreTrainedModel:
    """A random-weight causal LM for ``tokenizer``, with untied LM head (same ``seed``, same
    weights)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    return Qwen2ForCausalLM(Qwen2Config(**common))


def save_pair(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, directory: Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_jsonl(rows: Iterable[dict], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------- tokenizing as Axolotl does


def encode_prompt(tokenizer: PreTrainedTokenizerFast, row: dict[str, str], fmt: str = PROMPT_FORMAT) -> list[int]:
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
    return prompt + answer, [-100] * len(prompt) + answer


def _pad_batch(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int):  # -> dict of tensors
    import torch

    width = max(len(ids) for ids, _ in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (x, y) in enumerate(pairs):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _pad_id(tokenizer: PreTrainedTokenizerFast) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def train_causal_lm(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    rows: Sequence[dict[str, str]],
    *,
    steps: int,
    fmt: str = PROMPT_FORMAT,
    **kw: Any,
) -> list[float]:
    """Full fine-tuning on task rows, on the response tokens only (see :func:`fit`)."""
    return fit(model, [encode_row(tokenizer, r, fmt) for r in rows], _pad_id(tokenizer), steps=steps, **kw)


def pretrain_lm(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, texts: Sequence[str], *, steps: int, **kw: Any
) -> list[float]:
    """Plain language modelling on ``texts`` (every token trained, EOS appended)."""
    examples = []
    for text in texts:
        ids = list(tokenizer(text)["input_ids"]) + [tokenizer.eos_token_id]
        examples.append((ids, ids))
    return fit(model, examples, _pad_id(tokenizer), steps=steps, **kw)


def fit(
    model: PreTrainedModel,
    examples: Sequence[tuple[list[int], list[int]]],
    pad_id: int,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 0.01,
    warmup: int = 50,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
    log_every: int = 100,
) -> list[float]:
    """A plain torch training loop over ``(input_ids, labels)`` examples: AdamW, linear warmup,
    cosine decay, gradient clipping; examples are shuffled each epoch. Returns every step's loss."""
    import torch

    encoded, pad = list(examples), pad_id
    torch.manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    model.train()
    order: list[int] = []
    losses: list[float] = []
    start = time.time()
    for step in range(steps):
        if len(order) < batch_size:
            more = list(range(len(encoded)))
            rng.shuffle(more)
            order += more
        batch = _pad_batch([encoded[i] for i in order[:batch_size]], pad)
        del order[:batch_size]
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log and ((step + 1) % log_every == 0 or step + 1 == steps):
            recent = losses[-log_every:]
            log(
                f"  step {step + 1}/{steps}  loss {sum(recent) / len(recent):.4f}  "
                f"({time.time() - start:.0f}s)"
            )
    model.eval()
    return losses


# ------------------------------------------------------------------------------------ evaluation


@dataclass
class TaskScores:
    exact_match: float
    """Greedy answers equal to the reference, as text (whitespace-stripped)."""
    token_nll: float
    """Mean negative log-likelihood (nats) of the reference's tokens (EOS included)."""
    answer_nll: float
    """Mean total NLL of a reference answer: comparable across tokenizers."""
    n: int
    examples: list[dict[str, str]] = field(default_factory=list)


def evaluate_task(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    rows: Sequence[dict[str, str]],
    *,
    fmt: str = PROMPT_FORMAT,
    batch_size: int = 64,
    max_new_tokens: int = 12,
    keep_examples: int = 5,
) -> TaskScores:
    """Greedy exact match and answer NLL of ``model`` on ``rows`` (prompts as Axolotl makes them)."""
    import torch

    model.eval()
    pad = _pad_id(tokenizer)
    eos = tokenizer.eos_token_id
    correct, nll_sum, n_tokens, examples = 0, 0.0, 0, []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            # answer NLL, teacher-forced (right padding)
            batch = _pad_batch([encode_row(tokenizer, r, fmt) for r in chunk], pad)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            logp = torch.log_softmax(logits[:, :-1].float(), -1)
            mask = targets != -100
            token_logp = logp.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
            nll_sum += float(-(token_logp * mask).sum())
            n_tokens += int(mask.sum())
            # greedy decoding (left padding), stopped at EOS
            prompts = [encode_prompt(tokenizer, r, fmt) for r in chunk]
            width = max(map(len, prompts))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
            attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            out = model.generate(
                input_ids=ids,
                attention_mask=attn,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=pad,
            )[:, width:]
            for row, gen in zip(chunk, out.tolist()):
                if eos in gen:
                    gen = gen[: gen.index(eos)]
                text = tokenizer.decode(gen, skip_special_tokens=True).strip()
                correct += text == row["output"].strip()
                if len(examples) < keep_examples:
                    examples.append({"prompt": fmt.format(**row), "reference": row["output"], "greedy": text})
    n = len(rows)
    return TaskScores(
        exact_match=correct / max(n, 1),
        token_nll=nll_sum / max(n_tokens, 1),
        answer_nll=nll_sum / max(n, 1),
        n=n,
        examples=examples,
    )


# ---------------------------------------------------------------------------------------- assets

ASSETS_VERSION = 2
"""Bumped whenever the code that builds assets changes what it builds (part of the cache key)."""


@dataclass(frozen=True)
class TinySpec:
    """Everything that decides a set of assets; its hash names the cache folder."""

    seed: int = 0
    max_operand: int = 50
    """The first operand of the addition task is one of ``0 .. max_operand - 1``."""
    max_second: int = 0
    """The second operand is one of ``0 .. max_second - 1`` (0: ``max_operand``)."""
    tokenizer_rows: int = 400
    bpe_vocab: int = 600
    sentencepiece_vocab: int = 450
    teacher_hidden: int = 128
    """A multiple of 64: bitsandbytes quantizes the teacher to 4 bits on the CPU."""
    teacher_layers: int = 2
    teacher_intermediate: int = 256
    teacher_steps: int = 0
    """Full fine-tuning steps of the teacher on ``teacher_rows`` clean rows; 0: random weights."""
    teacher_batch: int = 64
    teacher_lr: float = 5e-3
    teacher_rows: int = 0
    """Clean rows the teacher trains on (0: every pair not held out)."""
    student_hidden: int = 64
    student_layers: int = 2
    student_pretrain_steps: int = 0
    """Language modelling on :func:`counting_texts` before the task (0: random weights): a
    LoRA student needs a base that already writes number words."""
    student_rows: int = 64
    """Rows of the students' dataset (``data``)."""
    noise: float = 0.0
    """Fraction of the students' rows whose answer is wrong (a careless annotator)."""
    eval_rows: int = 0
    """Held-out rows (``eval``), pairs neither the teacher nor the students train on."""

    def key(self) -> str:
        blob = json.dumps({"version": ASSETS_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


DEFAULT_CACHE = Path(".cache") / "tiny"


def task_split(spec: TinySpec) -> dict[str, list[dict[str, str]]]:
    """The task's rows for ``spec``: ``eval`` (held out from everyone), ``teacher`` (plenty, clean)
    and ``student`` (few, a ``noise`` fraction with a wrong answer), deterministic in the seed.

    Without held-out rows the students' data is plain ``arithmetic_rows`` (any pairs, clean
    unless ``noise``)."""
    rng = random.Random(f"split-{spec.seed}")
    pairs = [(a, b) for a in range(spec.max_operand) for b in range(spec.max_second or spec.max_operand)]
    rng.shuffle(pairs)
    held_out, pool = pairs[: spec.eval_rows], pairs[spec.eval_rows :]
    if spec.teacher_rows:
        teacher_pairs = [pool[rng.randrange(len(pool))] for _ in range(spec.teacher_rows)]
    else:
        teacher_pairs = list(pool)
    if spec.eval_rows:
        student_pairs = rng.sample(pool, spec.student_rows)
    else:  # nothing held out: the rows of ``arithmetic_rows`` (any pairs)
        data_rng = random.Random(spec.seed)
        student_pairs = [
            (data_rng.randrange(spec.max_operand), data_rng.randrange(spec.max_second or spec.max_operand))
            for _ in range(spec.student_rows)
        ]
    noise_rng = random.Random(f"noise-{spec.seed}")
    student = []
    for a, b in student_pairs:
        answer = a + b
        if noise_rng.random() < spec.noise:
            answer = wrong_answer(a + b, noise_rng)
        student.append(addition_row(a, b, answer))
    return {
        "eval": [addition_row(a, b) for a, b in held_out],
        "teacher": [addition_row(a, b) for a, b in teacher_pairs],
        "student": student,
    }


def wrong_answer(right: int, rng: random.Random) -> int:
    """A careless annotator's answer: off by one or two, or by ten (a dropped or extra carry)."""
    while True:
        wrong = right + rng.choice((-10, -2, -1, 1, 2, 10))
        if wrong >= 0:
            return wrong


def tokenizers_for(spec: TinySpec) -> tuple[PreTrainedTokenizerFast, PreTrainedTokenizerFast]:
    """The teacher's byte-level BPE and the cross student's sentencepiece-style tokenizer."""
    corpus = task_corpus(spec.tokenizer_rows, spec.seed, spec.max_operand, spec.max_second)
    bpe = bpe_tokenizer(corpus, spec.bpe_vocab)
    sp = sentencepiece_tokenizer(corpus, spec.sentencepiece_vocab, pad_token="</s>")
    return bpe, sp


def train_teacher(
    spec: TinySpec,
    tokenizer: PreTrainedTokenizerFast,
    rows: Sequence[dict[str, str]],
    log: Callable[[str], None] | None = print,
) -> PreTrainedModel:
    """The teacher: a tiny Qwen2 trained (full fine-tuning, plain torch) on ``rows``."""
    model = tiny_model(
        "qwen2",
        tokenizer,
        hidden_size=spec.teacher_hidden,
        num_layers=spec.teacher_layers,
        intermediate_size=spec.teacher_intermediate,
        seed=spec.seed,
    )
    if spec.teacher_steps:
        train_causal_lm(
            model,
            tokenizer,
            rows,
            steps=spec.teacher_steps,
            batch_size=spec.teacher_batch,
            lr=spec.teacher_lr,
            seed=spec.seed,
            log=log,
            log_every=max(1, spec.teacher_steps // 10),
        )
    return model


def make_student(
    spec: TinySpec, tokenizer: PreTrainedTokenizerFast, seed: int, log: Callable[[str], None] | None = print
) -> PreTrainedModel:
    """A student base: a tiny Llama, pretrained on counting text when the spec asks for it."""
    model = tiny_model(
        "llama", tokenizer, hidden_size=spec.student_hidden, num_layers=spec.student_layers, seed=seed
    )
    if spec.student_pretrain_steps:
        if log:
            log(f"pretraining a student base (Llama, d={spec.student_hidden}) on counting text")
        top = spec.max_operand + (spec.max_second or spec.max_operand)
        # Numbers a line apart too: a byte-level BPE spells a word at the start of a line (or of
        # an answer, which Axolotl tokenizes on its own) without the space marker ("forty", not
        # "Ġforty"). A base that never predicted those tokens has LM-head rows that LoRA (which
        # leaves the head frozen) can hardly use, and its students barely learn the task.
        pretrain_lm(
            model,
            tokenizer,
            counting_texts(4000, seed, top, separators=(" ", "\n")),
            steps=spec.student_pretrain_steps,
            seed=seed,
            log=log,
            log_every=max(1, spec.student_pretrain_steps // 3),
        )
    return model


ASSET_NAMES = ("teacher", "student", "student_sp", "data", "eval", "teacher_data")


def asset_paths(root: PathLike) -> dict[str, Path]:
    root = Path(root)
    return {
        "teacher": root / "teacher",
        "student": root / "student",
        "student_sp": root / "student_sp",
        "data": root / "data" / "arithmetic.jsonl",
        "eval": root / "data" / "eval.jsonl",
        "teacher_data": root / "data" / "teacher.jsonl",
    }


def _stamp(root: Path) -> Path:
    return root / "assets.json"


def assets_ready(root: PathLike, spec: TinySpec) -> bool:
    """Whether ``root`` holds complete assets built from ``spec``."""
    root = Path(root)
    try:
        recorded = json.loads(_stamp(root).read_text())
    except (OSError, ValueError):
        return False
    return recorded.get("key") == spec.key() and all(p.exists() for p in asset_paths(root).values())


def make_assets(
    root: PathLike,
    seed: int = 0,
    *,
    spec: TinySpec | None = None,
    log: Callable[[str], None] | None = None,
    threads: int | None = None,
) -> dict[str, Path]:
    """Teacher (Qwen2, BPE), same-vocab student (Llama, BPE), cross student (Llama,
    sentencepiece-style), the students' alpaca dataset (``data``), held-out rows (``eval``) and
    the teacher's training rows (``teacher_data``), under ``root``.

    Reused when ``root`` already holds assets of the same ``spec`` (``assets.json`` records its
    key, written last); rebuilt otherwise. The default spec (``TinySpec(seed=seed)``): random
    weights, 64 clean rows, built in seconds. ``threads``: torch threads while training.
    """
    import torch

    spec = spec or TinySpec(seed=seed)
    root = Path(root)
    paths = asset_paths(root)
    if assets_ready(root, spec):
        return paths
    say = log or (lambda _msg: None)
    started = time.time()
    root.mkdir(parents=True, exist_ok=True)
    _stamp(root).unlink(missing_ok=True)
    work = root / f".building-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    staged = asset_paths(work)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        bpe, sp = tokenizers_for(spec)
        rows = task_split(spec)
        if spec.teacher_steps:
            say(
                f"training the teacher (Qwen2, d={spec.teacher_hidden}, {spec.teacher_layers} layers) "
                f"on {len(rows['teacher'])} clean rows for {spec.teacher_steps} steps"
            )
        save_pair(train_teacher(spec, bpe, rows["teacher"], log=say), bpe, staged["teacher"])
        for offset, (name, tok) in enumerate((("student", bpe), ("student_sp", sp)), start=1):
            save_pair(make_student(spec, tok, seed=spec.seed + offset, log=say), tok, staged[name])
        write_jsonl(rows["student"], staged["data"])
        write_jsonl(rows["eval"], staged["eval"])
        write_jsonl(rows["teacher"], staged["teacher_data"])
        for name in ("teacher", "student", "student_sp", "data", "eval", "teacher_data"):
            target = paths[name]
            if target.is_dir():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged[name], target)
    finally:
        torch.set_num_threads(previous_threads)
        shutil.rmtree(work, ignore_errors=True)
    _stamp(root).write_text(json.dumps({"key": spec.key(), "spec": asdict(spec)}, indent=2))
    say(f"assets ready in {root} ({time.time() - started:.0f}s)")
    return paths


def cached_assets(
    spec: TinySpec,
    cache_dir: PathLike = DEFAULT_CACHE,
    *,
    name: str | None = None,
    log: Callable[[str], None] | None = None,
    threads: int | None = None,
) -> dict[str, Path]:
    """:func:`make_assets` under ``cache_dir/name`` (default ``task-<hash of spec>``): built
    once, reused while the spec's hash (recorded in ``assets.json``) stays the same."""
    root = Path(cache_dir) / (name or f"task-{spec.key()}")
    if log and assets_ready(root, spec):
        log(f"reusing the cached teacher and students in {root} (settings hash {spec.key()})")
    return make_assets(root, spec=spec, log=log, threads=threads)


ARITHMETIC = TinySpec(
    seed=0,
    max_operand=100,
    max_second=10,
    tokenizer_rows=2000,
    teacher_layers=4,
    teacher_intermediate=512,
    teacher_steps=600,
    teacher_lr=3e-3,
    student_pretrain_steps=300,
    student_rows=256,
    noise=0.15,
    eval_rows=200,
)
"""The quickstart's and the distillation benchmark's task (``.cache/tiny/arithmetic``): add a
digit to a number below 100, in words. The teacher (Qwen2, d=128, 4 layers, byte-level BPE)
trains on the 800 problems not held out; the students (Llama, d=64, 2 layers, pretrained on
counting text only) get 256 of them, 15% with a wrong answer; 200 problems are held out.

The noise is moderate on purpose: cross-model attention distills only where the teacher's
projected prediction matches the label (the paper's mask), so it cannot correct wrong labels,
and at 30% noise its gain over SFT vanishes (see benchmarks/distill_quality.py)."""
ARITHMETIC_NAME = "arithmetic"


def load_trained(path: PathLike, base_model: PathLike | None = None):  # -> (model, tokenizer)
    """A trained model folder, or a LoRA adapter folder merged into its base (``base_model``, or
    the adapter's ``base_model_name_or_path``), with the folder's tokenizer, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        from peft import PeftModel

        base = base_model or json.loads(adapter.read_text())["base_model_name_or_path"]
        model = AutoModelForCausalLM.from_pretrained(base)
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer_dir = path if (path / "tokenizer_config.json").is_file() else base_model
    return model.eval(), AutoTokenizer.from_pretrained(tokenizer_dir)


# ---------------------------------------------------------------------------------- Axolotl runs

OFFLINE_ENV = {
    "AXOLOTL_DO_NOT_TRACK": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}
"""The environment of an Axolotl run on local assets: no hub look-ups, no telemetry, no W&B."""


def axolotl_train_command(config: PathLike) -> list[str]:
    """``accelerate launch -m axolotl.cli.train <config>`` with this interpreter's ``accelerate``,
    one process and no mixed precision (the CPU defaults, spelled out so accelerate does not
    warn about a missing ``accelerate config``)."""
    accelerate = Path(sys.executable).with_name("accelerate")
    return [str(accelerate), "launch", "--num_processes", "1", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "axolotl.cli.train", str(config)]  # fmt: skip


def axolotl_env(threads: int) -> dict[str, str]:
    """The current environment, offline (:data:`OFFLINE_ENV`), with ``threads`` CPU threads per
    process: a few single-threaded runs side by side use two cores better than one run on both."""
    return {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def without_distillation(config: dict[str, Any]) -> dict[str, Any]:
    """The same Axolotl config as plain SFT: the plugin and every ``dskd_*`` key removed."""
    plain = {k: v for k, v in config.items() if not k.startswith("dskd_")}
    plugins = [p for p in plain.pop("plugins", None) or [] if not str(p).startswith("axolotl_dskd")]
    return {**plain, "plugins": plugins} if plugins else plain


def quiet_library_logs() -> None:
    """Silence the import-time notes of optional kernels a CPU run does not use (torchao's CUDA
    extensions, bitsandbytes' hub kernels, torch's pytree deprecations): they read like errors."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", module="bitsandbytes")
    for name in ("torchao", "bitsandbytes", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


if __name__ == "__main__":  # python -m axolotl_dskd.tiny: the quickstart's models, for its YAML
    for name, path in cached_assets(ARITHMETIC, name=ARITHMETIC_NAME, log=print).items():
        print(f"{name}: {path}")
