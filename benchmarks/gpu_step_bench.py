#!/usr/bin/env python3
"""Step cost of DSKD against its two parts, on models with real shapes and random weights.

Measured side by side, in one process, on the same resident models:

  (a) ``sft``            plain LoRA SFT of the student: forward with labels, backward, AdamW step
  (b) ``teacher_fwd:*``  the teacher's forward alone, exactly as DSKD calls it
                         (``axolotl_dskd.core.models.teacher_hidden_states``, no full logits)
  (c) ``dskd_same``      the DSKD step, same vocabulary (Llama-2-7B-shaped teacher)
      ``dskd_cma``       the DSKD step, cross-tokenizer CMA (Qwen2.5-3B-shaped teacher)

The DSKD step is the trainer's code path (``DSKDTrainer.compute_loss``): student
``final_hidden_states`` (under bf16 autocast, as Accelerate wraps the student), teacher
``teacher_hidden_states``, ``dskd_loss`` with ``Projectors``, backward, one AdamW step over the
LoRA and projector parameters. The teacher is quantized exactly as the plugin loads it
(``axolotl_dskd.core.teacher.load_teacher``: nf4, double quantization, bf16 compute), from a
random-weight checkpoint written once to ``--model-dir``.

Per (sequence length, micro-batch) point and mode: median step time, tokens/s (student tokens
of the micro-batch / step time), ``torch.cuda.max_memory_allocated`` (absolute) and the step's
own memory (peak minus what was allocated before the step: models, optimizer states).
Targets (per variant): DSKD time <= 1.25 x (SFT + teacher forward); DSKD memory beyond
SFT + teacher forward < 1.5 GB at 4096 tokens per micro-batch.

    python benchmarks/gpu_step_bench.py --out $OUT               # GPU: real shapes, bf16
    python benchmarks/gpu_step_bench.py --device cpu --tiny      # CPU dry run, tiny shapes
    python benchmarks/gpu_step_bench.py --make-only --tokenizers # only write the models

Writes ``step_bench.json`` and ``step_bench.md`` under ``--out`` (default ``$OUT`` or
``./outputs/step_bench``). An out-of-memory point is recorded as ``oom`` and the larger
micro-batches of that mode and length are skipped; ``--time-budget`` stops measuring (and
still writes everything measured) when it runs out.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from axolotl_dskd.core.loss import DSKDLossConfig, Projectors, dskd_loss
from axolotl_dskd.core.models import (
    final_hidden_states,
    input_embedding_weight,
    lm_head_weight,
    teacher_hidden_states,
)
from axolotl_dskd.core.teacher import load_teacher

REPO = Path(__file__).resolve().parents[1]
GB = 1e9
GIB = 2**30
TIME_TARGET = 1.25
MEM_TARGET_BYTES = 1.5e9
MEM_TARGET_TOKENS = 4096

# ---------------------------------------------------------------------------- model shapes
# From the models' config.json on the Hugging Face hub (no download here).

REAL = {
    "student": {  # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T
        "family": "llama",
        "vocab_size": 32000,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
    "teacher_same": {  # meta-llama/Llama-2-7b-hf
        "family": "llama",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
    "teacher_cma": {  # Qwen/Qwen2.5-3B
        "family": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
    },
}
NAMES = {"student": "tinyllama_1.1b", "teacher_same": "llama2_7b", "teacher_cma": "qwen2.5_3b"}
TINY = {
    "student": {
        "family": "llama",
        "vocab_size": 1024,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
    },
    "teacher_same": {
        "family": "llama",
        "vocab_size": 1024,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
    },
    "teacher_cma": {
        "family": "qwen2",
        "vocab_size": 1536,
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": True,
    },
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_config(spec: dict[str, Any]):
    """The ``transformers`` config of a ``REAL`` / ``TINY`` shape (its ``family`` picks the class)."""
    from transformers import LlamaConfig, Qwen2Config

    spec = dict(spec)
    family = spec.pop("family")
    cls = LlamaConfig if family == "llama" else Qwen2Config
    return cls(**spec)


def _saved(directory: Path) -> bool:
    """Whether ``directory`` already holds a saved model (written by an earlier run)."""
    return (directory / "config.json").is_file() and (
        (directory / "model.safetensors").is_file() or (directory / "model.safetensors.index.json").is_file()
    )


def make_model_dir(
    role: str, spec: dict[str, Any], directory: Path, device: str, dtype: torch.dtype, log
) -> float:
    """Random weights with ``spec``'s shapes, initialised on ``device`` (fast) and saved."""
    if _saved(directory):
        log(f"  {role}: reusing {directory}")
        return 0.0
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    torch.manual_seed({"student": 1, "teacher_same": 2, "teacher_cma": 3}[role])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config(spec), dtype=dtype)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(directory, max_shard_size="5GB")
    del model
    _free(device)
    dt = time.perf_counter() - t0
    log(f"  {role}: {n / 1e9:.3f}B params, random init on {device} + save -> {directory} ({dt:.1f}s)")
    return dt


