"""DSKD against SFT, vanilla KD and ULD on real pretrained models, through Axolotl's CLI as users run it.

Every run is ``accelerate launch -m axolotl.cli.train config.yml`` on a config this script writes;
each teacher's states are built once with ``axolotl dskd-cache-teacher config.yml`` and every
distilled run of that teacher reads them (``dskd_teacher_cache``; the two students share a
tokenizer, so one cache serves both). Nothing is in-process but the scoring.

- Students: SmolLM2-135M-Instruct pruned to 11 of its 30 layers (``KEEP_LAYERS``, saved once as a
  model folder), and a narrow one, the same with its hidden size also cut from 576 to 378
  (``NARROW_WIDTH``, :func:`prune_width`: its hidden space and LM head are not its teacher's);
  LoRA r 16 on every linear layer of the blocks, the tied embeddings frozen.
- Pairs (``PAIRS``): SmolLM2-135M-Instruct, the model they were pruned from, teaches each student
  (one vocabulary), and so do Qwen2.5-Coder-1.5B-Instruct (another tokenizer: 151,936 ids
  against 49,152, a far stronger teacher), which reads each conversation in its own chat template
  (``dskd_teacher_chat_template: auto``), and Gemma 3 270M base (262,144 sentencepiece-style ids;
  as strong as SmolLM2 on these answers), which reads them in Gemma 3's (``GEMMA_KEYS``).
  Teachers in float32.
- Data: questions about Python's standard library answered by its docstrings
  (:mod:`dskd_devkit.stdlib_qa`), a ``chat_template`` dataset in SmolLM2's template, answers and
  ``<|im_end|>`` trained, rows cut at 144 tokens (``excess_length_strategy: truncate``); a held-out
  split never trained on.
- Training: 80 steps of 8 rows, AdamW at 5e-4 (cosine, 8 warm-up steps), the projectors at the
  plugin's rate (3e-4; the in-process sweep's 1e-3 was the default when it ran), gradient norm
  clipped at 1.0, as in :mod:`real_pair_sweep` (its in-process twin, where most ideas were
  measured).
- Scores: the held-out answers' NLL per UTF-8 byte (comparable across tokenizers) of the saved
  adapter, and with ``--rouge-seeds`` the ROUGE-L of answers sampled for the held-out questions
  by ``python -m axolotl_dskd.evaluate`` (the paper's protocol). The terms a run logged
  (``dskd/*``, the last 20 steps) come from its ``trainer_state.json``, its seconds per step from
  its log. A run whose checkpoint exists is scored again, not trained again.

Each run and each cache build appends one JSON line to ``benchmarks/results/real_models.jsonl``
(a run already there is skipped); ``real_models.md`` (every arm) and ``real_models_summary.md``
(the headline arms, as seeds won) beside it are rewritten from them. Runs go
``--jobs`` at a time, one CPU thread each; a run waits for its teacher's cache. Measured on two
cores, two or three processes side by side: the students and data in seconds, SmolLM2's cache
3 minutes, Gemma's 4, Qwen's 43; an SFT or same-vocabulary run 7 to 10 minutes (the narrow
student's 5 to 8), a cross-tokenizer run with the plugin's defaults 6 to 12, ULD and the paper's
settings across tokenizers (they read Qwen's 151,936-row head) 20 and 23, the teacher-space term
across tokenizers 18; ROUGE-L 2 minutes a run.

    .venv/bin/python benchmarks/real_models.py --seeds 0 --rouge-seeds 10    # every arm, seed 0
    .venv/bin/python benchmarks/real_models.py --arms sft vanilla_kd uld dskd_default --seeds 1 2 3 4
    .venv/bin/python benchmarks/real_models.py --pairs smollm2_narrow qwen_narrow \
        --arms sft vanilla_kd dskd_default --seeds 0 1 2 3 4
    .venv/bin/python benchmarks/real_models.py --pairs smollm2 smollm2_narrow --arms dskd_plr1e3 \
        --seeds 0 1 2 3 4
    .venv/bin/python benchmarks/real_models.py --pairs gemma gemma_narrow --arms dskd_default --seeds 0 1 2 3 4
    .venv/bin/python benchmarks/real_models.py --table-only
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dskd_devkit.axolotl_runs import (
    CPU_LORA_BASE,
    cache_command,
    log_history,
    train_command,
    train_env,
    without_distillation,
    write_config,
)
from dskd_devkit.chat_pairs import write_conversations
from dskd_devkit.real_models import (
    CACHE,
    NARROW_WIDTH,
    gemma_dir,
    narrow_smollm2_dir,
    pruned_smollm2_dir,
    qwen_dir,
    smollm2_dir,
)
from dskd_devkit.stdlib_qa import chat_prompt, encode, heldout_nll, split, stdlib_pairs

RESULTS = Path(__file__).resolve().parent / "results" / "real_models.jsonl"
WORK = CACHE / "cli_benchmark"


@dataclass(frozen=True)
class Pair:
    """A teacher and the student it distils into."""

    label: str
    teacher: Callable[[], Path]
    student: str
    """A key of :data:`STUDENTS`."""
    keys: dict[str, Any] = field(default_factory=dict)
    """``dskd_*`` keys every distilled run of the pair sets (and its cache build)."""

    @property
    def teacher_name(self) -> str:
        return self.label.split(" (")[0]


GEMMA_LABEL = "Gemma 3 270M base (other tokenizer)"
GEMMA_KEYS = {"dskd_teacher_chat_template": "gemma3"}
"""Gemma 3 270M is a base model without a chat template: it reads each conversation in Gemma 3's
instruction template (Axolotl's ``gemma3``), where its held-out answer NLL is 0.816 nats per byte
(SmolLM2-135M-Instruct in its own: 0.828); in the student's rendering (``auto`` without a
template) 0.835."""
STUDENTS = {"pruned": pruned_smollm2_dir, "narrow": narrow_smollm2_dir}
STUDENT_LABELS = {"pruned": "layer-pruned", "narrow": f"narrow (hidden {NARROW_WIDTH})"}
PAIRS = {
    "smollm2": Pair("SmolLM2-135M-Instruct (same vocabulary)", smollm2_dir, "pruned"),
    "qwen": Pair("Qwen2.5-Coder-1.5B-Instruct (other tokenizer)", qwen_dir, "pruned"),
    "gemma": Pair(GEMMA_LABEL, gemma_dir, "pruned", GEMMA_KEYS),
    "smollm2_narrow": Pair("SmolLM2-135M-Instruct (same vocabulary)", smollm2_dir, "narrow"),
    "qwen_narrow": Pair("Qwen2.5-Coder-1.5B-Instruct (other tokenizer)", qwen_dir, "narrow"),
    "gemma_narrow": Pair(GEMMA_LABEL, gemma_dir, "narrow", GEMMA_KEYS),
}
RECOVERY = [
    ("smollm2", "qwen"),
    ("smollm2", "gemma"),
    ("smollm2_narrow", "qwen_narrow"),
    ("smollm2_narrow", "gemma_narrow"),
]
"""Same-vocabulary and cross-tokenizer pairs of one student: what the second recovers of the first's gain."""
SEQUENCE_LEN = 144
STEPS = 80
PAPER = {
    "dskd_kd_rate": 0.5,
    "dskd_projector_init": "random",
    "dskd_grad_clip": "joint",
    "dskd_student_space_target": "projected",
    "dskd_kd_teacher_weight": 1.0,
    "dskd_projector_lr": 1e-3,
}
"""The DSKD paper's settings where the plugin's defaults differ (its temperature, 2, is the plugin's)."""
SAME_VOCABULARY_ARMS: dict[str, dict[str, Any]] = {
    "sft": {},
    "vanilla_kd": {"dskd_method": "vanilla_kd"},
    "dskd_paper": PAPER,
    "dskd_default": {},
    "dskd_plr1e3": {"dskd_projector_lr": 1e-3},
    "dskd_plr3e3": {"dskd_projector_lr": 3e-3},
    "dskd_plr1e4": {"dskd_projector_lr": 1e-4},
    "dskd_plr2e4": {"dskd_projector_lr": 2e-4},
    "dskd_shared": {"dskd_student_space_target": "shared_vocabulary", "dskd_projector_lr": 1e-3},
    "dskd_srkl_both": {
        "dskd_divergence": "skew_reverse_kl",
        "dskd_teacher_space_divergence": "skew_reverse_kl",
    },
}
PROJECTED_W0 = {"dskd_student_space_target": "projected", "dskd_kd_teacher_weight": 0.0}
"""Across tokenizers, the projected teacher in place of the teacher's own distribution."""
CROSS_TOKENIZER_ARMS: dict[str, dict[str, Any]] = {
    "sft": {},
    "uld": {"dskd_method": "uld"},
    "dskd_paper": {**PAPER, "dskd_token_alignment": "cma"},
    "dskd_default": {},
    "dskd_w1": {"dskd_kd_teacher_weight": 1.0},
    "dskd_projected_w0": PROJECTED_W0,
    "dskd_projected_w1": {**PROJECTED_W0, "dskd_kd_teacher_weight": 1.0},
    "dskd_projected_w0_plr1e4": {**PROJECTED_W0, "dskd_projector_lr": 1e-4},
    "dskd_projected_w0_plr1e4_t1": {**PROJECTED_W0, "dskd_projector_lr": 1e-4, "dskd_temperature": 1.0},
    "dskd_agreement": {"dskd_kd_student_accuracy_mask": "everywhere"},
    "dskd_r05": {"dskd_kd_rate": 0.5},
    "dskd_r02": {"dskd_kd_rate": 0.2},
    "dskd_skl": {"dskd_divergence": "skew_forward_kl"},
    "dskd_srkl": {"dskd_divergence": "skew_reverse_kl"},
    "dskd_akl": {"dskd_divergence": "adaptive_kl"},
}
ARMS: dict[str, dict[str, dict[str, Any]]] = {
    "smollm2": SAME_VOCABULARY_ARMS,
    "qwen": CROSS_TOKENIZER_ARMS,
    "gemma": CROSS_TOKENIZER_ARMS,
    "smollm2_narrow": SAME_VOCABULARY_ARMS,
    "qwen_narrow": CROSS_TOKENIZER_ARMS,
    "gemma_narrow": CROSS_TOKENIZER_ARMS,
}
"""Per pair, each arm's ``dskd_*`` keys over the plugin's defaults (``sft``: none, no teacher).
SFT does not depend on the teacher: it runs once per student, under its first pair
(:func:`sft_pair`)."""
LABELS = {
    "sft": "SFT (no teacher)",
    "vanilla_kd": "vanilla KD (dskd_method: vanilla_kd)",
    "uld": "ULD (dskd_method: uld)",
    "dskd_paper": "DSKD, the paper's settings",
    "dskd_default": "DSKD, the plugin's defaults",
    "dskd_plr1e3": "DSKD, the plugin's defaults but dskd_projector_lr: 1e-3 (the paper's)",
    "dskd_plr3e3": "DSKD, the plugin's defaults but dskd_projector_lr: 3e-3",
    "dskd_plr1e4": "DSKD, the plugin's defaults but dskd_projector_lr: 1e-4",
    "dskd_plr2e4": "DSKD, the plugin's defaults but dskd_projector_lr: 2e-4",
    "dskd_shared": "DSKD, the plugin's defaults but dskd_student_space_target: shared_vocabulary (projectors at 1e-3)",
    "dskd_w1": "DSKD, the plugin's defaults but dskd_kd_teacher_weight: 1",
    "dskd_projected_w0": "DSKD, the plugin's defaults but the projected target (dskd_kd_teacher_weight: 0)",
    "dskd_projected_w1": "DSKD, the plugin's defaults but the projected target and the teacher-space term "
    "(dskd_kd_teacher_weight: 1): DSKD's two spaces at the exact pairs",
    "dskd_projected_w0_plr1e4": "DSKD, the projected target (dskd_kd_teacher_weight: 0), projectors at 1e-4",
    "dskd_projected_w0_plr1e4_t1": "DSKD, the projected target (dskd_kd_teacher_weight: 0), projectors at 1e-4, "
    "dskd_temperature: 1",
    "dskd_agreement": "DSKD, the plugin's defaults but dskd_kd_student_accuracy_mask: everywhere (DSKDv2)",
    "dskd_r05": "DSKD, the plugin's defaults but dskd_kd_rate: 0.5 (the paper's)",
    "dskd_r02": "DSKD, the plugin's defaults but dskd_kd_rate: 0.2",
    "dskd_skl": "DSKD, the plugin's defaults but dskd_divergence: skew_forward_kl",
    "dskd_srkl": "DSKD, the plugin's defaults but dskd_divergence: skew_reverse_kl",
    "dskd_akl": "DSKD, the plugin's defaults but dskd_divergence: adaptive_kl",
    "dskd_srkl_both": "DSKD, the plugin's defaults but dskd_divergence and dskd_teacher_space_divergence: "
    "skew_reverse_kl",
}


