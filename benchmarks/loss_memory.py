"""Peak memory and wall time of the chunked DSKD loss against an unchunked baseline.

    python benchmarks/loss_memory.py --device cpu  [--quick] [--out DIR]
    python benchmarks/loss_memory.py --device cuda [--quick] [--out DIR]

For each point of the sweep (tokens per batch x teacher vocabulary x variant) the same random
inputs are built (fixed seed) and one forward + backward of

- ``chunked``:   ``axolotl_dskd.core.loss.dskd_loss`` (vocabulary products a chunk of trained
  tokens at a time), and
- ``unchunked``: ``dskd_devkit/unchunked.py`` (whole-batch ``[B, L, V]`` logits, as the
  authors' code; same precision as ``dskd_loss``)

is measured, each in a **fresh subprocess** (``--worker``):

- memory: CPU: peak RSS during the loss minus the RSS just before it (the peak is reset right
  before the loss through ``/proc/self/clear_refs``, then read with ``getrusage``'s
  ``ru_maxrss``; the absolute peak is kept in the JSON too); CUDA:
  ``torch.cuda.max_memory_allocated()`` minus the memory allocated before the loss.
- time: median of forward + backward passes after a warm-up at a tiny size. Where a chunked
  pass is cheap (``--interleave-max-s``) and always at the target point, the two
  implementations are timed alternately in the same process (the unchunked worker), so machine
  noise hits both: the first pass of each, then alternating rounds while ``--budget-s`` seconds
  per point last (at most ``--rounds``; the target point gets at least 3 passes each).
  Expensive points use the one measured pass of each implementation's own worker (marked † in
  the table), which keeps the full CPU sweep near 15 minutes on an idle 2-core machine. Where
  the unchunked baseline is skipped, the chunked time is that of its memory pass.

Unchunked points whose predicted peak RSS exceeds ``--max-rss-gb`` (or 85 % of the memory
available now) are not run and are reported as "skipped (OOM risk)".

Results: a markdown table on stdout and in OUT/loss_memory.md, OUT/loss_memory.json and a plot
OUT/loss_memory.png; OUT defaults to benchmarks/results/. The issue's targets are checked and
printed as PASS/FAIL lines.

Investigation knobs (they only change the chunked loss, in the worker process):
``--chunk-size N`` (``DSKDLossConfig.chunk_size``) and ``--chunk-elements E`` (monkeypatches
``axolotl_dskd.core.loss.CHUNK_ELEMENTS``, the default chunk is ``E // V`` tokens).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results"
MB = 1024 * 1024
WORKER_TIMEOUT_S = 1800

# sweep
BATCH = 2
TOKENS = (512, 1024, 2048, 4096, 8192)
STUDENT_VOCAB = 32000
TEACHER_VOCABS = (32000, 64000, 152064)
VARIANTS = ("same", "cma")
SHAPES = {  # hidden sizes: (d_s, d_t) and the dtype of hidden states and LM heads
    "cpu": {"d_s": 512, "d_t": 768, "dtype": "float32"},
    "cuda": {"d_s": 2048, "d_t": 3584, "dtype": "bfloat16"},
}
PROMPT_SHARE = 0.2
"""Leading share of each row that is prompt (label -100); the rest (~80 %) is trained."""
TEACHER_LENGTH_RATIO = 17 / 16
"""CMA: the teacher tokenizes the same text into ~6 % more tokens."""

# the targets
CPU_TARGET = {"tokens": 2048, "v_t": 64000, "variant": "cma", "max_memory_ratio": 0.25, "max_time_ratio": 1.3}
CUDA_TARGET = {"tokens": 4096, "v_t": 152064, "max_peak_mb": 1.5 * 1024}
SKIPPED = "skipped (OOM risk)"
"""The unchunked status of a point whose predicted peak memory is over the limit."""


@dataclass(frozen=True)
class Point:
    tokens: int
    v_t: int
    variant: str  # "same" (V_s = V_t) or "cma" (V_s = STUDENT_VOCAB, cross-tokenizer)

    @property
    def label(self) -> str:
        return f"{self.tokens} tok, V_t={self.v_t}, {self.variant}"


# ============================================================================================
# Inputs (shared with tests/unit/core/test_loss.py)
# ============================================================================================


def make_inputs(point: Point, *, d_s: int, d_t: int, v_s: int, device: str, dtype, seed: int = 0):
    """``(proj, dskd_loss keyword tensors, config)`` for one point, deterministic in ``seed``.

    ``BATCH`` rows of ``tokens / BATCH`` student positions; the first ``PROMPT_SHARE`` of each
    row is an untrained prompt. Same vocabulary: ``V_s = V_t``, both models see the same tokens.
    CMA: ``V_s = v_s``, the teacher sequence is ``TEACHER_LENGTH_RATIO`` times longer with its
    own ids and labels, plus both embedding matrices. The student hidden states require grad
    (they stand for the student); the LM heads are frozen (LoRA student).
    """
    import torch

    from axolotl_dskd.core.loss import DSKDLossConfig, Projectors

    cma = point.variant == "cma"
    V_s = v_s if cma else point.v_t
    V_t = point.v_t
    L_s = point.tokens // BATCH
    L_t = round(L_s * TEACHER_LENGTH_RATIO) if cma else L_s
    g = torch.Generator(device=device).manual_seed(seed)
    torch.manual_seed(seed)

    def randn(*shape, scale=1.0):
        x = torch.randn(*shape, generator=g, device=device, dtype=dtype)
        return x.mul_(scale) if scale != 1.0 else x

    def ids_labels(L: int, V: int):
        ids = torch.randint(1, V, (BATCH, L), generator=g, device=device)
        labels = ids.clone()
        prompt = max(1, round(PROMPT_SHARE * L))
        labels[:, :prompt] = -100
        return ids, labels

    s_ids, s_labels = ids_labels(L_s, V_s)
    # logits z = h W^T of standard deviation ~2, as a trained LM head gives
    inputs = {
        "student_hidden": randn(BATCH, L_s, d_s).requires_grad_(True),
        "student_lm_head": randn(V_s, d_s, scale=2.0 / math.sqrt(d_s)),
        "student_labels": s_labels,
        "teacher_hidden": randn(BATCH, L_t, d_t),
        "teacher_lm_head": randn(V_t, d_t, scale=2.0 / math.sqrt(d_t)),
    }
    if cma:
        t_ids, t_labels = ids_labels(L_t, V_t)
        inputs.update(
            teacher_labels=t_labels,
            student_input_ids=s_ids,
            teacher_input_ids=t_ids,
            student_embeddings=randn(V_s, d_s, scale=0.02),
            teacher_embeddings=randn(V_t, d_t, scale=0.02),
        )
    proj = Projectors(d_s, d_t, cross_tokenizer=cma).to(device)
    return proj, inputs, DSKDLossConfig(cross_tokenizer=cma, token_alignment="cma")


# ============================================================================================
# Worker: one fresh process per measurement
# ============================================================================================


def _proc_status() -> dict[str, int]:
    """This process's current (``VmRSS``) and peak (``VmHWM``) resident memory, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak_rss() -> bool:
    """Reset the peak RSS (VmHWM, and with it ``ru_maxrss``) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int:
    """This process's peak RSS in bytes (``ru_maxrss`` is in kB on Linux, in bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


