"""Quickstart: distill a 4-bit teacher into a LoRA student with a different tokenizer, offline.

``make quickstart`` runs this from the repository root. It

1. makes (or reuses, from ``.cache/tiny/arithmetic``) the tiny models of
   :data:`dskd_devkit.assets.ARITHMETIC`: a teacher trained on arithmetic in words, and a student
   base with another tokenizer;
2. trains the student twice with Axolotl's own CLI, both runs at once:
   - distilled: ``accelerate launch -m axolotl.cli.train example_configs/quickstart.yml``
   - SFT only: the same YAML without the plugin and its ``dskd_*`` keys (``outputs/quickstart/sft.yml``);
3. scores both (and the teacher) on the held-out problems and prints a before/after table.

Logs of the two runs: ``outputs/quickstart/{distilled,sft}.log``.
"""

from __future__ import annotations

import argparse
import os
import re
import runpy
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from axolotl_dskd import dolly
from axolotl_dskd.evaluate import load_model_and_tokenizer
from dskd_devkit import axolotl_runs, scoring
from dskd_devkit.assets import ARITHMETIC, ARITHMETIC_NAME, cached_assets

REPO = Path(__file__).resolve().parent.parent
CONFIG = Path("example_configs/quickstart.yml")
OUT = Path("outputs/quickstart")
RESULTS = REPO / "benchmarks" / "results" / "quickstart.md"
START = time.time()
REPORT_EVERY = 10.0
"""Seconds between progress lines while the two runs train."""


def say(msg: str) -> None:
    print(f"[{time.time() - START:5.0f}s] {msg}", flush=True)


