"""DSKD against SFT and vanilla KD on real pretrained teachers, in-process (not through Axolotl's CLI).

Student: a layer-pruned copy of SmolLM2-135M-Instruct (layers 0, 3, ..., 27 and 29: 11 of 30)
trained with LoRA (r 16 on every linear layer of the blocks; its tied embeddings / LM head
frozen, as a LoRA user's are). Teacher (``--teacher``, float32, frozen): ``smollm2``, the model
it was pruned from (one vocabulary), or ``qwen``, Qwen2.5-Coder-1.5B-Instruct (another tokenizer:
151,936 ids against 49,152; hidden 1536 against 576), which reads the student's ChatML rendering
re-tokenized (``dskd_teacher_chat_template: student``; both models are ChatML chat models) and is
paired with the student's positions as the plugin pairs them (:class:`TeacherTokenBuilder`).
Data: stdlib questions answered by their docstrings in SmolLM2's chat template
(:mod:`dskd_devkit.stdlib_qa`), answer tokens trained, a held-out split never trained on. The
teacher's final hidden states are computed once and cached (the teacher is frozen and reads the
same tokens every epoch, so this is the same loss). The student, its data and the SFT arm are the
same with both teachers.

Each arm runs the project's own loss (``dskd_loss`` / ``vanilla_kd_loss``, ``Projectors``,
``logit_equivalent_projectors``) with the trainer's optimizer layout: AdamW, the projectors in
their own group (``projector_lr``, default 1e-3), one gradient norm clipped over student and
projectors (``clip: separate``: each on its own, as ``dskd_grad_clip: separate``; ``joint``: one
norm over both). Each run appends one JSON line (held-out answer NLL per token and per byte, the
loss terms over the first 10 and last 20 steps, the spec) to ``benchmarks/results/real_pair.jsonl``
(``real_pair_qwen.jsonl`` with Qwen), and with ``--rouge-seeds`` the ROUGE-L of answers sampled
for the held-out questions (the paper's protocol, :mod:`axolotl_dskd.evaluate`; about 2 minutes
per generation seed); the table ``real_pair.md`` beside it is rewritten from all the
lines there (``--table-only``: only that), and the summary ``real_pair_summary.md`` from both. One run
takes 4 to 7 minutes on one CPU core with SmolLM2, 19 to 24 with Qwen (its 151,936-row head; two
runs side by side on two cores); Qwen's hidden states take 31 minutes on two cores (34 on one),
once, and 444 MiB. ``--speed`` times arms one after another in one process instead.

    .venv/bin/python benchmarks/real_pair_sweep.py --arms sft vanilla_kd dskd_default --seeds 0 1 2 \
        --rouge-seeds 10 20
    .venv/bin/python benchmarks/real_pair_sweep.py --teacher qwen --arms uld dskd_default --seeds 0
    .venv/bin/python benchmarks/real_pair_sweep.py --teacher qwen --speed --steps 4 \
        --arms sft dskd_default dskd_default_live_teacher
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from axolotl_dskd.core.loss import (
    IGNORE_INDEX,
    DSKDLossConfig,
    Projectors,
    dskd_loss,
    uld_loss,
    vanilla_kd_loss,
)
from axolotl_dskd.core.projector_init import logit_equivalent_projectors
from axolotl_dskd.core.teacher_tokens import TeacherTokenBuilder
from axolotl_dskd.core.vocabulary import shared_vocabulary
from dskd_devkit.real_models import CACHE, prune_layers, qwen_dir, smollm2
from dskd_devkit.stdlib_qa import chat_prompt, encode, heldout_nll, split, stdlib_pairs
from dskd_devkit.training import pad_batch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS = {"smollm2": RESULTS_DIR / "real_pair.jsonl", "qwen": RESULTS_DIR / "real_pair_qwen.jsonl"}

HALF = {"kd_rate": 0.5}
"""The paper's kd_rate (the plugin's default was 0.5 until these runs chose 1/3)."""
ARMS: dict[str, dict[str, Any]] = {
    "sft": {"method": "sft"},
    "vanilla_kd": {"method": "vanilla_kd", "loss": HALF},
    "vanilla_kd_T1": {"method": "vanilla_kd", "loss": {**HALF, "temperature": 1.0}},
    "vanilla_kd_r033": {"method": "vanilla_kd", "loss": {"kd_rate": 0.3333}},
    "vanilla_kd_r067": {"method": "vanilla_kd", "loss": {"kd_rate": 0.6667}},
    "uld": {"method": "uld", "loss": HALF},
    "uld_r033": {"method": "uld", "loss": {"kd_rate": 0.3333}},
    "dskd_default": {"method": "dskd"},
    "dskd_default_live_teacher": {"method": "dskd", "live_teacher": True},
    "dskd_paper": {"method": "dskd", "loss": HALF, "init": "random", "clip": "joint"},
    "dskd_cma_paper": {
        "method": "dskd",
        "loss": {**HALF, "token_alignment": "cma"},
        "init": "random",
        "clip": "joint",
    },
    "dskd_cma": {"method": "dskd", "loss": {"token_alignment": "cma"}},
    "dskd_r050": {"method": "dskd", "loss": HALF},
    "dskd_r033": {"method": "dskd", "loss": {"kd_rate": 0.3333}},
    "dskd_r010": {"method": "dskd", "loss": {"kd_rate": 0.1}},
    "dskd_T1": {"method": "dskd", "loss": {**HALF, "temperature": 1.0}},
    "dskd_r033_T1": {"method": "dskd", "loss": {"kd_rate": 0.3333, "temperature": 1.0}},
    "dskd_joint_clip": {"method": "dskd", "loss": HALF, "clip": "joint"},
    "dskd_joint_clip_plr1e-5": {"method": "dskd", "loss": HALF, "clip": "joint", "projector_lr": 1e-5},
    "dskd_frozen_projectors": {"method": "dskd", "loss": HALF, "projector_lr": 0.0},
    "dskd_r033_frozen_projectors": {"method": "dskd", "loss": {"kd_rate": 0.3333}, "projector_lr": 0.0},
    "dskd_pinv_identity": {"method": "dskd", "loss": HALF, "pinv_identity": True},
    "dskd_mask_everywhere": {"method": "dskd", "loss": {**HALF, "kd_student_accuracy_mask": "everywhere"}},
    "dskd_r033_shared": {
        "method": "dskd",
        "loss": {"kd_rate": 0.3333, "student_space_target": "shared_vocabulary"},
    },
    "dskd_r033_kdt0": {"method": "dskd", "loss": {"kd_rate": 0.3333, "kd_teacher_weight": 0.0}},
    "dskd_r033_shared_kdt0": {
        "method": "dskd",
        "loss": {"kd_rate": 0.3333, "student_space_target": "shared_vocabulary", "kd_teacher_weight": 0.0},
    },
    "dskd_r033_mask_everywhere": {
        "method": "dskd",
        "loss": {"kd_rate": 0.3333, "kd_student_accuracy_mask": "everywhere"},
    },
    "dskd_r033_s2t_closed_form": {"method": "dskd", "loss": {"kd_rate": 0.3333}, "frozen": ["s2t"]},
    "dskd_r033_t2s_teacher_top1": {
        "method": "dskd",
        "loss": {"kd_rate": 0.3333},
        "t2s_target": "teacher_top1",
    },
}
"""Name -> method, loss settings (``loss``, over :class:`DSKDLossConfig`'s defaults: the plugin's,
but for the paper's projected target and teacher-space weight, which the plugin's ``auto`` keys
replace across tokenizers, see :data:`HEADLINE`), projector ``init``
(``pinv``, as the plugin's default, or ``random``), ``projector_lr`` (1e-3), ``clip``
(``separate``, as the plugin's default, or ``joint``), ``pinv_identity`` (pair every id with
itself instead of by text), ``live_teacher`` (the teacher's forward each step, not its cached
states), ``frozen`` (projectors held at their start: DSKDv2 computes s2t each step in closed form
from the student's LM head, W_s pinv(W_t) over the shared tokens, which is ``pinv``'s s2t; LoRA
leaves that head frozen, so here it is s2t held at ``pinv``), ``t2s_target`` (``teacher_top1``,
one vocabulary: t2s_ce trains the projected teacher toward the teacher's own top-1, DSKDv2's
``t2s_labels``, instead of the label)."""


def teacher_states(teacher: Any, inputs: list[list[int]], path: Path) -> list[torch.Tensor]:
    """The teacher's final hidden states of each input, computed once per data version."""
    if path.is_file():
        return torch.load(path)
    states = []
    with torch.no_grad():
        for ids in inputs:
            states.append(teacher.model(input_ids=torch.tensor([ids])).last_hidden_state[0].float())
    torch.save(states, path)
    return states


def teacher_readings(
    builder: TeacherTokenBuilder, examples: list
) -> list[tuple[list[int], list[int], list[int]]]:
    """Per example, the teacher's ``(input_ids, labels, token_alignment)`` as the plugin's
    collator makes them from the student's tokens."""
    readings = []
    for ids, labels, _ in examples:
        out = builder({"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels])})
        readings.append(
            tuple(out[k][0].tolist() for k in ("teacher_input_ids", "teacher_labels", "token_alignment"))
        )
    return readings


def pruned_student(model: Any, rank: int, seed: int) -> Any:
    from peft import LoraConfig, get_peft_model

    student = prune_layers(copy.deepcopy(model))
    torch.manual_seed(seed)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets)
    return get_peft_model(student, config)


def padded(rows: list[list[int]], value: int) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), value)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out


