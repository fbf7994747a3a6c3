"""Does it distill? Held-out quality of SFT, vanilla KD, DSKD and DSKD + CMA students.

Everything runs as users run it: each arm is an Axolotl YAML (``example_configs/quickstart.yml``
with the arm's student, method and seed) trained by ``accelerate launch -m axolotl.cli.train``;
the plugin is loaded by its bare name, the teacher in 4 bits. Nothing is downloaded: the models
are tiny and made locally by :mod:`dskd_devkit` (cached in ``.cache/tiny/arithmetic``).

The task (:data:`dskd_devkit.assets.ARITHMETIC`): a digit added to a number below 100, in words
(``"forty-three plus nine ="`` -> ``"fifty-two"``). The knowledge is in the teacher: a Qwen2
(byte-level BPE) trained on all 800 problems that are not held out, clean. The students (Llama,
pretrained on counting text only) get 256 of those problems, 15% of them with a wrong answer
(a careless annotator); LoRA r=16, 400 steps of 16 rows, the paper's DSKD settings (kd_rate 0.5,
temperature 2, forward KL, projector lr 1e-3). Six arms, same data, steps and seeds:

1. ``sft``: SFT only (no teacher), BPE student
2. ``vanilla_kd``: ``dskd_method: vanilla_kd``, logit KD against the teacher, same tokenizer
3. ``dskd``: DSKD, same tokenizer
4. ``sft_sp``: SFT only, a student with a sentencepiece-style tokenizer (5's and 6's baseline)
5. ``dskd_cma``: cross-tokenizer DSKD, that student, the YAML's exact alignment and pinv projectors
6. ``dskd_cma_paper``: the same with the paper's cross-model attention and random projectors

Every run starts from the same student base (LoRA's B is zero at first). ``seed:`` sets the
data order and the LoRA A initialization: the plugin, listed in every arm (the SFT arms only
drop the ``dskd_*`` keys), seeds before the adapter is built, so every run repeats to the bit. Each student is scored on the 200 held-out problems: greedy
exact match (the decoded answer equals the reference) and the reference answer's NLL (per token,
and per answer: the sum over its tokens, comparable across tokenizers). Mean and sample standard
deviation over the seeds.

Usage (from the repository root)::

    .venv/bin/python benchmarks/distill_quality.py            # 5 arms x 3 seeds, 2 runs at a time
    .venv/bin/python benchmarks/distill_quality.py --seeds 0 --arms sft dskd   # a quick look

Writes ``benchmarks/results/distill_quality.{json,md,png}``; per-run folders (config, log,
adapter, scores) under ``outputs/distill_quality/``. A run whose ``scores.json`` matches its
config and assets is reused unless ``--fresh``. Each training process gets ``--threads`` torch
threads (default 1) and ``--jobs`` of them run at once (default 2): on two cores that is the
fastest setting, and the most robust one when other work shares the CPU.
"""

from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent import futures
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from axolotl_dskd import dolly
from axolotl_dskd.evaluate import load_model_and_tokenizer
from dskd_devkit import axolotl_runs, scoring
from dskd_devkit.assets import ARITHMETIC, ARITHMETIC_NAME, DEFAULT_CACHE, TinySpec, cached_assets

REPO = Path(__file__).resolve().parent.parent
BASE_CONFIG = REPO / "example_configs" / "quickstart.yml"
RESULTS = REPO / "benchmarks" / "results"
WORK = REPO / "outputs" / "distill_quality"
START = time.time()


@dataclass(frozen=True)
class Arm:
    label: str
    student: str
    """The asset name of the student base."""
    keys: dict[str, Any] | None
    """The arm's ``dskd_*`` keys over the plugin's defaults; None: SFT only (no teacher)."""

    @property
    def distills(self) -> bool:
        return self.keys is not None


ARMS: dict[str, Arm] = {
    "sft": Arm("SFT only", "student", None),
    "vanilla_kd": Arm("Vanilla KD", "student", {"dskd_method": "vanilla_kd"}),
    "dskd": Arm("DSKD", "student", {}),
    "sft_sp": Arm("SFT only (SP student)", "student_sp", None),
    "dskd_cma": Arm("DSKD cross-tokenizer (SP student)", "student_sp", {}),
    "dskd_cma_paper": Arm(
        "DSKD, paper's CMA, random projectors (SP student)",
        "student_sp",
        {"dskd_token_alignment": "cma", "dskd_projector_init": "random"},
    ),
}
"""Same-tokenizer arms use the byte-level BPE student; the three last a sentencepiece-style one.
The distillation arms run with the quickstart YAML's settings (exact token alignment, pinv
projectors: the plugin's defaults); the last one with the paper's cross-model attention and
randomly initialized projectors instead."""

