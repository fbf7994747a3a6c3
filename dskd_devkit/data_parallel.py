"""DSKDTrainer under data parallelism on the CPU: scenarios for ``torchrun`` (gloo).

``torchrun --standalone --nproc_per_node 2 -m dskd_devkit.data_parallel ASSETS_JSON OUT_DIR`` runs every
scenario in one launch and writes, per rank, what the tests compare (``OUT_DIR/<scenario>/
rank<r>.json`` and ``.safetensors``): the logged losses, the skipped micro-batch count, the
projectors and the LoRA weights. :func:`run_scenario` also runs a scenario in one process (with
gradient accumulation in place of the second rank), the reference the tests compare against.

The trainer is driven through HF's Trainer directly (as Axolotl's builder makes it), on the
tiny models of the ``assets`` fixture, with a float32 teacher and a LoRA student whose ``lora_B``
starts non-zero, so every trainable tensor moves from the first step.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

ROWS = 8
TRIGGER = "Ω"
"""Text whose teacher embeddings the ``skip`` scenario sets to inf (same vocabulary)."""

SCENARIOS: dict[str, dict[str, Any]] = {
    "same_vocab": {"student": "student", "max_steps": 4, "save_steps": 2},
    "cma": {"student": "student_sp", "max_steps": 3},
    "resume": {"student": "student", "max_steps": 4, "resume": "same_vocab"},
    "skip": {"student": "student", "max_steps": 3, "broken_row": 3, "dskd_on_nonfinite": "skip"},
}
"""``broken_row``: the row (in data order) whose teacher states are non-finite: with two ranks and
micro-batch 1, step 2's row on rank 1 only."""


def rows(tokenizer: Any, broken_row: int | None) -> list[dict[str, list[int]]]:
    """Task rows of different lengths, in the order the sequential sampler serves them."""
    from dskd_devkit.task import arithmetic_rows, encode_row

    out = []
    for i, row in enumerate(arithmetic_rows(ROWS, seed=11)):
        if i == broken_row:
            row = {**row, "input": f"{row['input']} {TRIGGER}"}
        ids, labels = encode_row(tokenizer, row)
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return out


def run_scenario(name: str, assets: dict[str, str], out: Path, *, world_size: int) -> dict[str, Any]:
    """One scenario with ``world_size`` ranks of micro-batch 1 (``world_size == 1``: one
    process accumulating 2 micro-batches per step). Returns what :func:`main` writes."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

    from axolotl_dskd.core.loss import Projectors
    from axolotl_dskd.core.teacher import load_teacher
    from axolotl_dskd.core.teacher_tokens import TeacherTokenBuilder
    from axolotl_dskd.integration.collator import DSKDDataCollator
    from dskd_devkit.axolotl_runs import dskd_trainer

    spec = SCENARIOS[name]
    cross = spec["student"] == "student_sp"
    tokenizer = AutoTokenizer.from_pretrained(assets[spec["student"]])
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # as Axolotl sets it
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(assets[spec["student"]], dtype=torch.float32)
    student = get_peft_model(student, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for param_name, p in student.named_parameters():
            if "lora_B" in param_name:
                p.normal_(0, 0.05)
    teacher = load_teacher(assets["teacher"], device=torch.device("cpu"), dtype=torch.float32)
    if "broken_row" in spec:  # the teacher's embeddings of TRIGGER's tokens are inf
        with torch.no_grad():
            teacher.get_input_embeddings().weight[tokenizer.encode(TRIGGER, add_special_tokens=False)] = (
                math.inf
            )
    projectors = Projectors(student.config.hidden_size, teacher.config.hidden_size, cross_tokenizer=cross)
    if cross:
        builder = TeacherTokenBuilder(
            tokenizer, AutoTokenizer.from_pretrained(assets["teacher"]), max_length=512
        )
        collator = DSKDDataCollator(tokenizer=tokenizer, padding=True, teacher_tokens=builder)
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    run_dir = out / (spec.get("resume") or name) / f"world{world_size}"
    trainer = dskd_trainer(
        student, teacher, projectors,
        train_dataset=Dataset.from_list(rows(tokenizer, spec.get("broken_row"))), data_collator=collator,
        output_dir=str(run_dir), per_device_train_batch_size=1, gradient_accumulation_steps=3 - world_size,
        max_steps=spec["max_steps"], learning_rate=1e-2, optim="adamw_torch", lr_scheduler_type="constant",
        max_grad_norm=1.0, save_strategy="steps" if "save_steps" in spec else "no",
        save_steps=spec.get("save_steps", 500), curriculum_sampling=True,
        dskd_cross_tokenizer=cross, dskd_on_nonfinite=spec.get("dskd_on_nonfinite", "stop"),
        **({"ddp_backend": "gloo"} if world_size > 1 else {}),
    )  # fmt: skip
    resume = str(run_dir / "checkpoint-2") if "resume" in spec else None
    trainer.train(resume_from_checkpoint=resume)
    losses = {row["step"]: row["loss"] for row in trainer.state.log_history if "loss" in row}
    return {
        "losses": losses,
        "nonfinite_skipped": trainer.nonfinite_skipped,
        "projectors": {k: v.detach().clone() for k, v in trainer.projectors.state_dict().items()},
        "lora": {k: v.detach().clone() for k, v in student.named_parameters() if "lora_" in k},
    }


def write_result(result: dict[str, Any], folder: Path, rank: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"projectors.{k}": v for k, v in result["projectors"].items()}
    tensors.update({f"lora.{k}": v for k, v in result["lora"].items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / f"rank{rank}.safetensors")
    scalars = {"losses": result["losses"], "nonfinite_skipped": result["nonfinite_skipped"]}
    (folder / f"rank{rank}.json").write_text(json.dumps(scalars))


def main(argv: list[str]) -> None:
    assets, out = json.loads(Path(argv[0]).read_text()), Path(argv[1])
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # AxolotlTrainer resets accelerate's state and rebuilds it from the environment: on a machine
    # without a GPU, only ACCELERATE_USE_CPU makes that a gloo data-parallel state (MULTI_CPU).
    # Without it the process group exists, yet every rank trains alone on all the data.
    os.environ["ACCELERATE_USE_CPU"] = "true"
    # HF's Trainer resumes the optimizer with map_location=args.device, which is "cpu:0" for a CPU
    # process group, a location torch.load does not know: read "cpu:N" as the CPU (GPUs never
    # see this, their devices are "cuda:N").
    torch.serialization.register_package(
        11, lambda _obj: None, lambda obj, location: obj if location.startswith("cpu:") else None
    )
    for name in SCENARIOS:
        write_result(run_scenario(name, assets, out, world_size=world_size), out / name, rank)


if __name__ == "__main__":
    main(sys.argv[1:])
