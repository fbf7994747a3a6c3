"""An independent, plain float64 transcription of the DSKD loss (``docs/dskd.md``).

This file is written from the math alone and is deliberately naive: no chunking,
full-vocabulary logits for the whole batch, every step in the order the spec states it, in
float64. It is the yardstick that ``tests/unit/core/test_loss.py`` holds ``axolotl_dskd.core.loss.dskd_loss`` to
(values, metrics and gradients), and the benchmarks' unchunked baseline
(:mod:`dskd_devkit.unchunked`) is checked against the same tests.

Gradients flow back to the caller's tensors: inputs are cast with ``.to(float64)`` (which is
differentiable) and the projectors are applied through ``torch.func.functional_call`` with their
parameters cast by ``.double()``, so ``torch.autograd.grad(loss, proj.parameters())`` works.
Teacher tensors and the embedding matrices are detached, as the spec requires.

Conventions fixed here where the spec leaves room:

- ``N`` (the token-mean denominator) and the ``t2s_acc`` denominator are floored at 1, so a
  micro-batch without trained student tokens gives 0 instead of 0/0.
- A packed position ``i`` (after the shift, i.e. the hidden state at ``i`` predicting
  ``labels[i + 1]``) belongs to the segment ``segment_ids[:, i]``.
- ``Norm`` over fewer than two valid entries (no trained teacher token in the micro-batch)
  divides by 1; every pair is masked then, so the value does not reach any term.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["DIVERGENCE_NAMES", "reference_divergence", "reference_dskd_loss"]

IGNORE_INDEX = -100
MASKED_SCORE = -1e5
DIVERGENCE_NAMES = (
    "forward_kl",
    "reverse_kl",
    "js",
    "skew_forward_kl",
    "skew_reverse_kl",
    "adaptive_kl",
)
_DEFAULTS = {
    "kd_rate": 0.5,
    "kd_teacher_weight": 1.0,
    "temperature": 2.0,
    "divergence": "forward_kl",
    "teacher_space_divergence": "forward_kl",
    "skew_lambda": 0.1,
    "akl_alpha": 0.5,
    "cross_tokenizer": False,
    "token_alignment": "cma",
    "kd_student_accuracy_mask": "attention",
    "student_space_target": "projected",
}
F64 = torch.float64


# --------------------------------------------------------------------------------------------
# Divergences (spec table). Rows are tokens, the last dim the vocabulary.
# --------------------------------------------------------------------------------------------


def reference_divergence(
    name: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 2.0,
    skew_lambda: float = 0.1,
    akl_alpha: float = 0.5,
) -> Tensor:
    """``D(student_side, teacher_side)`` per token.

    ``q = softmax(student_side / T)``, ``p = softmax(teacher_side / T)``; ``[..., V] -> [...]``.
    """
    log_q = F.log_softmax(student_logits.to(F64) / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.to(F64) / temperature, dim=-1)
    p = log_p.exp()
    q = log_q.exp()
    fkl = (p * (log_p - log_q)).sum(-1)
    rkl = (q * (log_q - log_p)).sum(-1)

    if name == "forward_kl":
        return fkl
    if name == "reverse_kl":
        return rkl
    if name == "js":
        # m = (p + q) / 2, log m = logaddexp(log p, log q) - log 2
        log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
        return 0.5 * (p * (log_p - log_m)).sum(-1) + 0.5 * (q * (log_q - log_m)).sum(-1)
    if name == "skew_forward_kl":
        lam = skew_lambda
        # log(lam p + (1 - lam) q)
        log_mix = torch.logaddexp(math.log(lam) + log_p, math.log(1.0 - lam) + log_q)
        return (p * (log_p - log_mix)).sum(-1)
    if name == "skew_reverse_kl":
        lam = skew_lambda
        # log((1 - lam) p + lam q)
        log_mix = torch.logaddexp(math.log(1.0 - lam) + log_p, math.log(lam) + log_q)
        return (q * (log_q - log_mix)).sum(-1)
    if name == "adaptive_kl":
        with torch.no_grad():
            p_sorted, order = torch.sort(p, dim=-1, stable=True)  # ascending
            q_sorted = torch.gather(q, -1, order)
            gap = (p_sorted - q_sorted).abs()
            tail = torch.cumsum(p_sorted, dim=-1) <= akl_alpha
            g_tail = (gap * tail).sum(-1)
            g_head = (gap * ~tail).sum(-1)
            total = g_head + g_tail
            # Identical distributions: total == 0 and FKL == RKL == 0, any weights give 0.
            safe = torch.where(total > 0, total, torch.ones_like(total))
            w_head = torch.where(total > 0, g_head / safe, torch.full_like(total, 0.5))
            w_tail = torch.where(total > 0, g_tail / safe, torch.full_like(total, 0.5))
        return w_head * fkl + w_tail * rkl
    raise ValueError(f"unknown divergence {name!r}")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _linear64(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer(x)`` in float64 with gradients reaching ``layer``'s float32 parameters."""
    params = {name: p.double() for name, p in layer.named_parameters()}
    return functional_call(layer, params, (x.to(F64),))


