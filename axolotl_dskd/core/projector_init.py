"""Logit-equivalence initialization of the DSKD projectors (DSKDv2), framework-free.

With random weights, ``t2s(h_t)`` fed to the student's LM head is a poor copy of the teacher's
prediction, and the early t2s terms teach noise. Here ``t2s`` starts as the linear map under which
the student's head reproduces the teacher's logits on the tokens both vocabularies share, in the
least-squares sense, for every hidden state; ``s2t`` symmetrically. The shared tokens are paired by
the text they stand for (:func:`axolotl_dskd.core.vocabulary.shared_vocabulary`), so the pairing also
works between a byte-level BPE and a sentencepiece vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    both biases zero. A token only one side has would otherwise be left free, and a map fitted to
    the others can give it the largest logit of all (a byte-fallback newline, say): its row is
    fitted to the other side's average row, an ordinary, unremarkable logit. The normal equations
    are summed over row chunks in float64 on the student head's device (memory O(d^2 + chunk d)
    for any vocabulary) and solved with a pseudo-inverse of the Gram matrix, so rank-deficient
    heads work. ``projectors.query`` is left alone.

    Returns the relative residuals ``||A W - B|| / ||B||`` of both fits (those rows included),
    for logging.
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
    device = a_head.device
    rows = max(1, chunk_elements // max(a_head.shape[1], b_head.shape[1]))
    # a row that is not finite (a broken checkpoint) takes no part: the run's own checks name it
    a_finite, b_finite = _finite_rows(a_head, rows), _finite_rows(b_head, rows)
    keep = a_finite[student_ids.to(a_finite.device)].cpu() & b_finite[teacher_ids.to(b_finite.device)].cpu()
    student_ids, teacher_ids = student_ids[keep], teacher_ids[keep]
    a_sums = _Sums.of(a_head, rows, device, a_finite.nonzero().squeeze(1))
    b_sums = _Sums.of(b_head, rows, device, b_finite.nonzero().squeeze(1))
    a_own, b_own = a_sums.without(a_head, student_ids, rows), b_sums.without(b_head, teacher_ids, rows)
    cross = torch.zeros(a_head.shape[1], b_head.shape[1], dtype=torch.float64, device=device)  # A^T B
    for start in range(0, len(student_ids), rows):
        a = a_head[student_ids[start : start + rows].to(a_head.device)].to(device, torch.float64)
        b = b_head[teacher_ids[start : start + rows].to(b_head.device)].to(device, torch.float64)
        cross.addmm_(a.T, b)
    # fit: the shared rows to each other, each side's own rows to the other side's mean row
    a_mean, b_mean = a_sums.total / a_sums.count, b_sums.total / b_sums.count
    t2s_cross = cross + torch.outer(a_own.total, b_mean)
    s2t_cross = cross.T + torch.outer(b_own.total, a_mean)
    gram_a, gram_b = a_sums.gram, b_sums.gram  # every row of a head takes part in its fit
    t2s = torch.linalg.pinv(gram_a, hermitian=True) @ t2s_cross  # [d_s, d_t]
    s2t = torch.linalg.pinv(gram_b, hermitian=True) @ s2t_cross  # [d_t, d_s]
    for layer, weight in ((projectors.t2s, t2s), (projectors.s2t, s2t)):
        layer.weight.copy_(weight)
        if layer.bias is not None:
            layer.bias.zero_()
    # the targets' Gram matrices: the shared rows of the other side, plus the mean row per own row
    t2s_target = b_sums.gram - b_own.gram + a_own.count * torch.outer(b_mean, b_mean)
    s2t_target = a_sums.gram - a_own.gram + b_own.count * torch.outer(a_mean, a_mean)
    return {
        "t2s_relative_residual": _relative_residual(t2s, gram_a, t2s_cross, t2s_target),
        "s2t_relative_residual": _relative_residual(s2t, gram_b, s2t_cross, s2t_target),
    }


def _finite_rows(head: Tensor, rows: int) -> Tensor:
    return torch.cat([head[i : i + rows].isfinite().all(1) for i in range(0, head.shape[0], rows)])


@dataclass
class _Sums:
    """``X^T X``, the column sums and the row count of some rows of an LM head, in float64."""

    gram: Tensor
    total: Tensor
    count: int

    @classmethod
    def of(cls, head: Tensor, rows: int, device: torch.device, ids: Tensor | None = None) -> _Sums:
        d = head.shape[1]
        sums = cls(torch.zeros(d, d, dtype=torch.float64, device=device),
                   torch.zeros(d, dtype=torch.float64, device=device), 0)  # fmt: skip
        n = head.shape[0] if ids is None else len(ids)
        for start in range(0, n, rows):
            part = (
                head[start : start + rows] if ids is None else head[ids[start : start + rows].to(head.device)]
            )
            x = part.to(device, torch.float64)
            sums.gram.addmm_(x.T, x)
            sums.total += x.sum(0)
            sums.count += x.shape[0]
        return sums

    def without(self, head: Tensor, shared: Tensor, rows: int) -> _Sums:
        """The sums over the rows not in ``shared``: all rows minus the shared ones."""
        part = _Sums.of(head, rows, self.gram.device, shared)
        return _Sums(self.gram - part.gram, self.total - part.total, self.count - part.count)


def _relative_residual(w: Tensor, gram_x: Tensor, cross_xy: Tensor, gram_y: Tensor) -> float:
    """``||X W - Y|| / ||Y||`` from the normal-equation sums alone (no second pass over the heads):
    ``||X W - Y||^2 = <W, X^T X W> - 2 <W, X^T Y> + tr(Y^T Y)``."""
    target = gram_y.trace()
    squared = (w * (gram_x @ w)).sum() - 2 * (w * cross_xy).sum() + target
    return float((squared.clamp_min(0) / target.clamp_min(torch.finfo(torch.float64).tiny)).sqrt())