CLAIMS = [
    ("DSKD beats SFT", "dskd", "sft", False),
    ("DSKD is at least as good as vanilla KD", "dskd", "vanilla_kd", True),
    ("Cross-tokenizer DSKD beats its SFT baseline (SP student)", "dskd_cma", "sft_sp", False),
]
"""The paper's claims: (text, arm, baseline, whether a tie counts)."""


def say(msg: str) -> None:
    print(f"[{time.time() - START:4.0f}s] {msg}", flush=True)


# -------------------------------------------------------------------------------------- runs


def arm_config(
    base: dict, arm: Arm, assets: dict[str, Path], seed: int, run_dir: Path, steps: int | None
) -> dict:
    """The quickstart YAML with this arm's student, method, seed and folders."""
    cfg = copy.deepcopy(base)
    cfg["base_model"] = str(assets[arm.student])
    cfg["datasets"][0]["path"] = str(assets["data"])
    cfg["seed"] = seed
    cfg["output_dir"] = str(run_dir / "output")
    cfg["dataset_prepared_path"] = str(run_dir / "prepared")
    if steps:
        cfg["max_steps"] = steps
    if not arm.distills:
        return axolotl_runs.without_distillation(cfg)
    cfg["dskd_teacher"] = str(assets["teacher"])
    return {**cfg, **arm.keys}