class LossPasses:
    """Forward + backward passes of either implementation, with the worker's device, dtype and chunking."""

    def __init__(self, spec: dict) -> None:
        import torch

        import axolotl_dskd.core.loss as loss_mod

        if spec.get("chunk_elements"):
            loss_mod.CHUNK_ELEMENTS = int(spec["chunk_elements"])
        self.spec = spec
        self.cuda = spec["device"] == "cuda"
        self.dtype = getattr(torch, spec["dtype"])

    def sync(self) -> None:
        """Wait for the GPU, so that a time covers the work and not just its launch."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def build(self, point: Point, **shape) -> tuple:
        """``make_inputs`` for ``point``, with the ``--chunk-size`` override in its config."""
        from axolotl_dskd.core.loss import DSKDLossConfig

        proj, inputs, cfg = make_inputs(
            point, device=self.spec["device"], dtype=self.dtype, seed=self.spec["seed"], **shape
        )
        if self.spec.get("chunk_size"):
            cfg = DSKDLossConfig(
                cross_tokenizer=cfg.cross_tokenizer,
                token_alignment="cma",
                chunk_size=int(self.spec["chunk_size"]),
            )
        return proj, inputs, cfg

    def warm_up(self, variant: str) -> None:
        """One pass of each implementation at a tiny size: thread pools, allocator, lazy initialisation."""
        tiny = self.build(Point(64, 1024, variant), d_s=32, d_t=48, v_s=512)
        for impl in self.spec["impls"]:
            self.step(impl, *tiny)

    def step(self, impl: str, proj, inputs: dict, cfg) -> tuple[float, float]:
        """Seconds and loss value of one forward + backward of ``impl``; the gradients are cleared after."""
        from axolotl_dskd.core.loss import dskd_loss
        from dskd_devkit.unchunked import unchunked_dskd_loss

        self.sync()
        t0 = time.perf_counter()
        if impl == "chunked":
            loss = dskd_loss(proj, **inputs, config=cfg).loss
        else:
            loss, _ = unchunked_dskd_loss(proj, **inputs, config=cfg)
        loss.backward()
        self.sync()
        elapsed = time.perf_counter() - t0
        value = float(loss.detach())
        del loss
        inputs["student_hidden"].grad = None
        for p in proj.parameters():
            p.grad = None
        return elapsed, value

    def timing_rounds(self, case: tuple, first: dict[str, float]) -> dict[str, list[float]]:
        """Pass times: each implementation's first pass, then alternating rounds while the budget lasts.

        Alternating (u c | c u | u c ...) lets machine noise hit both implementations. Every pass
        after the tiny warm-up is a sample (large buffers are fresh mmaps each pass, so a first
        pass is not special).
        """
        spec = self.spec
        impls = spec["impls"]
        times = {impl: [first[impl]] for impl in impls}
        round_s = sum(first.values())
        spent, rounds = 0.0, 0
        while rounds < spec["max_rounds"] and (
            len(times[impls[0]]) < spec["min_samples"] or spent + round_s <= spec["budget_s"]
        ):
            for impl in impls[::-1] if rounds % 2 == 0 else impls:
                t = self.step(impl, *case)[0]
                times[impl].append(t)
                spent += t
            rounds += 1
        return times


def _memory_before(cuda: bool) -> tuple[int, dict]:
    """Bytes held before the loss, with the peak counter reset to them, and facts for the record."""
    if not cuda:
        before = _proc_status()["VmRSS"]
        return before, {"peak_reset": _reset_peak_rss()}
    import torch

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    free, total = torch.cuda.mem_get_info()
    return before, {"gpu_total": total, "gpu_free_before": free}


def _memory_peak(cuda: bool, before: int) -> dict[str, int]:
    """The peak since ``_memory_before``: absolute and above ``before`` (CPU: with VmHWM)."""
    if cuda:
        import torch

        peak = torch.cuda.max_memory_allocated()
        return {"before": before, "peak_abs": peak, "peak_delta": peak - before}
    peak = _maxrss_bytes()
    return {"before": before, "peak_abs": peak, "peak_delta": peak - before, "hwm": _proc_status()["VmHWM"]}


def _is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` means out of memory (CUDA, Python, or a RuntimeError from an allocator)."""
    import torch

    message = str(exc).splitlines()[0]
    return isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)) or any(
        m in message for m in ("out of memory", "can't allocate", "not enough memory")
    )


