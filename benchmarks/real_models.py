"""DSKD against SFT, vanilla KD and ULD on real pretrained models, through Axolotl's CLI as users run it.

Every run is ``accelerate launch -m axolotl.cli.train config.yml`` on a config this script writes;
each teacher's hidden states are built once with ``axolotl dskd-cache-teacher config.yml`` and
every distilled run of that teacher reads them (``dskd_teacher_cache``). Nothing is in-process
but the scoring.

- Student: SmolLM2-135M-Instruct pruned to 11 of its 30 layers (``KEEP_LAYERS``, saved once as a
  model folder), LoRA r 16 on every linear layer of the blocks, its tied embeddings frozen.
- Teachers: SmolLM2-135M-Instruct, the model it was pruned from (one vocabulary), and
  Qwen2.5-Coder-1.5B-Instruct (another tokenizer: 151,936 ids against 49,152), which reads each
  conversation in its own chat template (``dskd_teacher_chat_template: auto``); both float32.
- Data: questions about Python's standard library answered by its docstrings
  (:mod:`dskd_devkit.stdlib_qa`), a ``chat_template`` dataset in SmolLM2's template, answers and
  ``<|im_end|>`` trained, rows cut at 144 tokens (``excess_length_strategy: truncate``); a held-out
  split never trained on.
- Training: 80 steps of 8 rows, AdamW at 5e-4 (cosine, 8 warm-up steps), projectors at 1e-3,
  gradient norm clipped at 1.0, as in :mod:`real_pair_sweep` (its in-process twin, where the ideas
  were measured).
- Scores: the held-out answers' NLL per UTF-8 byte (comparable across tokenizers) of the saved
  adapter, and with ``--rouge-seeds`` the ROUGE-L of answers sampled for the held-out questions
  by ``python -m axolotl_dskd.evaluate`` (the paper's protocol). The terms a run logged
  (``dskd/*``, the last 20 steps) come from its ``trainer_state.json``, its seconds per step from
  its log. A run whose checkpoint exists is scored again, not trained again.

Each run and each cache build appends one JSON line to ``benchmarks/results/real_models.jsonl``
(a run already there is skipped); ``real_models.md`` beside it is rewritten from them. Runs go
``--jobs`` at a time, one CPU thread each; a run waits for its teacher's cache. Measured on two
cores, two or three processes side by side: the student and data in seconds, SmolLM2's cache
3 minutes, Qwen's 43; an SFT or same-vocabulary run 7 to 10 minutes, a cross-tokenizer run with
the plugin's defaults 8 to 10, ULD and the paper's settings across tokenizers (they read Qwen's
151,936-row head) 20 and 23; ROUGE-L 2 minutes a run.

    .venv/bin/python benchmarks/real_models.py --seeds 0 --rouge-seeds 10    # every arm (README's table)
    .venv/bin/python benchmarks/real_models.py --arms sft vanilla_kd uld dskd_default --seeds 1 2 3 4
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
from dskd_devkit.real_models import CACHE, pruned_smollm2_dir, qwen_dir, smollm2_dir
from dskd_devkit.stdlib_qa import chat_prompt, encode, heldout_nll, split, stdlib_pairs

RESULTS = Path(__file__).resolve().parent / "results" / "real_models.jsonl"
WORK = CACHE / "cli_benchmark"
TEACHERS = {"smollm2": smollm2_dir, "qwen": qwen_dir}
PAIRS = {
    "smollm2": "SmolLM2-135M-Instruct (same vocabulary)",
    "qwen": "Qwen2.5-Coder-1.5B-Instruct (other tokenizer)",
}
SEQUENCE_LEN = 144
STEPS = 80
PAPER = {
    "dskd_kd_rate": 0.5,
    "dskd_projector_init": "random",
    "dskd_grad_clip": "joint",
    "dskd_student_space_target": "projected",
    "dskd_kd_teacher_weight": 1.0,
}
"""The DSKD paper's settings where the plugin's defaults differ (its temperature, 2, is the plugin's)."""
ARMS: dict[str, dict[str, dict[str, Any]]] = {
    "smollm2": {
        "sft": {},
        "vanilla_kd": {"dskd_method": "vanilla_kd"},
        "dskd_paper": PAPER,
        "dskd_default": {},
    },
    "qwen": {
        "sft": {},
        "uld": {"dskd_method": "uld"},
        "dskd_paper": {**PAPER, "dskd_token_alignment": "cma"},
        "dskd_default": {},
    },
}
"""Per teacher, each arm's ``dskd_*`` keys over the plugin's defaults (``sft``: none, no teacher).
The student, its data and SFT do not depend on the teacher: SFT runs once, under ``smollm2``."""
LABELS = {
    "sft": "SFT (no teacher)",
    "vanilla_kd": "vanilla KD (dskd_method: vanilla_kd)",
    "uld": "ULD (dskd_method: uld)",
    "dskd_paper": "DSKD, the paper's settings",
    "dskd_default": "DSKD, the plugin's defaults",
}


@dataclass(frozen=True)
class Assets:
    """What every run of the benchmark reads: the student folder and the data files."""

    student: Path
    train: Path
    heldout: Path
    """``{"prompt", "output"}`` rows: the chat-rendered question and its reference answer."""


def prepare() -> Assets:
    """The pruned student and the stdlib Q&A in Axolotl's ``chat_template`` format, built once."""
    from transformers import AutoTokenizer

    student = pruned_smollm2_dir()
    data = WORK / "data"
    assets = Assets(student, data / "train.jsonl", data / "heldout.jsonl")
    if assets.heldout.is_file():
        return assets
    train, heldout = split(stdlib_pairs())
    conversation = [
        [{"role": "user", "content": p["question"]}, {"role": "assistant", "content": p["answer"]}]
        for p in train
    ]
    write_conversations(assets.train, conversation)
    tokenizer = AutoTokenizer.from_pretrained(student)
    rows = [{"prompt": chat_prompt(tokenizer, p), "output": p["answer"]} for p in heldout]
    assets.heldout.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return assets


def run_dir(teacher: str, arm: str, seed: int) -> Path:
    return WORK / "runs" / teacher / f"{arm}_seed{seed}"


def cache_dir(teacher: str) -> Path:
    return WORK / f"cache_{teacher}"


def config(assets: Assets, teacher: str, arm: str, seed: int) -> dict[str, Any]:
    """The Axolotl config of one run (or, as ``dskd_default``, of the teacher's cache build)."""
    out = run_dir(teacher, arm, seed)
    cfg = {
        **CPU_LORA_BASE,
        "plugins": ["axolotl_dskd.DSKDPlugin"],
        "base_model": str(assets.student),
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
        "dskd_teacher": str(TEACHERS[teacher]()),
        "dskd_teacher_cache": str(cache_dir(teacher)),
        **ARMS[teacher][arm],
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


def build_cache(assets: Assets, teacher: str) -> dict[str, Any]:
    """``axolotl dskd-cache-teacher`` on the teacher's default DSKD config: its time and size."""
    workdir = WORK / f"cache_build_{teacher}"
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = write_config(config(assets, teacher, "dskd_default", 0), workdir / "config.yml")
    seconds = _run(cache_command(cfg, "axolotl"), workdir, "cache.log")
    size = sum(f.stat().st_size for f in cache_dir(teacher).rglob("*") if f.is_file())
    return {
        "teacher": teacher,
        "arm": "cache",
        "seed": 0,
        "build_s": round(seconds),
        "mib": round(size / 2**20),
    }


def train_and_score(
    assets: Assets, teacher: str, arm: str, seed: int, rouge_seeds: list[int]
) -> dict[str, Any]:
    """Train one arm through ``accelerate launch -m axolotl.cli.train`` and score its adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    workdir = run_dir(teacher, arm, seed)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = config(assets, teacher, arm, seed)
    output = Path(cfg["output_dir"])
    if not (output / f"checkpoint-{STEPS}").is_dir():  # a run trained before is scored again
        _run(train_command(write_config(cfg, workdir / "config.yml")), workdir, "train.log")
    runtime = re.search(r"'train_runtime': '?([\d.]+)", (workdir / "train.log").read_text())
    steps = [row for row in log_history(output / f"checkpoint-{STEPS}") if "loss" in row]
    terms = sorted({k for row in steps for k in row if k.startswith("dskd/") or k in ("loss", "grad_norm")})
    result: dict[str, Any] = {
        "teacher": teacher,
        "arm": arm,
        "seed": seed,
        "keys": ARMS[teacher][arm],
        "seconds_per_step": round(float(runtime.group(1)) / STEPS, 2),
        "last20": {k: round(statistics.mean(row[k] for row in steps[-20:] if k in row), 4) for k in terms},
    }
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(assets.student)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets.student), output)
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


def _done(teacher: str, arm: str, seed: int) -> bool:
    return any((r["teacher"], r["arm"], r["seed"]) == (teacher, arm, seed) for r in _results())


def _append(result: dict[str, Any]) -> None:
    with open(RESULTS, "a") as f:
        f.write(json.dumps(result) + "\n")


def write_table() -> Path:
    """``real_models.md``: per teacher and arm the held-out NLL per byte (mean, spread, per
    seed, against SFT on the same seed), ROUGE-L and seconds per step (two runs sharing two cores:
    a rough guide, not a speed benchmark); then what the cross-tokenizer default recovers of the
    same-vocabulary default's gain; then the caches."""
    runs: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    caches = {}
    for r in _results():
        if r["arm"] == "cache":
            caches[r["teacher"]] = r
        else:
            runs.setdefault((r["teacher"], r["arm"]), {})[r["seed"]] = r
    sft = runs.get(("smollm2", "sft"), {})
    rows = [
        "| Teacher | Arm | Seeds | NLL/byte | Spread | Per seed | vs SFT, per seed | ROUGE-L (runs) | s/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    gains = {}
    for teacher, label in PAIRS.items():
        for arm in ARMS[teacher]:
            by_seed = sft if arm == "sft" else runs.get((teacher, arm), {})
            if not by_seed or (arm == "sft" and teacher != "smollm2"):
                continue
            seeds = sorted(by_seed)
            nll = [by_seed[s]["nll_byte"] for s in seeds]
            delta = [by_seed[s]["nll_byte"] - sft[s]["nll_byte"] for s in seeds if s in sft and arm != "sft"]
            if arm == "dskd_default":
                gains[teacher] = {s: by_seed[s]["nll_byte"] - sft[s]["nll_byte"] for s in seeds if s in sft}
            rouge = [by_seed[s]["rouge_l"]["mean"] for s in seeds if "rouge_l" in by_seed[s]]
            step = statistics.mean(by_seed[s]["seconds_per_step"] for s in seeds)
            rows.append(
                f"| {label if arm != 'sft' else 'none'} | {LABELS[arm]} | {len(seeds)} | {statistics.mean(nll):.4f} "
                f"| {max(nll) - min(nll):.4f} | {' / '.join(f'{x:.4f}' for x in nll)} "
                f"| {' / '.join(f'{d:+.4f}' for d in delta)} "
                f"| {f'{statistics.mean(rouge):.2f} ({len(rouge)})' if rouge else ''} "
                f"| {step:.1f} |"
            )
    lines = rows
    both = sorted(set(gains.get("smollm2", {})) & set(gains.get("qwen", {})))
    if both:
        same, cross = (statistics.mean(gains[t][s] for s in both) for t in ("smollm2", "qwen"))
        recovered = (
            f"On seed{'s' * (len(both) > 1)} {', '.join(map(str, both))} (mean of the changes against SFT) the "
            f"cross-tokenizer default changes held-out NLL by {cross:+.4f} nats/byte, the same-vocabulary "
            f"default by {same:+.4f}"
            + (f": it recovers {cross / same:.0%} of that gain." if same < 0 else ".")
        )
        lines += ["", recovered]
    for teacher, cache in caches.items():
        minutes = cache["build_s"] / 60
        lines += [
            "",
            f"{PAIRS[teacher]}: `axolotl dskd-cache-teacher` {minutes:.0f} min (one thread), {cache['mib']} MiB.",
        ]
    out = RESULTS.with_suffix(".md")
    out.write_text("\n".join(lines) + "\n")
    return out


@dataclass
class _Job:
    teacher: str
    arm: str
    seed: int
    needs: str | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--teachers", nargs="+", choices=list(TEACHERS), default=list(TEACHERS))
    parser.add_argument(
        "--arms", nargs="+", default=["sft", "vanilla_kd", "uld", "dskd_paper", "dskd_default"]
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--rouge-seeds", nargs="*", type=int, default=[])
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side, one CPU thread each")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--job", nargs=3, metavar=("TEACHER", "ARM", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table_only:
        print(write_table().read_text())
        return
    assets = prepare()
    if args.job:
        teacher, arm, seed = args.job
        result = (
            build_cache(assets, teacher)
            if arm == "cache"
            else train_and_score(assets, teacher, arm, int(seed), args.rouge_seeds)
        )
        _append(result)
        print(json.dumps(result), flush=True)
        return
    jobs = [_Job(t, "cache", 0) for t in args.teachers if not _done(t, "cache", 0)]
    for seed in args.seeds:
        for teacher in args.teachers:
            for arm in args.arms:
                if (
                    arm in ARMS[teacher]
                    and not (arm == "sft" and teacher != "smollm2")
                    and not _done(teacher, arm, seed)
                ):
                    jobs.append(_Job(teacher, arm, seed, needs=None if arm == "sft" else teacher))
    started, running = time.time(), []
    while jobs or running:
        for job in [j for j in running if j.proc.poll() is not None]:
            running.remove(job)
            print(
                f"{time.time() - started:6.0f}s {job.teacher} {job.arm} seed {job.seed}: exit {job.proc.returncode}",
                flush=True,
            )
        cached = {r["teacher"] for r in _results() if r["arm"] == "cache"}
        ready = [j for j in jobs if j.needs is None or j.needs in cached]
        while ready and len(running) < args.jobs:
            job = ready.pop(0)
            jobs.remove(job)
            command = [sys.executable, __file__, "--job", job.teacher, job.arm, str(job.seed),
                       "--rouge-seeds", *map(str, args.rouge_seeds)]  # fmt: skip
            job.proc = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"})
            running.append(job)
        if not running and jobs:
            raise SystemExit(f"{len(jobs)} runs wait for a teacher cache that failed to build")
        time.sleep(5)
    print(write_table().read_text())


if __name__ == "__main__":
    main()