def _shift(labels: Tensor) -> tuple[Tensor, Tensor]:
    y = labels[:, 1:]
    return y, y != IGNORE_INDEX


def _ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-token cross-entropy (no temperature)."""
    return F.cross_entropy(logits, targets, reduction="none")


def _norm(x: Tensor, valid: Tensor) -> Tensor:
    """``x / std(x)``: unbiased std of all entries of ``x`` at the valid positions."""
    entries = x[valid]
    if entries.numel() < 2:
        return x
    return x / entries.std(unbiased=True)


def _config(config: Any) -> Any:
    if config is None:
        return SimpleNamespace(**_DEFAULTS)
    return config


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------


def reference_dskd_loss(
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
    token_alignment: Tensor | None = None,
    config: Any = None,
    num_items: int | Tensor | None = None,
    student_segment_ids: Tensor | None = None,
    teacher_segment_ids: Tensor | None = None,
    shared_vocabulary: tuple[Tensor, Tensor] | None = None,
    t2s_labels: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The DSKD loss of one micro-batch, exactly as the spec writes it, in float64.

    Returns ``(loss, metrics)`` with metrics ``ce``, ``kd_student``, ``kd_teacher``, ``t2s_ce``,
    ``t2s_acc``, ``aligned_frac`` (float64 tensors; the KD terms are the un-weighted token means).

    Cross-tokenizer pairing (``config.token_alignment``): ``cma`` attends over every trained
    pair; ``exact`` takes, for each trained student position ``i`` with a partner
    ``j = token_alignment[b, i] >= 0``, the same-vocabulary terms between the student state at
    ``i`` and the teacher state at ``j`` (no accuracy mask unless ``kd_student_accuracy_mask``
    is ``everywhere``), and CE alone elsewhere;
    ``exact+cma`` does the same on the partnered positions and attention for the trained
    student rows without a partner and the trained teacher columns that are no partner.

    ``student_space_target: shared_vocabulary``: at every position paired one to one (same
    vocabulary, exact partners) kd_student compares the student's logits of the shared tokens
    (``shared_vocabulary[0]``; one vocabulary: every common id) with the teacher's logits of the
    same tokens (``shared_vocabulary[1]``), each renormalized over them; the accuracy mask then
    asks whether the teacher's top shared token is the label. Without attention nothing then reads
    the projected teacher: t2s_ce and t2s_acc are 0 and t2s is not trained.

    ``t2s_labels`` (default the labels): the targets of t2s_ce, read at the trained positions.
    """
    cfg = _config(config)
    T = float(cfg.temperature)
    # kd_student only where the projected teacher's top-1 is the label, also off attention (DSKDv2)
    masked_everywhere = cfg.kd_student_accuracy_mask == "everywhere"
    own_target = getattr(cfg, "student_space_target", "projected") == "shared_vocabulary"
    if own_target and not cfg.cross_tokenizer:
        common = torch.arange(min(student_lm_head.shape[0], teacher_lm_head.shape[0]))
        shared_vocabulary = (common, common)
    if own_target and shared_vocabulary is None:
        raise ValueError("student_space_target='shared_vocabulary' needs the shared token ids")
    s_ids, t_ids = shared_vocabulary if own_target else (None, None)
    t2s_read = not own_target or (cfg.cross_tokenizer and cfg.token_alignment != "exact")

    def student_space_kd(
        z_student: Tensor, z_teacher_own: Tensor, z_projected: Tensor, label: Tensor
    ) -> Tensor:
        """kd_student of one row paired position by position, zero where the mask drops it."""
        if own_target:
            student_side, teacher_side = z_student[s_ids], z_teacher_own[t_ids]
            agrees = s_ids[teacher_side.argmax()] == label
        else:
            student_side, teacher_side = z_student, z_projected
            agrees = z_projected.argmax() == label
        if masked_everywhere and not agrees:
            return torch.zeros((), dtype=F64)
        return div(cfg.divergence, student_side[None], teacher_side[None].detach()).sum()

    def div(name: str, student_side: Tensor, teacher_side: Tensor) -> Tensor:
        return reference_divergence(
            name,
            student_side,
            teacher_side,
            temperature=T,
            skew_lambda=float(cfg.skew_lambda),
            akl_alpha=float(cfg.akl_alpha),
        )

    # Shift: hidden states at 0..L-2 predict labels[1:].
    y_s, m_s = _shift(student_labels)
    y_t2s = y_s if t2s_labels is None else t2s_labels[:, 1:]  # what t2s_ce trains t2s toward
    h_s = student_hidden[:, :-1].to(F64)  # keeps the gradient to the caller's tensor
    h_t = teacher_hidden[:, :-1].detach().to(F64)
    W_s = student_lm_head.to(F64)  # trainable in a full fine-tune
    W_s_sg = W_s.detach()
    W_t = teacher_lm_head.detach().to(F64)

    n_trained = m_s.sum()
    aligned_frac = torch.ones((), dtype=F64) if not cfg.cross_tokenizer else torch.zeros((), dtype=F64)
    N = n_trained.to(F64) if num_items is None else torch.as_tensor(num_items, dtype=F64)
    N = N.clamp_min(1.0)

    # Student logits and CE (as the model computes them).
    z_s = h_s @ W_s.T  # [B, n, V_s]
    ce = _ce(z_s[m_s], y_s[m_s]).sum() / N

    # Teacher logits: constant.
    z_t = h_t @ W_t.T  # [B, m, V_t]

    if not cfg.cross_tokenizer:
        # ---------------- same vocabulary: M_t = M_s, y_t = y_s ----------------
        z_t2s = _linear64(proj.t2s, h_t) @ W_s_sg.T  # teacher projected into the student space
        t2s_ce = _ce(z_t2s[m_s], y_t2s[m_s]).sum() / N * t2s_read
        correct = m_s & (z_t2s.argmax(-1) == y_s) & t2s_read
        kd_stu = (
            sum(
                (
                    student_space_kd(z_s[b, i], z_t[b, i], z_t2s[b, i], y_s[b, i])
                    for b, i in m_s.nonzero().tolist()
                ),
                torch.zeros((), dtype=F64),
            )
            / N
        )
        z_s2t = _linear64(proj.s2t, h_s) @ W_t.T  # student projected into the teacher space
        kd_tea = div(cfg.teacher_space_divergence, z_s2t[m_s], z_t[m_s]).sum() / N
    else:
        # ---------------- different vocabularies ----------------
        mode = cfg.token_alignment
        y_t, m_t = _shift(teacher_labels)
        zero = torch.zeros((), dtype=F64)
        exact = torch.zeros_like(m_s)  # trained student positions distilled from their partner
        partnered = torch.zeros_like(m_t)  # teacher positions that are such a partner
        t2s_ce = kd_stu = kd_tea = zero
        correct = torch.zeros_like(m_s)
        if token_alignment is not None:
            partner = token_alignment[:, :-1]
            aligned_frac = (m_s & (partner >= 0)).sum().to(F64) / n_trained.to(F64).clamp_min(1.0)
        if mode != "cma":
            if token_alignment is None:
                raise ValueError(f"token_alignment={mode!r} needs the token_alignment tensor")
            exact = m_s & (partner >= 0)
            H_t = teacher_hidden.detach().to(F64)
            for b, i in exact.nonzero().tolist():
                j = int(partner[b, i])
                if j < m_t.shape[1]:
                    partnered[b, j] = True
                h_j = H_t[b, j]
                z_t2s_bi = _linear64(proj.t2s, h_j) @ W_s_sg.T
                t2s_ce = t2s_ce + _ce(z_t2s_bi[None], y_t2s[b, i][None]).sum() / N * t2s_read
                z_t_j = h_j @ W_t.T
                kd_stu = kd_stu + student_space_kd(z_s[b, i], z_t_j, z_t2s_bi, y_s[b, i]) / N
                z_s2t_bi = _linear64(proj.s2t, h_s[b, i]) @ W_t.T
                kd_tea = kd_tea + div(cfg.teacher_space_divergence, z_s2t_bi[None], z_t_j[None]).sum() / N
                correct[b, i] = t2s_read and bool(z_t2s_bi.argmax() == y_s[b, i])
    if cfg.cross_tokenizer and mode != "exact":
        # ---------------- cross-model attention ----------------
        if student_input_ids is None or teacher_input_ids is None:
            raise ValueError("CMA needs both input_ids")
        if student_embeddings is None or teacher_embeddings is None:
            raise ValueError("CMA needs both embedding matrices")
        x_s = student_input_ids[:, :-1]
        x_t = teacher_input_ids[:, :-1]
        E_s = student_embeddings.detach().to(F64)
        E_t = teacher_embeddings.detach().to(F64)
        d_t = teacher_hidden.shape[-1]

        # 1. index embeddings, masked positions -> token id 0
        xs0 = torch.where(m_s, x_s, torch.zeros_like(x_s))
        ys0 = torch.where(m_s, y_s, torch.zeros_like(y_s))
        xt0 = torch.where(m_t, x_t, torch.zeros_like(x_t))
        yt0 = torch.where(m_t, y_t, torch.zeros_like(y_t))
        q_idx = torch.cat([E_s[xs0], E_s[ys0]], dim=-1)  # [B, n, 2 d_s]
        k_idx = torch.cat([E_t[xt0], E_t[yt0]], dim=-1)  # [B, m, 2 d_t]

        # 2-3. Norm (teacher tensors over M_t), queries, keys, values
        Q = _linear64(proj.query, q_idx)  # [B, n, 2 d_t]
        K = _norm(k_idx, m_t)  # keys are not projected
        V_t = _linear64(proj.t2s, _norm(h_t, m_t) + _norm(E_t[yt0], m_t))  # [B, m, d_s]
        V_s = _linear64(proj.s2t, h_s)  # [B, n, d_t]

        # 4. scores and the pair mask
        S = Q @ K.transpose(-1, -2) / math.sqrt(2 * d_t)  # [B, n, m]
        pair = m_s[:, :, None] & m_t[:, None, :]
        if (student_segment_ids is None) != (teacher_segment_ids is None):
            raise ValueError("give segment ids for both sides or for neither")
        if student_segment_ids is not None:
            seg_s = student_segment_ids[:, :-1]
            seg_t = teacher_segment_ids[:, :-1]
            pair = pair & (seg_s[:, :, None] == seg_t[:, None, :])
        S = S + (~pair).to(F64) * MASKED_SCORE
        row_ok = pair.any(-1)  # student rows with a valid partner   [B, n]
        col_ok = pair.any(-2)  # teacher columns with a valid partner [B, m]

        # 5. teacher -> student
        A = torch.softmax(S, dim=-1)
        z_t2s = (A @ V_t) @ W_s_sg.T  # [B, n, V_s]
        rows = m_s & row_ok & ~exact
        t2s_ce = t2s_ce + _ce(z_t2s[rows], y_t2s[rows]).sum() / N
        correct_cma = rows & (z_t2s.argmax(-1) == y_s)
        kd_stu = kd_stu + div(cfg.divergence, z_s[correct_cma], z_t2s[correct_cma].detach()).sum() / N
        correct = correct | correct_cma

        # 6. student -> teacher (same scores, normalised over student positions)
        A_prime = torch.softmax(S.transpose(-1, -2), dim=-1)  # [B, m, n]
        z_s2t = (A_prime @ V_s) @ W_t.T  # [B, m, V_t]
        cols = m_t & col_ok & ~partnered
        kd_tea = kd_tea + div(cfg.teacher_space_divergence, z_s2t[cols], z_t[cols]).sum() / N

    r, w = float(cfg.kd_rate), float(cfg.kd_teacher_weight)
    loss = (1.0 - r) * ce + r * (kd_stu + t2s_ce + w * kd_tea)
    t2s_acc = correct.sum().to(F64) / n_trained.to(F64).clamp_min(1.0)
    metrics = {
        "ce": ce,
        "kd_student": kd_stu,
        "kd_teacher": kd_tea if w > 0 else torch.zeros((), dtype=F64),  # not computed at w = 0
        "t2s_ce": t2s_ce,
        "t2s_acc": t2s_acc,
        "aligned_frac": aligned_frac,
    }
    return loss, metrics