def worker(spec: dict) -> dict:
    """Measure one point in this fresh process: the first pass's peak memory, then the pass times."""
    import torch

    passes = LossPasses(spec)
    impls: list[str] = spec["impls"]
    point = Point(**spec["point"])
    passes.warm_up(point.variant)
    case = passes.build(point, d_s=spec["d_s"], d_t=spec["d_t"], v_s=spec["v_s"])
    gc.collect()
    passes.sync()
    before, facts = _memory_before(passes.cuda)
    out: dict = {"torch_threads": torch.get_num_threads(), "impls": impls, **facts}

    values: dict[str, float] = {}
    first: dict[str, float] = {}
    try:
        # the measured pass: the first (and only memory-relevant) pass of impls[0]
        first[impls[0]], values[impls[0]] = passes.step(impls[0], *case)
    except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as exc:
        if not _is_oom(exc):
            raise
        out.update(error=f"OOM: {str(exc).splitlines()[0]}")
        return out
    out.update(_memory_peak(passes.cuda, before))
    _, inputs, cfg = case
    out["cfg_tokens_per_chunk"] = {
        "student": cfg.tokens_per_chunk(inputs["student_lm_head"].shape[0]),
        "teacher": cfg.tokens_per_chunk(inputs["teacher_lm_head"].shape[0]),
    }

    # the first pass of every other implementation in this process, then the timing rounds
    for impl in impls[1:]:
        first[impl], values[impl] = passes.step(impl, *case)
    times = passes.timing_rounds(case, first)
    out.update(
        times=times,
        first=first,
        values=values,
        median={impl: statistics.median(t) for impl, t in times.items()},
    )
    return out


