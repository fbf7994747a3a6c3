"""CUDA checks (``pytest -m gpu``; skipped without CUDA, run by ``benchmarks/gpu_check.sh``).

- The teacher loads through ``axolotl_dskd.core.teacher.load_teacher`` in 4-bit nf4 (double
  quantization, bf16 compute) and in 8-bit on the GPU: bitsandbytes layers, frozen, eval mode,
  smaller than bf16, finite final hidden states from ``teacher_hidden_states``.
- ``dskd_loss`` in bf16 stays finite and close to float32 (loss, logged terms, gradients of the
  student's hidden states and of every projector), same vocabulary and CMA, with real
  vocabulary sizes (TinyLlama 32000, Qwen2.5 151936), also with very large logits.
- Two optimizer steps of the real ``DSKDTrainer`` on the GPU (4-bit teacher, bf16 student,
  projectors, the collator's teacher tokens for CMA).

``DSKD_GPU_TESTS_ON_CPU=1`` runs them on the CPU instead (a dry run of the test code; bitsandbytes
has CPU kernels for both modes).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from axolotl_dskd.core.loss import DSKDLossConfig, Projectors, dskd_loss

ON_CPU = os.environ.get("DSKD_GPU_TESTS_ON_CPU") == "1"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() or ON_CPU), reason="needs CUDA"),
]
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not ON_CPU else "cpu")


# ============================================================================================
# Tiny models on disk
# ============================================================================================


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """A Qwen2 teacher (byte-level BPE) and two Llama students: same tokenizer, and a
    sentencepiece-style one (CMA). Hidden sizes are multiples of 64 (bitsandbytes blocks)."""
    from dskd_devkit import task, tiny_tokenizers, training

    root = tmp_path_factory.mktemp("gpu_tiny")
    corpus = task.task_corpus()
    bpe = tiny_tokenizers.bpe_tokenizer(corpus)
    sp = tiny_tokenizers.sentencepiece_tokenizer(corpus, pad_token="</s>")
    return {
        "teacher": training.save_pair(
            training.tiny_model("qwen2", bpe, hidden_size=128, num_layers=2, seed=0), bpe, root / "teacher"
        ),
        "student": training.save_pair(
            training.tiny_model("llama", bpe, hidden_size=64, seed=1), bpe, root / "student"
        ),
        "student_sp": training.save_pair(
            training.tiny_model("llama", sp, hidden_size=64, seed=2), sp, root / "student_sp"
        ),
    }


def _load(path: Path, **quant):
    from axolotl_dskd.core.teacher import load_teacher

    return load_teacher(str(path), device=DEVICE, dtype=torch.bfloat16, **quant)


def _bf16_footprint(path: Path) -> int:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).get_memory_footprint()


def _check_frozen_teacher(teacher, path: Path) -> torch.Tensor:
    from axolotl_dskd.core.models import teacher_hidden_states

    assert not teacher.training, "the teacher must be in eval mode"
    assert not any(p.requires_grad for p in teacher.parameters()), "teacher parameters must be frozen"
    ids = torch.randint(0, teacher.config.vocab_size, (2, 24), device=DEVICE)
    h = teacher_hidden_states(teacher, input_ids=ids, attention_mask=torch.ones_like(ids))
    assert h.shape == (2, 24, teacher.config.hidden_size)
    assert h.device.type == DEVICE.type
    assert not h.requires_grad
    assert torch.isfinite(h.float()).all(), "non-finite teacher hidden states"
    assert teacher.get_memory_footprint() < _bf16_footprint(path)
    return h


def test_teacher_loads_in_4bit_nf4(tiny_models):
    import bitsandbytes as bnb

    teacher = _load(tiny_models["teacher"], load_in_4bit=True)
    q = teacher.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit), type(q)
    state = q.weight.quant_state
    assert state.quant_type == "nf4"
    assert state.nested, "double quantization (bnb_4bit_use_double_quant) expected"
    assert q.compute_dtype == torch.bfloat16
    assert q.weight.device.type == DEVICE.type
    h = _check_frozen_teacher(teacher, tiny_models["teacher"])
    assert h.dtype == torch.bfloat16


def test_teacher_loads_in_8bit(tiny_models):
    import bitsandbytes as bnb

    teacher = _load(tiny_models["teacher"], load_in_8bit=True)
    q = teacher.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear8bitLt), type(q)
    assert q.weight.dtype == torch.int8
    assert q.weight.device.type == DEVICE.type
    _check_frozen_teacher(teacher, tiny_models["teacher"])


# ============================================================================================
# The loss in bf16 against float32
# ============================================================================================


def _inputs(
    variant: str,
    *,
    B: int = 2,
    L: int = 192,
    d_s: int = 256,
    d_t: int = 384,
    V_s: int = 32000,
    V_t: int | None = None,
    hidden_scale: float = 1.0,
    seed: int = 0,
):
    """float32 inputs with LM heads whose logits have a spread like a trained model's."""
    g = torch.Generator().manual_seed(seed)
    V_t = V_t or (V_s if variant == "same" else 151936)
    s_ids = torch.randint(0, V_s, (B, L), generator=g)
    s_labels = s_ids.clone()
    s_labels[:, : L // 4] = -100
    s_labels[1, -7:] = -100  # padding
    inputs = {
        "student_hidden": torch.randn(B, L, d_s, generator=g) * hidden_scale,
        "student_lm_head": torch.randn(V_s, d_s, generator=g) * (3 / math.sqrt(d_s)),
        "student_labels": s_labels,
        "teacher_lm_head": torch.randn(V_t, d_t, generator=g) * (3 / math.sqrt(d_t)),
    }
    if variant == "same":
        inputs["teacher_hidden"] = torch.randn(B, L, d_t, generator=g) * hidden_scale
        inputs["teacher_labels"] = s_labels
    else:
        L_t = L - 17
        t_ids = torch.randint(0, V_t, (B, L_t), generator=g)
        t_labels = t_ids.clone()
        t_labels[:, : L_t // 4] = -100
        t_labels[1, -5:] = -100
        inputs.update(
            teacher_hidden=torch.randn(B, L_t, d_t, generator=g) * hidden_scale,
            teacher_labels=t_labels,
            student_input_ids=s_ids,
            teacher_input_ids=t_ids,
            student_embeddings=torch.randn(V_s, d_s, generator=g) * 0.02,
            teacher_embeddings=torch.randn(V_t, d_t, generator=g) * 0.02,
        )
    return inputs


FLOAT_KEYS = (
    "student_hidden",
    "student_lm_head",
    "teacher_hidden",
    "teacher_lm_head",
    "student_embeddings",
    "teacher_embeddings",
)


def _run(variant: str, inputs: dict, dtype: torch.dtype, proj_state: dict):
    d_s, d_t = inputs["student_hidden"].shape[-1], inputs["teacher_hidden"].shape[-1]
    proj = Projectors(d_s, d_t, cross_tokenizer=variant == "cma").to(DEVICE)
    proj.load_state_dict(proj_state)
    moved = {
        k: (v.detach().to(DEVICE, dtype).clone() if k in FLOAT_KEYS else v.to(DEVICE))
        for k, v in inputs.items()
    }
    h_s = moved["student_hidden"].requires_grad_(True)
    out = dskd_loss(
        proj, **moved, config=DSKDLossConfig(cross_tokenizer=variant == "cma", token_alignment="cma")
    )
    out.loss.backward()
    grads = {"student_hidden": h_s.grad.float()}
    grads.update({f"proj.{k}": p.grad.float() for k, p in proj.named_parameters()})
    return out, grads


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


@pytest.mark.parametrize("variant", ["same", "cma"])
def test_dskd_loss_bf16_close_to_float32(variant):
    torch.manual_seed(0)
    d_s, d_t = 256, 384
    proj_state = Projectors(d_s, d_t, cross_tokenizer=variant == "cma").state_dict()
    inputs = _inputs(variant, d_s=d_s, d_t=d_t)
    ref, ref_g = _run(variant, inputs, torch.float32, proj_state)
    out, got = _run(variant, inputs, torch.bfloat16, proj_state)
    assert torch.isfinite(out.loss), "non-finite bf16 loss"
    assert float(out.loss.detach()) == pytest.approx(float(ref.loss.detach()), rel=2e-2)
    for name in ("ce", "kd_student", "kd_teacher", "t2s_ce"):
        assert torch.isfinite(out.metrics[name]), name
        assert float(out.metrics[name]) == pytest.approx(float(ref.metrics[name]), rel=5e-2, abs=5e-3), name
    for name, g in got.items():
        assert torch.isfinite(g).all(), f"non-finite bf16 gradient of {name}"
        if ref_g[name].abs().max() == 0:
            continue
        assert _cos(g, ref_g[name]) > 0.99, f"{name}: bf16 gradient direction differs"
        rel = float((g - ref_g[name]).norm() / ref_g[name].norm())
        assert rel < 0.1, f"{name}: bf16 gradient off by {rel:.3f} (relative norm)"


@pytest.mark.parametrize("variant", ["same", "cma"])
def test_dskd_loss_bf16_huge_logits_finite(variant):
    """Hidden states 30x larger than usual: logits in the thousands. bf16 must not overflow
    into inf/NaN anywhere (the authors' fp16 code did)."""
    d_s, d_t = 256, 384
    proj_state = Projectors(d_s, d_t, cross_tokenizer=variant == "cma").state_dict()
    inputs = _inputs(variant, d_s=d_s, d_t=d_t, hidden_scale=30.0, L=96)
    out, grads = _run(variant, inputs, torch.bfloat16, proj_state)
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(v).all() for v in out.metrics.values())
    for name, g in grads.items():
        assert torch.isfinite(g).all(), f"non-finite gradient of {name}"


# ============================================================================================
# One step as the trainer takes it
# ============================================================================================


def _rows(tokenizer, n: int) -> list[dict]:
    """Task rows as Axolotl tokenizes them: an untrained prompt, a trained answer and EOS."""
    from dskd_devkit.task import arithmetic_rows, encode_row

    rows = []
    for row in arithmetic_rows(n, seed=3):
        ids, labels = encode_row(tokenizer, row)
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return rows


@pytest.mark.parametrize("variant", ["same", "cma"])
def test_trainer_step_with_4bit_teacher(tiny_models, tmp_path, variant):
    """Two optimizer steps of the real ``DSKDTrainer`` (the Axolotl collator building the teacher's
    tokens for CMA): a 4-bit teacher, a bf16-autocast student and the projectors on the device;
    the student and every projector train, the teacher gets no gradient, the loss is finite."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from axolotl_dskd.core.teacher_tokens import TeacherTokenBuilder
    from axolotl_dskd.integration.collator import DSKDDataCollator
    from dskd_devkit.axolotl_runs import dskd_trainer

    cma = variant == "cma"
    teacher = _load(tiny_models["teacher"], load_in_4bit=True)
    student_dir = tiny_models["student_sp" if cma else "student"]
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    proj = Projectors(student.config.hidden_size, teacher.config.hidden_size, cross_tokenizer=cma)
    builder = TeacherTokenBuilder(
        tokenizer, AutoTokenizer.from_pretrained(tiny_models["teacher"]), max_length=512
    )
    collator = DSKDDataCollator(
        tokenizer=tokenizer, padding=True, label_pad_token_id=-100, teacher_tokens=builder
    )
    before = {
        "student": student.model.layers[0].self_attn.q_proj.weight.detach().clone(),
        **{f"proj.{k}": v.detach().clone() for k, v in proj.named_parameters()},
    }
    trainer = dskd_trainer(
        student, teacher, proj, train_dataset=Dataset.from_list(_rows(tokenizer, 8)), data_collator=collator,
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3,
        bf16=DEVICE.type == "cuda", use_cpu=DEVICE.type == "cpu", dskd_cross_tokenizer=cma,
    )  # fmt: skip
    result = trainer.train()
    assert math.isfinite(result.training_loss) and result.training_loss > 0
    after = {
        "student": student.model.layers[0].self_attn.q_proj.weight.detach(),
        **{f"proj.{k}": v.detach() for k, v in trainer.projectors.named_parameters()},
    }
    moved = [name for name in before if not torch.equal(before[name], after[name].to(before[name].device))]
    assert set(moved) == set(before), f"did not train: {set(before) - set(moved)}"
    assert trainer.projectors.t2s.weight.device.type == DEVICE.type
    assert not any(p.grad is not None for p in teacher.parameters()), "the teacher got gradients"
