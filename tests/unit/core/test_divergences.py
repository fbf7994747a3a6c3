"""The divergences of ``axolotl_dskd.core.divergences`` as the loss applies them: each one's closed
form (``docs/dskd.md``) on hand-made distributions, the temperature on both sides, zero on
identical distributions."""

from __future__ import annotations

import math

import pytest
import torch

from axolotl_dskd.core.loss import Projectors, dskd_loss
from dskd_devkit.reference import DIVERGENCE_NAMES as DIVERGENCES
from dskd_devkit.reference import reference_divergence
from tests.unit.core.loss_cases import Case, as_float

# ============================================================================================
# Divergences: closed forms, zero on identical distributions
# ============================================================================================


def _kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def closed_form(name: str, p: list[float], q: list[float], lam: float, alpha: float) -> float:
    """The spec's table, on plain Python floats (p teacher side, q student side)."""
    if name == "forward_kl":
        return _kl(p, q)
    if name == "reverse_kl":
        return _kl(q, p)
    if name == "js":
        m = [(x + y) / 2 for x, y in zip(p, q)]
        return 0.5 * _kl(p, m) + 0.5 * _kl(q, m)
    if name == "skew_forward_kl":
        return _kl(p, [lam * x + (1 - lam) * y for x, y in zip(p, q)])
    if name == "skew_reverse_kl":
        return _kl(q, [(1 - lam) * x + lam * y for x, y in zip(p, q)])
    if name == "adaptive_kl":
        running, g_head, g_tail = 0.0, 0.0, 0.0
        for i in sorted(range(len(p)), key=lambda i: p[i]):
            running += p[i]
            if running <= alpha:
                g_tail += abs(p[i] - q[i])
            else:
                g_head += abs(p[i] - q[i])
        total = g_head + g_tail
        return g_head / total * _kl(p, q) + g_tail / total * _kl(q, p)
    raise ValueError(name)


# hand-made (teacher p, student q); cumulative sorted p never sits on an alpha used below
HAND_MADE = [
    ([0.6, 0.25, 0.15], [0.2, 0.3, 0.5]),
    ([0.05, 0.1, 0.3, 0.55], [0.4, 0.3, 0.2, 0.1]),
    ([0.45, 0.55 - 1e-9, 1e-9], [0.25, 0.75 - 1e-9, 1e-9]),
]


def test_closed_form_helper_anchors():
    """The closed forms above, checked on numbers worked out by hand."""
    p, q = [0.5, 0.5], [0.25, 0.75]
    assert closed_form("forward_kl", p, q, 0.1, 0.5) == pytest.approx(0.5 * math.log(4 / 3))
    assert closed_form("reverse_kl", p, q, 0.1, 0.5) == pytest.approx(
        0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    )
    # sorted p = [0.15, 0.25, 0.6], q in that order [0.5, 0.3, 0.2]: tail = first two (0.4 <= 0.5)
    p, q = HAND_MADE[0]
    g_tail, g_head = 0.35 + 0.05, 0.4
    want = 0.5 * _kl(p, q) + 0.5 * _kl(q, p)
    assert g_head / (g_head + g_tail) == 0.5
    assert closed_form("adaptive_kl", p, q, 0.1, 0.5) == pytest.approx(want)


def identity_case(p_rows: list[list[float]], q_rows: list[list[float]], T: float) -> Case:
    """Same-vocab batch with V = d, identity LM heads and identity projectors, so that
    softmax(z_s / T) = q, softmax(z_t2s / T) = softmax(z_t / T) = p, softmax(z_s2t / T) = q,
    one trained token per row: kd_student and kd_teacher are then the mean of D(q, p)."""
    n, V = len(p_rows), len(p_rows[0])
    proj = Projectors(V, V)
    with torch.no_grad():
        for layer in (proj.t2s, proj.s2t):
            layer.weight.copy_(torch.eye(V))
            layer.bias.zero_()
    h_s = T * torch.tensor(q_rows, dtype=torch.float64).log()
    h_t = T * torch.tensor(p_rows, dtype=torch.float64).log()
    # L = 2: position 0 predicts labels[1]
    hs = torch.stack([h_s, torch.zeros(n, V, dtype=torch.float64)], 1).float()
    ht = torch.stack([h_t, torch.zeros(n, V, dtype=torch.float64)], 1).float()
    labels = torch.tensor([[-100, 0]] * n)
    inputs = {
        "student_hidden": hs.requires_grad_(),
        "student_lm_head": torch.eye(V),
        "student_labels": labels,
        "teacher_hidden": ht,
        "teacher_lm_head": torch.eye(V),
    }
    return Case(proj, inputs, cross_tokenizer=False)


@pytest.mark.parametrize("lam, alpha", [(0.1, 0.5), (0.3, 0.2)])
@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("dist", range(len(HAND_MADE)))
def test_divergence_closed_form(name, dist, lam, alpha):
    p, q = ([x / sum(v) for x in v] for v in HAND_MADE[dist])
    T = 2.0
    want = closed_form(name, p, q, lam, alpha)
    # the reference
    z_q = T * torch.tensor([q], dtype=torch.float64).log()
    z_p = T * torch.tensor([p], dtype=torch.float64).log()
    got_ref = reference_divergence(name, z_q, z_p, temperature=T, skew_lambda=lam, akl_alpha=alpha)
    assert float(got_ref) == pytest.approx(want, rel=1e-9, abs=1e-12)
    # the project, student space (kd_student) and teacher space (kd_teacher)
    case = identity_case([p], [q], T)
    cfg = case.config(
        divergence=name,
        teacher_space_divergence=name,
        temperature=T,
        skew_lambda=lam,
        akl_alpha=alpha,
    )
    out = dskd_loss(case.proj, **case.inputs, config=cfg)
    assert as_float(out.metrics["kd_student"]) == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert as_float(out.metrics["kd_teacher"]) == pytest.approx(want, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_temperature_applies_to_both_sides(name):
    """D at T on logits z equals D at T = 1 on logits z / T (and no T^2 factor)."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(3, 6, generator=g), -1).tolist()
    q = torch.softmax(torch.randn(3, 6, generator=g), -1).tolist()
    want = sum(closed_form(name, pp, qq, 0.1, 0.5) for pp, qq in zip(p, q)) / 3
    case = identity_case(p, q, T=3.0)  # hidden = 3 log p, divided by T = 3 inside
    cfg = case.config(divergence=name, teacher_space_divergence=name, temperature=3.0)
    out = dskd_loss(case.proj, **case.inputs, config=cfg)
    assert as_float(out.metrics["kd_student"]) == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert as_float(out.metrics["kd_teacher"]) == pytest.approx(want, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_identical_distributions_give_zero(name):
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(3 * torch.randn(4, 8, generator=g), -1).tolist()
    case = identity_case(p, p, T=2.0)
    cfg = case.config(divergence=name, teacher_space_divergence=name)
    out = dskd_loss(case.proj, **case.inputs, config=cfg)
    for term in ("kd_student", "kd_teacher"):
        assert abs(as_float(out.metrics[term])) < 1e-6, term
    (gh,) = torch.autograd.grad(out.loss, [case.inputs["student_hidden"]])
    assert torch.isfinite(gh).all()
    z = torch.tensor(p, dtype=torch.float64).log()
    assert float(reference_divergence(name, z, z).abs().max()) < 1e-12