def run_key(cfg: dict, spec: TinySpec) -> str:
    """What decides a run's scores: its config and the assets it trains on."""
    blob = json.dumps({"config": cfg, "assets": spec.key()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_METRICS_LINE = re.compile(r"\{'loss': .*?\}")
LOGGED = (
    "loss",
    "dskd/ce",
    "dskd/kd_student",
    "dskd/kd_teacher",
    "dskd/t2s_ce",
    "dskd/t2s_acc",
    "dskd/aligned_frac",
)


def train_metrics(log: str) -> list[dict[str, float]]:
    """The logged training metrics of every logging step (Axolotl prints a dict of strings)."""
    rows = [ast.literal_eval(found) for found in _METRICS_LINE.findall(log)]
    return [{k: float(row[k]) for k in LOGGED if k in row} for row in rows]


def train(cfg: dict, run_dir: Path, threads: int) -> tuple[float, str]:
    """``accelerate launch -m axolotl.cli.train config.yml``; returns (seconds, log)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(run_dir / "output", ignore_errors=True)
    config = run_dir / "config.yml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    start = time.time()
    proc = subprocess.run(
        axolotl_runs.train_command(config),
        cwd=REPO,
        env=axolotl_runs.train_env(threads),
        capture_output=True,
        text=True,
        check=False,
    )
    log = proc.stdout + proc.stderr
    (run_dir / "train.log").write_text(log)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed ({run_dir}/train.log):\n{log[-3000:]}")
    return time.time() - start, log


def evaluate(model_dir: Path, base_model: Path | None, eval_rows: list[dict]) -> dict[str, Any]:
    model, tokenizer, _ = load_model_and_tokenizer(model_dir, base_model, device="cpu")
    return asdict(scoring.evaluate_task(model, tokenizer, eval_rows))


def run_one(
    name: str,
    seed: int,
    base: dict,
    assets: dict[str, Path],
    eval_rows: list[dict],
    args: argparse.Namespace,
    arms: dict[str, Arm] = ARMS,
    spec: TinySpec = ARITHMETIC,
) -> dict[str, Any]:
    """Train and score one arm and seed, or reuse its scores when config and assets match."""
    arm = arms[name]
    run_dir = Path(args.work) / f"{name}-seed{seed}"
    cfg = arm_config(base, arm, assets, seed, run_dir, args.steps)
    key = run_key(cfg, spec)
    scores_file = run_dir / "scores.json"
    if not args.fresh and scores_file.is_file():
        saved = json.loads(scores_file.read_text())
        if saved.get("run_key") == key:
            return {**saved, "reused": True}
    say(f"      {arm.label}, seed {seed}: training ({cfg['max_steps']} steps) ...")
    seconds, log = train(cfg, run_dir, args.threads)
    result = evaluate(run_dir / "output", assets[arm.student], eval_rows)
    history = train_metrics(log)
    result.update(
        arm=name, seed=seed, run_key=key, train_seconds=round(seconds, 1),
        train_metrics=history[-1] if history else {}, history=history,
        cross_tokenizer="DSKD: cross-tokenizer" in log,
    )  # fmt: skip
    if arm.distills and arm.student == "student_sp" and not result["cross_tokenizer"]:
        raise RuntimeError(f"{run_dir}: the cross-tokenizer run did not report its pairing")
    scores_file.write_text(json.dumps(result, indent=2))
    return {**result, "reused": False}


# ---------------------------------------------------------------------------------- reporting


def summarize(runs: list[dict], arms: list[str], table: dict[str, Arm] = ARMS) -> dict[str, dict[str, Any]]:
    out = {}
    for name in arms:
        mine = sorted((r for r in runs if r["arm"] == name), key=lambda r: r["seed"])
        row: dict[str, Any] = {"label": table[name].label, "seeds": [r["seed"] for r in mine]}
        for metric in ("exact_match", "token_nll", "answer_nll"):
            values = [r[metric] for r in mine]
            row[metric] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "values": values,
            }
        row["train_seconds"] = statistics.fmean(r["train_seconds"] for r in mine)
        out[name] = row
    return out


def verdicts(summary: dict[str, dict]) -> list[dict[str, Any]]:
    """The paper's claims, checked on held-out exact match and on answer NLL (lower is better)."""
    out = []
    for text, a, b, tie_counts in CLAIMS:
        if a not in summary or b not in summary:
            continue
        em_a, em_b = summary[a]["exact_match"], summary[b]["exact_match"]
        diff = em_a["mean"] - em_b["mean"]
        nll_diff = summary[a]["answer_nll"]["mean"] - summary[b]["answer_nll"]["mean"]
        out.append({
            "claim": text, "a": a, "b": b, "em_diff": diff,
            "paired_em_diffs": [x - y for x, y in zip(em_a["values"], em_b["values"])],
            "answer_nll_diff": nll_diff,
            "holds_on_em": diff >= 0 if tie_counts else diff > 0,
            "holds_on_nll": nll_diff <= 0 if tie_counts else nll_diff < 0,
        })  # fmt: skip
    return out


def fmt(stat: dict[str, float], pct: bool = False) -> str:
    if pct:
        return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    lines = [
        "| Arm | Student tokenizer | Exact match (%) | Answer NLL (nats) | Token NLL (nats) | Per-seed EM (%) |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in s.items():
        tok = "sentencepiece-style" if ARMS[name].student == "student_sp" else "byte-level BPE (teacher's)"
        per_seed = ", ".join(f"{100 * v:.1f}" for v in row["exact_match"]["values"])
        lines.append(
            f"| {row['label']} | {tok} | {fmt(row['exact_match'], True)} | {fmt(row['answer_nll'])} "
            f"| {fmt(row['token_nll'])} | {per_seed} |"
        )
    t = report["teacher"]
    lines.append(
        f"| *Teacher (reference)* | byte-level BPE | {100 * t['exact_match']:.1f} | {t['answer_nll']:.3f} "
        f"| {t['token_nll']:.3f} | |"
    )
    seeds = ", ".join(map(str, report["seeds"]))
    lines += [
        "",
        (
            f"Mean ± sample standard deviation over seeds {seeds}; {report['eval_rows']} held-out problems, "
            "greedy decoding. Answer NLL: the reference answer's total NLL (comparable across tokenizers); "
            "token NLL: per answer token (EOS included) in the student's own tokenization."
        ),
        "",
        "| Claim | EM difference (points) | Per-seed EM differences | Answer NLL difference | Holds on EM / NLL |",
        "|---|---|---|---|---|",
    ]
    for v in report["verdicts"]:
        paired = ", ".join(f"{100 * d:+.1f}" for d in v["paired_em_diffs"])
        lines.append(
            f"| {v['claim']} | {100 * v['em_diff']:+.1f} | {paired} | {v['answer_nll_diff']:+.3f} "
            f"| {'yes' if v['holds_on_em'] else 'no'} / {'yes' if v['holds_on_nll'] else 'no'} |"
        )
    lines += ["", (f"Command: `{report['command']}` ({report['wall_seconds'] / 60:.1f} min, "
              f"{report['jobs']} runs at a time, {report['threads']} thread each).")]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["summary"]
    names = list(s)
    colors = {
        "sft": "#9e9e9e",
        "vanilla_kd": "#f2a541",
        "dskd": "#2a7ab0",
        "sft_sp": "#c7c7c7",
        "dskd_cma": "#3aa17e",
        "dskd_cma_paper": "#8fd1b5",
    }
    labels = [s[n]["label"].replace(" (SP student)", "\n(SP student)") for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, metric, title in (
        (axes[0], "exact_match", "Held-out exact match (%, higher is better)"),
        (axes[1], "answer_nll", "Held-out answer NLL (nats, lower is better)"),
    ):
        scale = 100 if metric == "exact_match" else 1
        means = [scale * s[n][metric]["mean"] for n in names]
        stds = [scale * s[n][metric]["std"] for n in names]
        bars = ax.bar(
            range(len(names)), means, yerr=stds, capsize=4, color=[colors.get(n, "#777") for n in names]
        )
        for i, n in enumerate(names):
            ax.plot(
                [i] * len(s[n][metric]["values"]),
                [scale * v for v in s[n][metric]["values"]],
                "k.",
                markersize=4,
            )
        teacher = scale * report["teacher"][metric]
        ax.axhline(teacher, color="#b03a2e", linestyle="--", linewidth=1)
        ax.text(len(names) - 0.5, teacher, "teacher", color="#b03a2e", ha="right", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)), labels, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.bar_label(bars, fmt="%.1f" if metric == "exact_match" else "%.2f", fontsize=8, padding=2)
    fig.suptitle(
        f"Distilling arithmetic in words: mean ± std over seeds {', '.join(map(str, report['seeds']))} "
        "(dots: single seeds)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main


def add_run_arguments(parser: argparse.ArgumentParser, work: Path) -> None:
    """The options every quality benchmark shares: steps, parallelism, folders, reuse."""
    parser.add_argument("--steps", type=int, default=None, help="override max_steps of the YAML")
    parser.add_argument("--jobs", type=int, default=2, help="training runs at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training run")
    parser.add_argument("--work", default=str(work))
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--fresh", action="store_true", help="retrain runs that have scores")


def prepare(args: argparse.Namespace, spec: TinySpec, name: str) -> tuple[dict, list[dict], dict, dict]:
    """Offline, quiet, from the repository root: the cached assets of ``spec``, the held-out rows,
    the teacher's scores on them and the quickstart YAML the arms start from."""
    os.environ.update(axolotl_runs.OFFLINE_ENV)  # before transformers is imported

    import torch
    from transformers.utils import logging as hf_logging

    axolotl_runs.quiet_library_logs()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    os.chdir(REPO)
    say(f"[assets] teacher and students (cached in {DEFAULT_CACHE / name})")
    assets = cached_assets(spec, name=name, log=lambda m: say(f"[assets] {m}"), threads=args.threads)
    assets = {k: v.resolve() for k, v in assets.items()}
    eval_rows = dolly.read_jsonl(assets["eval"])
    teacher = evaluate(assets["teacher"], None, eval_rows)
    say(f"[assets] teacher: held-out exact match {100 * teacher['exact_match']:.1f}%")
    return assets, eval_rows, teacher, yaml.safe_load(BASE_CONFIG.read_text())


def run_jobs(
    jobs: list[tuple[str, int]],
    args: argparse.Namespace,
    base: dict,
    assets: dict[str, Path],
    eval_rows: list[dict],
    arms: dict[str, Arm] = ARMS,
    spec: TinySpec = ARITHMETIC,
) -> list[dict]:
    """Train and score ``(arm, seed)`` jobs, ``--jobs`` at a time. The distillation runs (the
    longer ones) go first: fewer runs left alone on a core at the end."""
    jobs = sorted(jobs, key=lambda job: not arms[job[0]].distills)
    runs: list[dict] = []
    with futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        pending = [pool.submit(run_one, n, s, base, assets, eval_rows, args, arms, spec) for n, s in jobs]
        for done, future in enumerate(futures.as_completed(pending), start=1):
            r = future.result()
            how = "reused" if r["reused"] else f"{r['train_seconds']:.0f}s"
            say(f"[{done}/{len(jobs)}] {arms[r['arm']].label}, seed {r['seed']}: exact match "
                f"{100 * r['exact_match']:.1f}%, answer NLL {r['answer_nll']:.3f} ({how})")  # fmt: skip
            runs.append(r)
    return runs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    add_run_arguments(parser, WORK)
    args = parser.parse_args(argv)
    command = " ".join(
        ["python benchmarks/distill_quality.py", *(argv if argv is not None else sys.argv[1:])]
    )
    assets, eval_rows, teacher, base = prepare(args, ARITHMETIC, ARITHMETIC_NAME)
    runs = run_jobs([(n, s) for s in args.seeds for n in args.arms], args, base, assets, eval_rows)

    summary = summarize(runs, args.arms)
    report = {
        "task": "arithmetic in words: a digit added to a number below 100",
        "command": command,
        "spec": asdict(ARITHMETIC),
        "config": str(BASE_CONFIG.relative_to(REPO)),
        "max_steps": args.steps or base["max_steps"],
        "seeds": args.seeds,
        "eval_rows": len(eval_rows),
        "teacher": {k: v for k, v in teacher.items() if k != "examples"},
        "summary": summary,
        "verdicts": verdicts(summary),
        "runs": sorted(runs, key=lambda r: (r["arm"], r["seed"])),
        "wall_seconds": round(time.time() - START, 1),
        "jobs": args.jobs,
        "threads": args.threads,
    }
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "distill_quality.json").write_text(json.dumps(report, indent=2))
    md = markdown(report)
    (results / "distill_quality.md").write_text(md)
    plot(report, results / "distill_quality.png")
    print("\n" + md, flush=True)
    say(f"wrote {results}/distill_quality.{{md,json,png}} in {report['wall_seconds'] / 60:.1f} min")
    return report


if __name__ == "__main__":
    main()