def add_tokenizers(model_dir: Path, log) -> None:
    """Tiny trained tokenizers whose ids fit the real vocabularies, for ``axolotl.cli.train``:
    sentencepiece-style (TinyLlama / Llama 2 style) for the student, byte-level BPE (Qwen style)
    for the CMA teacher; the model configs get the tokenizers' special token ids."""
    from dskd_devkit import task, tiny_tokenizers

    corpus = task.task_corpus()
    pairs = {
        "student": tiny_tokenizers.sentencepiece_tokenizer(corpus, pad_token="</s>"),
        "teacher_cma": tiny_tokenizers.bpe_tokenizer(corpus),
    }
    for role, tok in pairs.items():
        directory = model_dir / role
        tok.save_pretrained(directory)
        cfg_path = directory / "config.json"
        cfg = json.loads(cfg_path.read_text())
        assert len(tok) <= cfg["vocab_size"], (len(tok), cfg["vocab_size"])
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(tok, key)
            cfg[key] = value
        cfg_path.write_text(json.dumps(cfg, indent=2))
        gen = directory / "generation_config.json"
        if gen.is_file():
            gen.unlink()  # stale special ids
        log(f"  {role}: tokenizer with {len(tok)} tokens (model vocab {cfg['vocab_size']}) -> {directory}")


# ---------------------------------------------------------------------------- measurement


def _free(device: str) -> None:
    """Release what the last point left behind, so that the next one starts from the models alone."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` means the device ran out of memory."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


@dataclass
class Point:
    """One mode at one (sequence length, micro-batch): its status and measurements."""

    mode: str
    seq: int
    mb: int
    tokens: int
    status: str = "ok"
    ms: float | None = None
    ms_all: list[float] | None = None
    tokens_per_s: float | None = None
    peak_alloc_gib: float | None = None
    step_mem_gib: float | None = None
    step_mem_bytes: int | None = None
    loss: float | None = None
    error: str | None = None

    def record_times(self, times: list[float], loss: torch.Tensor | None) -> None:
        """Median step time, tokens/s and the last loss; a non-finite loss marks the point."""
        if loss is not None:
            loss = float(loss)
            if not math.isfinite(loss):
                self.status = "nonfinite"
            self.loss = loss
        self.ms = 1e3 * statistics.median(times)
        self.ms_all = [round(1e3 * t, 2) for t in times]
        self.tokens_per_s = self.tokens / (self.ms / 1e3)

    def record_memory(self, peak: int, base: int) -> None:
        """The peak allocation and the step's own memory above what was allocated before it."""
        self.peak_alloc_gib = peak / GIB
        self.step_mem_bytes = peak - base
        self.step_mem_gib = (peak - base) / GIB


