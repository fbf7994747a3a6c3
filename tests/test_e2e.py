"""End to end through Axolotl's own CLI, as users run it: tiny local models, a 4-bit teacher
quantized by bitsandbytes on the CPU, a LoRA (or full) student."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import assert_ok, dskd_config, run_train, training_logs

pytestmark = pytest.mark.e2e

DSKD_METRICS = ("dskd/ce", "dskd/kd_student", "dskd/kd_teacher", "dskd/t2s_ce", "dskd/t2s_acc")


def _losses(checkpoint: Path) -> dict[int, float]:
    return {row["step"]: float(row["loss"]) for row in training_logs(checkpoint)}


def test_same_vocab_lora_run_logs_metrics_and_saves_projectors(assets, tmp_path):
    """The canonical plugin name, a 4-bit teacher: every DSKD term is logged, projectors land in
    every checkpoint and in output_dir with their shapes, and resume continues the loss curve."""
    cfg = dskd_config(assets, tmp_path, max_steps=6, save_steps=3)
    assert_ok(run_train(cfg, tmp_path))
    out = tmp_path / "output"
    logs = training_logs(out / "checkpoint-6")
    assert len(logs) == 6
    for row in logs:
        for metric in DSKD_METRICS:
            assert metric in row, f"{metric} missing from {row}"
        assert torch.isfinite(torch.tensor(float(row["loss"])))
    for folder in (out / "checkpoint-3", out / "checkpoint-6", out):
        weights = load_file(folder / "dskd_projectors.safetensors")
        assert set(weights) == {"t2s.weight", "t2s.bias", "s2t.weight", "s2t.bias"}
        meta = json.loads((folder / "dskd_projectors.json").read_text())
        assert meta["shapes"]["t2s.weight"] == [64, 128]  # student d=64, teacher d=128
    # projectors are trained: the saved ones moved between checkpoints
    assert not torch.equal(
        load_file(out / "checkpoint-3" / "dskd_projectors.safetensors")["t2s.weight"],
        load_file(out / "checkpoint-6" / "dskd_projectors.safetensors")["t2s.weight"],
    )
    full_run = _losses(out / "checkpoint-6")

    # resume from checkpoint-3 (as after a crash): steps 4-6 repeat the uninterrupted run
    shutil.rmtree(out / "checkpoint-6")
    resumed = dskd_config(assets, tmp_path, max_steps=6, save_steps=3,
                          resume_from_checkpoint=str(out / "checkpoint-3"))  # fmt: skip
    proc = run_train(resumed, tmp_path)
    assert_ok(proc)
    assert "DSKD projectors restored" in proc.stdout + proc.stderr
    after = _losses(out / "checkpoint-6")
    for step in (4, 5, 6):
        assert after[step] == pytest.approx(full_run[step], rel=1e-3), (step, after, full_run)


def test_cross_tokenizer_run_with_bare_plugin_name(assets, tmp_path):
    """`plugins: [axolotl_dskd]` through `accelerate launch`, a sentencepiece-style student and
    a byte-level BPE teacher: CMA is chosen, trains the query projector and logs t2s_acc."""
    cfg = dskd_config(assets, tmp_path, student="student_sp", plugins=["axolotl_dskd"])
    proc = run_train(cfg, tmp_path, launcher="accelerate")
    assert_ok(proc)
    assert "cross-model attention" in proc.stdout + proc.stderr
    out = tmp_path / "output"
    logs = training_logs(out / "checkpoint-4")
    assert all(metric in row for row in logs for metric in DSKD_METRICS)
    weights = load_file(out / "dskd_projectors.safetensors")
    assert weights["query.weight"].shape == (2 * 128, 2 * 64)


def test_cross_tokenizer_with_sample_packing(assets, tmp_path):
    cfg = dskd_config(
        assets, tmp_path, student="student_sp", sample_packing=True, pad_to_sequence_len=True,
        micro_batch_size=1, max_steps=3, save_steps=3,
    )  # fmt: skip
    assert_ok(run_train(cfg, tmp_path))
    logs = training_logs(tmp_path / "output" / "checkpoint-3")
    assert len(logs) == 3 and all("dskd/t2s_ce" in row for row in logs)


def test_full_finetune_student_with_8bit_teacher(assets, tmp_path):
    """No adapter: the student's own LM head trains too; the teacher is int8."""
    cfg = dskd_config(
        assets, tmp_path, adapter=None, lora_r=None, lora_alpha=None, lora_dropout=None,
        lora_target_linear=None, dskd_teacher_load_in_4bit=False, dskd_teacher_load_in_8bit=True,
        max_steps=2, save_steps=2, learning_rate=1e-4,
    )  # fmt: skip
    assert_ok(run_train(cfg, tmp_path))
    out = tmp_path / "output"
    assert (out / "dskd_projectors.safetensors").is_file()
    assert len(training_logs(out / "checkpoint-2")) == 2