def run_worker(spec: dict) -> dict:
    """``worker(spec)`` in a fresh subprocess, so that its peak memory is its own; errors are returned."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {WORKER_TIMEOUT_S} s"}
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-3:]
        killed = proc.returncode in (-9, 137)
        return {
            "error": ("killed (OOM?)" if killed else f"exit {proc.returncode}: ") + " | ".join(tail),
            "worker_wall_s": wall,
        }
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    result = json.loads(lines[-1])
    result["worker_wall_s"] = wall
    return result


# ============================================================================================
# Driver
# ============================================================================================


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``--worker`` is the subprocess's entry (``run_worker``)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--quick", action="store_true", help="a small subset (a couple of minutes)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument(
        "--rounds", type=int, default=2, help="at most this many extra alternating timing rounds per point"
    )
    ap.add_argument(
        "--budget-s", type=float, default=6.0, help="seconds of extra timing rounds per point (default 6)"
    )
    ap.add_argument("--max-rss-gb", type=float, default=16.0)
    ap.add_argument(
        "--interleave-max-s",
        type=float,
        default=10.0,
        help="time both implementations alternately in one process only where a "
        "chunked pass takes at most this long (always at the target point)",
    )
    ap.add_argument("--chunk-size", type=int, default=None, help="DSKDLossConfig.chunk_size")
    ap.add_argument(
        "--chunk-elements",
        type=int,
        default=None,
        help="monkeypatch axolotl_dskd.core.loss.CHUNK_ELEMENTS in the workers",
    )
    ap.add_argument(
        "--points", default=None, help="only these points: 'tokens:v_t:variant,...' (e.g. 2048:64000:cma)"
    )
    ap.add_argument(
        "--d-s",
        type=int,
        default=None,
        help="student hidden size (default: " + ", ".join(f"{k} {v['d_s']}" for k, v in SHAPES.items()) + ")",
    )
    ap.add_argument(
        "--d-t",
        type=int,
        default=None,
        help="teacher hidden size (default: " + ", ".join(f"{k} {v['d_t']}" for k, v in SHAPES.items()) + ")",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Plan the sweep, measure each point in fresh worker processes, then write the report and plot."""
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    shape = hidden_shape(args)
    name = device_name(args.device)
    if name is None:
        print("--device cuda: CUDA is not available", file=sys.stderr)
        return 2
    points = parse_points(args.points) if args.points else sweep_points(args.device, args.quick)
    print_intro(args, shape, name, len(points))
    t_start = time.perf_counter()
    rows = run_sweep(points, args, shape)
    write_report(rows, args, shape, name, time.perf_counter() - t_start)
    return 0


def hidden_shape(args: argparse.Namespace) -> dict:
    """The device's hidden sizes and dtype (``SHAPES``), with ``--d-s`` / ``--d-t`` applied."""
    shape = dict(SHAPES[args.device])
    shape.update({k: v for k, v in (("d_s", args.d_s), ("d_t", args.d_t)) if v})
    return shape


def device_name(device: str) -> str | None:
    """The device, in words, for the report; None where CUDA is asked for but not available."""
    if device == "cpu":
        return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def sweep_points(device: str, quick: bool) -> list[Point]:
    """The full sweep, or with ``--quick`` the device's three most telling points."""
    if quick:
        if device == "cuda":
            chosen = [(2048, 64000, "cma"), (4096, 152064, "same"), (4096, 152064, "cma")]
        else:
            chosen = [(512, 32000, "same"), (512, 32000, "cma"), (2048, 64000, "cma")]
        return [Point(*c) for c in chosen]
    # per (vocabulary, variant), tokens ascending: the unchunked OOM prediction uses the last one
    return [Point(t, v, var) for v in TEACHER_VOCABS for var in VARIANTS for t in TOKENS]


def parse_points(text: str) -> list[Point]:
    """``--points``: ``tokens:v_t:variant`` items, comma-separated."""
    return [Point(int(t), int(v), var) for t, v, var in (p.split(":") for p in text.split(","))]


def print_intro(args: argparse.Namespace, shape: dict, name: str, n_points: int) -> None:
    """What is measured, before the first (slow) point."""
    print(f"# DSKD loss memory benchmark: {name}")
    print(
        f"student d_s={shape['d_s']}, teacher d_t={shape['d_t']}, dtype {shape['dtype']}, "
        f"batch {BATCH} x L, prompt {PROMPT_SHARE:.0%} untrained; same-vocab: V_s = V_t; "
        f"CMA: V_s={STUDENT_VOCAB}, teacher length = {TEACHER_LENGTH_RATIO:.4f} x student; "
        f"LM heads frozen (LoRA student); divergences forward_kl"
    )
    if args.chunk_size or args.chunk_elements:
        print(f"chunked loss overridden: chunk_size={args.chunk_size}, CHUNK_ELEMENTS={args.chunk_elements}")
    print(f"{n_points} points, each implementation in a fresh subprocess", flush=True)


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------