@dataclass(frozen=True)
class Assets:
    """What every run of the benchmark reads: the data files (the students share a tokenizer)."""

    train: Path
    heldout: Path
    """``{"prompt", "output"}`` rows: the chat-rendered question and its reference answer."""


def prepare() -> Assets:
    """The stdlib Q&A in Axolotl's ``chat_template`` format, built once."""
    from transformers import AutoTokenizer

    data = WORK / "data"
    assets = Assets(data / "train.jsonl", data / "heldout.jsonl")
    if assets.heldout.is_file():
        return assets
    train, heldout = split(stdlib_pairs())
    conversation = [
        [{"role": "user", "content": p["question"]}, {"role": "assistant", "content": p["answer"]}]
        for p in train
    ]
    write_conversations(assets.train, conversation)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    rows = [{"prompt": chat_prompt(tokenizer, p), "output": p["answer"]} for p in heldout]
    assets.heldout.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return assets


def sft_pair(pair: str) -> str:
    """The pair whose ``sft`` runs are the SFT of ``pair``'s student."""
    return next(p for p in PAIRS if PAIRS[p].student == PAIRS[pair].student)


def run_dir(pair: str, arm: str, seed: int) -> Path:
    return WORK / "runs" / pair / f"{arm}_seed{seed}"


def cache_pair(pair: str) -> str:
    """The pair whose teacher cache ``pair`` reads: the first with its teacher. A cache depends on
    the student's tokenizer, which the students share, not on its weights."""
    return next(p for p in PAIRS if PAIRS[p].teacher is PAIRS[pair].teacher)


