"""``axolotl_dskd.core.projector_init``, logit-equivalence initialization of the projectors: the
least-squares maps between the LM heads' spaces (which tokens two vocabularies share:
``test_vocabulary.py``)."""

from __future__ import annotations

import math

import pytest
import torch

from axolotl_dskd.core.loss import Projectors
from axolotl_dskd.core.projector_init import logit_equivalent_projectors

# ---------------------------------------------------------------------------- least-squares maps


def _lstsq(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.lstsq(x.double(), y.double(), driver="gelsd").solution


def test_exact_solution_reproduces_the_teachers_logits():
    """The student's head is the teacher's (rows permuted, as in another vocabulary order) times a
    full-rank [d_t, d_s] map with d_s >= d_t: the projected teacher state then gives the teacher's
    logits exactly, and the projected student state the student's."""
    gen = torch.Generator().manual_seed(0)
    vocab, d_t, d_s = 300, 16, 24
    teacher_head = torch.randn(vocab, d_t, generator=gen)
    order = torch.randperm(vocab, generator=gen)
    student_head = teacher_head[order] @ torch.randn(d_t, d_s, generator=gen)
    student_ids = torch.arange(vocab)
    teacher_ids = order[student_ids]
    proj = Projectors(d_s, d_t)
    logit_equivalent_projectors(proj, student_head, teacher_head, student_ids, teacher_ids)
    assert proj.t2s.weight.dtype == torch.float32 and not proj.t2s.bias.any() and not proj.s2t.bias.any()
    with torch.no_grad():
        h_t = torch.randn(5, d_t, generator=gen)
        # every student row is a teacher row in another order: the whole vocabulary matches
        teacher_logits = (h_t @ teacher_head.T)[:, order]
        torch.testing.assert_close(proj.t2s(h_t) @ student_head.T, teacher_logits, atol=1e-4, rtol=1e-4)
        h_s = torch.randn(5, d_s, generator=gen)
        student_logits = (h_s @ student_head.T)[:, student_ids]
        teacher_on_s2t = (proj.s2t(h_s) @ teacher_head.T)[:, teacher_ids]
        torch.testing.assert_close(teacher_on_s2t, student_logits, atol=1e-4, rtol=1e-4)


def _with_own_rows(x_head, x_ids, y_head, y_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows a fit from ``x`` to ``y`` matches: the shared ones to each other, and each row
    only ``x`` has to the mean row of ``y``."""
    own = torch.ones(len(x_head), dtype=torch.bool)
    own[x_ids] = False
    x = torch.cat([x_head[x_ids], x_head[own]]).double()
    y = torch.cat([y_head[y_ids], y_head.mean(0, keepdim=True).expand(int(own.sum()), -1)]).double()
    return x, y


def test_general_case_is_the_least_squares_solution():
    """Shared rows fitted to each other, each vocabulary's own rows to the other's mean row."""
    gen = torch.Generator().manual_seed(1)
    student_head, teacher_head = torch.randn(500, 12, generator=gen), torch.randn(400, 20, generator=gen)
    student_ids = torch.randperm(500, generator=gen)[:350]
    teacher_ids = torch.randperm(400, generator=gen)[:350]
    a, b = _with_own_rows(student_head, student_ids, teacher_head, teacher_ids)
    b2, a2 = _with_own_rows(teacher_head, teacher_ids, student_head, student_ids)
    proj = Projectors(12, 20, cross_tokenizer=True)
    query = proj.query.weight.clone()
    # small chunks: the normal equations are summed over many of them
    stats = logit_equivalent_projectors(
        proj, student_head, teacher_head, student_ids, teacher_ids, chunk_elements=20 * 37
    )
    t2s, s2t = proj.t2s.weight.detach().double(), proj.s2t.weight.detach().double()
    torch.testing.assert_close(t2s, _lstsq(a, b), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s2t, _lstsq(b2, a2), atol=1e-5, rtol=1e-5)
    best = torch.linalg.norm(a @ t2s - b)
    for _ in range(5):  # no other map fits better
        assert best <= torch.linalg.norm(
            a @ (t2s + 0.01 * torch.randn(t2s.shape, generator=gen).double()) - b
        )
    assert stats["t2s_relative_residual"] == pytest.approx(float(best / torch.linalg.norm(b)), rel=1e-4)
    s2t_residual = torch.linalg.norm(b2 @ s2t - a2) / torch.linalg.norm(a2)
    assert stats["s2t_relative_residual"] == pytest.approx(float(s2t_residual), rel=1e-4)
    assert torch.equal(proj.query.weight, query)  # the cross-tokenizer query is not touched


def test_rank_deficient_and_bf16_heads():
    gen = torch.Generator().manual_seed(2)
    ids = torch.arange(200)
    # every column twice: rank 8 in a 16-dimensional student space, exactly, in any precision
    student_head = torch.randn(200, 8, generator=gen).repeat(1, 2).to(torch.bfloat16)
    teacher_head = torch.nn.Linear(8, 200, bias=False, dtype=torch.bfloat16)  # a module is fine too
    proj = Projectors(16, 8)
    stats = logit_equivalent_projectors(proj, student_head, teacher_head, ids, ids)
    assert all(p.isfinite().all() for p in proj.parameters()) and proj.t2s.weight.dtype == torch.float32
    a, b = student_head.double(), teacher_head.weight.detach().double()
    for fitted, x, y in ((proj.t2s.weight, a, b), (proj.s2t.weight, b, a)):
        optimum = torch.linalg.norm(x @ _lstsq(x, y) - y)
        assert torch.linalg.norm(x @ fitted.detach().double() - y) <= optimum * (1 + 1e-4) + 1e-6
    # of the many equally good maps, the smallest: both copies of a column get half
    torch.testing.assert_close(proj.t2s.weight[:8], proj.t2s.weight[8:], atol=1e-5, rtol=1e-4)
    assert 0.0 < stats["t2s_relative_residual"] < 1.0


def test_mismatched_ids_are_rejected():
    proj, head = Projectors(4, 4), torch.randn(10, 4)
    with pytest.raises(ValueError, match="equally long"):
        logit_equivalent_projectors(proj, head, head, torch.arange(3), torch.arange(4))
    with pytest.raises(ValueError, match="out of range"):
        logit_equivalent_projectors(proj, head, head, torch.arange(3), torch.tensor([0, 1, 10]))


def test_a_token_only_the_student_has_gets_an_ordinary_logit():
    """A student row outside the shared vocabulary (a byte-fallback newline, say) with a large
    norm: the projected teacher must not put its top logit there."""
    gen = torch.Generator().manual_seed(3)
    teacher_head = torch.randn(300, 16, generator=gen)
    student_head = teacher_head[:200] @ torch.randn(16, 8, generator=gen) / 4
    student_head = torch.cat([student_head, 50 * torch.randn(1, 8, generator=gen)])  # the student's own
    ids = torch.arange(200)
    proj = Projectors(8, 16)
    logit_equivalent_projectors(proj, student_head, teacher_head, ids, ids)
    with torch.no_grad():
        logits = proj.t2s(torch.randn(64, 16, generator=gen)) @ student_head.T
    own = logits[:, 200]
    assert (own < logits[:, :200].max(-1).values).all()
    assert own.abs().mean() < logits[:, :200].abs().mean()


def test_a_non_finite_head_row_takes_no_part():
    """A broken checkpoint (an inf LM-head row) must not turn the projectors into NaN before the
    run's own checks can name the problem."""
    gen = torch.Generator().manual_seed(4)
    student_head, teacher_head = torch.randn(50, 8, generator=gen), torch.randn(60, 12, generator=gen)
    teacher_head[7] = math.inf
    ids = torch.arange(50)
    proj = Projectors(8, 12)
    stats = logit_equivalent_projectors(proj, student_head, teacher_head, ids, ids)
    assert all(p.isfinite().all() for p in proj.parameters())
    assert all(math.isfinite(v) for v in stats.values())