def run_sweep(points: list[Point], args: argparse.Namespace, shape: dict) -> list[dict]:
    """Measure the points in order, a progress line each; the table's and the JSON's rows."""
    rows: list[dict] = []
    guard = UnchunkedGuard(args.device, args.max_rss_gb)
    for point in points:
        status = guard.skip_status(point, rows)
        t0 = time.perf_counter()
        chunked, unchunked = measure_point(
            point, worker_spec(args, shape, point), args, skipped=status is not None
        )
        if unchunked is not None:
            status = guard.record(point, unchunked)
        if "error" in chunked:
            print(f"  chunked {point.label}: {chunked['error']}", file=sys.stderr)
        row = result_row(point, status, chunked, unchunked)
        rows.append(row)
        print(progress_line(point, row, time.perf_counter() - t0), flush=True)
    return rows


def mem_available() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes; None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclass
class UnchunkedGuard:
    """Skips the unchunked runs that would likely run out of memory, learning from the earlier ones."""

    device: str
    max_rss_gb: float
    last: dict[tuple, tuple[int, int, int]] = field(default_factory=dict)
    """(v_t, variant) -> (tokens, peak delta, memory before the loss) of the last unchunked run"""
    skip_from: dict[tuple, int] = field(default_factory=dict)
    """(v_t, variant) -> the tokens from which the unchunked runs are skipped"""

    def skip_status(self, point: Point, rows: list[dict]) -> str | None:
        """ "skipped (OOM risk)" where the peak predicted from the last smaller run exceeds the limit."""
        key = (point.v_t, point.variant)
        if key in self.skip_from and point.tokens >= self.skip_from[key]:
            return SKIPPED
        if key not in self.last:
            return None
        t_prev, d_prev, before_prev = self.last[key]
        # the logits grow linearly with the tokens (CMA scores quadratically, but are small)
        predicted = before_prev + d_prev * point.tokens / t_prev * 1.1
        limit = self.limit(rows)
        if predicted <= limit:
            return None
        self.skip_from[key] = point.tokens
        print(
            f"  unchunked {point.label}: predicted peak RSS {predicted / MB:,.0f} MB > "
            f"limit {limit / MB:,.0f} MB: skipped",
            flush=True,
        )
        return SKIPPED

    def limit(self, rows: list[dict]) -> float:
        """Bytes a run may peak at: CPU ``--max-rss-gb`` and 85 % of MemAvailable, CUDA 85 % of the GPU."""
        if self.device == "cpu":
            avail = mem_available()
            limit = self.max_rss_gb * 1024**3
            return limit if avail is None else min(limit, 0.85 * avail)
        gpu_total = next((r["gpu_total"] for r in rows if r.get("gpu_total")), None)
        return 0.85 * gpu_total if gpu_total else math.inf

    def record(self, point: Point, unchunked: dict) -> str | None:
        """The row's unchunked status after a run (None: measured); an OOM skips the larger points."""
        key = (point.v_t, point.variant)
        error = unchunked.get("error")
        if error is None:
            self.last[key] = (point.tokens, unchunked["peak_delta"], unchunked["before"])
            return None
        if "OOM" in error or "killed" in error:
            self.skip_from[key] = point.tokens
            return "OOM"
        return f"failed: {error}"[:60]


def worker_spec(args: argparse.Namespace, shape: dict, point: Point) -> dict:
    """What a worker needs to build and measure ``point``, less its implementations and rounds."""
    return {
        "device": args.device,
        "dtype": shape["dtype"],
        "d_s": shape["d_s"],
        "d_t": shape["d_t"],
        "v_s": STUDENT_VOCAB,
        "seed": args.seed,
        "budget_s": args.budget_s,
        "max_rounds": args.rounds,
        "chunk_size": args.chunk_size,
        "chunk_elements": args.chunk_elements,
        "point": asdict(point),
    }


def measure_point(
    point: Point, spec: dict, args: argparse.Namespace, *, skipped: bool
) -> tuple[dict, dict | None]:
    """The chunked worker's and (unless skipped) the unchunked worker's results for one point.

    The chunked worker measures memory, and is timed only when the baseline is skipped. Where a
    chunked pass is cheap (or at the target point) the unchunked worker times both implementations
    alternately; otherwise each implementation's single fresh-process pass is used.
    """
    is_target = args.device == "cpu" and _matches(asdict(point), CPU_TARGET)
    chunked = run_worker(
        dict(spec, impls=["chunked"], min_samples=1, max_rounds=args.rounds if skipped else 0)
    )
    if skipped:
        return chunked, None
    interleave = is_target or (
        "error" not in chunked and chunked["first"]["chunked"] <= args.interleave_max_s
    )
    unchunked = run_worker(
        dict(
            spec,
            impls=["unchunked", "chunked"] if interleave else ["unchunked"],
            min_samples=3 if is_target else 1,
            max_rounds=args.rounds if interleave else 0,
        )
    )
    return chunked, unchunked


