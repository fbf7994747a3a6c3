"""End to end through Axolotl's own CLI, as users run it: tiny local models, a 4-bit teacher
quantized by bitsandbytes on the CPU, a LoRA (or full) student."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from axolotl_dskd.core.loss import DSKDLossConfig
from dskd_devkit.axolotl_runs import assert_ok, dskd_config, run_train, start_train, training_logs

pytestmark = pytest.mark.e2e

DSKD_METRICS = ("dskd/ce", "dskd/kd_student", "dskd/kd_teacher", "dskd/t2s_ce", "dskd/t2s_acc")


def _losses(checkpoint: Path) -> dict[int, float]:
    return {row["step"]: float(row["loss"]) for row in training_logs(checkpoint)}


STEPS, SAVE_EVERY = 24, 8


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    """A same-vocabulary LoRA run with the canonical plugin name and a 4-bit teacher."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    assert_ok(run_train(dskd_config(assets, workdir, max_steps=STEPS, save_steps=SAVE_EVERY), workdir))
    return workdir / "output"


def test_run_logs_every_dskd_term_and_saves_projectors(uninterrupted):
    """Every DSKD term is logged each step; projectors land in every checkpoint and in
    output_dir with their shapes, and they train."""
    out = uninterrupted
    logs = training_logs(out / f"checkpoint-{STEPS}")
    assert len(logs) == STEPS
    for row in logs:
        for metric in DSKD_METRICS:
            assert metric in row, f"{metric} missing from {row}"
        assert torch.isfinite(torch.tensor(float(row["loss"])))
    for folder in (out / f"checkpoint-{SAVE_EVERY}", out / f"checkpoint-{STEPS}", out):
        weights = load_file(folder / "dskd_projectors.safetensors")
        assert set(weights) == {"t2s.weight", "t2s.bias", "s2t.weight", "s2t.bias"}
        meta = json.loads((folder / "dskd_projectors.json").read_text())
        assert meta["shapes"]["t2s.weight"] == [64, 128]  # student d=64, teacher d=128
        assert meta["loss_config"]["kd_rate"] == DSKDLossConfig().kd_rate
    assert not torch.equal(
        load_file(out / f"checkpoint-{SAVE_EVERY}" / "dskd_projectors.safetensors")["t2s.weight"],
        load_file(out / f"checkpoint-{STEPS}" / "dskd_projectors.safetensors")["t2s.weight"],
    )


@pytest.fixture(scope="module")
def killed(assets, tmp_path_factory):
    """The same run as ``uninterrupted``, killed (SIGKILL) after its first checkpoint."""
    workdir = tmp_path_factory.mktemp("killed")
    cfg = dskd_config(assets, workdir, max_steps=STEPS, save_steps=SAVE_EVERY)
    checkpoint = workdir / "output" / f"checkpoint-{SAVE_EVERY}"
    proc = start_train(cfg, workdir)
    try:
        deadline = time.monotonic() + 300
        while not (checkpoint / "trainer_state.json").exists():
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert not (workdir / "output" / f"checkpoint-{STEPS}").exists(), "killed too late"
    return workdir, cfg, checkpoint


def test_same_seed_gives_the_same_losses_step_by_step(killed, uninterrupted):
    """Two runs with one seed agree exactly (LoRA init included), so settings can be compared."""
    _, _, checkpoint = killed
    reference = _losses(uninterrupted / f"checkpoint-{STEPS}")
    before = _losses(checkpoint)
    assert len(before) == SAVE_EVERY
    assert before == {step: reference[step] for step in before}


def test_killed_run_resumes_where_it_stopped(killed, uninterrupted):
    """Resuming the killed run restores projectors, optimizer and scheduler: its loss curve
    continues exactly as the uninterrupted run's."""
    workdir, cfg, checkpoint = killed
    resumed = run_train({**cfg, "resume_from_checkpoint": str(checkpoint)}, workdir)
    assert_ok(resumed)
    assert "DSKD projectors restored" in resumed.stdout + resumed.stderr
    reference = _losses(uninterrupted / f"checkpoint-{STEPS}")
    after = _losses(workdir / "output" / f"checkpoint-{STEPS}")
    assert {step: after[step] for step in range(SAVE_EVERY + 1, STEPS + 1)} == {
        step: reference[step] for step in range(SAVE_EVERY + 1, STEPS + 1)
    }


PAIRING_LOG = {
    "cma": "cross-tokenizer, cross-model attention (CMA)",
    "exact": "cross-tokenizer, exact token alignment (",
    "exact+cma": "cross-tokenizer, exact token alignment + cross-model attention (CMA)",
}


