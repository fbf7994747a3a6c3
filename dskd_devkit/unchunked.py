"""The unchunked DSKD loss: the speed and memory baseline of ``benchmarks/loss_memory.py``.

A plain transcription of ``docs/dskd.md``, written the way the authors' code computes the
loss: every vocabulary-sized tensor (``z_s``, ``z_t``, ``z_t2s``, ``z_s2t`` and their
log-probabilities) exists for the **whole batch, every position** (``[B, L, V]``) and autograd
keeps what it needs for the backward pass. Unlike :mod:`dskd_devkit.reference` (float64, the
correctness yardstick) it runs in the inputs' precision, as ``axolotl_dskd.core.loss.dskd_loss`` does:

- vocabulary products in the LM head's dtype (bf16 stays bf16; fp16 is widened to float32,
  its logits overflow), the logits then cast to float32;
- projectors in their own (float32) precision;
- cross-model attention scores, softmaxes and divergences in float32.

So a timing or memory difference against ``dskd_loss`` is the chunking, not the precision.
``tests/unit/core/test_loss.py`` checks that both agree (value, metrics, gradients).

Not part of the package: it exists only to be measured against.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["unchunked_dskd_loss"]

IGNORE_INDEX = -100
MASKED_SCORE = -1e5
_DEFAULTS = {
    "kd_rate": 0.5,
    "temperature": 2.0,
    "divergence": "forward_kl",
    "teacher_space_divergence": "forward_kl",
    "skew_lambda": 0.1,
    "akl_alpha": 0.5,
    "cross_tokenizer": False,
}


# --------------------------------------------------------------------------------------------
# Divergences: per position, over the last (vocabulary) dim, from float32 logits.
# --------------------------------------------------------------------------------------------


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _divergence(
    name: str, z_student: Tensor, z_teacher: Tensor, T: float, lam: float, alpha: float
) -> Tensor:
    """``D(student_side, teacher_side)``, ``q = softmax(z_student/T)``, ``p = softmax(z_teacher/T)``."""
    log_q = F.log_softmax(z_student / T, dim=-1)
    log_p = F.log_softmax(z_teacher / T, dim=-1)
    if name == "forward_kl":
        return _kl(log_p, log_q)
    if name == "reverse_kl":
        return _kl(log_q, log_p)
    if name == "js":
        log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
        return 0.5 * _kl(log_p, log_m) + 0.5 * _kl(log_q, log_m)
    if name == "skew_forward_kl":
        return _kl(log_p, torch.logaddexp(log_p + math.log(lam), log_q + math.log1p(-lam)))
    if name == "skew_reverse_kl":
        return _kl(log_q, torch.logaddexp(log_p + math.log1p(-lam), log_q + math.log(lam)))
    if name == "adaptive_kl":
        with torch.no_grad():
            p_sorted, order = log_p.exp().sort(dim=-1)
            gap = (p_sorted - log_q.exp().gather(-1, order)).abs()
            tail = p_sorted.cumsum(-1) <= alpha
            g_tail = torch.where(tail, gap, 0.0).sum(-1)
            g_head = gap.sum(-1) - g_tail
            total = g_head + g_tail
            w_head = torch.where(total > 0, g_head / total.clamp_min(1e-30), 0.5)
        return w_head * _kl(log_p, log_q) + (1.0 - w_head) * _kl(log_q, log_p)
    raise ValueError(f"unknown divergence {name!r}")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _logits(hidden: Tensor, weight: Tensor) -> Tensor:
    """``hidden @ weight.T`` in the weight's precision (fp16 widened), as float32."""
    dtype = torch.float32 if weight.dtype == torch.float16 else weight.dtype
    return (hidden.to(dtype) @ weight.to(dtype).T).float()


def _linear(layer: nn.Linear, x: Tensor) -> Tensor:
    return layer(x.to(layer.weight.dtype))


def _norm(x: Tensor, valid: Tensor) -> Tensor:
    """``x / std(x)``, one unbiased std of all entries at the valid positions."""
    entries = x[valid]
    return x / entries.std() if entries.shape[0] > 0 else x


def _masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, values, 0.0).sum()


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------