class Bench:
    """The resident models and optimizers of one run, and the points measured on them."""

    def __init__(self, args: argparse.Namespace, log) -> None:
        self.args = args
        self.log = log
        self.device = args.device
        self.cuda = self.device.startswith("cuda")
        self.dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        self.specs = TINY if args.tiny else REAL
        self.model_dir = Path(args.model_dir)
        self.t_start = time.perf_counter()
        self.points: list[Point] = []
        self.models: dict[str, Any] = {}
        self.projectors: dict[str, Projectors] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.info: dict[str, Any] = {
            "device": torch.cuda.get_device_name(0) if self.cuda else platform.processor() or "cpu",
            "versions": versions(),
        }

    # ------------------------------------------------------------------ models
    def build(self) -> None:
        """Write the random models (once), then load the student, the teachers and the optimizers."""
        self.log(f"models under {self.model_dir} ({'tiny' if self.args.tiny else 'real'} shapes)")
        make_s = {
            role: make_model_dir(
                role, self.specs[role], self.model_dir / role, self.device, self.dtype, self.log
            )
            for role in ("student", "teacher_same", "teacher_cma")
        }
        if self.args.tokenizers:
            add_tokenizers(self.model_dir, self.log)
        if self.args.make_only:
            return
        self.load_student()
        self.load_teachers(make_s)
        self.make_optimizers()
        if self.cuda:
            torch.cuda.synchronize()
            self.info["resident_gib"] = round(torch.cuda.memory_allocated() / GIB, 3)

    def load_student(self) -> None:
        """The student with LoRA adapters on every projection (as a LoRA SFT run trains it)."""
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        student = AutoModelForCausalLM.from_pretrained(
            self.model_dir / "student", dtype=self.dtype, device_map={"": self.device}
        )
        student.config.use_cache = False
        lora = LoraConfig(
            r=self.args.lora_r,
            lora_alpha=2 * self.args.lora_r,
            lora_dropout=0.0,
            target_modules=LORA_TARGETS,
            task_type="CAUSAL_LM",
        )
        student = get_peft_model(student, lora)
        if self.args.grad_ckpt:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            student.enable_input_require_grads()
        student.train()
        self.models["student"] = student
        trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
        self.info["student"] = {
            "name": NAMES["student"],
            **self.specs["student"],
            "params": sum(p.numel() for p in student.parameters()),
            "lora_trainable": trainable,
            "load_s": round(time.perf_counter() - t0, 2),
        }

    def load_teachers(self, make_s: dict[str, float]) -> None:
        """The teachers the modes need, quantized as the plugin loads them (``load_teacher``)."""
        quant = {"4bit": {"load_in_4bit": True}, "8bit": {"load_in_8bit": True}, "none": {}}[
            self.args.teacher_quant
        ]
        for role in ("teacher_same", "teacher_cma"):
            if not self._wanted(role):
                continue
            t0 = time.perf_counter()
            teacher = load_teacher(
                str(self.model_dir / role), device=torch.device(self.device), dtype=self.dtype, **quant
            )
            self.models[role] = teacher
            self.info[role] = {
                "name": NAMES[role],
                **self.specs[role],
                "quant": self.args.teacher_quant,
                "footprint_gib": round(teacher.get_memory_footprint() / GIB, 3),
                "load_s": round(time.perf_counter() - t0, 2),
                "make_s": round(make_s[role], 2),
            }
            self.log(
                f"  {role}: loaded ({self.args.teacher_quant}) in {self.info[role]['load_s']}s, "
                f"footprint {self.info[role]['footprint_gib']} GiB"
            )

    def _wanted(self, role: str) -> bool:
        """Whether a chosen mode uses the teacher ``role`` (so it is worth loading)."""
        modes = self.args.modes
        if role == "teacher_same":
            return "dskd_same" in modes or "teacher_fwd" in modes
        return "dskd_cma" in modes or "teacher_fwd" in modes

    def make_optimizers(self) -> None:
        """AdamW over the LoRA parameters for SFT, and per DSKD variant over LoRA + its projectors."""
        lora_params = [p for p in self.models["student"].parameters() if p.requires_grad]
        d_s = self.specs["student"]["hidden_size"]
        self.optimizers["sft"] = torch.optim.AdamW(lora_params, lr=1e-4, fused=self.cuda or None)
        for variant, role in (("same", "teacher_same"), ("cma", "teacher_cma")):
            if role not in self.models:
                continue
            proj = Projectors(d_s, self.specs[role]["hidden_size"], cross_tokenizer=variant == "cma").to(
                self.device
            )
            self.projectors[variant] = proj
            self.optimizers[variant] = torch.optim.AdamW(
                [{"params": lora_params}, {"params": list(proj.parameters()), "lr": 1e-3}],
                lr=1e-4,
                fused=self.cuda or None,
            )

    # ------------------------------------------------------------------ inputs
    def batch(self, seq: int, mb: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Random ids and labels, the first quarter of each row an untrained prompt."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        ids = torch.randint(0, vocab, (mb, seq), generator=g)
        labels = ids.clone()
        labels[:, : seq // 4] = -100  # a prompt that is not trained
        return ids.to(self.device), labels.to(self.device)

    def teacher_batch(
        self, variant: str, seq: int, mb: int, ids: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's ids and labels: the student's, or (CMA) its own, ``--cma-teacher-ratio`` x long."""
        if variant == "same":
            return ids, labels
        t_len = max(8, round(seq * self.args.cma_teacher_ratio))
        return self.batch(t_len, mb, self.specs["teacher_cma"]["vocab_size"], seed=seq * 37 + mb)

    def autocast(self):
        """bf16 autocast around the student, as Accelerate wraps it (nothing in fp32)."""
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type="cuda" if self.cuda else "cpu", dtype=self.dtype)

    # ------------------------------------------------------------------ steps
    def step_fn(self, mode: str, seq: int, mb: int) -> Callable[[], torch.Tensor | None]:
        """The step that ``mode`` times, on a fixed random micro-batch of ``mb`` x ``seq`` tokens."""
        ids, labels = self.batch(seq, mb, self.specs["student"]["vocab_size"], seed=seq * 31 + mb)
        if mode == "sft":
            return self.sft_step(ids, labels)
        if mode.startswith("teacher_fwd:"):
            variant = mode.removeprefix("teacher_fwd:teacher_")
            return self.teacher_fwd_step(variant, self.teacher_batch(variant, seq, mb, ids, labels)[0])
        variant = mode.removeprefix("dskd_")
        return self.dskd_step(variant, ids, labels, *self.teacher_batch(variant, seq, mb, ids, labels))

    def sft_step(self, ids: torch.Tensor, labels: torch.Tensor) -> Callable[[], torch.Tensor]:
        """(a) Plain LoRA SFT: forward with labels, backward, AdamW step."""
        student, opt = self.models["student"], self.optimizers["sft"]

        def sft() -> torch.Tensor:
            with self.autocast():
                out = student(input_ids=ids, labels=labels, use_cache=False)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return out.loss.detach()

        return sft

    def teacher_fwd_step(self, variant: str, t_ids: torch.Tensor) -> Callable[[], None]:
        """(b) The teacher's forward alone, exactly as DSKD calls it (hidden states, no full logits)."""
        teacher = self.models[f"teacher_{variant}"]

        def teacher_fwd() -> None:
            teacher_hidden_states(teacher, input_ids=t_ids)

        return teacher_fwd

    def dskd_step(
        self,
        variant: str,
        ids: torch.Tensor,
        labels: torch.Tensor,
        t_ids: torch.Tensor,
        t_labels: torch.Tensor,
    ) -> Callable[[], torch.Tensor]:
        """(c) The DSKD step: the trainer's loss, backward, AdamW over LoRA and the projectors."""
        student, teacher = self.models["student"], self.models[f"teacher_{variant}"]
        proj, opt = self.projectors[variant], self.optimizers[variant]
        config = DSKDLossConfig(cross_tokenizer=variant == "cma", token_alignment="cma")

        def dskd() -> torch.Tensor:
            # DSKDTrainer.compute_loss, minus the metrics logging
            with self.autocast():
                h_s = final_hidden_states(student, input_ids=ids)
            h_t = teacher_hidden_states(teacher, input_ids=t_ids)
            extra = {}
            if variant == "cma":
                extra = {
                    "student_input_ids": ids,
                    "teacher_input_ids": t_ids,
                    "student_embeddings": input_embedding_weight(student),
                    "teacher_embeddings": input_embedding_weight(teacher),
                }
            out = dskd_loss(
                proj,
                student_hidden=h_s,
                student_lm_head=lm_head_weight(student),
                student_labels=labels,
                teacher_hidden=h_t,
                teacher_lm_head=lm_head_weight(teacher),
                teacher_labels=t_labels,
                config=config,
                **extra,
            )
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return out.loss.detach()

        return dskd

    # ------------------------------------------------------------------ measurement
    def modes(self) -> list[str]:
        """The chosen modes, the teacher forward once per loaded teacher."""
        out = []
        if "sft" in self.args.modes:
            out.append("sft")
        if "teacher_fwd" in self.args.modes:
            out += [f"teacher_fwd:{r}" for r in ("teacher_same", "teacher_cma") if r in self.models]
        out += [m for m in ("dskd_same", "dskd_cma") if m in self.args.modes]
        return out

    def run(self) -> None:
        """Every mode at every (seq, mb), smallest first, within the time budget and past OOMs."""
        grid = sorted(
            ((s, b) for s in self.args.seq for b in self.args.mb), key=lambda sb: (sb[0] * sb[1], sb[0])
        )
        dead: set[tuple[str, int]] = set()  # (mode, seq) that ran out of memory
        for seq, mb in grid:
            for mode in self.modes():
                left = self.args.time_budget - (time.perf_counter() - self.t_start)
                if (mode, seq) in dead:
                    p = Point(mode, seq, mb, seq * mb, status="skipped_after_oom")
                elif left <= 0:
                    p = Point(mode, seq, mb, seq * mb, status="skipped_time_budget")
                else:
                    p = self.measure(mode, seq, mb)
                    if p.status == "oom":
                        dead.add((mode, seq))
                self.points.append(p)
                self.log(_point_line(p))

    def measure(self, mode: str, seq: int, mb: int) -> Point:
        """One point: warm-up steps, then step times and (CUDA) memory; a failure is recorded, not raised."""
        point = Point(mode, seq, mb, seq * mb)
        fn = None
        try:
            fn = self.step_fn(mode, seq, mb)
            for _ in range(self.args.warmup):
                fn()
            self.sync()
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            point.record_times(*self.time_steps(fn))
            if self.cuda:
                point.record_memory(torch.cuda.max_memory_allocated(), base)
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
            point.status = "oom" if _is_oom(exc) else "error"
            point.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        finally:
            del fn
            for opt in self.optimizers.values():
                opt.zero_grad(set_to_none=True)
            _free(self.device)
        return point

    def time_steps(self, fn: Callable[[], torch.Tensor | None]) -> tuple[list[float], torch.Tensor | None]:
        """Step times (and the last loss): ``--iters`` steps, fewer past ``--max-point-s`` (at least 2)."""
        times, loss = [], None
        spent = 0.0
        while len(times) < self.args.iters and (len(times) < 2 or spent < self.args.max_point_s):
            t0 = time.perf_counter()
            loss = fn()
            self.sync()
            dt = time.perf_counter() - t0
            times.append(dt)
            spent += dt
        return times, loss

    def sync(self) -> None:
        """Wait for the GPU, so that a time covers the work and not just its launch."""
        if self.cuda:
            torch.cuda.synchronize()

    # ------------------------------------------------------------------ ratios
    def summary(self) -> list[dict[str, Any]]:
        """Per measured DSKD point: its cost against SFT + teacher forward at the same (seq, mb)."""
        by = {(p.mode, p.seq, p.mb): p for p in self.points}
        rows = []
        for variant in ("same", "cma"):
            for seq in self.args.seq:
                for mb in self.args.mb:
                    dskd = by.get((f"dskd_{variant}", seq, mb))
                    if dskd is not None:
                        sft = by.get(("sft", seq, mb))
                        teacher = by.get((f"teacher_fwd:teacher_{variant}", seq, mb))
                        rows.append(ratio_row(variant, dskd, sft, teacher))
        return rows


def ratio_row(variant: str, dskd: Point, sft: Point | None, teacher: Point | None) -> dict[str, Any]:
    """A summary row: DSKD time / (SFT + teacher forward) and DSKD memory beyond both, with the targets."""
    row: dict[str, Any] = {
        "variant": variant,
        "teacher": NAMES[f"teacher_{variant}"],
        "seq": dskd.seq,
        "mb": dskd.mb,
        "tokens": dskd.tokens,
        "dskd_status": dskd.status,
        "dskd_ms": dskd.ms,
        "sft_ms": sft.ms if sft else None,
        "teacher_ms": teacher.ms if teacher else None,
    }
    if not all(p is not None and p.status == "ok" for p in (dskd, sft, teacher)):
        return row
    row["time_ratio"] = dskd.ms / (sft.ms + teacher.ms)
    row["time_ok"] = row["time_ratio"] <= TIME_TARGET
    if dskd.step_mem_bytes is not None:
        extra = dskd.step_mem_bytes - (sft.step_mem_bytes + teacher.step_mem_bytes)
        row["mem_extra_gb"] = extra / GB
        row["mem_ok"] = extra < MEM_TARGET_BYTES if dskd.tokens == MEM_TARGET_TOKENS else None
    return row


def _fmt(x: float | None, spec: str) -> str:
    """A number for the tables (a dash where not measured)."""
    return "-" if x is None else format(x, spec)


def _point_line(p: Point) -> str:
    """The point's log line while the run goes on."""
    if p.status != "ok":
        return f"  {p.mode:24s} seq={p.seq:<5d} mb={p.mb:<2d} {p.status.upper()} {p.error or ''}"
    mem = (
        f" peak={p.peak_alloc_gib:.2f}GiB step={p.step_mem_gib:.2f}GiB"
        if p.peak_alloc_gib is not None
        else ""
    )
    loss = f" loss={p.loss:.4f}" if p.loss is not None else ""
    return (
        f"  {p.mode:24s} seq={p.seq:<5d} mb={p.mb:<2d} {p.ms:9.1f} ms {p.tokens_per_s:10.0f} tok/s{mem}{loss}"
    )


def markdown(bench: Bench, summary: list[dict[str, Any]]) -> str:
    """The report: every point's measurements, then the summary against the targets."""
    lines = [
        (
            f"### DSKD step cost ({bench.info.get('device', bench.device)}, {bench.args.dtype}, "
            f"teacher {bench.args.teacher_quant}, LoRA r={bench.args.lora_r}"
            f"{', grad ckpt' if bench.args.grad_ckpt else ''})"
        ),
        "",
        (
            "Measurements: median step time, student tokens/s, max_memory_allocated (peak) and the "
            "step's own memory above the resident models (step)."
        ),
        "",
        "| mode | seq | mb | tokens | ms | tok/s | peak GiB | step GiB | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in sorted(bench.points, key=lambda p: (p.mode, p.seq, p.mb)):
        lines.append(
            f"| {p.mode} | {p.seq} | {p.mb} | {p.tokens} | {_fmt(p.ms, '.1f')} | {_fmt(p.tokens_per_s, '.0f')} "
            f"| {_fmt(p.peak_alloc_gib, '.2f')} | {_fmt(p.step_mem_gib, '.2f')} | {p.status} |"
        )
    lines += [
        "",
        (
            f"Targets: DSKD time <= {TIME_TARGET} x (SFT + teacher forward); DSKD step memory beyond "
            f"SFT + teacher forward < {MEM_TARGET_BYTES / GB:.1f} GB at {MEM_TARGET_TOKENS} tokens per micro-batch."
        ),
        "",
        "| variant | teacher | seq | mb | tokens | DSKD ms | SFT ms | teacher ms | ratio | time ok | extra GB | mem ok |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in summary:
        lines.append(
            f"| {r['variant']} | {r['teacher']} | {r['seq']} | {r['mb']} | {r['tokens']} | {_fmt(r['dskd_ms'], '.1f')} "
            f"| {_fmt(r['sft_ms'], '.1f')} | {_fmt(r['teacher_ms'], '.1f')} | {_fmt(r.get('time_ratio'), '.3f')} "
            f"| {_yn(r.get('time_ok'))} | {_fmt(r.get('mem_extra_gb'), '+.3f')} | {_yn(r.get('mem_ok'))} |"
        )
    return "\n".join(lines) + "\n"


def _yn(x: bool | None) -> str:
    """A target's verdict for the table (a missed one stands out in bold)."""
    return "-" if x is None else ("yes" if x else "**NO**")


def versions() -> dict[str, str]:
    """The versions of the libraries the timings depend on, for the report."""
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    for name in ("transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            out[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001
            out[name] = f"unavailable ({type(exc).__name__})"
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the defaults that depend on the device and ``--tiny`` filled in."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU dry run)")
    ap.add_argument(
        "--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU"
    )
    ap.add_argument("--teacher-quant", choices=["4bit", "8bit", "none"], default="4bit")
    ap.add_argument("--seq", type=int, nargs="+", default=None, help="default 1024 2048 (tiny: 32 64)")
    ap.add_argument("--mb", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument(
        "--modes",
        nargs="+",
        default=["sft", "teacher_fwd", "dskd_same", "dskd_cma"],
        choices=["sft", "teacher_fwd", "dskd_same", "dskd_cma"],
    )
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing on the student")
    ap.add_argument(
        "--cma-teacher-ratio",
        type=float,
        default=1.0,
        help="teacher tokens per student token in CMA (Qwen's tokenizer is denser than Llama 2's)",
    )
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument(
        "--max-point-s", type=float, default=4.0, help="stop timing a point after this (min 2 iters)"
    )
    ap.add_argument("--time-budget", type=float, default=1e9, help="seconds for everything, models included")
    ap.add_argument("--model-dir", default=None, help="default /tmp/dskd_bench_models[_tiny]")
    ap.add_argument("--make-only", action="store_true", help="write the random models and exit")
    ap.add_argument("--tokenizers", action="store_true", help="add tiny tokenizers (for axolotl runs)")
    ap.add_argument("--out", default=None, help="default $OUT or ./outputs/step_bench")
    args = ap.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    if args.seq is None:
        args.seq = [32, 64] if args.tiny else [1024, 2048]
    if args.model_dir is None:
        args.model_dir = "/tmp/dskd_bench_models" + ("_tiny" if args.tiny else "")
    if args.out is None:
        args.out = os.environ.get("OUT") or str(REPO / "outputs" / "step_bench")
    return args


def main(argv: list[str] | None = None) -> int:
    """Build the models, measure every mode at every point, then report; 1 where a point failed."""
    args = parse_args(argv)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[bench {time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            log("CUDA requested but torch.cuda.is_available() is False")
            return 2
        torch.backends.cuda.matmul.allow_tf32 = True
    bench = Bench(args, log)
    log(
        f"device={bench.info['device']} dtype={args.dtype} teacher={args.teacher_quant} "
        f"seq={args.seq} mb={args.mb} modes={args.modes} {bench.info['versions']}"
    )
    bench.build()
    if args.make_only:
        log("models written (--make-only)")
        return 0
    bench.run()
    write_report(bench, time.perf_counter() - t0, log)
    return report_failures(bench.points, log)


def write_report(bench: Bench, elapsed_s: float, log) -> None:
    """Write ``step_bench.json`` and ``step_bench.md`` under ``--out`` and print the markdown."""
    summary = bench.summary()
    report = {
        "meta": {"args": vars(bench.args), "elapsed_s": round(elapsed_s, 1), **bench.info},
        "targets": {
            "time_ratio_max": TIME_TARGET,
            "mem_extra_max_gb": MEM_TARGET_BYTES / GB,
            "mem_at_tokens_per_micro_batch": MEM_TARGET_TOKENS,
        },
        "results": [asdict(p) for p in bench.points],
        "summary": summary,
    }
    out = Path(bench.args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_bench.json").write_text(json.dumps(report, indent=2))
    md = markdown(bench, summary)
    (out / "step_bench.md").write_text(md)
    print(md)
    log(f"wrote {out / 'step_bench.json'} and {out / 'step_bench.md'}")


def report_failures(points: list[Point], log) -> int:
    """Log the points that failed (an error or a non-finite loss): the exit status, 1 if any."""
    bad = [p for p in points if p.status in ("error", "nonfinite")]
    for p in bad:
        log(f"FAILED point: {_point_line(p)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
