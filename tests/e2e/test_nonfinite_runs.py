"""No silent failure in real training runs through Axolotl's CLI: a non-finite DSKD term stops
the run naming the term and step, or (``dskd_on_nonfinite: skip``) is skipped and counted."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from axolotl_dskd.core.projector_io import WEIGHTS_NAME
from dskd_devkit.axolotl_runs import assert_ok, dskd_config, run_train, training_logs

pytestmark = pytest.mark.e2e


def broken_copy(assets, folder: Path, breaks) -> Path:
    """A float32 copy of the fixture teacher, with ``breaks(model, tokenizer)`` applied."""
    model = AutoModelForCausalLM.from_pretrained(assets["teacher"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(assets["teacher"])
    with torch.no_grad():
        breaks(model, tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def broken_run(assets, teacher: Path, workdir: Path, **overrides):
    cfg = dskd_config(
        assets, workdir, dskd_teacher=str(teacher),
        dskd_teacher_load_in_4bit=False,  # a float32 teacher: its inf reaches the loss as is
        max_steps=2, save_steps=2, **overrides,
    )  # fmt: skip
    proc = run_train(cfg, workdir, timeout=420)
    return proc, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def stopped_cma_run(assets, tmp_path_factory):
    """A cross-tokenizer run with the default ``dskd_on_nonfinite`` (stop), whose teacher has
    one LM-head row of +inf: its logits of that token are inf or NaN on every row, so the
    teacher-space KD term is non-finite while its hidden states stay finite."""
    workdir = tmp_path_factory.mktemp("stop")

    def inf_head_row(model, _tokenizer):
        model.lm_head.weight[7] = math.inf

    teacher = broken_copy(assets, workdir / "teacher", inf_head_row)
    return broken_run(assets, teacher, workdir, student="student_sp")


def test_non_finite_term_stops_the_run_naming_term_and_step(stopped_cma_run):
    proc, log = stopped_cma_run
    assert proc.returncode != 0
    assert "FloatingPointError: DSKD: non-finite kd_teacher at step 1" in log, log[-4000:]
    assert "dskd_on_nonfinite: skip" in log  # what to set to go on anyway


def test_special_tokens_read_differently_are_reported_once_at_start(stopped_cma_run):
    """The teacher's ChatML markers are plain text to the sentencepiece student: said once,
    before training, with the tokens the other model makes of them."""
    _, log = stopped_cma_run
    assert log.count("can differ in meaning") == 1, log[-4000:]
    line = next(line for line in log.splitlines() if "can differ in meaning" in line)
    assert "'<|im_start|>' is plain text to the other model" in line
    assert "'<|im_end|>'" in line and "<0x7C>" in line  # the '|' byte token, as an example
    assert log.index("can differ in meaning") < log.index("non-finite kd_teacher")


def test_non_finite_micro_batches_are_skipped_and_counted(assets, tmp_path):
    """With dskd_on_nonfinite: skip, a micro-batch whose teacher output is non-finite is
    skipped and counted in the logged ``dskd/nonfinite_skipped``; the next, finite micro-batch
    trains as usual, and no NaN reaches the saved weights.

    The teacher breaks only on rows containing "Ω" (inf in the embeddings of its byte tokens,
    which no ASCII text uses); the first micro-batch has four such rows, the second none."""
    trigger = "Ω"

    def inf_embeddings(model, tokenizer):
        model.get_input_embeddings().weight[tokenizer.encode(trigger, add_special_tokens=False)] = math.inf

    teacher = broken_copy(assets, tmp_path / "teacher", inf_embeddings)
    rows = [{"instruction": "Add the two numbers.", "input": f"{a} plus {b}", "output": str(a + b)}
            for a, b in [(3, 4), (10, 5), (7, 7), (20, 1), (6, 2), (9, 9), (12, 8), (1, 30)]]  # fmt: skip
    for row in rows[:4]:
        row["input"] += f" {trigger}"
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))

    proc, log = broken_run(
        assets, teacher, tmp_path, dskd_on_nonfinite="skip",
        datasets=[{"path": str(data), "ds_type": "json", "type": "alpaca"}],
        shuffle_merged_datasets=False, curriculum_sampling=True,  # rows in file order
    )  # fmt: skip
    assert_ok(proc)
    first, second = training_logs(tmp_path / "output" / "checkpoint-2")
    assert first["dskd/nonfinite_skipped"] == 1 and first["loss"] == 0.0
    assert "dskd/kd_teacher" not in first  # the skipped micro-batch logs no DSKD terms
    assert second["dskd/nonfinite_skipped"] == 1  # the count so far, still reported
    assert second["loss"] > 0 and all(math.isfinite(second[f"dskd/{t}"]) for t in ("ce", "kd_teacher"))
    assert "at step 1; micro-batch skipped (1 so far)" in log
    adapter = load_file(tmp_path / "output" / "adapter_model.safetensors")
    projectors = load_file(tmp_path / "output" / WEIGHTS_NAME)
    for name, tensor in {**adapter, **projectors}.items():
        assert torch.isfinite(tensor).all(), name
