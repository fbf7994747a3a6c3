"""The tiny world the tests, the quickstart and the benchmarks run in, built once and cached.

A teacher (Qwen2, byte-level BPE), a same-vocabulary student (Llama, BPE), a cross-tokenizer
student (Llama, sentencepiece-style) and the task's datasets under one folder, rebuilt only
when their settings (:class:`TinySpec`) change. The tokenizers are tiny trained ones, or real
ones (Qwen3, Llama 2, Llama 3) with their full vocabularies. ``python -m dskd_devkit.assets``
builds the quickstart's set (``.cache/tiny/arithmetic``); ``python -m dskd_devkit.assets real``
the same task on real tokenizers (``.cache/tiny/arithmetic-real-vocab``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

from axolotl_dskd.dolly import write_jsonl
from dskd_devkit.real_tokenizers import NPM_PACKAGES, real_tokenizer
from dskd_devkit.task import addition_row, counting_texts, task_corpus
from dskd_devkit.tiny_tokenizers import bpe_tokenizer, sentencepiece_tokenizer
from dskd_devkit.training import pretrain_lm, save_pair, tiny_model, train_causal_lm

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

PathLike = str | os.PathLike

ASSETS_VERSION = 3
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
    teacher_tokenizer: str = "tiny"
    """The teacher's and the same-vocab student's: ``"tiny"`` (a byte-level BPE of ``bpe_vocab``
    trained on the task) or a real one, a name of :data:`NPM_PACKAGES`."""
    cross_tokenizer: str = "tiny"
    """The cross-tokenizer student's (``student_sp``): ``"tiny"`` (a sentencepiece-style Unigram
    of ``sentencepiece_vocab``) or a name of :data:`NPM_PACKAGES`."""

    def __post_init__(self) -> None:
        for name in (self.teacher_tokenizer, self.cross_tokenizer):
            if name != "tiny" and name not in NPM_PACKAGES:
                raise ValueError(f"unknown tokenizer {name!r}: 'tiny' or one of {sorted(NPM_PACKAGES)}")

    def key(self) -> str:
        """The settings' hash. Fields added later count only when they differ from their default,
        so the specs that existed before them keep their key (and their cache folders)."""
        settings = asdict(self)
        for f in fields(self):
            if f.name in _LATER_FIELDS and settings[f.name] == f.default:
                del settings[f.name]
        blob = json.dumps({"version": ASSETS_VERSION, **settings}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


_LATER_FIELDS = ("teacher_tokenizer", "cross_tokenizer")


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
    """The teacher's tokenizer and the cross student's: by default a byte-level BPE and a
    sentencepiece-style one trained on the task, else the real ones the spec names."""
    if "tiny" in (spec.teacher_tokenizer, spec.cross_tokenizer):
        corpus = task_corpus(spec.tokenizer_rows, spec.seed, spec.max_operand, spec.max_second)
    if spec.teacher_tokenizer == "tiny":
        teacher = bpe_tokenizer(corpus, spec.bpe_vocab)
    else:
        teacher = real_tokenizer(spec.teacher_tokenizer)
    if spec.cross_tokenizer == "tiny":
        cross = sentencepiece_tokenizer(corpus, spec.sentencepiece_vocab, pad_token="</s>")
    else:
        cross = real_tokenizer(spec.cross_tokenizer)
    return teacher, cross


def train_teacher(
    spec: TinySpec,
    tokenizer: PreTrainedTokenizerFast,
    rows: Sequence[dict[str, str]],
    log: Callable[[str], None] | None = print,
) -> PreTrainedModel:
    """The teacher: a tiny Qwen2 trained (full fine-tuning, plain torch) on ``rows``; with a real
    tokenizer's vocabulary, by :func:`~dskd_devkit.training.fit_used_vocab` (minutes, not hours).

    Each row is trained spelled both ways: the answer tokenized on its own (as Axolotl feeds a
    byte-level student: ``=`` then ``fifty``) and after a space (as a sentencepiece student's
    text reads: ``= fifty``, which is how the teacher sees that student's data). A real LLM reads
    both; a tiny teacher trained on one spelling only is lost on the other (answer NLL 27.9 nats
    instead of 0.63 on the Qwen3 teacher), and a cross-tokenizer student would learn from that.
    """
    model = tiny_model(
        "qwen2",
        tokenizer,
        hidden_size=spec.teacher_hidden,
        num_layers=spec.teacher_layers,
        intermediate_size=spec.teacher_intermediate,
        seed=spec.seed,
    )
    if spec.teacher_steps:
        spaced = [{**row, "output": " " + row["output"]} for row in rows]
        train_causal_lm(
            model,
            tokenizer,
            [*rows, *spaced],
            steps=spec.teacher_steps,
            batch_size=spec.teacher_batch,
            lr=spec.teacher_lr,
            seed=spec.seed,
            log=log,
            log_every=max(1, spec.teacher_steps // 10),
            used_vocab=spec.teacher_tokenizer != "tiny",
        )
    return model


def make_student(
    spec: TinySpec,
    tokenizer: PreTrainedTokenizerFast,
    seed: int,
    log: Callable[[str], None] | None = print,
    *,
    used_vocab: bool = False,
) -> PreTrainedModel:
    """A student base: a tiny Llama, pretrained on counting text when the spec asks for it
    (``used_vocab``: by :func:`~dskd_devkit.training.fit_used_vocab`, for a real vocabulary)."""
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
            used_vocab=used_vocab,
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
    """Teacher (Qwen2), same-vocab student (Llama, the teacher's tokenizer), cross student (Llama,
    another tokenizer; see :func:`tokenizers_for`), the students' alpaca dataset (``data``),
    held-out rows (``eval``) and the teacher's training rows (``teacher_data``), under ``root``.

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
                f"training the teacher (Qwen2, d={spec.teacher_hidden}, {spec.teacher_layers} layers, "
                f"{spec.teacher_tokenizer} tokenizer) on {len(rows['teacher'])} clean rows "
                f"for {spec.teacher_steps} steps"
            )
        save_pair(train_teacher(spec, bpe, rows["teacher"], log=say), bpe, staged["teacher"])
        students = (("student", bpe, spec.teacher_tokenizer), ("student_sp", sp, spec.cross_tokenizer))
        for offset, (name, tok, tok_name) in enumerate(students, start=1):
            student = make_student(spec, tok, seed=spec.seed + offset, log=say, used_vocab=tok_name != "tiny")
            save_pair(student, tok, staged[name])
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
    teacher_steps=1200,
    teacher_lr=3e-3,
    student_pretrain_steps=300,
    student_rows=256,
    noise=0.15,
    eval_rows=200,
)
"""The quickstart's and the distillation benchmark's task (``.cache/tiny/arithmetic``): add a
digit to a number below 100, in words. The teacher (Qwen2, d=128, 4 layers, byte-level BPE)
trains on the 800 problems not held out, each spelled both ways (see :func:`train_teacher`); the
students (Llama, d=64, 2 layers, pretrained on
counting text only) get 256 of them, 15% with a wrong answer; 200 problems are held out.

The noise is moderate on purpose: cross-model attention distills only where the teacher's
projected prediction matches the label (the paper's mask), so it cannot correct wrong labels."""
ARITHMETIC_NAME = "arithmetic"