class Run:
    """One ``accelerate launch -m axolotl.cli.train`` process, its log, and its progress."""

    _STEP = re.compile(r"(\d+)/(\d+) \[")
    _LOSS = re.compile(r"\{'loss': '([0-9.]+)'")

    def __init__(self, name: str, config: Path, log_path: Path, steps: int, threads: int) -> None:
        self.name, self.log_path, self.steps = name, log_path, steps
        self.step, self.loss, self.phase = 0, None, "starting Axolotl"
        self._log = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed by the reader
        self.proc = subprocess.Popen(
            axolotl_runs.train_command(config), cwd=REPO, env=axolotl_runs.train_env(threads),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        tail = ""
        while chunk := self.proc.stdout.read(256):
            self._log.write(chunk)
            tail = (tail + chunk)[-2000:]
            if "Tokenizing" in chunk:
                self.phase = "tokenizing the data"
            if "DSKD teacher" in tail and "loaded on" in tail:
                self.phase = "teacher loaded (4-bit)"
            # tqdm bars: only the trainer's counts to max_steps (tokenizing counts rows)
            steps = [int(m[1]) for m in self._STEP.finditer(tail) if int(m[2]) == self.steps]
            if steps:
                self.step = max(self.step, steps[-1])
            if losses := self._LOSS.findall(tail):
                self.loss = float(losses[-1])
        self._log.close()

    @property
    def done(self) -> bool:
        return self.proc.poll() is not None

    def status(self) -> str:
        if self.done:
            return f"{self.name}: {'done' if self.proc.returncode == 0 else 'FAILED'}"
        if self.step:
            loss = f", loss {self.loss:.3f}" if self.loss is not None else ""
            return f"{self.name}: step {self.step}/{self.steps}{loss}"
        return f"{self.name}: {self.phase}"

    def wait(self) -> int:
        code = self.proc.wait()
        self._reader.join()
        return code


def train_both(config: Path, sft_config: Path, steps: int, threads: int) -> bool:
    """Both runs side by side, a progress line every few seconds; whether both succeeded."""
    runs = [
        Run("distilled", config, OUT / "distilled.log", steps, threads),
        Run("SFT only", sft_config, OUT / "sft.log", steps, threads),
    ]
    finished: set[str] = set()
    next_report = time.time() + REPORT_EVERY
    while len(finished) < len(runs):
        time.sleep(0.5)
        newly = {r.name for r in runs if r.done} - finished
        if newly or time.time() >= next_report:
            finished |= newly
            say("  " + " | ".join(r.status() for r in runs))
            next_report = time.time() + REPORT_EVERY
    failed = [r for r in runs if r.wait() != 0]
    for r in failed:
        say(f"  {r.name} failed; the end of {r.log_path}:")
        print(r.log_path.read_text(encoding="utf-8")[-3000:])
    return not failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="DSKD quickstart (offline, CPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    args = parser.parse_args(argv)
    os.chdir(REPO)
    OUT.mkdir(parents=True, exist_ok=True)
    say("DSKD quickstart: distill a 4-bit teacher into a LoRA student that uses another tokenizer")

    say("step 1/3: tiny models (loading torch and transformers) ...")
    os.environ.update(axolotl_runs.OFFLINE_ENV)  # before transformers is imported
    import torch
    from transformers.utils import logging as hf_logging

    axolotl_runs.quiet_library_logs()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    spec = ARITHMETIC
    assets = cached_assets(
        spec, name=ARITHMETIC_NAME, log=lambda m: say(f"  {m.strip()}"), threads=args.threads
    )
    n_teacher, n_student = (len(dolly.read_jsonl(assets[k])) for k in ("teacher_data", "data"))
    say(f"  teacher: {assets['teacher']} (Qwen2, byte-level BPE, trained on {n_teacher} clean problems)")
    say(f"  student: {assets['student_sp']} (Llama, sentencepiece-style tokenizer, knows number words only)")
    say(
        f"  student data: {assets['data']} ({n_student} problems, ~{spec.noise:.0%} of them with a wrong answer)"
    )

    config = yaml.safe_load(CONFIG.read_text())
    sft = {
        **axolotl_runs.without_distillation(config),
        "output_dir": str(OUT / "sft"),
        "dataset_prepared_path": str(OUT / "prepared_sft"),
    }
    sft_config = OUT / "sft.yml"
    header = f"# SFT-only twin of {CONFIG} (written by scripts/quickstart.py)\n"
    sft_config.write_text(header + yaml.safe_dump(sft, sort_keys=False))
    steps = config["max_steps"]
    say(f"step 2/3: training the student twice ({steps} steps each, both at once):")
    say(f"  distilled: accelerate launch -m axolotl.cli.train {CONFIG}")
    say(f"  SFT only:  accelerate launch -m axolotl.cli.train {sft_config}")
    if not train_both(CONFIG, sft_config, steps, args.threads):
        return 1
    if "DSKD: cross-tokenizer" in (OUT / "distilled.log").read_text(encoding="utf-8"):
        say("  the tokenizers differ: the plugin distilled the positions where both have read the same text")

    eval_rows = dolly.read_jsonl(assets["eval"])
    say(f"step 3/3: scoring on {len(eval_rows)} held-out problems (greedy decoding) ...")
    rows = []
    for label, folder, base in (
        ("teacher (reference)", assets["teacher"], None),
        ("student, SFT only", Path(sft["output_dir"]), assets["student_sp"]),
        ("student, distilled (DSKD)", Path(config["output_dir"]), assets["student_sp"]),
    ):
        model, tokenizer, _ = load_model_and_tokenizer(folder, base, device="cpu")
        rows.append((label, scoring.evaluate_task(model, tokenizer, eval_rows)))

    example = rows[0][1].examples[0]
    table = [
        f"{'':32s} {'exact match':>11s} {'answer NLL':>11s}   {example['prompt']} ({example['reference']})"
    ]
    for label, s in rows:
        table.append(
            f"{label:32s} {100 * s.exact_match:10.1f}% {s.answer_nll:11.3f}   {s.examples[0]['greedy']}"
        )
    print("\n" + "\n".join(table) + "\n")
    print("exact match: the greedy answer equals the reference; answer NLL: nats per reference answer")
    print("(lower is better). One seed; benchmarks/distill_quality.py runs 3 seeds and the baselines.")
    RESULTS.write_text("```\n" + "\n".join(table) + "\n```\n")
    runpy.run_path(str(REPO / "scripts" / "render_docs.py"))["main"]([])
    say(f"  table written to {RESULTS.relative_to(REPO)} and shown in README.md")
    say(f"done. Adapter + DSKD projectors: {config['output_dir']}; logs: {OUT}/*.log")
    return 0


if __name__ == "__main__":
    sys.exit(main())