def cache_dir(pair: str) -> Path:
    return WORK / f"cache_{cache_pair(pair)}"


def config(assets: Assets, pair: str, arm: str, seed: int) -> dict[str, Any]:
    """The Axolotl config of one run (or, as ``dskd_default``, of the pair's cache build)."""
    out = run_dir(pair, arm, seed)
    cfg = {
        **CPU_LORA_BASE,
        "plugins": ["axolotl_dskd.DSKDPlugin"],
        "base_model": str(STUDENTS[PAIRS[pair].student]()),
        "chat_template": "tokenizer_default",
        "datasets": [
            {
                "path": str(assets.train),
                "ds_type": "json",
                "type": "chat_template",
                "field_messages": "messages",
            }
        ],
        "dataset_num_proc": 1,
        "sequence_len": SEQUENCE_LEN,
        "excess_length_strategy": "truncate",
        "lora_r": 16,
        "lora_alpha": 32,
        "micro_batch_size": 8,
        "max_steps": STEPS,
        "learning_rate": 5e-4,
        "warmup_steps": STEPS // 10,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "save_steps": STEPS,
        "seed": seed,
        "output_dir": str(out / "output"),
        "dataset_prepared_path": str(out / "prepared"),
        "dskd_teacher": str(PAIRS[pair].teacher()),
        "dskd_teacher_cache": str(cache_dir(pair)),
        **PAIRS[pair].keys,
        **ARMS[pair][arm],
    }
    return without_distillation(cfg) if arm == "sft" else cfg


