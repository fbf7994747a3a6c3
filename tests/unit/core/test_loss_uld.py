"""``dskd_method: uld``, the paper's cross-tokenizer baseline (Universal Logit Distillation):
the chunked loss against the independent float64 reference, value and gradients, and the
properties a user comparing it with DSKD relies on."""

from __future__ import annotations

import pytest
import torch

from axolotl_dskd.core.loss import DSKDLossConfig, answer_order_partners, uld_loss
from dskd_devkit.reference import reference_uld_loss


def _case(seed: int = 0, *, packed: bool = False) -> dict:
    """Two rows of another length and vocabulary on each side; with ``packed``, row 0 holds two
    samples whose answers are of different lengths on the two sides."""
    g = torch.Generator().manual_seed(seed)
    B, L_s, L_t, d_s, d_t, V_s, V_t = 2, 10, 13, 8, 12, 40, 56
    s_labels = torch.randint(V_s, (B, L_s), generator=g)
    t_labels = torch.randint(V_t, (B, L_t), generator=g)
    s_labels[:, :3], t_labels[:, :5] = -100, -100  # prompts
    s_labels[1, -2:] = -100  # padding
    case = {
        "student_hidden": torch.randn(B, L_s, d_s, generator=g).requires_grad_(),
        "student_lm_head": (torch.randn(V_s, d_s, generator=g) / 2).requires_grad_(),
        "student_labels": s_labels,
        "teacher_hidden": torch.randn(B, L_t, d_t, generator=g),
        "teacher_lm_head": torch.randn(V_t, d_t, generator=g) / 2,
        "teacher_labels": t_labels,
    }
    if packed:
        s_seg, t_seg = torch.zeros(B, L_s, dtype=torch.long), torch.zeros(B, L_t, dtype=torch.long)
        s_seg[0, 6:], t_seg[0, 8:] = 1, 1
        s_labels[0, 6:8], t_labels[0, 8:11] = -100, -100  # the second sample's prompt
        case.update(student_segment_ids=s_seg, teacher_segment_ids=t_seg)
    return case


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("chunk_size", [1, 3, None], ids=lambda c: f"chunk{c}")
def test_uld_matches_the_reference_in_value_and_gradients(chunk_size, packed):
    case = _case(packed=packed)
    config = DSKDLossConfig(kd_rate=0.3, chunk_size=chunk_size, cross_tokenizer=True)
    out = uld_loss(**case, config=config, num_items=11)
    expected, metrics = reference_uld_loss(**case, kd_rate=0.3, num_items=11)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    for name in ("ce", "kd_student", "aligned_frac"):
        torch.testing.assert_close(out.metrics[name].double(), metrics[name].double(), rtol=1e-5, atol=1e-6)
    leaves = [case["student_hidden"], case["student_lm_head"]]
    got = torch.autograd.grad(out.loss, leaves)
    want = torch.autograd.grad(expected, leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_partners_follow_answer_order_within_each_packed_sample():
    s_mask = torch.tensor([[0, 1, 1, 1, 0, 1, 1]], dtype=torch.bool)
    t_mask = torch.tensor([[1, 1, 0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    s_seg = torch.tensor([[0, 0, 0, 0, 1, 1, 1]])
    t_seg = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
    partners = answer_order_partners(s_mask, t_mask, s_seg, t_seg)
    assert partners.tolist() == [[-1, 0, 1, -1, -1, 4, 5]]  # the third answer token of sample 0 has none


def test_a_teacher_with_the_same_model_under_permuted_ids_costs_nothing():
    """ULD compares sorted distributions: the token ids of the two vocabularies never matter."""
    case = _case()
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(case["student_lm_head"].shape[0], generator=g)
    case.update(
        teacher_hidden=case["student_hidden"].detach(),
        teacher_lm_head=case["student_lm_head"].detach()[perm],
        teacher_labels=case["student_labels"],
    )
    out = uld_loss(**case, config=DSKDLossConfig(cross_tokenizer=True))
    assert float(out.metrics["kd_student"]) == pytest.approx(0.0, abs=1e-6)
    assert float(out.metrics["aligned_frac"]) == 1.0