def result_row(point: Point, status: str | None, chunked: dict, unchunked: dict | None) -> dict:
    """One row of the table and the JSON: memory, times and their chunked / unchunked ratios."""
    row: dict = dict(
        asdict(point),
        chunked_mb=None,
        unchunked_mb=None,
        memory_ratio=None,
        chunked_s=None,
        unchunked_s=None,
        time_ratio=None,
        unchunked_status=status,
        chunked_worker=chunked,
        unchunked_worker=unchunked,
    )
    if "error" not in chunked:
        row["chunked_mb"] = chunked["peak_delta"] / MB
        row["chunked_peak_abs_mb"] = chunked["peak_abs"] / MB
        row["inputs_mb"] = chunked["before"] / MB
        row["chunk_tokens"] = chunked["cfg_tokens_per_chunk"]
        row["gpu_total"] = chunked.get("gpu_total")
    if unchunked is not None and "error" not in unchunked:
        row["unchunked_mb"] = unchunked["peak_delta"] / MB
        row["unchunked_peak_abs_mb"] = unchunked["peak_abs"] / MB
        row["unchunked_s"] = unchunked["median"]["unchunked"]
        if "chunked" in unchunked["median"]:
            row["timing"] = "interleaved"
            row["chunked_s"] = unchunked["median"]["chunked"]
            row["time_samples"] = unchunked["times"]
        else:
            row["timing"] = "separate"
            row["chunked_s"] = chunked["median"]["chunked"]
            row["time_samples"] = dict(unchunked["times"], **chunked["times"])
        v = dict(chunked.get("values", {}), **unchunked["values"])
        if "chunked" in v:
            row["loss_rel_diff"] = abs(v["chunked"] - v["unchunked"]) / max(abs(v["unchunked"]), 1e-30)
        if row["chunked_mb"] is not None:
            row["memory_ratio"] = row["chunked_mb"] / max(row["unchunked_mb"], 1e-9)
        row["time_ratio"] = row["chunked_s"] / row["unchunked_s"]
    elif "error" not in chunked:
        row["timing"] = "chunked only"
        row["chunked_s"] = chunked["median"]["chunked"]
        row["time_samples"] = chunked["times"]
    return row


def progress_line(point: Point, row: dict, seconds: float) -> str:
    """The point's line on stdout while the sweep runs."""
    status = row["unchunked_status"]
    return (
        f"  {point.label}: chunked {fmt_mb(row['chunked_mb'])} MB "
        f"{fmt_ratio(row['chunked_s'])} s | unchunked "
        + (
            status
            or f"{fmt_mb(row['unchunked_mb'])} MB {fmt_ratio(row['unchunked_s'])} s "
            f"| mem x{fmt_ratio(row['memory_ratio'], 3)} "
            f"time x{fmt_ratio(row['time_ratio'])}"
        )
        + f"  [{seconds:.0f} s]"
    )


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def write_report(rows: list[dict], args: argparse.Namespace, shape: dict, name: str, elapsed: float) -> None:
    """Print the table and the target verdicts; write them, the JSON and the plot under ``--out``."""
    md = table(rows)
    verdicts = check_targets(rows, args.device)
    threads = next((r["chunked_worker"].get("torch_threads") for r in rows if r.get("chunked_worker")), None)
    text = (
        report_header(args, shape, name, threads)
        + md
        + "\n\n"
        + "\n".join(verdicts)
        + f"\n\nTotal benchmark time {elapsed:.0f} s.\n"
    )
    print()
    print(md)
    print()
    for v in verdicts:
        print(v)
    print(f"total {elapsed:.0f} s")

    meta = run_meta(args, shape, name)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "loss_memory.md").write_text(text)
    (args.out / "loss_memory.json").write_text(
        json.dumps({"meta": meta, "total_s": elapsed, "verdicts": verdicts, "rows": rows}, indent=1)
    )
    plot(rows, meta, args.out / "loss_memory.png")
    print(f"wrote {args.out / 'loss_memory.md'}, loss_memory.json, loss_memory.png")


