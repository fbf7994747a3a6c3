"""Dual-Space Knowledge Distillation loss (Zhang et al., EMNLP 2024), framework-free.

The math, with its notation and where it deliberately differs from the authors' code, is in
``docs/dskd.md``. Everything here works from final hidden states and LM-head weights: logits
only ever exist a chunk of trained tokens at a time (:mod:`axolotl_dskd.core.chunking`), matrix
products run in the inputs' precision and every softmax and divergence in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from axolotl_dskd.core.chunking import chunked_token_sum
from axolotl_dskd.core.divergences import DIVERGENCES, Divergence, get_divergence

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 24
"""Default logit block per chunk: 16M entries (64 MiB in float32) for the largest vocabulary."""
MASKED_SCORE = -1e5
METRIC_NAMES = ("ce", "kd_student", "kd_teacher", "t2s_ce", "t2s_acc", "aligned_frac")
RATIO_METRICS = ("t2s_acc", "aligned_frac")
"""Metrics that are shares of this micro-batch's trained tokens, not sums over ``N``."""
TOKEN_ALIGNMENTS = ("cma", "exact", "exact+cma")
TokenAlignment = Literal["cma", "exact", "exact+cma"]
ACCURACY_MASKS = ("attention", "everywhere")
AccuracyMask = Literal["attention", "everywhere"]
STUDENT_SPACE_TARGETS = ("projected", "shared_vocabulary")
StudentSpaceTarget = Literal["projected", "shared_vocabulary"]


def _setting(default: Any, doc: str, **bounds: Any) -> Any:
    """A loss setting: its default, what it means, and its bounds in pydantic's words (``ge``,
    ``gt``, ``le``, ``lt``, ``allow_inf_nan``), so that the Axolotl layer's YAML schema is derived
    from these fields instead of repeating them."""
    return field(default=default, metadata={"doc": doc, "bounds": bounds})


_BOUND_CHECKS: dict[str, tuple[Callable[[float, float], bool], str]] = {
    "ge": (lambda x, b: x >= b, "at least"),
    "gt": (lambda x, b: x > b, "greater than"),
    "le": (lambda x, b: x <= b, "at most"),
    "lt": (lambda x, b: x < b, "less than"),
}


