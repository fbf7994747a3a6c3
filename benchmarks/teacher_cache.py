"""The offline teacher on the CPU: how much faster is a step without the teacher, what does the
cache cost, and after how many epochs does it pay off?

One same-vocabulary DSKD setup through the stock CLI, with a 4-bit teacher of about ten times the
LoRA student's compute per token (tiny random-weight models on the arithmetic task's tokenizer):

1. ``live``: ``python -m axolotl.cli.train`` with the teacher loaded;
2. the cache, built by ``python -m axolotl_dskd.cache_teacher`` in bfloat16 (the default), float32
   and int8: wall time of the command, seconds of its teacher pass, bytes per trained token;
3. ``cached``: the same training from the bfloat16 cache.

Step time is the trainer's ``train_runtime`` over its steps (model loading and dataset
preparation excluded), peak memory the training process's peak resident set. Break-even: the
epochs after which the time saved per epoch has paid for building the cache.

Beside it, an estimate for a 7B 4-bit teacher and a 1.1B LoRA student on one GPU: the CPU run
gives the throughput of the teacher's forward and of the rest of a step (student and loss), each
in FLOP/s of its FLOP count; the same two rates applied to the 7B / 1.1B FLOP counts. An estimate
until a GPU run replaces it: on a GPU the ratio of the two rates differs (4-bit dequantization,
kernel sizes).

Usage (from the repository root)::

    .venv/bin/python benchmarks/teacher_cache.py            # 512 rows, 60 steps
    .venv/bin/python benchmarks/teacher_cache.py --rows 256 --steps 20

Writes ``benchmarks/results/teacher_cache.{json,md}``; runs under ``outputs/teacher_cache/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from axolotl_dskd.core.teacher_cache import read_manifest
from dskd_devkit.axolotl_runs import CPU_LORA_BASE, cache_command, train_command, train_env, write_config

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
WORK = REPO / "outputs" / "teacher_cache"
TEACHER = {"hidden_size": 512, "num_layers": 6}
STUDENT = {"hidden_size": 128, "num_layers": 4}
STORAGE = ("bfloat16", "float32", "int8")
GPU_PAIR = {"teacher_params": 6.7e9, "student_params": 1.1e9}
"""Llama-2-7B and TinyLlama-1.1B, non-embedding parameters rounded as the issue states them."""


def make_assets(root: Path, rows: int) -> dict[str, Path]:
    from axolotl_dskd.dolly import write_jsonl
    from dskd_devkit.task import arithmetic_rows, task_corpus
    from dskd_devkit.tiny_tokenizers import bpe_tokenizer
    from dskd_devkit.training import save_pair, tiny_model

    tokenizer = bpe_tokenizer(task_corpus())
    write_jsonl(arithmetic_rows(rows, seed=0), root / "data.jsonl")
    return {
        "teacher": save_pair(tiny_model("qwen2", tokenizer, **TEACHER), tokenizer, root / "teacher"),
        "student": save_pair(tiny_model("llama", tokenizer, seed=1, **STUDENT), tokenizer, root / "student"),
        "data": root / "data.jsonl",
    }


def config(assets: dict[str, Path], run: Path, steps: int, **keys: Any) -> dict[str, Any]:
    return {
        **CPU_LORA_BASE,
        "plugins": ["axolotl_dskd.DSKDPlugin"],
        "base_model": str(assets["student"]),
        "dskd_teacher": str(assets["teacher"]),
        "dskd_teacher_load_in_4bit": True,
        "datasets": [{"path": str(assets["data"]), "ds_type": "json", "type": "alpaca"}],
        "dataset_prepared_path": str(WORK / "prepared"),
        "output_dir": str(run / "output"),
        "micro_batch_size": 8,
        "max_steps": steps,
        "save_steps": 10 * steps,
        "logging_steps": steps,
        **keys,
    }


def run(command: list[str], log: Path) -> tuple[float, int, str]:
    """Run ``command`` offline; (wall seconds, peak resident set in bytes, output)."""
    started = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=train_env(), stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    text = log.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({log}):\n{text[-3000:]}")
    return time.time() - started, usage.ru_maxrss * 1024, text


def train(cfg: dict[str, Any], run_dir: Path) -> dict[str, float]:
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    command = train_command(write_config(cfg, run_dir / "config.yml"), "python")
    wall, peak, log = run(command, run_dir / "train.log")
    runtime = float(re.search(r"'train_runtime': '?([0-9.]+)", log).group(1))
    return {"wall_s": wall, "peak_rss": peak, "step_s": runtime / cfg["max_steps"]}


def build(cfg: dict[str, Any], run_dir: Path) -> dict[str, float]:
    shutil.rmtree(cfg["dskd_teacher_cache"], ignore_errors=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    wall, _peak, log = run(cache_command(write_config(cfg, run_dir / "config.yml")), run_dir / "cache.log")
    teacher_s = float(re.search(r"([0-9.]+) s of them running the teacher", log).group(1))
    manifest = read_manifest(cfg["dskd_teacher_cache"])
    return {
        "wall_s": wall,
        "teacher_s": teacher_s,
        "bytes": manifest["bytes"],
        "bytes_per_trained_token": manifest["bytes"] / manifest["trained_tokens"],
        "samples": manifest["samples"],
    }


def flops_per_token(assets: dict[str, Path]) -> dict[str, float]:
    """Matrix-multiply FLOPs per token: the teacher's forward (2 N) and a LoRA student's step
    (forward 2 N, input gradients 2 N), N the non-embedding parameters."""
    from transformers import AutoConfig

    def params(folder: Path) -> float:
        c = AutoConfig.from_pretrained(folder)
        head = c.hidden_size // c.num_attention_heads
        attention = c.hidden_size * head * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
        return c.num_hidden_layers * (attention + 3 * c.hidden_size * c.intermediate_size)

    return {"teacher": 2 * params(assets["teacher"]), "student": 4 * params(assets["student"])}


def gpu_estimate(live: dict, cached: dict, flops: dict[str, float]) -> list[dict[str, Any]]:
    """The live/cached step-time ratio for the 7B / 1.1B pair from its FLOP counts, with the
    teacher's forward at the rest of a step's FLOP rate, and at the relative rate measured here."""
    teacher_s = live["step_s"] - cached["step_s"]
    measured = (flops["teacher"] / teacher_s) / (flops["student"] / cached["step_s"])
    rows = []
    for rate, rate_label in (
        (1.0, "equal FLOP rates"),
        (measured, f"the CPU's relative rate ({measured:.1f}x)"),
    ):
        for student_factor, label in ((4, "without"), (6, "with")):
            teacher = 2 * GPU_PAIR["teacher_params"] / rate
            student = student_factor * GPU_PAIR["student_params"]
            rows.append({
                "rates": rate_label, "student": f"{label} gradient checkpointing",
                "ratio": (teacher + student) / student, "teacher_share": teacher / (teacher + student),
            })  # fmt: skip
    return rows


def storage_precision() -> list[dict[str, Any]]:
    """Relative change of the DSKD loss and of its gradient (student states and projectors) when
    a real model's final hidden states (SmolLM2-135M over this README, 4 x 256 tokens) are stored
    in each dtype instead of float32; int8 also with one plain per-token scale (no channel kept)."""
    import torch

    from axolotl_dskd.core.loss import IGNORE_INDEX, DSKDLossConfig, Projectors, dskd_loss
    from axolotl_dskd.core.models import teacher_hidden_states
    from axolotl_dskd.core.teacher_cache import decode, encode
    from dskd_devkit.real_models import smollm2

    model, tokenizer = smollm2()
    text = (REPO / "README.md").read_text()
    batch = tokenizer([text[i * 2000 : (i + 1) * 2000] for i in range(4)], return_tensors="pt",
                      padding=True, truncation=True, max_length=256)  # fmt: skip
    hidden = teacher_hidden_states(model, **batch)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    labels[:, :32] = IGNORE_INDEX
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(*hidden.shape[:2], 64, generator=generator)
    student_head = torch.randn(model.lm_head.weight.shape[0], 64, generator=generator) * 0.1
    projectors = Projectors(64, hidden.shape[-1])

    def loss_and_gradient(teacher: torch.Tensor) -> tuple[float, torch.Tensor]:
        states = student.clone().requires_grad_(True)
        projectors.zero_grad()
        out = dskd_loss(
            projectors, student_hidden=states, student_lm_head=student_head, student_labels=labels,
            teacher_hidden=teacher, teacher_lm_head=model.lm_head.weight.detach(), config=DSKDLossConfig(),
        )  # fmt: skip
        out.loss.backward()
        return float(out.loss), torch.cat(
            [states.grad.flatten(), *(p.grad.flatten() for p in projectors.parameters())]
        )

    loss, grad = loss_and_gradient(hidden)
    flat = hidden.reshape(-1, hidden.shape[-1])
    rows = []
    for label, storage, kwargs in (("bfloat16", "bfloat16", {}), ("int8", "int8", {}),
                                   ("int8, one scale per token only", "int8", {"outliers": 0})):  # fmt: skip
        stored = encode(flat, storage, **kwargs)
        got_loss, got_grad = loss_and_gradient(decode(stored).float().reshape(hidden.shape))
        rows.append({
            "storage": label, "d": hidden.shape[-1], "loss": abs(got_loss - loss) / abs(loss),
            "gradient": float((got_grad - grad).norm() / grad.norm()),
            "bytes_per_state": sum(t.element_size() * t.numel() for t in stored.values()) / flat.shape[0],
        })  # fmt: skip
    return rows


def markdown(report: dict[str, Any]) -> str:
    live, cached, builds = report["live"], report["cached"], report["builds"]
    lines = [
        "| | Live teacher | From the cache (bfloat16) | Ratio |",
        "|---|---|---|---|",
        (
            f"| Seconds per optimizer step | {live['step_s']:.3f} | {cached['step_s']:.3f} | "
            f"**{report['speedup']:.2f}x** faster |"
        ),
        (
            f"| Peak memory of training (RSS, MB) | {live['peak_rss'] / 1e6:.0f} | {cached['peak_rss'] / 1e6:.0f} | "
            f"{cached['peak_rss'] / live['peak_rss']:.2f} |"
        ),
        "",
        "| Cache storage | Bytes per trained token | Build command (s) | of it, the teacher pass (s) |",
        "|---|---|---|---|",
        *(
            f"| {dtype} | {b['bytes_per_trained_token']:.0f} | {b['wall_s']:.1f} | {b['teacher_s']:.1f} |"
            for dtype, b in builds.items()
        ),
        "",
        (
            f"Break-even: the bfloat16 cache (build command {builds['bfloat16']['wall_s']:.1f} s, the teacher "
            f"pass {builds['bfloat16']['teacher_s']:.1f} s) pays for itself after "
            f"**{report['break_even_epochs']:.2f} epochs** of {report['steps_per_epoch']} steps "
            f"({report['break_even_teacher_pass']:.2f} counting the teacher pass only; one epoch saves "
            f"{report['saved_per_epoch_s']:.1f} s)."
        ),
        "",
        (
            f"Storage precision on a real model's states (SmolLM2-135M-Instruct, d={report['precision'][0]['d']}, "
            "over this README; the DSKD loss of random student states and projectors, against float32 storage):"
        ),
        "",
        "| Storage | Bytes per state | Loss, relative change | Gradient, relative change |",
        "|---|---|---|---|",
        *(
            f"| {r['storage']} | {r['bytes_per_state']:.0f} | {r['loss']:.1e} | {r['gradient']:.1e} |"
            for r in report["precision"]
        ),
        "",
        (
            "Estimate, not a measurement (until a GPU run replaces it): 7B 4-bit teacher (forward 2 x 6.7 "
            "GFLOP per token), 1.1B LoRA student (4 x 1.1 GFLOP per token, 6 x with gradient "
            "checkpointing), one GPU. Two assumptions on the teacher's FLOP rate: the same as the rest of a "
            "step, and faster by the ratio measured on this CPU, where the tiny student's per-operation "
            "overhead inflates it (a 4-bit teacher on a GPU is rather slower per FLOP than a bf16 student):"
        ),
        "",
        "| Teacher's FLOP rate | Student step | Teacher share of a live step | Live / cached step time |",
        "|---|---|---|---|",
        *(
            f"| {r['rates']} | {r['student']} | {r['teacher_share']:.0%} | {r['ratio']:.2f}x |"
            for r in report["gpu"]
        ),
        "",
        (
            f"Tiny random-weight models: teacher d={TEACHER['hidden_size']}, {TEACHER['num_layers']} layers, "
            f"4-bit nf4; LoRA student d={STUDENT['hidden_size']}, {STUDENT['num_layers']} layers "
            f"(the teacher's forward is {report['flops']['teacher'] / report['flops']['student']:.1f}x the "
            f"student's step in FLOPs per token); {report['rows']} arithmetic rows in alpaca format "
            f"(answers of a few tokens), micro-batch 8, {report['steps']} steps; "
            f"{report['cpus']} CPU cores. Command: `{report['command']}` ({report['minutes']:.1f} min)."
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    started = time.time()
    shutil.rmtree(WORK, ignore_errors=True)
    assets = make_assets(WORK / "assets", args.rows)

    live = train(config(assets, WORK / "live", args.steps), WORK / "live")
    builds = {}
    for dtype in STORAGE:
        cfg = config(assets, WORK / f"cache-{dtype}", args.steps, dskd_teacher_cache=str(WORK / f"cache-{dtype}" / "cache"),
                     dskd_teacher_cache_dtype=dtype)  # fmt: skip
        builds[dtype] = build(cfg, WORK / f"build-{dtype}")
        print(f"cache {dtype}: {builds[dtype]}", flush=True)
    cached_cfg = config(
        assets, WORK / "cached", args.steps, dskd_teacher_cache=str(WORK / "cache-bfloat16" / "cache")
    )
    cached = train(cached_cfg, WORK / "cached")

    steps_per_epoch = math.ceil(builds["bfloat16"]["samples"] / 8)
    saved = (live["step_s"] - cached["step_s"]) * steps_per_epoch
    flops = flops_per_token(assets)
    report = {
        "rows": args.rows, "steps": args.steps, "cpus": os.cpu_count(), "live": live, "cached": cached,
        "builds": builds, "speedup": live["step_s"] / cached["step_s"], "steps_per_epoch": steps_per_epoch,
        "saved_per_epoch_s": saved, "break_even_epochs": builds["bfloat16"]["wall_s"] / saved,
        "break_even_teacher_pass": builds["bfloat16"]["teacher_s"] / saved, "flops": flops,
        "gpu": gpu_estimate(live, cached, flops), "precision": storage_precision(),
        "minutes": (time.time() - started) / 60,
        "command": " ".join(["python benchmarks/teacher_cache.py", *(argv if argv is not None else sys.argv[1:])]),
    }  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "teacher_cache.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (RESULTS / "teacher_cache.md").write_text(table)
    print(table)
    return report


if __name__ == "__main__":
    main()