@pytest.mark.parametrize("alignment", list(PAIRING_LOG))
def test_cross_tokenizer_run_with_bare_plugin_name(assets, tmp_path, alignment):
    """`plugins: [axolotl_dskd]` through `accelerate launch`, a sentencepiece-style student and
    a byte-level BPE teacher in 4 bits, each way of pairing the two tokenizations: the run says
    which, logs every term and the share of trained tokens with an exact partner, and saves the
    projectors (the query of cross-model attention among them). By default (``auto``) exact pairs
    distil the teacher's own distribution over the shared tokens; ``exact`` asks for the paper's
    projected teacher, ``exact+cma`` leaves the teacher's space out."""
    target = {
        "exact": {"dskd_student_space_target": "projected"},
        "exact+cma": {"dskd_kd_teacher_weight": 0},
    }.get(alignment, {})
    cfg = dskd_config(
        assets, tmp_path, student="student_sp", plugins=["axolotl_dskd"], dskd_token_alignment=alignment,
        **target,
    )  # fmt: skip
    proc = run_train(cfg, tmp_path, launcher="accelerate")
    assert_ok(proc)
    assert PAIRING_LOG[alignment] in proc.stdout + proc.stderr
    shared = alignment == "exact+cma"  # the shared-vocabulary target, and no teacher space
    assert ("tokens both vocabularies spell alike at exact pairs" in proc.stdout + proc.stderr) == shared
    assert ("the teacher's space is left out" in proc.stdout + proc.stderr) == shared
    out = tmp_path / "output"
    logs = training_logs(out / "checkpoint-4")
    assert all(metric in row for row in logs for metric in (*DSKD_METRICS, "dskd/aligned_frac"))
    assert all(0.5 < row["dskd/aligned_frac"] <= 1.0 for row in logs)
    assert all((row["dskd/kd_teacher"] == 0) == shared for row in logs)
    weights = load_file(out / "dskd_projectors.safetensors")
    assert weights["query.weight"].shape == (2 * 128, 2 * 64)


def test_cross_tokenizer_with_sample_packing(assets, tmp_path):
    """Packed rows through `axolotl train` with the canonical plugin name."""
    cfg = dskd_config(
        assets, tmp_path, student="student_sp", sample_packing=True, pad_to_sequence_len=True,
        micro_batch_size=1, max_steps=3, save_steps=3,
    )  # fmt: skip
    assert_ok(run_train(cfg, tmp_path, launcher="axolotl"))
    logs = training_logs(tmp_path / "output" / "checkpoint-3")
    assert len(logs) == 3 and all("dskd/t2s_ce" in row for row in logs)


def test_full_finetune_student_with_8bit_teacher(assets, tmp_path):
    """No adapter: the student's own weights, its LM head included, train (DSKD reads the head
    for CE and kd_student); the teacher is int8."""
    cfg = dskd_config(
        assets, tmp_path, adapter=None, lora_r=None, lora_alpha=None, lora_dropout=None,
        lora_target_linear=None, dskd_teacher_load_in_4bit=False, dskd_teacher_load_in_8bit=True,
        max_steps=2, save_steps=2, learning_rate=1e-4,
    )  # fmt: skip
    assert_ok(run_train(cfg, tmp_path))
    out = tmp_path / "output"
    assert (out / "dskd_projectors.safetensors").is_file()
    assert len(training_logs(out / "checkpoint-2")) == 2
    base, trained = load_file(assets["student"] / "model.safetensors"), load_file(out / "model.safetensors")
    for name in ("lm_head.weight", "model.layers.0.self_attn.q_proj.weight"):
        assert trained[name].shape == base[name].shape
        assert not torch.equal(trained[name].float(), base[name].float()), f"{name} did not train"


def test_chat_teacher_reads_its_own_template(real_tokenizer, tmp_path):
    """A chat_template run across real chat tokenizers and their own templates (a Qwen3 teacher
    in 4 bits, a Llama 3 LoRA student, packed rows): the teacher reads each conversation in
    Qwen's template, the run says so with the count of samples that fell back, and exact
    alignment pairs tokens of the shared message contents."""
    from dskd_devkit.chat_pairs import CONVERSATIONS, chat_config, chat_model, write_conversations

    real_tokenizer("llama3"), real_tokenizer("qwen3")
    data = write_conversations(tmp_path / "chat.jsonl", CONVERSATIONS * 4)
    cfg = chat_config(
        "llama3", chat_model("llama3", tmp_path / "student", weights=True),
        chat_model("qwen3", tmp_path / "teacher", weights=True), data, tmp_path,
        dskd_teacher_load_in_4bit=True, sample_packing=True, micro_batch_size=1, max_steps=2, save_steps=2,
    )  # fmt: skip
    proc = run_train(cfg, tmp_path)
    assert_ok(proc)
    assert (
        "the teacher reads chat data in its own chat template; 0 of 12 training samples"
        in proc.stdout + proc.stderr
    )
    logs = training_logs(tmp_path / "output" / "checkpoint-2")
    assert len(logs) == 2 and all(row["dskd/aligned_frac"] > 0 for row in logs)