def teacher_batch(ctx: dict[str, Any], idx: list[int], live: bool = False) -> dict[str, torch.Tensor]:
    """The teacher side of a batch: hidden states (cached, or ``live``: the teacher's forward
    pass now), and with another tokenizer its ids, labels and each student position's exact
    partner (right-padded as the collator pads)."""
    out = {}
    if ctx["readings"] is not None:
        readings = [ctx["readings"][i] for i in idx]
        out["teacher_input_ids"] = padded([r[0] for r in readings], ctx["teacher_pad"])
        out["teacher_labels"] = padded([r[1] for r in readings], IGNORE_INDEX)
        out["token_alignment"] = padded([r[2] for r in readings], -1)
    if live:
        inputs = [ctx["readings"][i][0] if ctx["readings"] else ctx["train"][i][0] for i in idx]
        with torch.no_grad():
            out["teacher_hidden"] = (
                ctx["teacher"]
                .model(
                    input_ids=padded(inputs, ctx["teacher_pad"]),
                    attention_mask=padded([[1] * len(x) for x in inputs], 0),
                )
                .last_hidden_state
            )
        return out
    states = [ctx["states"][i] for i in idx]
    out["teacher_hidden"] = torch.zeros(len(idx), max(len(h) for h in states), states[0].shape[-1])
    for row, h in enumerate(states):
        out["teacher_hidden"][row, : len(h)] = h
    return out