def run_meta(args: argparse.Namespace, shape: dict, name: str) -> dict:
    """The run's settings, for the JSON and the plot's title."""
    return {
        "device": args.device,
        "device_name": name,
        "dtype": shape["dtype"],
        "d_s": shape["d_s"],
        "d_t": shape["d_t"],
        "v_s": STUDENT_VOCAB,
        "batch": BATCH,
        "prompt_share": PROMPT_SHARE,
        "teacher_length_ratio": TEACHER_LENGTH_RATIO,
        "rounds": args.rounds,
        "budget_s": args.budget_s,
        "chunk_size": args.chunk_size,
        "chunk_elements": args.chunk_elements,
        "quick": args.quick,
        "max_rss_gb": args.max_rss_gb,
        "python": sys.version.split()[0],
    }


def command_line(args: argparse.Namespace) -> str:
    """The command that repeats this run, for the report."""
    parts = [f"python benchmarks/loss_memory.py --device {args.device}"]
    if args.quick:
        parts.append("--quick")
    for flag, value in (
        ("--chunk-size", args.chunk_size),
        ("--chunk-elements", args.chunk_elements),
        ("--d-s", args.d_s),
        ("--d-t", args.d_t),
        ("--points", args.points),
    ):
        if value:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


def report_header(args: argparse.Namespace, shape: dict, name: str, threads: int | None) -> str:
    """The report's title, command, setup and the meaning of its columns."""
    return (
        f"# DSKD loss: chunked vs unchunked, {name}\n\n"
        f"`{command_line(args)}`\n\n"
        f"Student d_s={shape['d_s']}, teacher d_t={shape['d_t']}, {shape['dtype']}, batch "
        f"{BATCH} x L, {PROMPT_SHARE:.0%} of each row an untrained prompt; same-vocab: "
        f"V_s = V_t; CMA: V_s = {STUDENT_VOCAB}, teacher sequence {TEACHER_LENGTH_RATIO:.4f} x "
        f"longer. LM heads frozen, gradients to the student hidden states and the projectors; "
        f"forward_kl both spaces. torch {_torch_version()}, {threads} threads.\n\n"
        "MB: peak "
        + ("RSS" if args.device == "cpu" else "CUDA allocated memory")
        + " during one forward + backward of the loss, above the memory held before it (inputs "
        "excluded), each implementation in a fresh process. s: median forward + backward time; "
        "where a chunked pass is cheap (and at the target point) both implementations are timed "
        "alternately in one process, otherwise one pass each. Ratios: chunked / unchunked.\n\n"
    )


def _torch_version() -> str:
    """The installed torch version, read without importing torch into the driver."""
    from importlib.metadata import version

    return version("torch")


def fmt_mb(x: float | None) -> str:
    """Megabytes for the table (a dash where not measured)."""
    return "—" if x is None else f"{x:,.0f}"


def fmt_ratio(x: float | None, digits: int = 2) -> str:
    """A ratio or seconds for the table (a dash where not measured)."""
    return "—" if x is None else f"{x:.{digits}f}"


