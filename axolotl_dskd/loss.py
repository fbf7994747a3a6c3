"""Dual-Space Knowledge Distillation loss (Zhang et al., EMNLP 2024), framework-free.

The contract is ``shared/dskd-spec.md``. Everything here works from final hidden states and
LM-head weights: logits only ever exist a chunk of trained tokens at a time
(:mod:`axolotl_dskd.chunking`), matrix products run in the inputs' precision and every
softmax and divergence in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from axolotl_dskd.chunking import chunked_token_sum
from axolotl_dskd.divergences import DIVERGENCES, get_divergence

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 24
"""Default logit block per chunk: 16M entries (64 MiB in float32) for the largest vocabulary."""
MASKED_SCORE = -1e5
METRIC_NAMES = ("ce", "kd_student", "kd_teacher", "t2s_ce", "t2s_acc")


@dataclass(frozen=True, kw_only=True)
class DSKDLossConfig:
    """Hyperparameters of the DSKD loss; the defaults are the paper's."""

    kd_rate: float = 0.5
    temperature: float = 2.0
    divergence: str = "forward_kl"
    teacher_space_divergence: str = "forward_kl"
    skew_lambda: float = 0.1
    akl_alpha: float = 0.5
    cross_tokenizer: bool = False
    chunk_size: int | None = None
    """Trained tokens per vocabulary chunk; ``None`` sizes it to ``CHUNK_ELEMENTS / V``."""
    compile: bool = False
    """``torch.compile`` the per-chunk function (CUDA; off where Inductor is unavailable)."""

    def __post_init__(self) -> None:
        for name in ("divergence", "teacher_space_divergence"):
            if getattr(self, name) not in DIVERGENCES:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is not a divergence; "
                    f"choose one of {', '.join(DIVERGENCES)}"
                )
        if not 0.0 <= self.kd_rate <= 1.0:
            raise ValueError(f"kd_rate={self.kd_rate} must lie in [0, 1]")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be positive")
        if not 0.0 < self.skew_lambda < 1.0:
            raise ValueError(f"skew_lambda={self.skew_lambda} must lie strictly between 0 and 1")
        if not 0.0 <= self.akl_alpha <= 1.0:
            raise ValueError(f"akl_alpha={self.akl_alpha} must lie in [0, 1]")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size={self.chunk_size} must be a positive number of tokens")

    def tokens_per_chunk(self, vocab_size: int) -> int:
        return self.chunk_size or max(16, CHUNK_ELEMENTS // vocab_size)


class Projectors(nn.Module):
    """The trained maps between the two hidden spaces, in float32 whatever the models use."""

    def __init__(
        self, student_hidden_size: int, teacher_hidden_size: int, cross_tokenizer: bool = False
    ) -> None:
        super().__init__()
        self.t2s = nn.Linear(teacher_hidden_size, student_hidden_size, dtype=torch.float32)
        self.s2t = nn.Linear(student_hidden_size, teacher_hidden_size, dtype=torch.float32)
        self.query: nn.Linear | None = (
            nn.Linear(2 * student_hidden_size, 2 * teacher_hidden_size, dtype=torch.float32)
            if cross_tokenizer
            else None
        )

    @property
    def shapes(self) -> dict[str, list[int]]:
        return {name: list(p.shape) for name, p in self.state_dict().items()}


@dataclass
class DSKDLossOutput:
    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


def _project(layer: nn.Linear, x: Tensor) -> Tensor:
    return layer(x.to(layer.weight.dtype))


def _logits(hidden: Tensor, weight: Tensor) -> Tensor:
    """Vocabulary product in the weight's precision (fp16 is widened: its logits overflow),
    returned in float32."""
    dtype = torch.float32 if weight.dtype == torch.float16 else weight.dtype
    return (hidden.to(dtype) @ weight.to(dtype).T).float()


def _student_space_chunk(
    hidden: Tensor,
    t2s_hidden: Tensor,
    targets: Tensor,
    t2s_valid: Tensor,
    lm_head: Tensor,
    *,
    config: DSKDLossConfig,
) -> tuple[Tensor, Tensor]:
    """CE, t2s_ce and kd_student over a chunk of trained student tokens.

    Stats: ``[ce, t2s_ce, kd_student, t2s_correct]`` sums.
    """
    divergence = get_divergence(config.divergence, config.skew_lambda, config.akl_alpha)
    z_s = _logits(hidden, lm_head)
    z_t2s = _logits(t2s_hidden, lm_head.detach())
    ce = F.cross_entropy(z_s, targets, reduction="none")
    t2s_ce = torch.where(t2s_valid, F.cross_entropy(z_t2s, targets, reduction="none"), 0.0)
    correct = t2s_valid & (z_t2s.detach().argmax(-1) == targets)
    kd_mask = correct if config.cross_tokenizer else t2s_valid
    log_q = F.log_softmax(z_s / config.temperature, dim=-1)
    log_p = F.log_softmax(z_t2s.detach() / config.temperature, dim=-1)
    kd = torch.where(kd_mask, divergence(log_q, log_p), 0.0)
    ce, t2s_ce, kd = ce.sum(), t2s_ce.sum(), kd.sum()
    loss = (1.0 - config.kd_rate) * ce + config.kd_rate * (t2s_ce + kd)
    stats = torch.stack([ce, t2s_ce, kd, correct.sum().float()]).detach()
    return loss, stats


def _teacher_space_chunk(
    s2t_hidden: Tensor,
    teacher_hidden: Tensor,
    valid: Tensor,
    lm_head: Tensor,
    *,
    config: DSKDLossConfig,
) -> tuple[Tensor, Tensor]:
    """kd_teacher over a chunk of trained teacher tokens. Stats: ``[kd_teacher]`` sum."""
    divergence = get_divergence(
        config.teacher_space_divergence, config.skew_lambda, config.akl_alpha
    )
    with torch.no_grad():
        log_p = F.log_softmax(_logits(teacher_hidden, lm_head) / config.temperature, dim=-1)
    log_q = F.log_softmax(_logits(s2t_hidden, lm_head) / config.temperature, dim=-1)
    kd = torch.where(valid, divergence(log_q, log_p), 0.0).sum()
    return config.kd_rate * kd, kd.detach().reshape(1)


def _maybe_compile(fn, config: DSKDLossConfig):
    return torch.compile(fn, dynamic=True) if config.compile else fn


def _shift(hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Hidden states at positions ``0..L-2``, their targets ``labels[1:]`` and the train mask."""
    targets = labels[:, 1:]
    return hidden[:, :-1], targets, targets != IGNORE_INDEX


def _token_counts(mask: Tensor, num_items: int | Tensor | None) -> tuple[Tensor, Tensor]:
    """Trained targets in this micro-batch, and the loss denominator ``N`` (at least 1)."""
    n_trained = mask.sum()
    denom = n_trained if num_items is None else num_items
    return n_trained, torch.as_tensor(denom, dtype=torch.float32, device=mask.device).clamp_min(1.0)


def _normalized(x: Tensor, valid: Tensor) -> Tensor:
    """``x / std(x)``, one unbiased std over every entry at the valid positions.

    With no valid position nothing downstream is used; dividing by 1 keeps it finite.
    """
    return x / x[valid].std() if valid.any() else x


def _cross_model_attention(
    proj: Projectors,
    h_s: Tensor,
    y_s: Tensor,
    m_s: Tensor,
    x_s: Tensor,
    h_t: Tensor,
    y_t: Tensor,
    m_t: Tensor,
    x_t: Tensor,
    student_embeddings: Tensor,
    teacher_embeddings: Tensor,
    student_segments: Tensor | None,
    teacher_segments: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Align each side's hidden states to the other's positions (spec, CMA steps 1-6).

    Returns ``t2s_hidden [B, n, d_s]``, ``s2t_hidden [B, m, d_t]`` and the masks of student
    rows / teacher columns that have at least one valid partner in their sample.
    """
    assert proj.query is not None, "cross-tokenizer DSKD needs Projectors(cross_tokenizer=True)"
    e_s, e_t = student_embeddings.detach(), teacher_embeddings.detach()
    zero = torch.zeros((), dtype=torch.long, device=x_s.device)
    y_s_ids, y_t_ids = torch.where(m_s, y_s, zero), torch.where(m_t, y_t, zero)
    q_idx = torch.cat([F.embedding(torch.where(m_s, x_s, zero), e_s), F.embedding(y_s_ids, e_s)], -1)
    y_t_emb = F.embedding(y_t_ids, e_t).float()
    k_idx = torch.cat([F.embedding(torch.where(m_t, x_t, zero), e_t).float(), y_t_emb], -1)

    query = _project(proj.query, q_idx)
    key = _normalized(k_idx, m_t)
    value_t = _project(proj.t2s, _normalized(h_t.float(), m_t) + _normalized(y_t_emb, m_t))
    value_s = _project(proj.s2t, h_s)

    pairs = m_s[:, :, None] & m_t[:, None, :]
    if student_segments is not None and teacher_segments is not None:
        pairs = pairs & (student_segments[:, :, None] == teacher_segments[:, None, :])
    scores = (query @ key.transpose(-1, -2)) / math.sqrt(key.shape[-1])
    scores = scores + (~pairs).float() * MASKED_SCORE
    t2s_hidden = scores.softmax(-1) @ value_t
    s2t_hidden = scores.transpose(-1, -2).softmax(-1) @ value_s
    return t2s_hidden, s2t_hidden, pairs.any(-1), pairs.any(-2)


def dskd_loss(
    proj: Projectors,
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
    config: DSKDLossConfig = DSKDLossConfig(),
    num_items: int | Tensor | None = None,
    student_segment_ids: Tensor | None = None,
    teacher_segment_ids: Tensor | None = None,
) -> DSKDLossOutput:
    """The DSKD loss of one micro-batch: ``(1-r) CE + r (kd_student + t2s_ce + kd_teacher)``.

    ``*_segment_ids`` (``[B, L]``, optional) name the packed sample each position belongs to,
    so that cross-model attention never pairs tokens of different packed samples.
    ``num_items`` is the trainer's global count of trained student tokens; without it the
    loss is a mean over this micro-batch's trained student tokens.
    """
    h_s, y_s, m_s = _shift(student_hidden, student_labels)
    n_trained, denom = _token_counts(m_s, num_items)
    teacher_hidden = teacher_hidden.detach()
    teacher_lm_head = teacher_lm_head.detach()

    if config.cross_tokenizer:
        if teacher_labels is None or student_input_ids is None or teacher_input_ids is None:
            raise ValueError("cross-tokenizer DSKD needs teacher_labels and both input_ids")
        if student_embeddings is None or teacher_embeddings is None:
            raise ValueError("cross-tokenizer DSKD needs student_embeddings and teacher_embeddings")
        h_t, y_t, m_t = _shift(teacher_hidden, teacher_labels)
        t2s_hidden, s2t_hidden, row_valid, col_valid = _cross_model_attention(
            proj,
            h_s, y_s, m_s, student_input_ids[:, :-1],
            h_t, y_t, m_t, teacher_input_ids[:, :-1],
            student_embeddings, teacher_embeddings,
            None if student_segment_ids is None else student_segment_ids[:, :-1],
            None if teacher_segment_ids is None else teacher_segment_ids[:, :-1],
        )  # fmt: skip
        t2s_tokens, t2s_valid = t2s_hidden[m_s], row_valid[m_s]
        s2t_tokens, teacher_tokens, tea_valid = s2t_hidden[m_t], h_t[m_t], col_valid[m_t]
    else:
        h_t = teacher_hidden[:, :-1]
        if h_t.shape[:2] != h_s.shape[:2]:
            raise ValueError(
                f"same-vocabulary DSKD needs teacher and student hidden states over the same "
                f"tokens, got {tuple(teacher_hidden.shape)} and {tuple(student_hidden.shape)}"
            )
        teacher_tokens = h_t[m_s]
        t2s_tokens = _project(proj.t2s, teacher_tokens)
        s2t_tokens = _project(proj.s2t, h_s[m_s])
        t2s_valid = tea_valid = torch.ones_like(m_s[m_s])

    student_side, stats_s = chunked_token_sum(
        _maybe_compile(partial(_student_space_chunk, config=config), config),
        (h_s[m_s], t2s_tokens, y_s[m_s], t2s_valid),
        (student_lm_head,),
        config.tokens_per_chunk(student_lm_head.shape[0]),
    )
    teacher_side, stats_t = chunked_token_sum(
        _maybe_compile(partial(_teacher_space_chunk, config=config), config),
        (s2t_tokens, teacher_tokens, tea_valid),
        (teacher_lm_head,),
        config.tokens_per_chunk(teacher_lm_head.shape[0]),
    )
    ce, t2s_ce, kd_student, correct = stats_s
    metrics = {
        "ce": ce / denom,
        "kd_student": kd_student / denom,
        "kd_teacher": stats_t[0] / denom,
        "t2s_ce": t2s_ce / denom,
        "t2s_acc": correct / n_trained.clamp_min(1).float(),
    }
    return DSKDLossOutput(loss=(student_side + teacher_side) / denom, metrics=metrics)


def _vanilla_kd_chunk(
    hidden: Tensor,
    teacher_hidden: Tensor,
    targets: Tensor,
    lm_head: Tensor,
    teacher_lm_head: Tensor,
    *,
    config: DSKDLossConfig,
) -> tuple[Tensor, Tensor]:
    """CE and ``D(student, teacher)`` over a chunk. Stats: ``[ce, kd]`` sums."""
    divergence = get_divergence(config.divergence, config.skew_lambda, config.akl_alpha)
    z_s = _logits(hidden, lm_head)
    with torch.no_grad():
        log_p = F.log_softmax(_logits(teacher_hidden, teacher_lm_head) / config.temperature, -1)
    ce = F.cross_entropy(z_s, targets, reduction="sum")
    kd = divergence(F.log_softmax(z_s / config.temperature, dim=-1), log_p).sum()
    loss = (1.0 - config.kd_rate) * ce + config.kd_rate * kd
    return loss, torch.stack([ce, kd]).detach()


def vanilla_kd_loss(
    *,
    student_hidden: Tensor,
    student_lm_head: Tensor,
    student_labels: Tensor,
    teacher_hidden: Tensor,
    teacher_lm_head: Tensor,
    config: DSKDLossConfig = DSKDLossConfig(),
    num_items: int | Tensor | None = None,
) -> DSKDLossOutput:
    """The paper's vanilla KD baseline: ``(1-r) CE + r D(z_s, z_t)``, same vocabulary only.

    Reported under the same metric names (``kd_student`` is the KD term; no projectors, so
    ``kd_teacher``, ``t2s_ce`` and ``t2s_acc`` are 0), for side-by-side comparisons.
    """
    if student_lm_head.shape[0] != teacher_lm_head.shape[0]:
        raise ValueError(
            f"vanilla KD needs one vocabulary; the student has {student_lm_head.shape[0]} "
            f"tokens and the teacher {teacher_lm_head.shape[0]}"
        )
    h_s, y_s, m_s = _shift(student_hidden, student_labels)
    _, denom = _token_counts(m_s, num_items)
    loss, (ce, kd) = chunked_token_sum(
        _maybe_compile(partial(_vanilla_kd_chunk, config=config), config),
        (h_s[m_s], teacher_hidden.detach()[:, :-1][m_s], y_s[m_s]),
        (student_lm_head, teacher_lm_head.detach()),
        config.tokens_per_chunk(student_lm_head.shape[0]),
    )
    zero = torch.zeros((), device=h_s.device)
    metrics = {"ce": ce / denom, "kd_student": kd / denom}
    metrics.update(kd_teacher=zero, t2s_ce=zero, t2s_acc=zero)
    return DSKDLossOutput(loss=loss / denom, metrics=metrics)