# --------------------------------------------------------------------------------------------
# Universal Logit Distillation (the paper's cross-tokenizer baseline)
# --------------------------------------------------------------------------------------------


def _trained_by_sample(mask: Tensor, segments: Tensor | None, b: int) -> dict[int, list[int]]:
    """Row ``b``'s trained positions, in order, per packed sample."""
    by_sample: dict[int, list[int]] = {}
    for i in mask.nonzero().flatten().tolist():
        by_sample.setdefault(int(segments[b, i]) if segments is not None else 0, []).append(i)
    return by_sample


def reference_uld_loss(
    *,
    student_hidden: Tensor,
    student_lm_head: Tensor,
    student_labels: Tensor,
    teacher_hidden: Tensor,
    teacher_lm_head: Tensor,
    teacher_labels: Tensor,
    kd_rate: float = 0.5,
    num_items: int | None = None,
    student_segment_ids: Tensor | None = None,
    teacher_segment_ids: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``(1-r) CE + r ULD`` in float64 (Boizard et al. 2024, as the DSKD authors run it):
    within each sample the k-th trained student target meets the k-th trained teacher target;
    ULD is the L1 distance between their softmax vectors, each sorted in decreasing order, the
    smaller vocabulary padded with zeros. Sums over trained student tokens divided by ``N``."""
    y_s, m_s = _shift(student_labels)
    _, m_t = _shift(teacher_labels)
    z_s = student_hidden[:, :-1].to(F64) @ student_lm_head.to(F64).T
    z_t = teacher_hidden.detach()[:, :-1].to(F64) @ teacher_lm_head.detach().to(F64).T
    n_trained = m_s.sum()
    N = float(num_items) if num_items is not None else max(float(n_trained), 1.0)
    width = max(z_s.shape[-1], z_t.shape[-1])

    def sorted_probs(z: Tensor) -> Tensor:
        p = torch.softmax(z, -1).sort(descending=True).values
        return torch.cat([p, p.new_zeros(width - p.shape[0])])

    ce = _ce(z_s[m_s], y_s[m_s]).sum() / N
    uld = z_s.new_zeros(())
    paired = 0
    s_seg = None if student_segment_ids is None else student_segment_ids[:, :-1]
    t_seg = None if teacher_segment_ids is None else teacher_segment_ids[:, :-1]
    for b in range(m_s.shape[0]):
        s_by, t_by = _trained_by_sample(m_s[b], s_seg, b), _trained_by_sample(m_t[b], t_seg, b)
        for sample, s_positions in s_by.items():
            for i, j in zip(s_positions, t_by.get(sample, [])):
                uld = uld + (sorted_probs(z_s[b, i]) - sorted_probs(z_t[b, j])).abs().sum() / N
                paired += 1
    r = float(kd_rate)
    loss = (1.0 - r) * ce + r * uld
    return loss, {"ce": ce, "kd_student": uld, "aligned_frac": torch.tensor(paired / max(int(n_trained), 1))}