def unchunked_dskd_loss(
    proj: nn.Module,
    *,
    student_hidden: Tensor,
    student_lm_head: Tensor,
    student_labels: Tensor,
    teacher_hidden: Tensor,
    teacher_lm_head: Tensor,
    teacher_labels: Tensor | None = None,
    student_input_ids: Tensor | None = None,
    teacher_input_ids: Tensor | None = None,
    student_embeddings: Tensor | None = None,
    teacher_embeddings: Tensor | None = None,
    config: Any = None,
    num_items: int | Tensor | None = None,
    student_segment_ids: Tensor | None = None,
    teacher_segment_ids: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The DSKD loss of one micro-batch with whole-batch ``[B, L, V]`` logits.

    Same keyword arguments as ``axolotl_dskd.core.loss.dskd_loss``; returns ``(loss, metrics)``
    with metrics ``ce``, ``kd_student``, ``kd_teacher``, ``t2s_ce``, ``t2s_acc``, ``aligned_frac``.
    """
    cfg = config if config is not None else SimpleNamespace(**_DEFAULTS)
    T, lam, alpha = float(cfg.temperature), float(cfg.skew_lambda), float(cfg.akl_alpha)

    def div(name: str, z_student: Tensor, z_teacher: Tensor) -> Tensor:
        return _divergence(name, z_student, z_teacher, T, lam, alpha)

    # shift: hidden states at 0..L-2 predict labels[1:]
    y_s = student_labels[:, 1:]
    m_s = y_s != IGNORE_INDEX
    y_s0 = torch.where(m_s, y_s, 0)
    h_s = student_hidden[:, :-1]
    h_t = teacher_hidden[:, :-1].detach()
    W_s = student_lm_head
    W_t = teacher_lm_head.detach()

    n_trained = m_s.sum()
    N = torch.as_tensor(
        n_trained if num_items is None else num_items, dtype=torch.float32, device=h_s.device
    ).clamp_min(1.0)

    # the student's own logits, every position of the batch
    z_s = _logits(h_s, W_s)  # [B, n, V_s]
    ce_tok = F.cross_entropy(z_s.flatten(0, 1), y_s0.flatten(), reduction="none").view_as(y_s)
    ce = _masked_sum(ce_tok, m_s) / N

    if not cfg.cross_tokenizer:
        z_t = _logits(h_t, W_t)  # [B, n, V_t], constant
        z_t2s = _logits(_linear(proj.t2s, h_t), W_s.detach())  # [B, n, V_s]
        z_s2t = _logits(_linear(proj.s2t, h_s), W_t)  # [B, n, V_t]
        rows, cols, kd_mask = m_s, m_s, m_s
        correct = m_s & (z_t2s.detach().argmax(-1) == y_s)
    else:
        if teacher_labels is None or student_input_ids is None or teacher_input_ids is None:
            raise ValueError("cross-tokenizer DSKD needs teacher_labels and both input_ids")
        if student_embeddings is None or teacher_embeddings is None:
            raise ValueError("cross-tokenizer DSKD needs student_embeddings and teacher_embeddings")
        y_t = teacher_labels[:, 1:]
        m_t = y_t != IGNORE_INDEX
        y_t0 = torch.where(m_t, y_t, 0)
        x_s0 = torch.where(m_s, student_input_ids[:, :-1], 0)
        x_t0 = torch.where(m_t, teacher_input_ids[:, :-1], 0)
        E_s = student_embeddings.detach()
        E_t = teacher_embeddings.detach()

        # 1-3: index embeddings, Norm, queries, keys, values (projectors in float32)
        q_idx = torch.cat([F.embedding(x_s0, E_s), F.embedding(y_s0, E_s)], -1)
        e_yt = F.embedding(y_t0, E_t).float()
        k_idx = torch.cat([F.embedding(x_t0, E_t).float(), e_yt], -1)
        Q = _linear(proj.query, q_idx)  # [B, n, 2 d_t]
        K = _norm(k_idx, m_t)  # [B, m, 2 d_t]
        V_t = _linear(proj.t2s, _norm(h_t.float(), m_t) + _norm(e_yt, m_t))  # [B, m, d_s]
        V_s = _linear(proj.s2t, h_s)  # [B, n, d_t]

        # 4: scores in float32 and the pair mask
        pair = m_s[:, :, None] & m_t[:, None, :]
        if (student_segment_ids is None) != (teacher_segment_ids is None):
            raise ValueError("give segment ids for both sides or for neither")
        if student_segment_ids is not None:
            seg_s, seg_t = student_segment_ids[:, :-1], teacher_segment_ids[:, :-1]
            pair = pair & (seg_s[:, :, None] == seg_t[:, None, :])
        S = Q @ K.transpose(-1, -2) / math.sqrt(K.shape[-1])
        S = S + (~pair).float() * MASKED_SCORE

        # 5-6: both directions, whole-batch logits
        z_t2s = _logits(S.softmax(-1) @ V_t, W_s.detach())  # [B, n, V_s]
        z_s2t = _logits(S.transpose(-1, -2).softmax(-1) @ V_s, W_t)  # [B, m, V_t]
        z_t = _logits(h_t, W_t)  # [B, m, V_t], constant
        rows = m_s & pair.any(-1)
        cols = m_t & pair.any(-2)
        correct = rows & (z_t2s.detach().argmax(-1) == y_s)
        kd_mask = correct

    t2s_ce_tok = F.cross_entropy(z_t2s.flatten(0, 1), y_s0.flatten(), reduction="none")
    t2s_ce = _masked_sum(t2s_ce_tok.view_as(y_s), rows) / N
    kd_stu = _masked_sum(div(cfg.divergence, z_s, z_t2s.detach()), kd_mask) / N
    kd_tea = _masked_sum(div(cfg.teacher_space_divergence, z_s2t, z_t), cols) / N

    r = float(cfg.kd_rate)
    loss = (1.0 - r) * ce + r * (kd_stu + t2s_ce + kd_tea)
    metrics = {
        "ce": ce.detach(),
        "kd_student": kd_stu.detach(),
        "kd_teacher": kd_tea.detach(),
        "t2s_ce": t2s_ce.detach(),
        "t2s_acc": correct.sum().float() / n_trained.clamp_min(1).float(),
        # cross-model attention alone pairs no position exactly; one vocabulary pairs every one
        "aligned_frac": torch.tensor(0.0 if cfg.cross_tokenizer else 1.0),
    }
    return loss, metrics