def table(rows: list[dict]) -> str:
    """The markdown results table, one row per point († marks times from separate processes)."""
    head = (
        "| tokens | V_t | variant | chunked MB | unchunked MB | memory ratio | chunked s "
        "| unchunked s | time ratio |"
    )
    lines = [head, "|---:|---:|:---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("unchunked_status"):
            rest = f"{r['unchunked_status']} | — | {fmt_ratio(r['chunked_s'])} | — | — |"
        else:
            mark = "" if r.get("timing") == "interleaved" else " †"
            rest = (
                f"{fmt_mb(r['unchunked_mb'])} | {fmt_ratio(r['memory_ratio'], 3)} | "
                f"{fmt_ratio(r['chunked_s'])} | {fmt_ratio(r['unchunked_s'])} | "
                f"{fmt_ratio(r['time_ratio'])}{mark} |"
            )
        lines.append(f"| {r['tokens']} | {r['v_t']} | {r['variant']} | {fmt_mb(r['chunked_mb'])} | " + rest)
    if any(r.get("timing") == "separate" for r in rows):
        lines.append("")
        lines.append(
            "† one pass of each implementation, in separate processes (not alternated): a noisier time ratio."
        )
    return "\n".join(lines)


def plot(rows: list[dict], meta: dict, path: Path) -> None:
    """Memory and time against tokens, one column per teacher vocabulary, saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vocabs = sorted({r["v_t"] for r in rows})
    fig, axes = plt.subplots(2, len(vocabs), figsize=(5.2 * len(vocabs), 8.6), squeeze=False)
    styles = {
        ("same", "chunked"): {"color": "tab:blue", "ls": "-", "marker": "o"},
        ("same", "unchunked"): {"color": "tab:blue", "ls": "--", "marker": "s", "mfc": "none"},
        ("cma", "chunked"): {"color": "tab:red", "ls": "-", "marker": "o"},
        ("cma", "unchunked"): {"color": "tab:red", "ls": "--", "marker": "s", "mfc": "none"},
    }
    for col, v in enumerate(vocabs):
        for row, (key, ylabel) in enumerate(
            (("mb", "peak loss memory (MB, log)"), ("s", "forward+backward time (s, log)"))
        ):
            ax = axes[row][col]
            for (variant, impl), style in styles.items():
                pts = sorted(
                    (r["tokens"], r[f"{impl}_{key}"])
                    for r in rows
                    if r["v_t"] == v and r["variant"] == variant and r[f"{impl}_{key}"] is not None
                )
                if pts:
                    ax.plot(*zip(*pts), label=f"{variant} / {impl}", **style)
                skipped = [
                    r["tokens"]
                    for r in rows
                    if r["v_t"] == v
                    and r["variant"] == variant
                    and impl == "unchunked"
                    and r.get("unchunked_status")
                ]
                if skipped and row == 0:
                    for t in skipped:
                        ax.axvline(t, color=style["color"], alpha=0.15, lw=6)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xticks(sorted({r["tokens"] for r in rows}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.grid(True, which="both", alpha=0.3)
            ax.set_xlabel("tokens per batch (2 x L)")
            ax.set_ylabel(ylabel)
            title = f"teacher vocab {v:,}" + (" (same: V_s=V_t)" if row == 0 else "")
            ax.set_title(title)
            if row == 0 and col == 0:
                ax.legend(fontsize=8)
    fig.suptitle(
        f"DSKD loss, chunked vs unchunked — {meta['device_name']}, {meta['dtype']}, "
        f"d_s={meta['d_s']}, d_t={meta['d_t']}, CMA V_s={meta['v_s']:,}\n"
        "missing unchunked points (shaded) = skipped (OOM risk)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _matches(record: dict, target: dict, keys: tuple[str, ...] = ("tokens", "v_t", "variant")) -> bool:
    """Whether a point or row is the target's."""
    return all(record[k] == target[k] for k in keys)


def check_targets(rows: list[dict], device: str) -> list[str]:
    """The PASS / FAIL line of the device's target."""
    return [cpu_verdict(rows) if device == "cpu" else cuda_verdict(rows)]


def cpu_verdict(rows: list[dict]) -> str:
    """CPU: memory and time ratios at ``CPU_TARGET``."""
    t = CPU_TARGET
    r = next((r for r in rows if _matches(r, t)), None)
    name = (
        f"CPU target ({t['tokens']} tokens = {BATCH} x {t['tokens'] // BATCH}, V_t "
        f"{t['v_t']}, {t['variant']}, memory ratio <= {t['max_memory_ratio']}, time ratio <= "
        f"{t['max_time_ratio']})"
    )
    if r is None or r["memory_ratio"] is None:
        return f"{name}: NOT MEASURED"
    ok_mem = r["memory_ratio"] <= t["max_memory_ratio"]
    ok_time = r["time_ratio"] <= t["max_time_ratio"]
    return (
        f"{'PASS' if ok_mem and ok_time else 'FAIL'}: {name}: memory ratio "
        f"{r['memory_ratio']:.3f} ({r['chunked_mb']:,.0f} / {r['unchunked_mb']:,.0f} MB) "
        f"{'ok' if ok_mem else 'MISSED'}, time ratio {r['time_ratio']:.2f} "
        f"({r['chunked_s']:.2f} / {r['unchunked_s']:.2f} s) {'ok' if ok_time else 'MISSED'}"
    )


def cuda_verdict(rows: list[dict]) -> str:
    """CUDA: the chunked loss's peak memory at ``CUDA_TARGET``, both variants."""
    c = CUDA_TARGET
    found = [r for r in rows if _matches(r, c, ("tokens", "v_t")) and r["chunked_mb"] is not None]
    name = (
        f"CUDA target ({c['tokens']} tokens, V_t {c['v_t']}, chunked peak loss memory "
        f"< {c['max_peak_mb']:,.0f} MB)"
    )
    if not found:
        return f"{name}: NOT MEASURED"
    worst = max(found, key=lambda r: r["chunked_mb"])
    ok = worst["chunked_mb"] < c["max_peak_mb"]
    detail = ", ".join(f"{r['variant']} {r['chunked_mb']:,.0f} MB" for r in found)
    return f"{'PASS' if ok else 'FAIL'}: {name}: {detail}"


if __name__ == "__main__":
    sys.exit(main())