REAL_VOCAB = replace(ARITHMETIC, teacher_tokenizer="qwen3", cross_tokenizer="llama2")
""":data:`ARITHMETIC` on real tokenizers (``.cache/tiny/arithmetic-real-vocab``): the teacher and
the same-vocab student on Qwen3's (byte-level BPE, 151,669 tokens, no BOS, EOS ``<|im_end|>``),
the cross student on Llama 2's (sentencepiece BPE with byte fallback, 32,000 tokens, BOS ``<s>``).
Same task, rows, noise and model sizes; only the tokenizers change, and with them what DSKD has
to bridge: vocabularies of real size (the teacher's embedding and LM head are 151,669 x 128, its
logits 151,669 wide) and two real, differently-split spellings of each number (the tiny tokenizers
were trained on this very text). The models still train in minutes: only the few dozen tokens the
task uses get logits during training (:func:`~dskd_devkit.training.fit_used_vocab`)."""
REAL_VOCAB_NAME = "arithmetic-real-vocab"

SETS = {"arithmetic": (ARITHMETIC, ARITHMETIC_NAME), "real": (REAL_VOCAB, REAL_VOCAB_NAME)}
"""``python -m dskd_devkit.assets [arithmetic|real]``: the sets built by name."""


if __name__ == "__main__":  # the quickstart's models (for its YAML), or another set by name
    import argparse

    parser = argparse.ArgumentParser(description="Build (or reuse) a cached set of tiny assets.")
    parser.add_argument("set", nargs="?", default="arithmetic", choices=sorted(SETS))
    parser.add_argument("--threads", type=int, default=None, help="torch threads while training")
    args = parser.parse_args()
    spec, set_name = SETS[args.set]
    for name, path in cached_assets(spec, name=set_name, log=print, threads=args.threads).items():
        print(f"{name}: {path}")