def _run(command: list[str], workdir: Path, log_name: str) -> float:
    """Run ``command`` in ``workdir`` on one CPU thread, its output in ``workdir/log_name``; the
    seconds it took (fails with the log's tail if the command fails)."""
    started = time.time()
    with open(workdir / log_name, "w") as log:
        proc = subprocess.run(
            command, check=False, cwd=workdir, env=train_env(threads=1), stdout=log, stderr=subprocess.STDOUT
        )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{(workdir / log_name).read_text()[-4000:]}")
    return time.time() - started


def build_cache(assets: Assets, pair: str) -> dict[str, Any]:
    """``axolotl dskd-cache-teacher`` on the pair's default DSKD config: its time and size."""
    workdir = WORK / f"cache_build_{pair}"
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = write_config(config(assets, pair, "dskd_default", 0), workdir / "config.yml")
    seconds = _run(cache_command(cfg, "axolotl"), workdir, "cache.log")
    size = sum(f.stat().st_size for f in cache_dir(pair).rglob("*") if f.is_file())
    return {
        "pair": pair,
        "arm": "cache",
        "seed": 0,
        "build_s": round(seconds),
        "mib": round(size / 2**20),
    }


def train_and_score(assets: Assets, pair: str, arm: str, seed: int, rouge_seeds: list[int]) -> dict[str, Any]:
    """Train one arm through ``accelerate launch -m axolotl.cli.train`` and score its adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    workdir = run_dir(pair, arm, seed)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = config(assets, pair, arm, seed)
    output = Path(cfg["output_dir"])
    if not (output / f"checkpoint-{STEPS}").is_dir():  # a run trained before is scored again
        _run(train_command(write_config(cfg, workdir / "config.yml")), workdir, "train.log")
    runtime = re.search(r"'train_runtime': '?([\d.]+)", (workdir / "train.log").read_text())
    steps = [row for row in log_history(output / f"checkpoint-{STEPS}") if "loss" in row]
    terms = sorted({k for row in steps for k in row if k.startswith("dskd/") or k in ("loss", "grad_norm")})
    result: dict[str, Any] = {
        "pair": pair,
        "arm": arm,
        "seed": seed,
        "keys": ARMS[pair][arm],
        "seconds_per_step": round(float(runtime.group(1)) / STEPS, 2),
        "last20": {k: round(statistics.mean(row[k] for row in steps[-20:] if k in row), 4) for k in terms},
    }
    torch.set_num_threads(1)
    student = cfg["base_model"]
    tokenizer = AutoTokenizer.from_pretrained(student)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student), output)
    _, heldout = split(stdlib_pairs())
    result.update(
        heldout_nll(model, [encode(tokenizer, p, SEQUENCE_LEN) for p in heldout], tokenizer.pad_token_id)
    )
    if rouge_seeds:
        scores = workdir / "rouge_l.json"
        command = [sys.executable, "-m", "axolotl_dskd.evaluate", "--model", str(output), "--data",
                   str(assets.heldout), "--seeds", *map(str, rouge_seeds), "--max-new-tokens", "128",
                   "--batch-size", "16", "--device", "cpu", "--dtype", "float32", "--out", str(scores)]  # fmt: skip
        _run(command, workdir, "rouge_l.log")
        rouge = json.loads(scores.read_text())
        result["rouge_l"] = {"mean": rouge["mean"], "per_seed": rouge["per_seed"], "max_new_tokens": 128}
    return result


def _results() -> list[dict[str, Any]]:
    return [json.loads(line) for line in RESULTS.read_text().splitlines()] if RESULTS.is_file() else []


def _done(pair: str, arm: str, seed: int) -> bool:
    return any((r["pair"], r["arm"], r["seed"]) == (pair, arm, seed) for r in _results())


def _append(result: dict[str, Any]) -> None:
    with open(RESULTS, "a") as f:
        f.write(json.dumps(result) + "\n")


def _per_seed(by_seed: dict[int, dict[str, Any]], baseline: dict[int, dict[str, Any]]) -> dict[int, float]:
    """NLL per byte against ``baseline`` on every seed both have."""
    return {s: by_seed[s]["nll_byte"] - baseline[s]["nll_byte"] for s in sorted(by_seed) if s in baseline}


def _collect() -> tuple[dict[tuple[str, str], dict[int, dict[str, Any]]], dict[str, dict[str, Any]]]:
    """The recorded runs by (pair, arm) and seed, and the cache builds by pair."""
    runs: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    caches = {}
    for r in _results():
        if r["arm"] == "cache":
            caches[r["pair"]] = r
        else:
            runs.setdefault((r["pair"], r["arm"]), {})[r["seed"]] = r
    return runs, caches


def _seed_count(seeds: list[int], sft: dict[int, dict[str, Any]]) -> str:
    """How many seeds an arm ran on, and which where they are not SFT's."""
    return (
        str(len(seeds)) if seeds == (sorted(sft) or seeds) else f"{len(seeds)} ({', '.join(map(str, seeds))})"
    )


