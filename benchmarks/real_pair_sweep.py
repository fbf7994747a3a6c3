"""Same-vocabulary diagnosis on a real pretrained teacher, in-process (not through Axolotl's CLI).

Teacher: SmolLM2-135M-Instruct (float32, frozen). Student: a layer-pruned copy of it (layers
0, 3, ..., 27 and 29: 11 of 30) trained with LoRA (r 16 on every linear layer of the blocks; its
tied embeddings / LM head frozen, as a LoRA user's are). Data: stdlib questions answered by their
docstrings in SmolLM2's chat template (:mod:`dskd_devkit.stdlib_qa`), answer tokens trained,
a held-out split never trained on. The teacher's final hidden states are computed once and cached
(the teacher is frozen and reads the same tokens every epoch, so this is the same loss).

Each arm runs the project's own loss (``dskd_loss`` / ``vanilla_kd_loss``, ``Projectors``,
``logit_equivalent_projectors``) with the trainer's optimizer layout: AdamW, the projectors in
their own group (``projector_lr``, default 1e-3), one gradient norm clipped over student and
projectors (``clip: separate``: each on its own, as ``dskd_grad_clip: separate``; ``joint``: one
norm over both). Each run appends one JSON line (held-out answer NLL per token and per byte, the
loss terms over the first 10 and last 20 steps, the spec) to ``benchmarks/results/real_pair.jsonl``;
the table ``real_pair.md`` beside it is rewritten from all the lines there (``--table-only``: only
that). One run takes 4 to 7 minutes on one CPU core.

    .venv/bin/python benchmarks/real_pair_sweep.py --arms sft vanilla_kd dskd_default --seeds 0 1 2
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

from axolotl_dskd.core.loss import IGNORE_INDEX, DSKDLossConfig, Projectors, dskd_loss, vanilla_kd_loss
from axolotl_dskd.core.projector_init import logit_equivalent_projectors
from axolotl_dskd.core.vocabulary import shared_vocabulary
from dskd_devkit.real_models import CACHE, smollm2
from dskd_devkit.stdlib_qa import split, stdlib_pairs

RESULTS = Path(__file__).resolve().parent / "results" / "real_pair.jsonl"

KEEP_LAYERS = (0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29)
# name -> method, loss settings, projector init, projector lr, extra switches
ARMS: dict[str, dict[str, Any]] = {
    "sft": {"method": "sft"},
    "vanilla_kd": {"method": "vanilla_kd"},
    "vanilla_kd_T1": {"method": "vanilla_kd", "loss": {"temperature": 1.0}},
    "vanilla_kd_r033": {"method": "vanilla_kd", "loss": {"kd_rate": 0.3333}},
    "vanilla_kd_r067": {"method": "vanilla_kd", "loss": {"kd_rate": 0.6667}},
    "dskd_paper": {"method": "dskd", "init": "random", "clip": "joint"},
    "dskd_joint_clip": {"method": "dskd", "clip": "joint"},
    "dskd_joint_clip_plr1e-5": {"method": "dskd", "clip": "joint", "projector_lr": 1e-5},
    "dskd_default": {"method": "dskd"},
    "dskd_T1": {"method": "dskd", "loss": {"temperature": 1.0}},
    "dskd_r033": {"method": "dskd", "loss": {"kd_rate": 0.3333}},
    "dskd_r033_T1": {"method": "dskd", "loss": {"kd_rate": 0.3333, "temperature": 1.0}},
    "dskd_frozen_projectors": {"method": "dskd", "projector_lr": 0.0},
    "dskd_pinv_identity": {"method": "dskd", "pinv_identity": True},
}
"""Name -> method, loss settings (``loss``), projector ``init`` (``pinv``, as the plugin's default,
or ``random``), ``projector_lr`` (1e-3), ``clip`` (``separate``, as the plugin's default, or
``joint``), ``pinv_identity`` (pair every id with itself instead of by text)."""


def encode(tokenizer: Any, pair: dict[str, str], max_len: int) -> tuple[list[int], list[int], int]:
    """``(input_ids, labels, answer_bytes)``: the chat-rendered question, the answer and
    ``<|im_end|>`` trained; ``answer_bytes`` counts the UTF-8 bytes of the trained tokens kept."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": pair["question"]}], add_generation_prompt=True, tokenize=False
    )
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    answer = tokenizer(pair["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt + answer)[:max_len]
    labels = ([IGNORE_INDEX] * len(prompt) + answer)[:max_len]
    kept = [t for t in labels if t != IGNORE_INDEX and t != tokenizer.eos_token_id]
    return ids, labels, len(tokenizer.decode(kept).encode())


def teacher_states(teacher: Any, examples: list, path: Path) -> list[torch.Tensor]:
    """The teacher's final hidden states of each example, computed once per data version."""
    if path.is_file():
        return torch.load(path)
    states = []
    with torch.no_grad():
        for ids, _, _ in examples:
            states.append(teacher.model(input_ids=torch.tensor([ids])).last_hidden_state[0].float())
    torch.save(states, path)
    return states


def pruned_student(teacher: Any, rank: int, seed: int) -> Any:
    from peft import LoraConfig, get_peft_model

    student = copy.deepcopy(teacher)
    layers = student.model.layers
    student.model.layers = torch.nn.ModuleList([layers[i] for i in KEEP_LAYERS])
    for new_index, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = new_index
    student.config.num_hidden_layers = len(KEEP_LAYERS)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in KEEP_LAYERS]
    torch.manual_seed(seed)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets)
    return get_peft_model(student, config)