@dataclass(frozen=True, kw_only=True)
class DSKDLossConfig:
    """Hyperparameters of the DSKD loss. The defaults are the paper's, but for ``kd_rate``
    (the paper's is 0.5) and ``token_alignment`` (the paper pairs positions by cross-model
    attention, ``cma``): both chosen on real models (docs/benchmarks.md).

    The single source of the loss settings' defaults, ranges and help: the plugin's
    ``dskd_<name>`` YAML keys read them from these fields.
    """

    kd_rate: float = _setting(
        1 / 3,
        "r in loss = (1 - r) CE + r (kd_student + t2s_ce + kd_teacher). 1/3 weighs CE against the "
        "two distillation terms 1 : 1, as vanilla KD at r = 0.5 does (the paper: 0.5).",
        ge=0.0,
        le=1.0,
    )
    temperature: float = _setting(
        2.0, "Softmax temperature of the distillation terms.", gt=0.0, allow_inf_nan=False
    )
    kd_teacher_weight: float = _setting(
        1.0,
        "w in r (kd_student + t2s_ce + w kd_teacher): the weight of the teacher-space term (the "
        "paper: 1). 0 leaves the teacher's space out: its pass over the teacher's vocabulary is "
        "skipped and kd_teacher is reported as 0.",
        ge=0.0,
        allow_inf_nan=False,
    )
    divergence: Divergence = _setting("forward_kl", "Divergence in the student's space (kd_student).")
    teacher_space_divergence: Divergence = _setting(
        "forward_kl", "Divergence in the teacher's space (kd_teacher)."
    )
    skew_lambda: float = _setting(0.1, "Mixing weight of the skew divergences.", gt=0.0, lt=1.0)
    akl_alpha: float = _setting(0.5, "Head/tail split of adaptive_kl.", ge=0.0, le=1.0)
    cross_tokenizer: bool = _setting(False, "Two tokenizations: the teacher reads its own tokens.")
    token_alignment: TokenAlignment = _setting(
        "exact",
        "Cross-tokenizer pairing of student and teacher positions: cma (cross-model attention), "
        "exact (positions where both have read the same text, the rest CE only), exact+cma.",
    )
    kd_student_accuracy_mask: AccuracyMask = _setting(
        "attention",
        "Where kd_student counts only the tokens whose projected teacher predicts the label: "
        "attention (the paper: tokens paired by cross-model attention) or everywhere (DSKDv2: "
        "exact and same-vocabulary pairs too).",
    )
    student_space_target: StudentSpaceTarget = _setting(
        "projected",
        "What kd_student distils where a teacher state is paired position by position (one "
        "vocabulary; exact cross-tokenizer pairs): projected (the paper: that state through t2s "
        "and the student's head) or shared_vocabulary (the teacher's own distribution over the "
        "tokens both vocabularies spell alike, against the student's over the same tokens; t2s "
        "then trains only where attention's rows read it).",
    )
    chunk_size: int | None = _setting(
        None, "Trained tokens per vocabulary chunk; default max(16, 2**24 // vocabulary).", ge=1
    )
    compile: bool = _setting(False, "torch.compile the per-chunk function (CUDA).")

    def __post_init__(self) -> None:
        for name, choices in (
            ("divergence", DIVERGENCES),
            ("teacher_space_divergence", DIVERGENCES),
            ("token_alignment", TOKEN_ALIGNMENTS),
            ("kd_student_accuracy_mask", ACCURACY_MASKS),
            ("student_space_target", STUDENT_SPACE_TARGETS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r}: choose one of {', '.join(choices)}")
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or isinstance(value, (bool, str)):
                continue
            bounds = f.metadata["bounds"]
            if not bounds.get("allow_inf_nan", True) and not math.isfinite(value):
                raise ValueError(f"{f.name}={value} must be finite")
            for kind, (holds, words) in _BOUND_CHECKS.items():
                if kind in bounds and not holds(value, bounds[kind]):
                    raise ValueError(f"{f.name}={value} must be {words} {bounds[kind]}")

    def tokens_per_chunk(self, vocab_size: int) -> int:
        return self.chunk_size or max(16, CHUNK_ELEMENTS // vocab_size)

    @property
    def uses_cma(self) -> bool:
        """Whether some student positions are paired with the teacher's by attention."""
        return self.cross_tokenizer and self.token_alignment != "exact"

    @property
    def uses_exact_pairs(self) -> bool:
        return self.cross_tokenizer and self.token_alignment != "cma"

    @property
    def reads_t2s(self) -> bool:
        """Whether a term reads the projected teacher: kd_student's ``projected`` target or
        attention's rows. Otherwise t2s would be trained (t2s_ce) for nothing, and its pass over
        the student's vocabulary is skipped."""
        return self.student_space_target == "projected" or self.uses_cma


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
    t2s_targets: Tensor,
    t2s_valid: Tensor,
    by_attention: Tensor,
    teacher_rows: Tensor,
    own_rows: Tensor,
    lm_head: Tensor,
    teacher_head: Tensor,
    student_ids: Tensor,
    *,
    config: DSKDLossConfig,
) -> tuple[Tensor, Tensor]:
    """CE, t2s_ce and kd_student over a chunk of trained student tokens.

    ``by_attention`` marks the tokens whose projected teacher comes from cross-model attention:
    there kd_student counts only where that projected teacher predicts the label (the paper's
    accuracy mask); a teacher state paired position by position is distilled everywhere, unless
    ``config.kd_student_accuracy_mask`` is ``everywhere``. With ``student_space_target:
    shared_vocabulary`` the ``own_rows`` distil the teacher's own distribution instead: its
    paired state ``teacher_rows`` through ``teacher_head`` (the shared tokens' rows), against the
    student's logits of the same tokens (``student_ids``); the mask then asks the teacher's top-1.
    Where no term reads it (``not config.reads_t2s``) ``t2s_hidden`` is empty and the projected
    teacher is not computed: t2s_ce and t2s_correct are 0.
    Stats: ``[ce, t2s_ce, kd_student, t2s_correct]`` sums.
    """
    divergence = get_divergence(config.divergence, config.skew_lambda, config.akl_alpha)
    z_s = _logits(hidden, lm_head)
    ce = F.cross_entropy(z_s, targets, reduction="none")
    t2s_ce, kd, correct = torch.zeros_like(ce), torch.zeros_like(ce), torch.zeros_like(t2s_valid)
    if config.reads_t2s:
        z_t2s = _logits(t2s_hidden, lm_head.detach())
        t2s_ce = torch.where(t2s_valid, F.cross_entropy(z_t2s, t2s_targets, reduction="none"), 0.0)
        correct = t2s_valid & (z_t2s.detach().argmax(-1) == targets)
        log_q = F.log_softmax(z_s / config.temperature, dim=-1)
        kd = divergence(log_q, F.log_softmax(z_t2s.detach() / config.temperature, dim=-1))
    agrees = correct
    if config.student_space_target == "shared_vocabulary":
        z_own = _logits(teacher_rows, teacher_head)
        log_q_own = F.log_softmax(z_s[:, student_ids] / config.temperature, dim=-1)
        own_kd = divergence(log_q_own, F.log_softmax(z_own / config.temperature, dim=-1))
        kd = torch.where(own_rows, own_kd, kd)
        agrees = torch.where(own_rows, student_ids[z_own.argmax(-1)] == targets, correct)
    everywhere = config.kd_student_accuracy_mask == "everywhere"
    kd_mask = agrees if everywhere else torch.where(by_attention, agrees, t2s_valid)
    kd = torch.where(kd_mask, kd, 0.0)
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
    divergence = get_divergence(config.teacher_space_divergence, config.skew_lambda, config.akl_alpha)
    with torch.no_grad():
        log_p = F.log_softmax(_logits(teacher_hidden, lm_head) / config.temperature, dim=-1)
    log_q = F.log_softmax(_logits(s2t_hidden, lm_head) / config.temperature, dim=-1)
    kd = torch.where(valid, divergence(log_q, log_p), 0.0).sum()
    return config.kd_rate * config.kd_teacher_weight * kd, kd.detach().reshape(1)


def _maybe_compile(fn, config: DSKDLossConfig):
    return torch.compile(fn, dynamic=True) if config.compile else fn


def _shift(hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Hidden states at positions ``0..L-2``, their targets ``labels[1:]`` and the train mask."""
    targets = labels[:, 1:]
    return hidden[:, :-1], targets, targets != IGNORE_INDEX


def _shifted(segment_ids: Tensor | None) -> Tensor | None:
    """The packed sample of each predicting position ``0..L-2``."""
    return None if segment_ids is None else segment_ids[:, :-1]


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


@dataclass(frozen=True)
class _Side:
    """One model's view of a micro-batch for cross-model attention, after the shift: hidden
    states ``h [B, L, d]``, targets ``y [B, L]``, trained mask ``m [B, L]``, input ids
    ``x [B, L]``, the model's input-embedding matrix ``embeddings [V, d]`` and, for packed rows,
    the sample each position belongs to (``segments [B, L]``)."""

    h: Tensor
    y: Tensor
    m: Tensor
    x: Tensor
    embeddings: Tensor
    segments: Tensor | None

    def index_embeddings(self) -> tuple[Tensor, Tensor]:
        """Embeddings of the inputs and of the targets, id 0 where the target is untrained."""
        zero = torch.zeros((), dtype=torch.long, device=self.x.device)
        x_ids, y_ids = torch.where(self.m, self.x, zero), torch.where(self.m, self.y, zero)
        e = self.embeddings.detach()
        return F.embedding(x_ids, e), F.embedding(y_ids, e)


def _cross_model_attention(proj: Projectors, s: _Side, t: _Side) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Align each side's hidden states to the other's positions (``docs/dskd.md``, CMA steps 1-6).

    Returns ``t2s_hidden [B, n, d_s]``, ``s2t_hidden [B, m, d_t]`` and the masks of student
    rows / teacher columns that have at least one valid partner in their sample.
    """
    assert proj.query is not None, "cross-tokenizer DSKD needs Projectors(cross_tokenizer=True)"
    x_s_emb, y_s_emb = s.index_embeddings()
    x_t_emb, y_t_emb = (e.float() for e in t.index_embeddings())
    query = _project(proj.query, torch.cat([x_s_emb, y_s_emb], -1))
    key = _normalized(torch.cat([x_t_emb, y_t_emb], -1), t.m)
    value_t = _project(proj.t2s, _normalized(t.h.float(), t.m) + _normalized(y_t_emb, t.m))
    value_s = _project(proj.s2t, s.h)

    pairs = s.m[:, :, None] & t.m[:, None, :]
    if s.segments is not None and t.segments is not None:
        pairs = pairs & (s.segments[:, :, None] == t.segments[:, None, :])
    scores = (query @ key.transpose(-1, -2)) / math.sqrt(key.shape[-1])
    scores = scores + (~pairs).float() * MASKED_SCORE
    t2s_hidden = scores.softmax(-1) @ value_t
    s2t_hidden = scores.transpose(-1, -2).softmax(-1) @ value_s
    return t2s_hidden, s2t_hidden, pairs.any(-1), pairs.any(-2)


@dataclass(frozen=True)
class _Pairs:
    """What the two chunked sums read: per trained student token (student space) and per
    teacher-space token, the inputs of :func:`_student_space_chunk` and
    :func:`_teacher_space_chunk`, plus the share of trained student tokens with an exact partner."""

    t2s: Tensor
    t2s_valid: Tensor
    by_attention: Tensor
    paired_teacher: Tensor
    """Per trained student token, the teacher state paired with it position by position (rows
    of ``paired`` only; ``[n, 0]`` when no token is paired so)."""
    paired: Tensor
    s2t: Tensor
    teacher: Tensor
    teacher_valid: Tensor
    aligned_frac: Tensor


def _partners(teacher_hidden: Tensor, token_alignment: Tensor, m_s: Tensor) -> tuple[Tensor, Tensor]:
    """For each student position ``0..L-2``: the teacher's hidden state at its exact partner
    ``token_alignment[b, i]`` (``[B, L-1, d_t]``), and which trained positions have one."""
    partner = token_alignment[:, :-1]
    rows = torch.arange(partner.shape[0], device=partner.device)[:, None]
    return teacher_hidden[rows, partner.clamp_min(0)], m_s & (partner >= 0)


def _t2s(proj: Projectors, config: DSKDLossConfig, teacher_rows: Tensor) -> Tensor:
    """The paired teacher states through t2s, or ``[n, 0]`` where no term reads them."""
    return _project(proj.t2s, teacher_rows) if config.reads_t2s else teacher_rows[:, :0]


def _same_vocabulary_pairs(
    proj: Projectors, config: DSKDLossConfig, h_s: Tensor, h_t: Tensor, m_s: Tensor
) -> _Pairs:
    """Every trained student position with the teacher's state at the same position."""
    if h_t.shape[:2] != h_s.shape[:2]:
        raise ValueError(
            f"same-vocabulary DSKD needs teacher and student hidden states over the same tokens, "
            f"got {tuple(h_t.shape)} and {tuple(h_s.shape)} (after the shift)"
        )
    teacher = h_t[m_s]
    ones = torch.ones_like(m_s[m_s])
    return _Pairs(
        t2s=_t2s(proj, config, teacher),
        t2s_valid=ones,
        by_attention=~ones,
        paired_teacher=teacher,
        paired=ones,
        s2t=_project(proj.s2t, h_s[m_s]),
        teacher=teacher,
        teacher_valid=ones,
        aligned_frac=torch.ones((), device=h_s.device),
    )


def _cross_tokenizer_pairs(
    proj: Projectors,
    config: DSKDLossConfig,
    h_s: Tensor,
    m_s: Tensor,
    teacher_hidden: Tensor,
    token_alignment: Tensor | None,
    sides: Callable[[], tuple[_Side, _Side]],
) -> _Pairs:
    """Exact partners where ``config.token_alignment`` uses them (same-vocabulary DSKD on those
    pairs), cross-model attention for the other trained tokens of both sides where it is used.

    With ``exact`` an unpaired student token gets CE only; with ``exact+cma`` it and every
    trained teacher token that is no student token's partner go through attention.
    """
    if token_alignment is None:
        aligned_frac = torch.zeros((), device=h_s.device)
        paired_teacher, aligned = None, torch.zeros_like(m_s)
    else:
        paired_teacher, aligned = _partners(teacher_hidden, token_alignment, m_s)
        aligned_frac = aligned.sum() / m_s.sum().clamp_min(1)
    if config.uses_exact_pairs and paired_teacher is None:
        raise ValueError(f"token_alignment={config.token_alignment!r} needs the token_alignment tensor")

    exact = aligned if config.uses_exact_pairs else torch.zeros_like(aligned)
    exact_rows = exact[m_s]
    t2s, t2s_valid, paired_rows = None, exact_rows, h_s.new_zeros(exact_rows.shape[0], 0)
    s2t, teacher, teacher_valid = [], [], []  # exact pairs first, then attention's columns
    if config.uses_exact_pairs:
        paired_rows = paired_teacher[m_s]
        t2s = _t2s(proj, config, paired_rows)
        s2t.append(_project(proj.s2t, h_s[exact]))
        teacher.append(paired_teacher[exact])
        teacher_valid.append(torch.ones_like(exact[exact]))
    if config.uses_cma:
        student, teacher_side = sides()
        t2s_cma, s2t_cma, row_valid, col_valid = _cross_model_attention(proj, student, teacher_side)
        t2s_cma = t2s_cma[m_s]
        t2s = t2s_cma if t2s is None else torch.where(exact_rows[:, None], t2s, t2s_cma)
        t2s_valid = exact_rows | row_valid[m_s]
        # a teacher token already distilled through its exact partner is left out of attention's
        columns = teacher_side.m & ~_partnered_columns(token_alignment, exact, teacher_side.m)
        s2t.append(s2t_cma[columns])
        teacher.append(teacher_side.h[columns])
        teacher_valid.append(col_valid[columns])
    return _Pairs(
        t2s=t2s,
        t2s_valid=t2s_valid,
        by_attention=~exact_rows,
        paired_teacher=paired_rows,
        paired=exact_rows,
        s2t=torch.cat(s2t),
        teacher=torch.cat(teacher),
        teacher_valid=torch.cat(teacher_valid),
        aligned_frac=aligned_frac,
    )


def _partnered_columns(token_alignment: Tensor | None, exact: Tensor, m_t: Tensor) -> Tensor:
    """Teacher positions ``0..L_t-2`` that are the exact partner of a distilled student token."""
    marked = torch.zeros_like(m_t)
    if token_alignment is not None and exact.any():
        rows = torch.arange(exact.shape[0], device=exact.device)[:, None].expand_as(exact)
        cols = token_alignment[:, :-1]
        inside = exact & (cols < m_t.shape[1])
        marked[rows[inside], cols[inside]] = True
    return marked


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
    token_alignment: Tensor | None = None,
    config: DSKDLossConfig = DSKDLossConfig(),
    num_items: int | Tensor | None = None,
    student_segment_ids: Tensor | None = None,
    teacher_segment_ids: Tensor | None = None,
    shared_vocabulary: tuple[Tensor, Tensor] | None = None,
    t2s_labels: Tensor | None = None,
) -> DSKDLossOutput:
    """The DSKD loss of one micro-batch: ``(1-r) CE + r (kd_student + t2s_ce + w kd_teacher)``.

    Every term is a sum over trained tokens divided by ``num_items``, so micro-batches add up
    to one large batch. Logits are computed a chunk of trained tokens at a time.

    Args:
        proj: The trained projectors (``Projectors(d_s, d_t, cross_tokenizer=...)``).
        student_hidden: ``[B, L_s, d_s]`` final hidden states of the student (with grad).
        student_lm_head: ``[V_s, d_s]`` the student's LM-head weight (grad if it trains).
        student_labels: ``[B, L_s]`` the token at each position (Hugging Face's convention,
            unshifted: position ``i`` predicts ``labels[:, i + 1]``), ``-100`` where untrained.
        teacher_hidden: ``[B, L_t, d_t]`` final hidden states of the frozen teacher
            (``L_t == L_s`` with one vocabulary).
        teacher_lm_head: ``[V_t, d_t]`` the teacher's LM-head weight (never trained).
        teacher_labels: ``[B, L_t]`` the teacher's labels; with one vocabulary, the student's.
        student_input_ids: ``[B, L_s]`` cross-model attention only: the student's input ids.
        teacher_input_ids: ``[B, L_t]`` cross-model attention only: the teacher's input ids.
        student_embeddings: ``[V_s, d_s]`` cross-model attention only: the student's input
            embeddings.
        teacher_embeddings: ``[V_t, d_t]`` cross-model attention only: the teacher's.
        token_alignment: ``[B, L_s]`` cross-tokenizer only: for student position ``i`` the
            teacher position ``j`` whose prefix covers the same text (both have read the same
            text, so both predict the same continuation), ``-1`` where none does. Needed by
            ``config.token_alignment`` ``exact`` and ``exact+cma``; with ``cma`` it only feeds
            the ``aligned_frac`` metric.
        config: Hyperparameters; ``config.cross_tokenizer`` selects two tokenizations and
            ``config.token_alignment`` how their positions are paired.
        num_items: The trainer's global count of trained student targets in the optimizer step
            (all micro-batches, all processes); ``None``: this micro-batch's count.
        student_segment_ids: ``[B, L_s]`` the packed sample of each position (optional), so
            that cross-model attention never pairs tokens of different packed samples.
        teacher_segment_ids: ``[B, L_t]`` the same for the teacher's tokens.
        shared_vocabulary: ``(student_ids, teacher_ids)``, the tokens both vocabularies spell
            alike (:func:`axolotl_dskd.core.vocabulary.shared_vocabulary`): needed across
            tokenizers by ``config.student_space_target`` ``shared_vocabulary``. One vocabulary
            shares every id.
        t2s_labels: ``[B, L_s]`` what t2s_ce trains the projected teacher toward, in the
            labels' convention (read where ``student_labels`` is trained); default the labels.
            DSKDv2 trains it toward the teacher's own top-1, so that it stays the teacher.

    Returns:
        ``DSKDLossOutput``: the 0-d ``loss`` and detached ``metrics`` (``ce``, ``kd_student``,
        ``kd_teacher``, ``t2s_ce`` over ``num_items``; ``t2s_acc`` and ``aligned_frac`` over
        this batch's trained tokens).
    """
    h_s, y_s, m_s = _shift(student_hidden, student_labels)
    y_t2s = y_s if t2s_labels is None else t2s_labels[:, 1:]
    n_trained, denom = _token_counts(m_s, num_items)
    teacher_hidden = teacher_hidden.detach()
    teacher_lm_head = teacher_lm_head.detach()

    if config.cross_tokenizer:
        if teacher_labels is None:
            raise ValueError("cross-tokenizer DSKD needs teacher_labels")

        def sides() -> tuple[_Side, _Side]:
            if student_input_ids is None or teacher_input_ids is None:
                raise ValueError("cross-model attention needs student_input_ids and teacher_input_ids")
            if student_embeddings is None or teacher_embeddings is None:
                raise ValueError("cross-model attention needs student_embeddings and teacher_embeddings")
            h_t, y_t, m_t = _shift(teacher_hidden, teacher_labels)
            s_seg, t_seg = _shifted(student_segment_ids), _shifted(teacher_segment_ids)
            return (
                _Side(h_s, y_s, m_s, student_input_ids[:, :-1], student_embeddings, s_seg),
                _Side(h_t, y_t, m_t, teacher_input_ids[:, :-1], teacher_embeddings, t_seg),
            )

        pairs = _cross_tokenizer_pairs(proj, config, h_s, m_s, teacher_hidden, token_alignment, sides)
    else:
        pairs = _same_vocabulary_pairs(proj, config, h_s, teacher_hidden[:, :-1], m_s)

    own = _own_target(config, pairs, student_lm_head, teacher_lm_head, shared_vocabulary)
    student_side, stats_s = chunked_token_sum(
        _maybe_compile(partial(_student_space_chunk, config=config), config),
        (h_s[m_s], pairs.t2s, y_s[m_s], y_t2s[m_s], pairs.t2s_valid, pairs.by_attention, *own[:2]),
        (student_lm_head, *own[2:]),
        config.tokens_per_chunk(student_lm_head.shape[0]),
    )
    teacher_side, stats_t = student_side.new_zeros(()), student_side.new_zeros(1)
    if config.kd_teacher_weight > 0:
        teacher_side, stats_t = chunked_token_sum(
            _maybe_compile(partial(_teacher_space_chunk, config=config), config),
            (pairs.s2t, pairs.teacher, pairs.teacher_valid),
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
        "aligned_frac": pairs.aligned_frac.detach().float(),
    }
    return DSKDLossOutput(loss=(student_side + teacher_side) / denom, metrics=metrics)


def _own_target(
    config: DSKDLossConfig,
    pairs: _Pairs,
    student_lm_head: Tensor,
    teacher_lm_head: Tensor,
    shared_vocabulary: tuple[Tensor, Tensor] | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The inputs :func:`_student_space_chunk` reads for ``student_space_target:
    shared_vocabulary``: the paired teacher states, which tokens have one, the teacher's LM-head
    rows of the shared tokens and their student ids. Empty (and no token marked) for
    ``projected``."""
    device = student_lm_head.device
    if config.student_space_target == "projected":
        none = torch.zeros(0, dtype=torch.long, device=device)
        return pairs.paired_teacher[:, :0], torch.zeros_like(pairs.paired), teacher_lm_head[:0], none
    if not config.cross_tokenizer:  # one vocabulary: every id is shared (padded heads: the common rows)
        rows = min(student_lm_head.shape[0], teacher_lm_head.shape[0])
        return pairs.paired_teacher, pairs.paired, teacher_lm_head[:rows], torch.arange(rows, device=device)
    if shared_vocabulary is None:
        raise ValueError(
            "student_space_target='shared_vocabulary' across tokenizers needs shared_vocabulary "
            "(the student's and the teacher's ids of the tokens both spell alike)"
        )
    student_ids, teacher_ids = (ids.to(device) for ids in shared_vocabulary)
    return pairs.paired_teacher, pairs.paired, teacher_lm_head[teacher_ids], student_ids


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
    ``kd_teacher``, ``t2s_ce`` and ``t2s_acc`` are 0, ``aligned_frac`` 1), for side-by-side
    comparisons.

    Args:
        student_hidden: ``[B, L, d_s]`` final hidden states of the student (with grad).
        student_lm_head: ``[V, d_s]`` the student's LM-head weight (grad if it trains).
        student_labels: ``[B, L]`` token ids, ``-100`` where untrained.
        teacher_hidden: ``[B, L, d_t]`` final hidden states of the frozen teacher, same tokens.
        teacher_lm_head: ``[V, d_t]`` the teacher's LM-head weight, same vocabulary ``V``.
        config: Hyperparameters (``kd_rate``, ``temperature``, ``divergence`` and its parameters).
        num_items: As in :func:`dskd_loss`.
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
    metrics.update(kd_teacher=zero, t2s_ce=zero, t2s_acc=zero, aligned_frac=torch.ones_like(zero))
    return DSKDLossOutput(loss=loss / denom, metrics=metrics)


def teacher_positions_read(
    labels: Tensor,
    config: DSKDLossConfig,
    teacher_labels: Tensor | None = None,
    token_alignment: Tensor | None = None,
) -> Tensor:
    """Which teacher hidden states :func:`dskd_loss` reads, ``[B, L_t]`` bool (what a teacher
    cache must hold).

    One vocabulary: every position whose next token is trained. Across tokenizers: cross-model
    attention reads the teacher positions whose next teacher token is trained; exact alignment the
    partners of the student positions whose next token is trained.
    """
    if not config.cross_tokenizer:
        return _next_trained(labels)
    if teacher_labels is None:
        raise ValueError("across tokenizers the teacher's positions need teacher_labels")
    read = (
        _next_trained(teacher_labels)
        if config.uses_cma
        else torch.zeros_like(teacher_labels, dtype=torch.bool)
    )
    if config.uses_exact_pairs:
        if token_alignment is None:
            raise ValueError(f"token_alignment={config.token_alignment!r} needs the token_alignment tensor")
        paired = _next_trained(labels) & (token_alignment >= 0) & (token_alignment < read.shape[1])
        rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(paired)
        read[rows[paired], token_alignment[paired]] = True
    return read


def _next_trained(labels: Tensor) -> Tensor:
    read = torch.zeros_like(labels, dtype=torch.bool)
    read[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return read


def _uld_chunk(
    hidden: Tensor,
    teacher_hidden: Tensor,
    targets: Tensor,
    paired: Tensor,
    lm_head: Tensor,
    teacher_lm_head: Tensor,
    *,
    config: DSKDLossConfig,
) -> tuple[Tensor, Tensor]:
    """CE over a chunk of trained student tokens, ULD over those with a teacher partner.
    Stats: ``[ce, uld]`` sums."""
    z_s = _logits(hidden, lm_head)
    ce = F.cross_entropy(z_s, targets, reduction="sum")
    p_s = z_s.softmax(-1).sort(-1, descending=True).values
    with torch.no_grad():
        p_t = _logits(teacher_hidden, teacher_lm_head).softmax(-1).sort(-1, descending=True).values
    gap = p_s.shape[-1] - p_t.shape[-1]  # the smaller vocabulary's tail is zeros
    p_s, p_t = F.pad(p_s, (0, max(-gap, 0))), F.pad(p_t, (0, max(gap, 0)))
    uld = ((p_s - p_t).abs().sum(-1) * paired).sum()
    loss = (1.0 - config.kd_rate) * ce + config.kd_rate * uld
    return loss, torch.stack([ce, uld]).detach()


def answer_order_partners(
    student_mask: Tensor,
    teacher_mask: Tensor,
    student_segments: Tensor | None = None,
    teacher_segments: Tensor | None = None,
) -> Tensor:
    """ULD's pairing, ``[B, L_s]``: the ``k``-th trained student position of a sample with the
    ``k``-th trained teacher position of the same sample (its index in the row), the longer side
    cut to the shorter; ``-1`` where none. Masks ``[B, L]`` bool; segments ``[B, L]`` (packed
    rows), one sample per row without them."""
    partners = torch.full(student_mask.shape, -1, dtype=torch.long, device=student_mask.device)
    for b in range(student_mask.shape[0]):
        s_seg = (
            student_segments[b]
            if student_segments is not None
            else torch.zeros_like(student_mask[b], dtype=torch.long)
        )
        t_seg = (
            teacher_segments[b]
            if teacher_segments is not None
            else torch.zeros_like(teacher_mask[b], dtype=torch.long)
        )
        for sample in torch.unique(s_seg[student_mask[b]]).tolist():
            s_pos = (student_mask[b] & (s_seg == sample)).nonzero().squeeze(-1)
            t_pos = (teacher_mask[b] & (t_seg == sample)).nonzero().squeeze(-1)
            n = min(len(s_pos), len(t_pos))
            partners[b, s_pos[:n]] = t_pos[:n]
    return partners


def uld_loss(
    *,
    student_hidden: Tensor,
    student_lm_head: Tensor,
    student_labels: Tensor,
    teacher_hidden: Tensor,
    teacher_lm_head: Tensor,
    teacher_labels: Tensor,
    config: DSKDLossConfig = DSKDLossConfig(),
    num_items: int | Tensor | None = None,
    student_segment_ids: Tensor | None = None,
    teacher_segment_ids: Tensor | None = None,
) -> DSKDLossOutput:
    """Universal Logit Distillation (Boizard et al. 2024), the DSKD paper's cross-tokenizer
    baseline: ``(1-r) CE + r ULD``, any two vocabularies, no projectors.

    ULD pairs the ``k``-th trained student target of a sample with the teacher's ``k``-th
    (:func:`answer_order_partners`) and compares the two next-token distributions sorted in
    decreasing order: ``sum_i |sort(p_s)_i - sort(p_t)_i|`` over the larger vocabulary, the
    smaller one padded with zeros (the closed-form Wasserstein-1 distance under a uniform cost).
    As in the DSKD authors' code, without temperature. Reported as ``kd_student``;
    ``aligned_frac`` is the share of trained student tokens with a teacher partner.

    Args:
        student_hidden: ``[B, L_s, d_s]`` final hidden states of the student (with grad).
        student_lm_head: ``[V_s, d_s]`` the student's LM-head weight.
        student_labels: ``[B, L_s]`` token ids, ``-100`` where untrained (unshifted).
        teacher_hidden: ``[B, L_t, d_t]`` final hidden states of the frozen teacher.
        teacher_lm_head: ``[V_t, d_t]`` the teacher's LM-head weight.
        teacher_labels: ``[B, L_t]`` the teacher's labels (with one vocabulary, the student's).
        config: ``kd_rate`` and ``chunk_size`` are read.
        num_items: As in :func:`dskd_loss`.
        student_segment_ids: ``[B, L_s]`` the packed sample of each position (optional).
        teacher_segment_ids: ``[B, L_t]`` the same for the teacher's tokens.
    """
    h_s, y_s, m_s = _shift(student_hidden, student_labels)
    h_t, _, m_t = _shift(teacher_hidden.detach(), teacher_labels)
    n_trained, denom = _token_counts(m_s, num_items)
    partners = answer_order_partners(m_s, m_t, _shifted(student_segment_ids), _shifted(teacher_segment_ids))
    rows = torch.arange(partners.shape[0], device=partners.device)[:, None]
    paired_teacher = h_t[rows, partners.clamp_min(0)]
    paired = partners[m_s] >= 0
    loss, (ce, uld) = chunked_token_sum(
        _maybe_compile(partial(_uld_chunk, config=config), config),
        (h_s[m_s], paired_teacher[m_s], y_s[m_s], paired.float()),
        (student_lm_head, teacher_lm_head.detach()),
        config.tokens_per_chunk(max(student_lm_head.shape[0], teacher_lm_head.shape[0])),
    )
    zero = torch.zeros((), device=h_s.device)
    metrics = {
        "ce": ce / denom,
        "kd_student": uld / denom,
        "kd_teacher": zero,
        "t2s_ce": zero,
        "t2s_acc": zero,
    }
    metrics["aligned_frac"] = paired.sum() / n_trained.clamp_min(1)
    return DSKDLossOutput(loss=loss / denom, metrics=metrics)
