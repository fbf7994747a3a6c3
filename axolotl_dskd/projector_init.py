"""Logit-equivalence initialization of the DSKD projectors (DSKDv2), framework-free.

With random weights, ``t2s(h_t)`` fed to the student's LM head is a poor copy of the teacher's
prediction, and the early t2s terms teach noise. Here ``t2s`` starts as the linear map under which
the student's head reproduces the teacher's logits on the tokens both vocabularies share, in the
least-squares sense, for every hidden state; ``s2t`` symmetrically. The shared tokens are paired by
the text they stand for (:func:`axolotl_dskd.vocabulary.shared_vocabulary`), so the pairing also
works between a byte-level BPE and a sentencepiece vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

GRAM_CHUNK_ELEMENTS = 1 << 24
"""Head rows per normal-equation chunk times the hidden size: 128 MiB per float64 chunk."""


def _weight(head: Tensor | nn.Module) -> Tensor:
    return head.weight if isinstance(head, nn.Module) else head


@torch.no_grad()
def logit_equivalent_projectors(
    projectors: nn.Module,
    student_lm_head: Tensor | nn.Module,
    teacher_lm_head: Tensor | nn.Module,
    student_ids: Tensor,
    teacher_ids: Tensor,
    chunk_elements: int = GRAM_CHUNK_ELEMENTS,
) -> dict[str, float]:
    """Set ``projectors.t2s`` and ``projectors.s2t`` in place to the least-squares logit maps.

    With ``A = student_lm_head[student_ids]`` and ``B = teacher_lm_head[teacher_ids]``:
    ``t2s.weight = argmin_W ||A W - B||_F`` (the student's head on ``t2s(h)`` gives the teacher's
    logits on ``h``, shared tokens, best for all ``h`` at once) and ``s2t.weight = argmin ||B W - A||``,
    both biases zero. The normal equations are summed over row chunks in float64 on the student
    head's device (memory O(d^2 + chunk d) for any vocabulary) and solved with a pseudo-inverse of
    the Gram matrix, so rank-deficient heads work. ``projectors.query`` is left alone.

    Returns the relative residuals ``||A W - B|| / ||B||`` of both fits, for logging.
    """
    a_head, b_head = _weight(student_lm_head), _weight(teacher_lm_head)
    if student_ids.shape != teacher_ids.shape or student_ids.ndim != 1 or len(student_ids) == 0:
        raise ValueError(
            f"need two equally long, non-empty id vectors, got {tuple(student_ids.shape)} "
            f"and {tuple(teacher_ids.shape)}"
        )
    for name, head, ids in (("student", a_head, student_ids), ("teacher", b_head, teacher_ids)):
        if int(ids.max()) >= head.shape[0] or int(ids.min()) < 0:
            raise ValueError(f"{name} ids out of range for a {head.shape[0]}-row LM head")
    device, f64 = a_head.device, torch.float64
    d_s, d_t = a_head.shape[1], b_head.shape[1]
    gram_a = torch.zeros(d_s, d_s, dtype=f64, device=device)
    gram_b = torch.zeros(d_t, d_t, dtype=f64, device=device)
    cross = torch.zeros(d_s, d_t, dtype=f64, device=device)  # A^T B
    rows = max(1, chunk_elements // max(d_s, d_t))
    for start in range(0, len(student_ids), rows):
        a = a_head[student_ids[start : start + rows].to(a_head.device)].to(device, f64)
        b = b_head[teacher_ids[start : start + rows].to(b_head.device)].to(device, f64)
        gram_a.addmm_(a.T, a)
        gram_b.addmm_(b.T, b)
        cross.addmm_(a.T, b)
    t2s = torch.linalg.pinv(gram_a, hermitian=True) @ cross  # [d_s, d_t]
    s2t = torch.linalg.pinv(gram_b, hermitian=True) @ cross.T  # [d_t, d_s]
    for layer, weight in ((projectors.t2s, t2s), (projectors.s2t, s2t)):
        layer.weight.copy_(weight)
        if layer.bias is not None:
            layer.bias.zero_()
    return {
        "t2s_relative_residual": _relative_residual(t2s, gram_a, cross, gram_b),
        "s2t_relative_residual": _relative_residual(s2t, gram_b, cross.T, gram_a),
    }


def _relative_residual(w: Tensor, gram_x: Tensor, cross_xy: Tensor, gram_y: Tensor) -> float:
    """``||X W - Y|| / ||Y||`` from the normal-equation sums alone (no second pass over the heads):
    ``||X W - Y||^2 = <W, X^T X W> - 2 <W, X^T Y> + tr(Y^T Y)``."""
    target = gram_y.trace()
    squared = (w * (gram_x @ w)).sum() - 2 * (w * cross_xy).sum() + target
    return float((squared.clamp_min(0) / target.clamp_min(torch.finfo(torch.float64).tiny)).sqrt())