def batch_of(examples: list, states: list | None, idx: list[int], pad_id: int):
    width = max(len(examples[i][0]) for i in idx)
    ids = torch.full((len(idx), width), pad_id)
    labels = torch.full((len(idx), width), IGNORE_INDEX)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    hidden = None if states is None else torch.zeros(len(idx), width, states[0].shape[-1])
    for row, i in enumerate(idx):
        x, y, _ = examples[i]
        ids[row, : len(x)], labels[row, : len(y)], mask[row, : len(x)] = torch.tensor(x), torch.tensor(y), 1
        if hidden is not None:
            hidden[row, : len(x)] = states[i]
    return ids, labels, mask, hidden


def heldout_nll(student: Any, examples: list, pad_id: int, batch_size: int = 16) -> dict[str, float]:
    nll, tokens, nbytes = 0.0, 0, 0
    student.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            idx = list(range(start, min(start + batch_size, len(examples))))
            ids, labels, mask, _ = batch_of(examples, None, idx, pad_id)
            logits = student(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            targets = labels[:, 1:]
            nll += F.cross_entropy(logits.transpose(1, 2), targets, reduction="sum").item()
            tokens += int((targets != IGNORE_INDEX).sum())
            nbytes += sum(examples[i][2] for i in idx)
    student.train()
    return {"nll_token": nll / tokens, "nll_byte": nll / nbytes}


def run(arm: str, seed: int, ctx: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    spec = {**ARMS.get(arm, {}), **ctx["overrides"].get(arm, {})}
    teacher, tokenizer, train, states, heldout = (
        ctx[k] for k in ("teacher", "tok", "train", "states", "heldout")
    )
    head = teacher.lm_head.weight.detach()
    student = pruned_student(teacher, args.rank, seed)
    base = student.base_model.model
    config = DSKDLossConfig(**spec.get("loss", {}))
    projectors = None
    if spec["method"] == "dskd":
        torch.manual_seed(seed)
        projectors = Projectors(head.shape[1], head.shape[1])
        if spec.get("init", "pinv") == "pinv":
            s_ids, t_ids = shared_vocabulary(tokenizer, tokenizer)
            if spec.get("pinv_identity"):
                s_ids = t_ids = torch.arange(head.shape[0])
            logit_equivalent_projectors(projectors, head, head, s_ids, t_ids)
        elif spec.get("init") == "identity":
            with torch.no_grad():
                for layer in (projectors.t2s, projectors.s2t):
                    layer.weight.copy_(torch.eye(head.shape[1]))
                    layer.bias.zero_()
    params = [p for p in student.parameters() if p.requires_grad]
    groups = [{"params": params, "lr": args.lr}]
    if projectors is not None:
        groups.append({"params": list(projectors.parameters()), "lr": spec.get("projector_lr", 1e-3)})
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
        ids, labels, mask, hidden_t = batch_of(train, states, idx, ctx["pad"])
        h_s = base.model(input_ids=ids, attention_mask=mask).last_hidden_state
        if spec["method"] == "sft":
            targets = labels[:, 1:]
            logits = h_s[:, :-1][targets != IGNORE_INDEX] @ head.T
            loss = F.cross_entropy(logits.float(), targets[targets != IGNORE_INDEX])
            metrics = {"ce": loss.detach()}
        elif spec["method"] == "vanilla_kd":
            out = vanilla_kd_loss(student_hidden=h_s, student_lm_head=head, student_labels=labels,
                                  teacher_hidden=hidden_t, teacher_lm_head=head, config=config)  # fmt: skip
            loss, metrics = out.loss, out.metrics
        else:
            out = dskd_loss(projectors, student_hidden=h_s, student_lm_head=head, student_labels=labels,
                            teacher_hidden=hidden_t, teacher_lm_head=head, config=config)  # fmt: skip
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
    keys = log[-1].keys()
    result["first10"] = {k: round(sum(e[k] for e in log[:10]) / len(log[:10]), 4) for k in keys}
    result["last20"] = {k: round(sum(e[k] for e in log[-20:]) / len(log[-20:]), 4) for k in keys}
    result["train_s"] = round(train_s, 1)
    result["spec"] = spec
    return result


def write_table(results: Path) -> Path:
    """``real_pair.md``: held-out answer NLL per arm (mean over seeds, and each seed), from every
    run in ``results`` (the last run of an arm and seed counts)."""
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for line in results.read_text().splitlines():
        run_ = json.loads(line)
        runs.setdefault(run_["arm"], {})[run_["seed"]] = run_
    rows = [
        "| Arm | Seeds | NLL/token | NLL/byte | Per seed (NLL/token) | Spec |",
        "|---|---|---|---|---|---|",
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
            f"| {arm} | {len(seeds)} | {statistics.mean(nll_t):.3f} | {statistics.mean(nll_b):.3f} | {per_seed} | `{spec}` |"
        )
    out = results.with_suffix(".md")
    out.write_text("\n".join(rows) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=144)
    parser.add_argument("--arm-json", default="{}", help='extra arms: {"name": {spec}}')
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--table-only", action="store_true", help="rewrite the table from --out only")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    if args.table_only:
        print(write_table(args.out).read_text())
        return
    torch.set_num_threads(1)
    teacher, tok = smollm2()
    for p in teacher.parameters():
        p.requires_grad_(False)
    train_pairs, heldout_pairs = split(stdlib_pairs())
    train = [encode(tok, p, args.max_len) for p in train_pairs]
    heldout = [encode(tok, p, args.max_len) for p in heldout_pairs]
    states = teacher_states(teacher, train, CACHE / f"stdlib_teacher_states_{len(train)}_{args.max_len}.pt")
    extra = json.loads(args.arm_json)
    ARMS.update({k: v for k, v in extra.items() if k not in ARMS})
    ctx = {"teacher": teacher, "tok": tok, "train": train, "states": states, "heldout": heldout,
           "pad": tok.pad_token_id, "overrides": {k: v for k, v in extra.items() if k in ARMS}}  # fmt: skip
    teacher_row = {"arm": "teacher", "seed": 0, **heldout_nll(teacher, heldout, tok.pad_token_id)}
    teacher_row["spec"] = {
        "method": "the teacher itself",
        "train_examples": len(train),
        "heldout_examples": len(heldout),
    }
    print(json.dumps(teacher_row), flush=True)
    if not args.out.is_file() or '"arm": "teacher"' not in args.out.read_text():
        with open(args.out, "a") as f:
            f.write(json.dumps(teacher_row) + "\n")
    for seed in args.seeds:
        for arm in args.arms:
            result = run(arm, seed, ctx, args)
            print(json.dumps(result), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(result) + "\n")
            write_table(args.out)


if __name__ == "__main__":
    main()