def teacher_top1(teacher_hidden: torch.Tensor, t_head: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The teacher's most likely next token at every trained position, in the labels' convention."""
    trained = labels[:, 1:] != IGNORE_INDEX
    out = labels.clone()
    with torch.no_grad():
        out[:, 1:][trained] = (teacher_hidden[:, :-1][trained].float() @ t_head.float().T).argmax(-1)
    return out


def heldout_rouge(student: Any, ctx: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """ROUGE-L of answers sampled for the held-out questions against their docstrings, the paper's
    protocol (:mod:`axolotl_dskd.evaluate`: sampling at temperature 1, one pass per generation
    seed), the first ``--rouge-tokens`` tokens of each answer."""
    from axolotl_dskd.evaluate import Example, SamplingConfig, evaluate

    tokenizer = ctx["generation_tok"]
    examples = [Example(chat_prompt(tokenizer, p), [p["answer"]]) for p in ctx["heldout_pairs"]]
    student.eval()
    scores = evaluate(
        student, tokenizer, examples, seeds=args.rouge_seeds,
        sampling=SamplingConfig(max_new_tokens=args.rouge_tokens), batch_size=16, progress=False,
    )  # fmt: skip
    student.train()
    return {"mean": scores["mean"], "per_seed": scores["per_seed"], "max_new_tokens": args.rouge_tokens}


def run(arm: str, seed: int, ctx: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    spec = {**ARMS.get(arm, {}), **ctx["overrides"].get(arm, {})}
    train, heldout, cross = ctx["train"], ctx["heldout"], ctx["readings"] is not None
    head, t_head = ctx["student_model"].lm_head.weight.detach(), ctx["teacher"].lm_head.weight.detach()
    student = pruned_student(ctx["student_model"], args.rank, seed)
    base = student.base_model.model
    config = DSKDLossConfig(**{"cross_tokenizer": cross, **spec.get("loss", {})})
    projectors = None
    if spec["method"] == "dskd":
        torch.manual_seed(seed)
        projectors = Projectors(head.shape[1], t_head.shape[1], cross_tokenizer=cross)
        if spec.get("init", "pinv") == "pinv":
            s_ids, t_ids = ctx["shared_vocabulary"]
            if spec.get("pinv_identity"):
                s_ids = t_ids = torch.arange(head.shape[0])
            logit_equivalent_projectors(projectors, head, t_head, s_ids, t_ids)
    params = [p for p in student.parameters() if p.requires_grad]
    groups = [{"params": params, "lr": args.lr}]
    if projectors is not None:
        for name, p in projectors.named_parameters():
            p.requires_grad_(name.split(".")[0] not in spec.get("frozen", []))
        trained = [p for p in projectors.parameters() if p.requires_grad]
        groups.append({"params": trained, "lr": spec.get("projector_lr", 1e-3)})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    steps, warmup = args.steps, max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    rng = random.Random(seed)
    order: list[int] = []
    log: list[dict[str, float]] = []
    started = time.time()
    for step in range(steps):
        if len(order) < args.batch:
            more = list(range(len(train)))
            rng.shuffle(more)
            order += more
        idx, order = order[: args.batch], order[args.batch :]
        batch = pad_batch([train[i][:2] for i in idx], ctx["pad"])
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
        h_s = base.model(input_ids=ids, attention_mask=mask).last_hidden_state
        if spec["method"] == "sft":
            targets = labels[:, 1:]
            logits = h_s[:, :-1][targets != IGNORE_INDEX] @ head.T
            loss = F.cross_entropy(logits.float(), targets[targets != IGNORE_INDEX])
            metrics = {"ce": loss.detach()}
        else:
            t = teacher_batch(ctx, idx, live=spec.get("live_teacher", False))
            common = {"student_hidden": h_s, "student_lm_head": head, "student_labels": labels,
                      "teacher_hidden": t["teacher_hidden"], "teacher_lm_head": t_head, "config": config}  # fmt: skip
            t_labels = t.get("teacher_labels", labels)
            if spec["method"] == "vanilla_kd":
                out = vanilla_kd_loss(**common)
            elif spec["method"] == "uld":
                out = uld_loss(**common, teacher_labels=t_labels)
            elif cross:
                out = dskd_loss(projectors, **common, teacher_labels=t_labels, student_input_ids=ids,
                                teacher_input_ids=t["teacher_input_ids"], token_alignment=t["token_alignment"],
                                student_embeddings=base.model.embed_tokens.weight.detach(),
                                teacher_embeddings=ctx["teacher"].model.embed_tokens.weight.detach(),
                                shared_vocabulary=ctx["shared_vocabulary"])  # fmt: skip
            else:
                t2s_labels = (
                    teacher_top1(t["teacher_hidden"], t_head, labels) if spec.get("t2s_target") else None
                )
                out = dskd_loss(projectors, **common, teacher_labels=labels, t2s_labels=t2s_labels)
            loss, metrics = out.loss, out.metrics
        loss.backward()
        clipped = params + ([] if projectors is None else list(projectors.parameters()))
        if spec.get("clip", "separate") == "separate":
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            if projectors is not None:
                torch.nn.utils.clip_grad_norm_(list(projectors.parameters()), 1.0)
        else:
            gnorm = torch.nn.utils.clip_grad_norm_(clipped, 1.0)
        s_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        entry = {k: float(v) for k, v in metrics.items()}
        entry["loss"], entry["student_grad_norm"] = loss.item(), s_norm
        if spec.get("clip", "separate") != "separate":
            entry["grad_norm"] = float(gnorm)
        log.append(entry)
        if args.verbose and (step + 1) % 25 == 0:
            print(f"  {arm} s{seed} step {step + 1} {json.dumps({k: round(v, 3) for k, v in entry.items()})}"
                  f" {time.time() - started:.0f}s", flush=True)  # fmt: skip
    train_s = time.time() - started
    result = {"arm": arm, "seed": seed, "steps": steps, **heldout_nll(student, heldout, ctx["pad"])}
    if args.rouge_seeds:
        result["rouge_l"] = heldout_rouge(student, ctx, args)
    keys = log[-1].keys()
    result["first10"] = {k: round(sum(e[k] for e in log[:10]) / len(log[:10]), 4) for k in keys}
    result["last20"] = {k: round(sum(e[k] for e in log[-20:]) / len(log[-20:]), 4) for k in keys}
    result["train_s"] = round(train_s, 1)
    result["spec"] = spec
    return result


def _runs(results: Path) -> dict[str, dict[int, dict[str, Any]]]:
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    if results.is_file():
        for line in results.read_text().splitlines():
            run_ = json.loads(line)
            runs.setdefault(run_["arm"], {})[run_["seed"]] = run_
    return runs


def rouge_cell(runs: list[dict[str, Any]]) -> str:
    """Mean ROUGE-L over the runs scored by it, and how many: runs from before ``--rouge-seeds``
    have none."""
    scores = [r["rouge_l"]["mean"] for r in runs if "rouge_l" in r]
    return f"{statistics.mean(scores):.2f} ({len(scores)})" if scores else ""


def write_table(results: Path) -> Path:
    """``real_pair.md``: held-out answer NLL per arm (mean over seeds, and each seed), from every
    run in ``results`` (the last run of an arm and seed counts)."""
    runs = _runs(results)
    rows = [
        "| Arm | Seeds | NLL/token | NLL/byte | Per seed (NLL/token) | ROUGE-L (runs) | Spec |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, by_seed in sorted(
        runs.items(), key=lambda kv: statistics.mean(r["nll_token"] for r in kv[1].values())
    ):
        seeds = sorted(by_seed)
        nll_t = [by_seed[s_]["nll_token"] for s_ in seeds]
        nll_b = [by_seed[s_]["nll_byte"] for s_ in seeds]
        per_seed = ", ".join(f"{s_}: {t:.3f}" for s_, t in zip(seeds, nll_t))
        spec = json.dumps(by_seed[seeds[0]]["spec"], sort_keys=True).replace("|", "\\|")
        rows.append(
            f"| {arm} | {len(seeds)} | {statistics.mean(nll_t):.3f} | {statistics.mean(nll_b):.3f} | {per_seed} "
            f"| {rouge_cell(list(by_seed.values()))} | `{spec}` |"
        )
    out = results.with_suffix(".md")
    out.write_text("\n".join(rows) + "\n")
    return out


def qwen_teacher() -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = qwen_dir()
    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32
    ).eval(), AutoTokenizer.from_pretrained(folder)


def qwen_heldout_nll(teacher: Any, t_tok: Any, pairs: list, max_len: int) -> dict[str, float]:
    """The teacher's own held-out answer NLL per byte (its tokens, the same answers and ChatML
    prompt): the bar a student of another vocabulary is compared with, per byte."""
    examples = [encode(t_tok, p, max_len) for p in pairs]
    return heldout_nll(teacher, examples, t_tok.pad_token_id, batch_size=4)


_BASELINES = {
    "sft": "SFT (no teacher)",
    "dskd_paper": "DSKD, the paper's settings",
}
HEADLINE = {
    "smollm2": {
        **_BASELINES,
        "vanilla_kd": "vanilla KD (logits, one vocabulary), kd_rate 0.5",
        "vanilla_kd_r033": "vanilla KD, kd_rate 1/3",
        "dskd_r050": "DSKD, the plugin's defaults but kd_rate 0.5",
        "dskd_r033": "DSKD, the plugin's defaults (projected target, teacher-space term)",
        "dskd_r033_shared": "DSKD, the plugin's defaults but dskd_student_space_target: shared_vocabulary",
        "dskd_r033_kdt0": "DSKD, the plugin's defaults but dskd_kd_teacher_weight: 0",
        "dskd_r033_s2t_closed_form": "DSKD, the plugin's defaults but s2t held at pinv (DSKDv2's closed-form s2t)",
        "dskd_r033_t2s_teacher_top1": "DSKD, the plugin's defaults but t2s_ce toward the teacher's top-1 (DSKDv2)",
    },
    "qwen": {
        **_BASELINES,
        "uld": "ULD (sorted probabilities, any vocabularies), kd_rate 0.5",
        "uld_r033": "ULD, kd_rate 1/3",
        "dskd_cma_paper": "DSKD, the paper's settings (CMA)",
        "dskd_cma": "DSKD, the plugin's defaults but CMA",
        "dskd_r050": "DSKD, the plugin's defaults but kd_rate 0.5 and the projected target",
        "dskd_r033": "DSKD, the plugin's defaults but the projected target, teacher-space term",
        "dskd_r033_shared": "DSKD, the plugin's defaults but dskd_kd_teacher_weight: 1",
        "dskd_r033_shared_kdt0": "DSKD, the plugin's defaults (shared-vocabulary target, no teacher space)",
    },
}
"""Per teacher, the arms of the summary table, in its order, with what they are. The plugin's
``auto`` keys are the paper's projected target and teacher-space term with one vocabulary and
the shared-vocabulary target without the teacher's space across tokenizers, so its defaults are
``dskd_r033`` with SmolLM2 and ``dskd_r033_shared_kdt0`` with Qwen (an arm's ``loss`` is over
:class:`DSKDLossConfig`'s defaults, the paper's target and weight)."""
PAIRS = {
    "smollm2": "SmolLM2-135M-Instruct (same vocabulary)",
    "qwen": "Qwen2.5-Coder-1.5B-Instruct (other tokenizer)",
}


def write_summary(out: Path = RESULTS_DIR / "real_pair_summary.md") -> Path:
    """``real_pair_summary.md``: held-out answer NLL per UTF-8 byte (comparable across tokenizers) of
    the headline arms with each teacher, mean, spread and per seed, and the change against SFT on
    the same seed. The student, its data and SFT do not depend on the teacher: the SFT runs are
    those of ``real_pair.jsonl``."""
    sft = _runs(RESULTS["smollm2"]).get("sft", {})
    rows = [
        "| Teacher | Arm | Seeds | NLL/byte | Spread | Per seed | vs SFT, per seed | ROUGE-L (runs) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for teacher, label in PAIRS.items():
        runs = {**_runs(RESULTS[teacher]), "sft": sft}
        if "teacher" in runs:
            rows.append(f"| {label} | the teacher itself | | {runs['teacher'][0]['nll_byte']:.4f} | | | | |")
        for arm, what in HEADLINE[teacher].items():
            if arm not in runs:
                continue
            seeds = sorted(runs[arm])
            nll = [runs[arm][s_]["nll_byte"] for s_ in seeds]
            delta = [
                f"{runs[arm][s_]['nll_byte'] - sft[s_]['nll_byte']:+.4f}"
                if s_ in sft and arm != "sft"
                else ""
                for s_ in seeds
            ]
            rows.append(
                f"| {label} | {what} | {len(seeds)} | {statistics.mean(nll):.4f} | {max(nll) - min(nll):.4f} "
                f"| {' / '.join(f'{x:.4f}' for x in nll)} | {' / '.join(delta).strip(' /')} "
                f"| {rouge_cell(list(runs[arm].values()))} |"
            )
    out.write_text("\n".join(rows) + "\n")
    return out


def write_speed(results: list[dict[str, Any]], teacher: str) -> Path:
    """``real_pair_speed_<teacher>.md``: seconds per optimizer step of each arm, measured in one
    process one after another, and as a ratio to SFT's."""
    base = next(r["train_s"] / r["steps"] for r in results if r["arm"] == "sft")
    rows = ["| Arm | Seconds per step | Ratio to SFT |", "|---|---|---|"]
    rows += [
        f"| {r['arm']} | {r['train_s'] / r['steps']:.2f} | {r['train_s'] / r['steps'] / base:.2f} |"
        for r in results
    ]
    out = RESULTS_DIR / f"real_pair_speed_{teacher}.md"
    out.write_text("\n".join(rows) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher", choices=list(RESULTS), default="smollm2")
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=144)
    parser.add_argument("--arm-json", default="{}", help='extra arms: {"name": {spec}}')
    parser.add_argument("--out", type=Path, help="results file; default: the teacher's")
    parser.add_argument("--table-only", action="store_true", help="rewrite the table from --out only")
    parser.add_argument(
        "--speed",
        action="store_true",
        help="time --arms (SFT first) on the first seed; write only the speed table",
    )
    parser.add_argument(
        "--rouge-seeds", nargs="*", type=int, default=[], help="also score sampled answers by ROUGE-L"
    )
    parser.add_argument("--rouge-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    args.out = args.out or RESULTS[args.teacher]
    if args.table_only:
        print(write_table(args.out).read_text())
        print(write_summary().read_text())
        return
    torch.set_num_threads(args.threads)
    student_model, tok = smollm2()
    teacher, t_tok = (student_model, tok) if args.teacher == "smollm2" else qwen_teacher()
    for p in [*student_model.parameters(), *teacher.parameters()]:
        p.requires_grad_(False)
    train_pairs, heldout_pairs = split(stdlib_pairs())
    train = [encode(tok, p, args.max_len) for p in train_pairs]
    heldout = [encode(tok, p, args.max_len) for p in heldout_pairs]
    if args.teacher == "smollm2":
        readings, teacher_inputs = None, [ids for ids, _, _ in train]
        states_file = CACHE / f"stdlib_teacher_states_{len(train)}_{args.max_len}.pt"
    else:
        readings = teacher_readings(TeacherTokenBuilder(tok, t_tok, max_length=4 * args.max_len), train)
        teacher_inputs = [r[0] for r in readings]
        states_file = CACHE / f"stdlib_qwen_states_{len(train)}_{args.max_len}.pt"
    started = time.time()
    states = teacher_states(teacher, teacher_inputs, states_file)
    print(
        f"teacher states: {time.time() - started:.0f}s, {states_file.stat().st_size / 2**20:.0f} MiB",
        flush=True,
    )
    extra = json.loads(args.arm_json)
    ARMS.update({k: v for k, v in extra.items() if k not in ARMS})
    ctx = {"student_model": student_model, "student_tok": tok, "teacher": teacher, "teacher_tok": t_tok,
           "train": train, "states": states, "readings": readings, "heldout": heldout,
           "heldout_pairs": heldout_pairs, "generation_tok": AutoTokenizer.from_pretrained(tok.name_or_path, padding_side="left"),
           "pad": tok.pad_token_id, "teacher_pad": t_tok.pad_token_id,
           "shared_vocabulary": shared_vocabulary(tok, t_tok),
           "overrides": {k: v for k, v in extra.items() if k in ARMS}}  # fmt: skip
    if args.speed:
        print(
            write_speed([run(arm, args.seeds[0], ctx, args) for arm in args.arms], args.teacher).read_text()
        )
        return
    if "teacher" not in _runs(args.out):
        teacher_row = {"arm": "teacher", "seed": 0, "spec": {"method": "the teacher itself"}}
        if args.teacher == "smollm2":
            teacher_row.update(heldout_nll(teacher, heldout, tok.pad_token_id))
        else:
            teacher_row.update(qwen_heldout_nll(teacher, t_tok, heldout_pairs, args.max_len))
        teacher_row["spec"].update(train_examples=len(train), heldout_examples=len(heldout))
        print(json.dumps(teacher_row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(teacher_row) + "\n")
    for seed in args.seeds:
        for arm in args.arms:
            result = run(arm, seed, ctx, args)
            print(json.dumps(result), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(result) + "\n")
            write_table(args.out)
            write_summary()


if __name__ == "__main__":
    main()
