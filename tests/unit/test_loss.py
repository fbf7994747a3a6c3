"""The DSKD loss (``axolotl_dskd.core.loss.dskd_loss``) against its math (``docs/dskd.md``).

Most tests compare the project's (float32, chunked) loss with ``dskd_devkit.reference``, an
independent float64 transcription of the math: the loss, every logged term, and the gradients
with respect to the student's hidden states, the student's LM head (full fine-tune) and every
projector parameter, to a relative 2e-4. The rest check properties the math states outright
(closed forms of the divergences, where gradients may and may not flow, invariance to padding,
packing and chunking, bf16 robustness, config validation) without the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from axolotl_dskd.core.loss import DSKDLossConfig, Projectors, dskd_loss
from dskd_devkit.reference import DIVERGENCE_NAMES as DIVERGENCES
from dskd_devkit.reference import reference_divergence, reference_dskd_loss
from dskd_devkit.unchunked import unchunked_dskd_loss

METRICS = ("ce", "kd_student", "kd_teacher", "t2s_ce", "t2s_acc", "aligned_frac")
RTOL = 2e-4
CHUNKS = (1, 3, None)


# ============================================================================================
# Building inputs
# ============================================================================================


@dataclass
class Case:
    """One micro-batch: the projectors and the keyword tensors ``dskd_loss`` takes."""

    proj: Projectors
    inputs: dict[str, Tensor | None]
    cross_tokenizer: bool
    token_alignment: Tensor | None = None
    """Cross-tokenizer cases: each student token's exact partner (the teacher position of its
    last piece), ``-1`` on padding."""

    def config(self, **kw) -> DSKDLossConfig:
        """The loss settings; a cross-tokenizer case pairs its tokens by cross-model attention
        unless ``token_alignment`` says otherwise (the reference's sections 3 and 3b)."""
        if self.cross_tokenizer:
            kw.setdefault("token_alignment", "cma")
        return DSKDLossConfig(cross_tokenizer=self.cross_tokenizer, **kw)

    def trainable(self) -> dict[str, Tensor]:
        """What the student's optimizer sees: student hidden (stands for the student's
        parameters), the LM head when it is trained, and every projector parameter."""
        out = {"student_hidden": self.inputs["student_hidden"]}
        if self.inputs["student_lm_head"].requires_grad:
            out["student_lm_head"] = self.inputs["student_lm_head"]
        for name, p in self.proj.named_parameters():
            out[f"proj.{name}"] = p
        return out

    def n_trained(self) -> int:
        return int((self.inputs["student_labels"][:, 1:] != -100).sum())


def _leaf(x: Tensor, dtype: torch.dtype, requires_grad: bool) -> Tensor:
    return x.detach().to(dtype).clone().requires_grad_(requires_grad)


def same_vocab_case(
    seed: int = 0,
    *,
    B: int = 2,
    L: int = 9,
    d_s: int = 12,
    d_t: int = 16,
    V: int = 64,
    full_ft: bool = False,
    dtype: torch.dtype = torch.float32,
    hidden_scale: float = 1.0,
    pad: int = 0,
) -> Case:
    """Two rows: a prompt (untrained) then a response; row 1 ends in one padded position.
    ``pad`` appends that many extra padded positions (garbage hidden states, label -100)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    proj = Projectors(d_s, d_t)
    ids = torch.randint(V, (B, L), generator=g)
    labels = ids.clone()
    for b in range(B):
        labels[b, : 2 + b] = -100
    labels[1, -1] = -100
    h_s = torch.randn(B, L, d_s, generator=g) * hidden_scale
    h_t = torch.randn(B, L, d_t, generator=g) * hidden_scale
    W_s = torch.randn(V, d_s, generator=g) * (2.0 / math.sqrt(d_s))
    W_t = torch.randn(V, d_t, generator=g) * (2.0 / math.sqrt(d_t))
    if pad:
        labels = torch.cat([labels, torch.full((B, pad), -100)], 1)
        h_s = torch.cat([h_s, 50 * torch.randn(B, pad, d_s, generator=g)], 1)
        h_t = torch.cat([h_t, 50 * torch.randn(B, pad, d_t, generator=g)], 1)
    inputs = {
        "student_hidden": _leaf(h_s, dtype, True),
        "student_lm_head": _leaf(W_s, dtype, full_ft),
        "student_labels": labels,
        "teacher_hidden": _leaf(h_t, dtype, False),
        "teacher_lm_head": _leaf(W_t, dtype, False),
    }
    return Case(proj, inputs, cross_tokenizer=False)


# ---- cross-tokenizer ------------------------------------------------------------------------


@dataclass
class World:
    """Weights shared by every sample of a CMA batch (two models and the projectors)."""

    proj: Projectors
    W_s: Tensor
    W_t: Tensor
    E_s: Tensor
    E_t: Tensor
    V_s: int
    V_t: int
    d_s: int
    d_t: int


def make_world(
    seed: int = 0,
    *,
    d_s: int = 8,
    d_t: int = 12,
    V_s: int = 40,
    V_t: int = 56,
    aligned: bool = True,
) -> World:
    """``aligned``: teacher embeddings are a rotation of the student's for shared token ids and
    the projectors roughly undo it, so that cross-model attention finds the matching token and
    the projected teacher is right on part of the tokens (``0 < t2s_acc < 1``): the accuracy mask
    of ``kd_student`` is then exercised. Otherwise everything is random."""
    g = torch.Generator().manual_seed(1000 + seed)
    torch.manual_seed(1000 + seed)
    proj = Projectors(d_s, d_t, cross_tokenizer=True)
    if aligned:
        E_s = F.normalize(torch.randn(V_s, d_s, generator=g), dim=-1)
        R = torch.linalg.qr(torch.randn(d_t, d_s, generator=g)).Q  # [d_t, d_s], orthonormal
        extra = F.normalize(torch.randn(V_t - V_s, d_s, generator=g), dim=-1)
        E_t = torch.cat([E_s, extra]) @ R.T + 0.05 * torch.randn(V_t, d_t, generator=g)
        W_s = 3.0 * E_s + 0.1 * torch.randn(V_s, d_s, generator=g)
        with torch.no_grad():
            proj.t2s.weight.copy_(R.T + 0.05 * torch.randn(d_s, d_t, generator=g))
            block = torch.block_diag(R, R)  # [2 d_t, 2 d_s]
            proj.query.weight.copy_(4.0 * block + 0.05 * torch.randn(2 * d_t, 2 * d_s, generator=g))
    else:
        E_s = torch.randn(V_s, d_s, generator=g)
        E_t = torch.randn(V_t, d_t, generator=g)
        W_s = torch.randn(V_s, d_s, generator=g) * (2.0 / math.sqrt(d_s))
    W_t = torch.randn(V_t, d_t, generator=g) * (2.0 / math.sqrt(d_t))
    return World(proj, W_s, W_t, E_s, E_t, V_s, V_t, d_s, d_t)


@dataclass
class Sample:
    """One text, tokenized by both sides, with each side's trained flags and hidden states."""

    s_ids: list[int]
    s_trained: list[bool]
    t_ids: list[int]
    t_trained: list[bool]
    h_s: Tensor
    h_t: Tensor
    partners: list[int]
    """Per student token: the teacher position of its last piece (both have read the same text)."""


def make_sample(
    world: World,
    g: torch.Generator,
    *,
    n_tokens: int = 10,
    prompt: int = 3,
    s_trained: list[bool] | None = None,
    teacher_trained: bool = True,
    hidden_scale: float = 1.0,
) -> Sample:
    """Student tokens are random; the teacher re-tokenizes each one as itself, or (for a third
    of the ids) as itself followed by an extra teacher-only piece, carrying the trained flag."""
    s_ids = torch.randint(1, world.V_s, (n_tokens,), generator=g).tolist()
    if s_trained is None:
        s_trained = [k >= prompt for k in range(n_tokens)]
    t_ids, t_trained, partners = [], [], []
    for tok, tr in zip(s_ids, s_trained):
        pieces = [tok] if tok % 3 else [tok, world.V_s + tok % (world.V_t - world.V_s)]
        t_ids += pieces
        t_trained += [tr and teacher_trained] * len(pieces)
        partners.append(len(t_ids) - 1)
    h_s = torch.randn(len(s_ids), world.d_s, generator=g) * hidden_scale
    h_t = torch.randn(len(t_ids), world.d_t, generator=g) * hidden_scale
    return Sample(s_ids, list(s_trained), t_ids, t_trained, h_s, h_t, partners)


def assemble(
    world: World,
    rows: list[list[Sample]],
    *,
    segments: bool = False,
    pad: int = 0,
    full_ft: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Case:
    """Concatenate each row's samples (packing when a row has several), pad rows to a common
    length (+ ``pad`` more) with garbage hidden states and label -100."""
    g = torch.Generator().manual_seed(5000 + seed)

    def side(prefix: str, d: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        seqs = []
        for row in rows:
            ids, labels, hidden, seg = [], [], [], []
            for k, smp in enumerate(row):
                s_ids = getattr(smp, f"{prefix}_ids")
                trained = getattr(smp, f"{prefix}_trained")
                ids += s_ids
                labels += [t if tr else -100 for t, tr in zip(s_ids, trained)]
                hidden.append(getattr(smp, f"h_{prefix}"))
                seg += [k] * len(s_ids)
            seqs.append((ids, labels, torch.cat(hidden), seg, len(row)))
        L = max(len(s[0]) for s in seqs) + pad
        all_ids, all_labels, all_hidden, all_seg = [], [], [], []
        for ids, labels, hidden, seg, n_seg in seqs:
            extra = L - len(ids)
            all_ids.append(ids + [0] * extra)
            all_labels.append(labels + [-100] * extra)
            all_hidden.append(torch.cat([hidden, 50 * torch.randn(extra, d, generator=g)]))
            all_seg.append(seg + [n_seg] * extra)
        return (
            torch.tensor(all_ids),
            torch.tensor(all_labels),
            torch.stack(all_hidden),
            torch.tensor(all_seg),
        )

    s_ids, s_labels, h_s, s_seg = side("s", world.d_s)
    t_ids, t_labels, h_t, t_seg = side("t", world.d_t)
    alignment = torch.full_like(s_ids, -1)
    for b, row in enumerate(rows):
        s_at = t_at = 0
        for smp in row:
            alignment[b, s_at : s_at + len(smp.s_ids)] = torch.tensor(smp.partners) + t_at
            s_at, t_at = s_at + len(smp.s_ids), t_at + len(smp.t_ids)
    inputs = {
        "student_hidden": _leaf(h_s, dtype, True),
        "student_lm_head": _leaf(world.W_s, dtype, full_ft),
        "student_labels": s_labels,
        "teacher_hidden": _leaf(h_t, dtype, False),
        "teacher_lm_head": _leaf(world.W_t, dtype, False),
        "teacher_labels": t_labels,
        "student_input_ids": s_ids,
        "teacher_input_ids": t_ids,
        "student_embeddings": _leaf(world.E_s, dtype, False),
        "teacher_embeddings": _leaf(world.E_t, dtype, False),
    }
    if segments:
        inputs["student_segment_ids"] = s_seg
        inputs["teacher_segment_ids"] = t_seg
    return Case(world.proj, inputs, cross_tokenizer=True, token_alignment=alignment)


def cma_case(
    seed: int = 0,
    *,
    aligned: bool = True,
    full_ft: bool = False,
    dtype: torch.dtype = torch.float32,
    hidden_scale: float = 1.0,
    empty_teacher_row: int | None = None,
    pad: int = 0,
) -> Case:
    """Two rows of one sample each (10 and 9 student tokens, prompts of 3 and 2)."""
    world = make_world(seed, aligned=aligned)
    g = torch.Generator().manual_seed(2000 + seed)
    samples = [
        make_sample(
            world,
            g,
            n_tokens=10 - b,
            prompt=3 - b,
            hidden_scale=hidden_scale,
            teacher_trained=(b != empty_teacher_row),
        )
        for b in range(2)
    ]
    return assemble(world, [[s] for s in samples], pad=pad, full_ft=full_ft, dtype=dtype, seed=seed)


def make_case(variant: str, seed: int = 0, **kw) -> Case:
    return same_vocab_case(seed, **kw) if variant == "same" else cma_case(seed, **kw)


# ============================================================================================
# Comparing
# ============================================================================================


def assert_rel(actual, expected, what: str, rtol: float = RTOL, atol: float = 1e-7) -> None:
    """``max|a - e| <= rtol * max|e| + atol`` (``None`` gradients count as zero)."""
    if expected is None and actual is None:
        return
    if expected is None:
        expected = torch.zeros_like(torch.as_tensor(actual), dtype=torch.float64)
    if actual is None:
        actual = torch.zeros_like(torch.as_tensor(expected))
    a = torch.as_tensor(actual).detach().double()
    e = torch.as_tensor(expected).detach().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} vs reference {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{what}: not finite"
    err = (a - e).abs().max().item() if a.numel() else 0.0
    scale = e.abs().max().item() if e.numel() else 0.0
    assert err <= rtol * scale + atol, (
        f"{what}: max abs error {err:.3e} against max |reference| {scale:.3e} "
        f"(relative {err / max(scale, 1e-30):.3e} > {rtol:.0e})"
    )


def _f(x) -> float:
    return float(torch.as_tensor(x).detach())


def grads(loss: Tensor, targets: dict[str, Tensor]) -> dict[str, Tensor | None]:
    names = list(targets)
    gs = torch.autograd.grad(loss, [targets[n] for n in names], allow_unused=True, retain_graph=True)
    return dict(zip(names, gs))


def check_against_reference(case: Case, config: DSKDLossConfig, **extra):
    """Loss, every metric and every trainable gradient of the project equal the reference."""
    targets = case.trainable()
    out = dskd_loss(case.proj, **case.inputs, config=config, **extra)
    ref_loss, ref_metrics = reference_dskd_loss(case.proj, **case.inputs, config=config, **extra)
    assert set(METRICS) <= set(out.metrics), f"missing metrics: {set(METRICS) - set(out.metrics)}"
    assert_rel(out.loss, ref_loss, "loss")
    for name in METRICS:
        assert_rel(out.metrics[name], ref_metrics[name], f"metric {name}")
    g_out = grads(out.loss, targets)
    g_ref = grads(ref_loss, targets)
    for name in targets:
        assert_rel(g_out[name], g_ref[name], f"d loss / d {name}")
    return out, ref_loss, ref_metrics


# ============================================================================================
# 1. The project equals the reference
# ============================================================================================


@pytest.mark.parametrize("full_ft", [False, True], ids=["frozen_head", "full_ft"])
@pytest.mark.parametrize("chunk_size", CHUNKS, ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_same_vocab_matches_reference(divergence, chunk_size, full_ft):
    # the teacher-space divergence rotates, so every name is also used there
    tea = DIVERGENCES[(DIVERGENCES.index(divergence) + 1 + (chunk_size or 0)) % 6]
    case = same_vocab_case(seed=DIVERGENCES.index(divergence), full_ft=full_ft)
    cfg = case.config(divergence=divergence, teacher_space_divergence=tea, chunk_size=chunk_size)
    check_against_reference(case, cfg)


@pytest.mark.parametrize("full_ft", [False, True], ids=["frozen_head", "full_ft"])
@pytest.mark.parametrize("chunk_size", CHUNKS, ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_cma_matches_reference(divergence, chunk_size, full_ft):
    tea = DIVERGENCES[(DIVERGENCES.index(divergence) + 1 + (chunk_size or 0)) % 6]
    case = cma_case(seed=DIVERGENCES.index(divergence), full_ft=full_ft)
    cfg = case.config(divergence=divergence, teacher_space_divergence=tea, chunk_size=chunk_size)
    _, _, ref = check_against_reference(case, cfg)
    # the fixture is built so that the accuracy mask of kd_student is exercised
    assert 0.0 < float(ref["t2s_acc"]) < 1.0


@pytest.mark.parametrize("variant", ["same", "cma"])
@pytest.mark.parametrize("teacher_space_divergence", DIVERGENCES)
def test_teacher_space_divergence_matches_reference(variant, teacher_space_divergence):
    case = make_case(variant, seed=7)
    cfg = case.config(divergence="js", teacher_space_divergence=teacher_space_divergence)
    check_against_reference(case, cfg)


@pytest.mark.parametrize("variant", ["same", "cma"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_non_default_hyperparameters_match_reference(variant, divergence):
    case = make_case(variant, seed=11, full_ft=True)
    cfg = case.config(
        divergence=divergence,
        teacher_space_divergence=divergence,
        kd_rate=0.7,
        temperature=1.3,
        skew_lambda=0.25,
        akl_alpha=0.35,
        chunk_size=2,
    )
    check_against_reference(case, cfg)


@pytest.mark.parametrize("as_tensor", [False, True], ids=["int", "tensor"])
@pytest.mark.parametrize("variant", ["same", "cma"])
def test_num_items_matches_reference(variant, as_tensor):
    case = make_case(variant, seed=3)
    num_items = 3 * case.n_trained() + 5  # e.g. a global count over accumulation steps
    cfg = case.config(divergence="skew_reverse_kl", chunk_size=3)
    check_against_reference(case, cfg, num_items=torch.tensor(num_items) if as_tensor else num_items)


@pytest.mark.parametrize("variant", ["same", "cma"])
def test_num_items_is_the_token_mean_denominator(variant):
    """Every term is a sum over tokens divided by N; t2s_acc is a share of trained tokens."""
    case = make_case(variant, seed=4)
    cfg = case.config(divergence="forward_kl")
    n = case.n_trained()
    local = dskd_loss(case.proj, **case.inputs, config=cfg)
    glob = dskd_loss(case.proj, **case.inputs, config=cfg, num_items=4 * n)
    assert_rel(glob.loss, local.loss / 4, "loss", rtol=1e-6)
    for name in ("ce", "kd_student", "kd_teacher", "t2s_ce"):
        assert_rel(glob.metrics[name], local.metrics[name] / 4, name, rtol=1e-6)
    assert_rel(glob.metrics["t2s_acc"], local.metrics["t2s_acc"], "t2s_acc", rtol=1e-6)


@pytest.mark.parametrize("chunk_size", CHUNKS, ids=lambda c: f"chunk{c}")
def test_cma_sample_without_trained_teacher_token_matches_reference(chunk_size):
    case = cma_case(seed=5, empty_teacher_row=1, full_ft=True)
    cfg = case.config(divergence="reverse_kl", teacher_space_divergence="js", chunk_size=chunk_size)
    check_against_reference(case, cfg)


def test_cma_sample_without_trained_teacher_token_adds_nothing_to_cma_terms():
    """The spec: 'A sample with no trained target on one side adds nothing to the CMA terms'
    (its CE still counts, and its tokens still count in N and in t2s_acc's denominator)."""
    world = make_world(6)
    g = torch.Generator().manual_seed(6)
    good = make_sample(world, g, n_tokens=10, prompt=3)
    cut = make_sample(world, g, n_tokens=9, prompt=2, teacher_trained=False)
    both = assemble(world, [[good], [cut]])
    alone = assemble(world, [[good]])
    n_total = both.n_trained()
    cfg = both.config(divergence="forward_kl")
    out_both = dskd_loss(both.proj, **both.inputs, config=cfg)
    out_alone = dskd_loss(alone.proj, **alone.inputs, config=cfg, num_items=n_total)
    for name in ("kd_student", "kd_teacher", "t2s_ce"):
        assert_rel(out_both.metrics[name], out_alone.metrics[name], name, rtol=1e-5)
    acc_alone = _f(out_alone.metrics["t2s_acc"]) * alone.n_trained() / n_total
    assert_rel(out_both.metrics["t2s_acc"], acc_alone, "t2s_acc", rtol=1e-5)
    for name, out in (("with the cut sample", out_both), ("alone", out_alone)):
        assert torch.isfinite(out.loss), name
    g_both = grads(out_both.loss, {"t2s": both.proj.t2s.weight, "query": both.proj.query.weight})
    assert all(torch.isfinite(v).all() for v in g_both.values() if v is not None)


@pytest.mark.parametrize("chunk_size", CHUNKS, ids=lambda c: f"chunk{c}")
def test_cma_sample_without_trained_student_token_matches_reference(chunk_size):
    """The other side cut: the teacher has trained tokens in a sample where the student has
    none; those teacher columns have no partner and add nothing to kd_teacher."""
    world = make_world(25)
    g = torch.Generator().manual_seed(25)
    good = make_sample(world, g, n_tokens=10, prompt=3)
    cut = make_sample(world, g, n_tokens=9, s_trained=[False] * 9)
    cut.t_trained = [k >= 2 for k in range(len(cut.t_ids))]
    case = assemble(world, [[good], [cut]], full_ft=True)
    cfg = case.config(divergence="forward_kl", teacher_space_divergence="reverse_kl", chunk_size=chunk_size)
    # (Dropping the cut sample is not equivalent: its trained teacher tokens still count in
    # Norm's std over the micro-batch's valid teacher positions.)
    check_against_reference(case, cfg)


@pytest.mark.parametrize("chunk_size", (1, None), ids=lambda c: f"chunk{c}")
def test_cma_packed_segments_match_reference(chunk_size):
    world = make_world(8)
    g = torch.Generator().manual_seed(8)
    rows = [
        [make_sample(world, g, n_tokens=6, prompt=2), make_sample(world, g, n_tokens=5, prompt=1)],
        [make_sample(world, g, n_tokens=7, prompt=3)],
    ]
    case = assemble(world, rows, segments=True, full_ft=True)
    cfg = case.config(divergence="adaptive_kl", teacher_space_divergence="reverse_kl", chunk_size=chunk_size)
    check_against_reference(case, cfg)


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "random"])
def test_cma_packed_row_equals_separate_rows(aligned):
    """With segment ids, packing samples into one row changes nothing: pairs of different
    packed samples never meet in the scores. (Each sample starts with an untrained token, so
    no target crosses a boundary.) Without segment ids it does change: the test can fail."""
    world = make_world(9, aligned=aligned)
    g = torch.Generator().manual_seed(9)
    a = make_sample(world, g, n_tokens=6, prompt=2)
    b = make_sample(world, g, n_tokens=5, prompt=1)
    c = make_sample(world, g, n_tokens=7, prompt=3)
    packed = assemble(world, [[a, b], [c]], segments=True)
    separate = assemble(world, [[a], [b], [c]], segments=False)
    unsegmented = assemble(world, [[a, b], [c]], segments=False)
    cfg = packed.config(divergence="forward_kl")
    out_p = dskd_loss(packed.proj, **packed.inputs, config=cfg)
    out_s = dskd_loss(separate.proj, **separate.inputs, config=cfg)
    assert_rel(out_p.loss, out_s.loss, "loss", rtol=1e-5)
    for name in METRICS:
        assert_rel(out_p.metrics[name], out_s.metrics[name], name, rtol=1e-5)
    gp = grads(out_p.loss, dict(packed.proj.named_parameters()))
    gs = grads(out_s.loss, dict(separate.proj.named_parameters()))
    for name in gp:
        assert_rel(gp[name], gs[name], f"d loss / d {name}", rtol=1e-4)
    out_u = dskd_loss(unsegmented.proj, **unsegmented.inputs, config=cfg)
    assert abs(_f(out_u.loss) - _f(out_s.loss)) > 1e-4


@pytest.mark.parametrize("variant", ["same", "cma"])
def test_padding_changes_nothing(variant):
    """Padded positions (label -100, any hidden state) do not enter any term, nor Norm's std
    (spec: 'Norm uses the std over valid positions only')."""
    cfg_kw = {"divergence": "js", "teacher_space_divergence": "adaptive_kl"}
    base = make_case(variant, seed=10)
    padded = make_case(variant, seed=10, pad=3)
    cfg = base.config(**cfg_kw)
    out_b = dskd_loss(base.proj, **base.inputs, config=cfg)
    out_p = dskd_loss(padded.proj, **padded.inputs, config=cfg)
    assert_rel(out_p.loss, out_b.loss, "loss", rtol=1e-5)
    for name in METRICS:
        assert_rel(out_p.metrics[name], out_b.metrics[name], name, rtol=1e-5)
    gb = grads(out_b.loss, dict(base.proj.named_parameters()))
    gp = grads(out_p.loss, dict(padded.proj.named_parameters()))
    for name in gb:
        assert_rel(gp[name], gb[name], f"d loss / d {name}", rtol=1e-4)


@settings(max_examples=20, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    masks=st.lists(
        st.tuples(
            st.lists(st.booleans(), min_size=4, max_size=8),  # student trained flags
            st.sampled_from(["same", "none", "all"]),  # teacher: same text trained, none, all
        ),
        min_size=1,
        max_size=3,
    ),
    divergence=st.sampled_from(DIVERGENCES),
    chunk_size=st.sampled_from(CHUNKS),
    seed=st.integers(0, 3),
)
def test_cma_any_label_mask_matches_reference(masks, divergence, chunk_size, seed):
    """Arbitrary trained/untrained patterns, including rows with nothing trained on one or
    both sides. (At least one student target is trained: N = 0 is out of scope.)"""
    # position 0 is never a target: require a trained flag after it
    if not any(any(flags[1:]) for flags, _ in masks):
        masks = [([False, True, True, False], "same")] + masks
    world = make_world(seed)
    g = torch.Generator().manual_seed(seed)
    samples = []
    for flags, teacher in masks:
        smp = make_sample(world, g, n_tokens=len(flags), s_trained=flags, teacher_trained=teacher != "none")
        if teacher == "all":
            smp.t_trained = [True] * len(smp.t_ids)
        samples.append(smp)
    case = assemble(world, [[s] for s in samples], full_ft=True, seed=seed)
    cfg = case.config(divergence=divergence, chunk_size=chunk_size)
    check_against_reference(case, cfg)


# ============================================================================================
# 2. Divergences: closed forms, zero on identical distributions, robustness
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
    assert _f(out.metrics["kd_student"]) == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert _f(out.metrics["kd_teacher"]) == pytest.approx(want, rel=1e-4, abs=1e-6)


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
    assert _f(out.metrics["kd_student"]) == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert _f(out.metrics["kd_teacher"]) == pytest.approx(want, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_identical_distributions_give_zero(name):
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(3 * torch.randn(4, 8, generator=g), -1).tolist()
    case = identity_case(p, p, T=2.0)
    cfg = case.config(divergence=name, teacher_space_divergence=name)
    out = dskd_loss(case.proj, **case.inputs, config=cfg)
    for term in ("kd_student", "kd_teacher"):
        assert abs(_f(out.metrics[term])) < 1e-6, term
    (gh,) = torch.autograd.grad(out.loss, [case.inputs["student_hidden"]])
    assert torch.isfinite(gh).all()
    z = torch.tensor(p, dtype=torch.float64).log()
    assert float(reference_divergence(name, z, z).abs().max()) < 1e-12


@pytest.mark.parametrize("variant", ["same", "cma"])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_huge_bf16_logits_stay_finite(variant, name):
    """bf16 inputs with hidden states scaled by 1e3 (logits in the thousands): loss, terms
    and gradients are finite."""
    case = make_case(variant, seed=12, dtype=torch.bfloat16, hidden_scale=1e3, full_ft=True)
    cfg = case.config(divergence=name, teacher_space_divergence=name, chunk_size=3)
    out = dskd_loss(case.proj, **case.inputs, config=cfg)
    assert torch.isfinite(out.loss), _f(out.loss)
    for term in METRICS:
        assert torch.isfinite(torch.as_tensor(out.metrics[term])).all(), term
    targets = case.trainable()
    for key, g in grads(out.loss, targets).items():
        assert g is None or torch.isfinite(g).all(), key


@pytest.mark.parametrize("variant", ["same", "cma"])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_huge_float32_logits_match_reference(variant, name):
    case = make_case(variant, seed=13, hidden_scale=1e3)
    cfg = case.config(divergence=name, teacher_space_divergence=name)
    out = dskd_loss(case.proj, **case.inputs, config=cfg)
    ref_loss, _ = reference_dskd_loss(case.proj, **case.inputs, config=cfg)
    assert_rel(out.loss, ref_loss, "loss", rtol=1e-3)


@pytest.mark.parametrize("variant", ["same", "cma"])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_bf16_inputs_close_to_float32(variant, name):
    f32 = make_case(variant, seed=14)
    bf16 = make_case(variant, seed=14, dtype=torch.bfloat16)
    cfg = f32.config(divergence=name, teacher_space_divergence=name)
    out32 = dskd_loss(f32.proj, **f32.inputs, config=cfg)
    out16 = dskd_loss(bf16.proj, **bf16.inputs, config=cfg)
    assert torch.isfinite(out16.loss)
    a, b = _f(out16.loss), _f(out32.loss)
    assert abs(a - b) <= 0.01 * abs(b) + 0.01, ("loss", a, b)
    for term in ("ce", "kd_student", "kd_teacher", "t2s_ce"):
        a, b = _f(out16.metrics[term]), _f(out32.metrics[term])
        assert abs(a - b) <= 0.02 * abs(b) + 0.01, (term, a, b)
    gh = grads(out16.loss, bf16.trainable())
    assert all(g is None or torch.isfinite(g).all() for g in gh.values())


# ============================================================================================
# 3. Where gradients flow
# ============================================================================================


def _zero_or_none(g: Tensor | None) -> bool:
    return g is None or bool((g == 0).all())


@pytest.mark.parametrize("variant", ["same", "cma"])
def test_teacher_and_embeddings_get_no_gradient(variant):
    """The teacher is frozen and W_t, E_t, E_s are used detached: even when the caller's
    tensors require grad, nothing reaches them."""
    case = make_case(variant, seed=15, full_ft=True)
    frozen = ["teacher_hidden", "teacher_lm_head", "teacher_embeddings", "student_embeddings"]
    for key in frozen:
        if case.inputs.get(key) is not None:
            case.inputs[key].requires_grad_(True)
    cfg = case.config(divergence="js")
    out = dskd_loss(case.proj, **case.inputs, config=cfg)
    out.loss.backward()
    for key in frozen:
        t = case.inputs.get(key)
        if t is not None:
            assert _zero_or_none(t.grad), f"{key} received a gradient"
    assert case.inputs["student_hidden"].grad is not None


def _component_grads(case: Case, cfg: DSKDLossConfig, layer: str, terms: tuple[str, ...]):
    """Gradient of the project's loss w.r.t. projector ``layer`` and ``kd_rate`` times the
    reference gradient of the sum of ``terms`` alone."""
    params = {n: p for n, p in case.proj.named_parameters() if n.startswith(layer + ".")}
    out = dskd_loss(case.proj, **case.inputs, config=cfg)
    _, ref = reference_dskd_loss(case.proj, **case.inputs, config=cfg)
    want = grads(cfg.kd_rate * sum(ref[t] for t in terms), params)
    got = grads(out.loss, params)
    return got, want


@pytest.mark.parametrize("variant", ["same", "cma"])
def test_t2s_learns_only_from_t2s_ce(variant):
    case = make_case(variant, seed=16)
    cfg = case.config(divergence="reverse_kl", kd_rate=0.3)
    got, want = _component_grads(case, cfg, "t2s", ("t2s_ce",))
    for name in got:
        assert not _zero_or_none(want[name])
        assert_rel(got[name], want[name], f"d loss / d {name}")


@pytest.mark.parametrize("variant", ["same", "cma"])
def test_s2t_learns_only_from_kd_teacher(variant):
    case = make_case(variant, seed=17)
    cfg = case.config(divergence="js", teacher_space_divergence="skew_forward_kl", kd_rate=0.3)
    got, want = _component_grads(case, cfg, "s2t", ("kd_teacher",))
    for name in got:
        assert not _zero_or_none(want[name])
        assert_rel(got[name], want[name], f"d loss / d {name}")


def test_cma_query_learns_from_t2s_ce_and_kd_teacher():
    case = cma_case(seed=18)
    cfg = case.config(divergence="forward_kl", kd_rate=0.3)
    got, want = _component_grads(case, cfg, "query", ("t2s_ce", "kd_teacher"))
    for name in got:
        assert not _zero_or_none(got[name])
        assert_rel(got[name], want[name], f"d loss / d {name}")


def test_query_exists_only_for_cma():
    assert Projectors(8, 12).query is None
    proj = Projectors(8, 12, cross_tokenizer=True)
    assert tuple(proj.query.weight.shape) == (24, 16) and proj.query.bias is not None
    assert tuple(proj.t2s.weight.shape) == (8, 12) and proj.t2s.bias is not None
    assert tuple(proj.s2t.weight.shape) == (12, 8) and proj.s2t.bias is not None
    assert all(p.dtype == torch.float32 for p in proj.parameters())


def test_same_vocab_t2s_gradient_ignores_the_student():
    """Same vocabulary: t2s is trained by t2s_ce alone, which involves only the teacher and
    sg(W_s): its gradient does not depend on the student's hidden states nor on D."""
    a = same_vocab_case(seed=19)
    b = same_vocab_case(seed=19)
    with torch.no_grad():
        b.inputs["student_hidden"].mul_(-3.0).add_(1.0)
    ga = grads(
        dskd_loss(a.proj, **a.inputs, config=a.config(divergence="forward_kl")).loss,
        {"w": a.proj.t2s.weight, "b": a.proj.t2s.bias},
    )
    gb = grads(
        dskd_loss(b.proj, **b.inputs, config=b.config(divergence="adaptive_kl")).loss,
        {"w": b.proj.t2s.weight, "b": b.proj.t2s.bias},
    )
    for k in ga:
        assert_rel(ga[k], gb[k], f"t2s {k}", rtol=1e-6)


@pytest.mark.parametrize("variant", ["same", "cma"])
def test_s2t_gradient_ignores_the_student_space_divergence(variant):
    a, b = make_case(variant, seed=20), make_case(variant, seed=20)
    params_a = dict(a.proj.s2t.named_parameters())
    params_b = dict(b.proj.s2t.named_parameters())
    ga = grads(dskd_loss(a.proj, **a.inputs, config=a.config(divergence="forward_kl")).loss, params_a)
    gb = grads(dskd_loss(b.proj, **b.inputs, config=b.config(divergence="reverse_kl")).loss, params_b)
    for k in ga:
        assert_rel(ga[k], gb[k], f"s2t {k}", rtol=1e-6)


@pytest.mark.parametrize("variant", ["same", "cma"])
def test_kd_rate_zero_is_plain_cross_entropy(variant):
    case = make_case(variant, seed=21, full_ft=True)
    out = dskd_loss(case.proj, **case.inputs, config=case.config(kd_rate=0.0))
    h = case.inputs["student_hidden"][:, :-1]
    y = case.inputs["student_labels"][:, 1:]
    logits = h @ case.inputs["student_lm_head"].T
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
    assert_rel(out.loss, ce, "loss", rtol=1e-5)
    assert_rel(out.metrics["ce"], ce, "ce", rtol=1e-5)
    g = grads(out.loss, dict(case.proj.named_parameters()))
    assert all(_zero_or_none(v) for v in g.values())


@pytest.mark.parametrize("variant", ["same", "cma"])
def test_frozen_student_lm_head(variant):
    """LoRA: W_s does not require grad; the loss works and the student hidden still learns."""
    case = make_case(variant, seed=22, full_ft=False)
    assert not case.inputs["student_lm_head"].requires_grad
    cfg = case.config(divergence="skew_forward_kl")
    check_against_reference(case, cfg)
    out = dskd_loss(case.proj, **case.inputs, config=cfg)
    out.loss.backward()
    assert case.inputs["student_lm_head"].grad is None
    assert case.inputs["student_hidden"].grad is not None
    assert all(p.grad is not None for p in case.proj.parameters())


@pytest.mark.parametrize("variant", ["same", "cma"])
def test_full_fine_tune_head_learns_from_ce_and_kd_student_only(variant):
    """z_t2s uses sg(W_s): W_s's gradient is that of (1-r) CE + r kd_student alone."""
    case = make_case(variant, seed=23, full_ft=True)
    cfg = case.config(divergence="js", kd_rate=0.4)
    W = {"W_s": case.inputs["student_lm_head"]}
    out = dskd_loss(case.proj, **case.inputs, config=cfg)
    _, ref = reference_dskd_loss(case.proj, **case.inputs, config=cfg)
    want = grads(0.6 * ref["ce"] + 0.4 * ref["kd_student"], W)["W_s"]
    assert_rel(grads(out.loss, W)["W_s"], want, "d loss / d W_s")


# ============================================================================================
# 4. Chunking changes nothing
# ============================================================================================


@pytest.mark.parametrize("variant", ["same", "cma"])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_chunk_size_changes_nothing(variant, name):
    case = make_case(variant, seed=24, full_ft=True)
    targets = case.trainable()
    results = []
    for chunk in (1, None, 1000):
        cfg = case.config(divergence=name, teacher_space_divergence=name, chunk_size=chunk)
        out = dskd_loss(case.proj, **case.inputs, config=cfg)
        results.append((chunk, out, grads(out.loss, targets)))
    _, base, base_g = results[0]
    for chunk, out, g in results[1:]:
        assert_rel(out.loss, base.loss, f"loss chunk={chunk}", rtol=1e-5)
        for m in METRICS:
            assert_rel(out.metrics[m], base.metrics[m], f"{m} chunk={chunk}", rtol=1e-5)
        for key in g:
            assert_rel(g[key], base_g[key], f"d loss / d {key} chunk={chunk}", rtol=1e-5)


# ============================================================================================
# 4b. Exact token alignment (cross-tokenizer positions that have read the same text)
# ============================================================================================
# ``token_alignment[b, i] = j``: the student's tokens ``0..i`` and the teacher's ``0..j`` cover
# the same text. ``exact`` distills those pairs as within one vocabulary; ``exact+cma`` sends
# the rest through cross-model attention.


def one_tokenization_as_two(case: Case) -> tuple[Case, Tensor]:
    """A same-vocabulary case handed to the cross-tokenizer path: the teacher's tokens are the
    student's, so every position is its own exact partner."""
    g = torch.Generator().manual_seed(77)
    labels = case.inputs["student_labels"]
    V, d_s = case.inputs["student_lm_head"].shape
    d_t = case.inputs["teacher_lm_head"].shape[1]
    ids = torch.where(labels != -100, labels, torch.randint(V, labels.shape, generator=g))
    proj = Projectors(d_s, d_t, cross_tokenizer=True)
    proj.load_state_dict(case.proj.state_dict(), strict=False)
    inputs = {
        **case.inputs,
        "teacher_labels": labels,
        "student_input_ids": ids,
        "teacher_input_ids": ids,
        "student_embeddings": torch.randn(V, d_s, generator=g),
        "teacher_embeddings": torch.randn(V, d_t, generator=g),
    }
    identity = torch.arange(labels.shape[1]).expand_as(labels).clone()
    return Case(proj, inputs, cross_tokenizer=True, token_alignment=identity), identity


def assert_same_loss(a, b, grads_a: dict, grads_b: dict, tol: float = 1e-6) -> None:
    assert_rel(a.loss, b.loss, "loss", rtol=tol)
    for name in METRICS:
        assert_rel(a.metrics[name], b.metrics[name], f"metric {name}", rtol=tol)
    for name, grad in grads_a.items():
        assert_rel(grad, grads_b[name], f"d loss / d {name}", rtol=tol)


@pytest.mark.parametrize("mode", ["exact", "exact+cma"])
@pytest.mark.parametrize("full_ft", [False, True], ids=["frozen_head", "full_ft"])
@pytest.mark.parametrize("chunk_size", (3, None), ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("divergence", ["forward_kl", "adaptive_kl"])
def test_exact_with_one_tokenization_equals_same_vocabulary_dskd(mode, full_ft, chunk_size, divergence):
    """The key property of exact alignment: two identical tokenizations distill exactly as one
    vocabulary does (value, every logged term, every gradient), with each other option at its
    default. With ``exact+cma`` every trained teacher token is some student token's partner, so
    attention has nothing left to do."""
    same = same_vocab_case(seed=40, full_ft=full_ft, pad=1)
    cross, identity = one_tokenization_as_two(same)
    cfg = {"divergence": divergence, "chunk_size": chunk_size}
    out_same = dskd_loss(same.proj, **same.inputs, config=same.config(**cfg))
    out_cross = dskd_loss(
        cross.proj, **cross.inputs, token_alignment=identity, config=cross.config(token_alignment=mode, **cfg)
    )
    targets_same, targets_cross = same.trainable(), cross.trainable()
    g_same = grads(out_same.loss, targets_same)
    g_cross = grads(
        out_cross.loss, {k: v for k, v in targets_cross.items() if not k.startswith("proj.query")}
    )
    assert_same_loss(out_cross, out_same, g_cross, g_same)
    assert float(out_cross.metrics["aligned_frac"]) == 1.0


@pytest.mark.parametrize("mode", ["exact", "exact+cma"])
@pytest.mark.parametrize("chunk_size", (1, None), ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("divergence", ["forward_kl", "js", "skew_reverse_kl"])
def test_exact_alignment_matches_reference(mode, chunk_size, divergence):
    """Some positions without a partner (every third one dropped): exact pairs, CE-only or
    attention rows and the remaining teacher columns, each as the reference writes them."""
    case = cma_case(seed=41)
    alignment = case.token_alignment.clone()
    alignment[:, ::3] = -1
    cfg = case.config(token_alignment=mode, divergence=divergence, chunk_size=chunk_size)
    out, _, _ = check_against_reference(case, cfg, token_alignment=alignment)
    trained = case.inputs["student_labels"][:, 1:] != -100
    expected = (trained & (alignment[:, :-1] >= 0)).sum() / trained.sum()
    assert_rel(out.metrics["aligned_frac"], expected, "aligned_frac")
    assert 0 < float(out.metrics["aligned_frac"]) < 1


def test_exact_alignment_with_packed_rows_matches_reference():
    world = make_world(42)
    g = torch.Generator().manual_seed(42)
    rows = [[make_sample(world, g, n_tokens=6, prompt=2), make_sample(world, g, n_tokens=5, prompt=1)],
            [make_sample(world, g, n_tokens=7, prompt=3)]]  # fmt: skip
    case = assemble(world, rows, segments=True, pad=2)
    for mode in ("exact", "exact+cma"):
        check_against_reference(case, case.config(token_alignment=mode), token_alignment=case.token_alignment)


@pytest.mark.parametrize("chunk_size", (1, None), ids=lambda c: f"chunk{c}")
def test_exact_plus_cma_without_partners_is_cma(chunk_size):
    """Where no position has an exact partner, ``exact+cma`` is cross-model attention."""
    case = cma_case(seed=43)
    nothing = torch.full_like(case.token_alignment, -1)
    targets = case.trainable()
    cma = dskd_loss(case.proj, **case.inputs, config=case.config(chunk_size=chunk_size))
    both = dskd_loss(
        case.proj, **case.inputs, token_alignment=nothing,
        config=case.config(token_alignment="exact+cma", chunk_size=chunk_size),
    )  # fmt: skip
    assert_same_loss(both, cma, grads(both.loss, targets), grads(cma.loss, targets))


def test_exact_without_partners_is_cross_entropy_only():
    case = cma_case(seed=44)
    nothing = torch.full_like(case.token_alignment, -1)
    out = dskd_loss(
        case.proj, **case.inputs, token_alignment=nothing, config=case.config(token_alignment="exact")
    )
    assert_rel(out.loss, 0.5 * out.metrics["ce"], "loss")
    assert all(float(out.metrics[t]) == 0.0 for t in ("kd_student", "kd_teacher", "t2s_ce", "aligned_frac"))


@pytest.mark.parametrize("mode", ["exact", "exact+cma"])
def test_exact_alignment_trains_the_projectors_and_the_student_only(mode):
    case = cma_case(seed=45, full_ft=True)
    frozen = ["teacher_hidden", "teacher_lm_head", "teacher_embeddings", "student_embeddings"]
    for key in frozen:
        case.inputs[key].requires_grad_(True)
    out = dskd_loss(
        case.proj,
        **case.inputs,
        token_alignment=case.token_alignment,
        config=case.config(token_alignment=mode),
    )
    out.loss.backward()
    for key in frozen:
        assert _zero_or_none(case.inputs[key].grad), f"{key} received a gradient"
    for key in ("student_hidden", "student_lm_head"):
        assert not _zero_or_none(case.inputs[key].grad), f"{key} got no gradient"
    for name, p in case.proj.named_parameters():
        if name.startswith("query"):  # attention's query is used only where attention runs
            assert _zero_or_none(p.grad) == (mode == "exact"), name
        else:
            assert not _zero_or_none(p.grad), f"projector {name} got no gradient"


def test_exact_alignment_needs_the_alignment_tensor():
    case = cma_case(seed=46)
    with pytest.raises(ValueError, match="token_alignment"):
        dskd_loss(case.proj, **case.inputs, config=case.config(token_alignment="exact"))


# ============================================================================================
# 5. Configuration
# ============================================================================================


def test_config_defaults_are_the_papers():
    cfg = DSKDLossConfig()
    assert (cfg.kd_rate, cfg.temperature) == (0.5, 2.0)
    assert cfg.divergence == cfg.teacher_space_divergence == "forward_kl"
    assert (cfg.skew_lambda, cfg.akl_alpha) == (0.1, 0.5)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_config_accepts_every_divergence(name):
    DSKDLossConfig(divergence=name, teacher_space_divergence=name)


def test_config_rejects_unknown_divergence():
    with pytest.raises(ValueError) as err:
        DSKDLossConfig(divergence="kl_divergence")
    msg = str(err.value)
    assert "divergence" in msg and "kl_divergence" in msg
    assert "teacher_space_divergence" not in msg


def test_config_rejects_unknown_token_alignment():
    with pytest.raises(ValueError, match="token_alignment='dtw'.*cma, exact, exact\\+cma"):
        DSKDLossConfig(token_alignment="dtw")


def test_config_rejects_unknown_teacher_space_divergence():
    with pytest.raises(ValueError, match="teacher_space_divergence") as err:
        DSKDLossConfig(teacher_space_divergence="tvd")
    assert "tvd" in str(err.value)


# ============================================================================================
# The benchmark's unchunked baseline computes the same loss
# ============================================================================================
# ``benchmarks/loss_memory.py`` measures memory and time against ``dskd_devkit.unchunked`` (whole-
# batch logits, in the inputs' precision): value, every metric and every trainable gradient must
# agree, or that comparison would be meaningless.

BASELINE_RTOL = 1e-4


@pytest.mark.parametrize(
    "divergence,teacher_space_divergence",
    [("forward_kl", "forward_kl"), ("adaptive_kl", "js"), ("skew_reverse_kl", "reverse_kl")],
)
@pytest.mark.parametrize("full_ft", [False, True], ids=["frozen_head", "full_ft"])
@pytest.mark.parametrize("variant", ["same", "cma"])
def test_unchunked_baseline_matches_dskd_loss(variant, full_ft, divergence, teacher_space_divergence):
    case = make_case(variant, seed=5, full_ft=full_ft, pad=2)
    cfg = case.config(divergence=divergence, teacher_space_divergence=teacher_space_divergence, chunk_size=3)
    targets = case.trainable()
    out = dskd_loss(case.proj, **case.inputs, config=cfg)
    base_loss, base_metrics = unchunked_dskd_loss(case.proj, **case.inputs, config=cfg)
    assert base_loss.dtype == torch.float32
    assert_rel(base_loss, out.loss, "loss", rtol=BASELINE_RTOL)
    for name in METRICS:
        assert_rel(base_metrics[name], out.metrics[name], f"metric {name}", rtol=BASELINE_RTOL)
    if variant == "cma":  # the accuracy mask of kd_student is exercised
        assert 0.0 < float(out.metrics["t2s_acc"]) < 1.0
    g_base = grads(base_loss, targets)
    g_out = grads(out.loss, targets)
    for name in targets:
        assert_rel(g_base[name], g_out[name], f"d loss / d {name}", rtol=BASELINE_RTOL)


def test_unchunked_baseline_matches_with_packing_and_num_items():
    case = make_case("cma", seed=2)
    cfg = case.config(chunk_size=4)
    s_ids, t_ids = case.inputs["student_input_ids"], case.inputs["teacher_input_ids"]
    # two packed samples per row: split each row in the middle
    seg = {
        "student_segment_ids": (torch.arange(s_ids.shape[1]) >= s_ids.shape[1] // 2).long().expand_as(s_ids),
        "teacher_segment_ids": (torch.arange(t_ids.shape[1]) >= t_ids.shape[1] // 2).long().expand_as(t_ids),
    }
    extra = dict(num_items=3 * case.n_trained() + 1, **seg)
    out = dskd_loss(case.proj, **case.inputs, config=cfg, **extra)
    base_loss, _ = unchunked_dskd_loss(case.proj, **case.inputs, config=cfg, **extra)
    assert_rel(base_loss, out.loss, "loss", rtol=BASELINE_RTOL)
    targets = case.trainable()
    g_base, g_out = grads(base_loss, targets), grads(out.loss, targets)
    for name in targets:
        assert_rel(g_base[name], g_out[name], f"d loss / d {name}", rtol=BASELINE_RTOL)


def test_benchmark_inputs_agree_at_small_realistic_shape():
    """The benchmark's own input generator, at a small size: both implementations agree."""
    from benchmarks.loss_memory import Point, make_inputs

    for variant in ("same", "cma"):
        point = Point(tokens=64, v_t=1024, variant=variant)
        proj, inputs, cfg = make_inputs(
            point, d_s=16, d_t=24, v_s=512, device="cpu", dtype=torch.float32, seed=0
        )
        out = dskd_loss(proj, **inputs, config=cfg)
        base_loss, _ = unchunked_dskd_loss(proj, **inputs, config=cfg)
        assert_rel(base_loss, out.loss, f"{variant} loss", rtol=BASELINE_RTOL)
        g_out = torch.autograd.grad(out.loss, inputs["student_hidden"])[0]
        g_base = torch.autograd.grad(base_loss, inputs["student_hidden"])[0]
        assert_rel(g_base, g_out, f"{variant} d loss / d student_hidden", rtol=BASELINE_RTOL)