def _short_label(arm: str) -> str:
    """``arm``'s label without the keys in parentheses: ``vanilla KD`` for vanilla KD."""
    return LABELS[arm].split(" (")[0]


def _baseline(pair: str) -> str:
    """What the default DSKD of ``pair`` must beat besides SFT: vanilla KD in one vocabulary, ULD across."""
    return "vanilla_kd" if "vanilla_kd" in ARMS[pair] else "uld"


def write_tables() -> Path:
    """``real_models.md``: per pair and arm the held-out NLL per byte (mean, spread, per seed,
    against SFT of the same student on the same seed), ROUGE-L and seconds per step (two runs
    sharing two cores: a rough guide, not a speed benchmark); then, per pair, the default DSKD
    against vanilla KD or ULD per seed, and what the cross-tokenizer default recovers of the
    same-vocabulary default's gain (one student); then the caches. ``real_models_summary.md``:
    the headline arms only, as seeds won (the README's table). Returns the first."""
    runs, caches = _collect()
    rows = [
        "| Teacher | Student | Arm | Seeds | NLL/byte | Spread | Per seed | vs SFT, per seed | ROUGE-L (runs) | s/step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes, gains = [], {}
    for pair, spec in PAIRS.items():
        sft = runs.get((sft_pair(pair), "sft"), {})
        for arm in ARMS[pair]:
            by_seed = runs.get((pair, arm), {})
            if not by_seed:
                continue
            seeds = sorted(by_seed)
            nll = [by_seed[s]["nll_byte"] for s in seeds]
            delta = _per_seed(by_seed, sft) if arm != "sft" else {}
            rouge = [by_seed[s]["rouge_l"]["mean"] for s in seeds if "rouge_l" in by_seed[s]]
            step = statistics.mean(by_seed[s]["seconds_per_step"] for s in seeds)
            rows.append(
                f"| {spec.label if arm != 'sft' else 'none'} | {STUDENT_LABELS[spec.student]} | {LABELS[arm]} "
                f"| {_seed_count(seeds, sft)} | {statistics.mean(nll):.4f} | {max(nll) - min(nll):.4f} "
                f"| {' / '.join(f'{x:.4f}' for x in nll)} | {' / '.join(f'{d:+.4f}' for d in delta.values())} "
                f"| {f'{statistics.mean(rouge):.2f} ({len(rouge)})' if rouge else ''} | {step:.1f} |"
            )
        gains[pair] = _per_seed(runs.get((pair, "dskd_default"), {}), sft)
        baseline = _baseline(pair)
        against = _per_seed(runs.get((pair, "dskd_default"), {}), runs.get((pair, baseline), {}))
        if against:
            notes.append(
                f"{spec.label}, {STUDENT_LABELS[spec.student]} student: the default DSKD against "
                f"{_short_label(baseline)} per seed ({', '.join(map(str, against))}): "
                f"{' / '.join(f'{d:+.4f}' for d in against.values())} nats/byte."
            )
    shares = {}
    for same_pair, cross_pair in RECOVERY:
        both = sorted(set(gains.get(same_pair, {})) & set(gains.get(cross_pair, {})))
        if not both:
            continue
        same, cross = (statistics.mean(gains[p][s] for s in both) for p in (same_pair, cross_pair))
        if same < 0:
            shares[cross_pair] = f"{max(cross / same, 0):.0%}"
        notes.append(
            f"With the {STUDENT_LABELS[PAIRS[same_pair].student]} student, on seed{'s' * (len(both) > 1)} "
            f"{', '.join(map(str, both))} (mean of the changes against SFT) the cross-tokenizer default "
            f"({PAIRS[cross_pair].teacher_name}) "
            f"changes held-out NLL by {cross:+.4f} nats/byte, the same-vocabulary default by {same:+.4f}"
            + (f": it recovers {shares[cross_pair]} of that gain." if cross_pair in shares else ".")
        )
    notes += [
        f"{PAIRS[pair].label}: `axolotl dskd-cache-teacher` {cache['build_s'] / 60:.0f} min (one thread), "
        f"{cache['mib']} MiB, read by both students."
        for pair, cache in caches.items()
    ]
    out = RESULTS.with_suffix(".md")
    out.write_text("\n".join(rows) + "\n" + "".join(f"\n{note}\n" for note in notes))
    _write_summary(runs, shares)
    return out


SUMMARY_ARMS = ("sft", "vanilla_kd", "uld", "dskd_paper", "dskd_default")


def _write_summary(runs: dict[tuple[str, str], dict[int, dict[str, Any]]], shares: dict[str, str]) -> None:
    """``real_models_summary.md`` (the README's table): per pair the headline arms, each against
    SFT of its student on the same seeds, the default also against vanilla KD or ULD, as seeds won,
    and ``shares``: what the cross-tokenizer default recovers of the same student's one-vocabulary
    gain, by pair."""
    rows = [
        "| Teacher | Student | Arm | Seeds | NLL/byte | vs SFT | Ahead of SFT | Ahead of vanilla KD or ULD | Recovers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for pair, spec in PAIRS.items():
        sft = runs.get((sft_pair(pair), "sft"), {})
        for arm in SUMMARY_ARMS:
            by_seed = runs.get((pair, arm), {})
            if arm not in ARMS[pair] or not by_seed:
                continue
            nll = statistics.mean(r["nll_byte"] for r in by_seed.values())
            delta = _per_seed(by_seed, sft) if arm != "sft" else {}
            ahead = f"{sum(d < 0 for d in delta.values())} of {len(delta)}" if delta else ""
            against = ""
            if arm == "dskd_default":
                baseline = _baseline(pair)
                versus = _per_seed(by_seed, runs.get((pair, baseline), {}))
                against = f"{sum(d < 0 for d in versus.values())} of {len(versus)} ({_short_label(baseline)})"
            rows.append(
                f"| {spec.teacher_name if arm != 'sft' else 'none'} | {STUDENT_LABELS[spec.student]} "
                f"| {_short_label(arm)} | {_seed_count(sorted(by_seed), sft)} | {nll:.4f} "
                f"| {f'{statistics.mean(delta.values()):+.4f}' if delta else ''} | {ahead} | {against} "
                f"| {shares.get(pair, '') if arm == 'dskd_default' else ''} |"
            )
    RESULTS.with_name("real_models_summary.md").write_text("\n".join(rows) + "\n")


@dataclass
class _Job:
    pair: str
    arm: str
    seed: int
    needs: str | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", nargs="+", choices=list(PAIRS), default=["smollm2", "qwen"])
    parser.add_argument(
        "--arms", nargs="+", default=["sft", "vanilla_kd", "uld", "dskd_paper", "dskd_default"]
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--rouge-seeds", nargs="*", type=int, default=[])
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side, one CPU thread each")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--job", nargs=3, metavar=("PAIR", "ARM", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table_only:
        print(write_tables().read_text())
        return
    assets = prepare()
    if args.job:
        pair, arm, seed = args.job
        result = (
            build_cache(assets, pair)
            if arm == "cache"
            else train_and_score(assets, pair, arm, int(seed), args.rouge_seeds)
        )
        _append(result)
        print(json.dumps(result), flush=True)
        return
    caches = dict.fromkeys(cache_pair(p) for p in args.pairs)
    jobs = [_Job(p, "cache", 0) for p in caches if not _done(p, "cache", 0)]
    for seed in args.seeds:
        for pair in args.pairs:
            for arm in args.arms:
                if arm not in ARMS[pair] or _done(pair, arm, seed):
                    continue
                if arm == "sft":
                    if sft_pair(pair) == pair:
                        jobs.append(_Job(pair, arm, seed))
                else:
                    jobs.append(_Job(pair, arm, seed, needs=cache_pair(pair)))
    started, running = time.time(), []
    while jobs or running:
        for job in [j for j in running if j.proc.poll() is not None]:
            running.remove(job)
            print(
                f"{time.time() - started:6.0f}s {job.pair} {job.arm} seed {job.seed}: exit {job.proc.returncode}",
                flush=True,
            )
        cached = {r["pair"] for r in _results() if r["arm"] == "cache"}
        ready = [j for j in jobs if j.needs is None or j.needs in cached]
        while ready and len(running) < args.jobs:
            job = ready.pop(0)
            jobs.remove(job)
            command = [sys.executable, __file__, "--job", job.pair, job.arm, str(job.seed),
                       "--rouge-seeds", *map(str, args.rouge_seeds)]  # fmt: skip
            job.proc = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"})
            running.append(job)
        if not running and jobs:
            raise SystemExit(f"{len(jobs)} runs wait for a teacher cache that failed to build")
        time.sleep(5)
    print(write_tables().read_text())


if __name__ == "__main__":
    main()
