"""The DSKD loss (``axolotl_dskd.core.loss.dskd_loss``) against its math (``docs/dskd.md``).

Most tests compare the project's (float32, chunked) loss with ``dskd_devkit.reference``, an
independent float64 transcription of the math: the loss, every logged term, and the gradients
with respect to the student's hidden states, the student's LM head (full fine-tune) and every
projector parameter, to a relative 2e-4. The rest check properties the math states outright
(where gradients may and may not flow, invariance to padding, packing and chunking, bf16 and
fp16 robustness, malformed rows, config validation) without the reference; the divergences'
closed forms are in ``test_divergences.py``.
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
from transformers import AutoModelForCausalLM, AutoTokenizer

from axolotl_dskd.core.loss import DSKDLossConfig, DSKDLossOutput, Projectors, dskd_loss, vanilla_kd_loss
from dskd_devkit.reference import DIVERGENCE_NAMES as DIVERGENCES
from dskd_devkit.reference import reference_dskd_loss
from dskd_devkit.unchunked import unchunked_dskd_loss
from tests.unit.core.loss_cases import Case, as_float

METRICS = ("ce", "kd_student", "kd_teacher", "t2s_ce", "t2s_acc", "aligned_frac")
RTOL = 2e-4
CHUNKS = (1, 3, None)


# ============================================================================================
# Building inputs
# ============================================================================================


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


@pytest.mark.parametrize("chunk_size", (1, None), ids=lambda c: f"chunk{c}")
def test_same_vocab_accuracy_mask_everywhere_matches_reference(chunk_size):
    """``kd_student_accuracy_mask: everywhere`` distils only the tokens whose projected teacher
    predicts the label, and so lowers kd_student where the projected teacher is sometimes wrong."""
    case = same_vocab_case(seed=7)
    with torch.no_grad():  # the projected teacher's top-1 becomes the label at every other token
        z_t2s = case.proj.t2s(case.inputs["teacher_hidden"]) @ case.inputs["student_lm_head"].T
        labels = case.inputs["student_labels"]
        trained = labels[:, 1::2] != -100
        labels[:, 1::2] = torch.where(trained, z_t2s[:, :-1:2].argmax(-1), labels[:, 1::2])
    masked, _, ref = check_against_reference(
        case, case.config(chunk_size=chunk_size, kd_student_accuracy_mask="everywhere")
    )
    assert 0.0 < float(ref["t2s_acc"]) < 1.0
    plain = dskd_loss(case.proj, **case.inputs, config=case.config(chunk_size=chunk_size))
    assert float(masked.metrics["kd_student"]) < float(plain.metrics["kd_student"])


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


@pytest.mark.parametrize("weight", [0.0, 0.5])
@pytest.mark.parametrize("variant", ["same", "cma"])
def test_kd_teacher_weight_matches_reference(variant, weight):
    """``kd_teacher_weight`` scales the teacher-space term; at 0 the teacher's space is left out
    (kd_teacher reported as 0, s2t gets no gradient) and the other terms are unchanged."""
    case = make_case(variant, seed=18)
    out, _, _ = check_against_reference(case, case.config(kd_rate=0.4, kd_teacher_weight=weight))
    full = dskd_loss(case.proj, **case.inputs, config=case.config(kd_rate=0.4))
    for name in ("ce", "kd_student", "t2s_ce"):
        assert_rel(out.metrics[name], full.metrics[name], name)
    kd_teacher = float(full.metrics["kd_teacher"])
    assert kd_teacher > 0
    assert_rel(full.loss - out.loss, torch.tensor(0.4 * (1 - weight) * kd_teacher), "the kd_teacher share")
    if weight == 0:
        assert float(out.metrics["kd_teacher"]) == 0.0
        s2t = torch.autograd.grad(out.loss, case.proj.s2t.weight, allow_unused=True)[0]
        assert _zero_or_none(s2t)


@pytest.mark.parametrize("alignment", ["same", "cma", "exact+cma"])
def test_t2s_labels_match_reference(alignment):
    """``t2s_labels`` (DSKDv2: the teacher's own top-1) is what t2s_ce trains the projected
    teacher toward; CE, the accuracy mask and t2s_acc still read the labels."""
    case = make_case("same" if alignment == "same" else "cma", seed=49)
    extra = {} if alignment == "same" else {"token_alignment": case.token_alignment.clone()}
    if alignment == "exact+cma":
        extra["token_alignment"][:, ::3] = -1
    cfg = case.config() if alignment == "same" else case.config(token_alignment=alignment)
    labels = case.inputs["student_labels"]
    vocabulary = case.inputs["student_lm_head"].shape[0]
    g = torch.Generator().manual_seed(4900)  # not the case's own seed: other ids than the labels
    t2s_labels = torch.where(labels != -100, torch.randint(vocabulary, labels.shape, generator=g), -100)
    out, _, _ = check_against_reference(case, cfg, t2s_labels=t2s_labels, **extra)
    plain = dskd_loss(case.proj, **case.inputs, config=cfg, **extra)
    for name in ("ce", "t2s_acc"):
        assert_rel(out.metrics[name], plain.metrics[name], name)
    assert float(out.metrics["t2s_ce"]) != pytest.approx(float(plain.metrics["t2s_ce"]), rel=1e-3)
    same = dskd_loss(case.proj, **case.inputs, config=cfg, t2s_labels=labels, **extra)
    assert torch.equal(same.loss, plain.loss)


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
    acc_alone = as_float(out_alone.metrics["t2s_acc"]) * alone.n_trained() / n_total
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
    assert abs(as_float(out_u.loss) - as_float(out_s.loss)) > 1e-4


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
# 2. Robustness: huge logits, bf16 (the divergences' closed forms: test_divergences.py)
# ============================================================================================


@pytest.mark.parametrize("variant", ["same", "cma"])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_huge_bf16_logits_stay_finite(variant, name):
    """bf16 inputs with hidden states scaled by 1e3 (logits in the thousands): loss, terms
    and gradients are finite."""
    case = make_case(variant, seed=12, dtype=torch.bfloat16, hidden_scale=1e3, full_ft=True)
    cfg = case.config(divergence=name, teacher_space_divergence=name, chunk_size=3)
    out = dskd_loss(case.proj, **case.inputs, config=cfg)
    assert torch.isfinite(out.loss), as_float(out.loss)
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
    a, b = as_float(out16.loss), as_float(out32.loss)
    assert abs(a - b) <= 0.01 * abs(b) + 0.01, ("loss", a, b)
    for term in ("ce", "kd_student", "kd_teacher", "t2s_ce"):
        a, b = as_float(out16.metrics[term]), as_float(out32.metrics[term])
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


@pytest.mark.parametrize("mask", ["attention", "everywhere"])
@pytest.mark.parametrize("mode", ["exact", "exact+cma"])
@pytest.mark.parametrize("chunk_size", (1, None), ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("divergence", ["forward_kl", "js", "skew_reverse_kl"])
def test_exact_alignment_matches_reference(mode, chunk_size, divergence, mask):
    """Some positions without a partner (every third one dropped): exact pairs, CE-only or
    attention rows and the remaining teacher columns, each as the reference writes them."""
    case = cma_case(seed=41)
    alignment = case.token_alignment.clone()
    alignment[:, ::3] = -1
    cfg = case.config(
        token_alignment=mode, divergence=divergence, chunk_size=chunk_size, kd_student_accuracy_mask=mask
    )
    out, _, _ = check_against_reference(case, cfg, token_alignment=alignment)
    trained = case.inputs["student_labels"][:, 1:] != -100
    expected = (trained & (alignment[:, :-1] >= 0)).sum() / trained.sum()
    assert_rel(out.metrics["aligned_frac"], expected, "aligned_frac")
    assert 0 < float(out.metrics["aligned_frac"]) < 1


def some_shared_tokens(case: Case, seed: int) -> tuple[Tensor, Tensor]:
    """Two thirds of the student's ids paired one to one with distinct teacher ids, as two
    vocabularies that spell some tokens alike are."""
    g = torch.Generator().manual_seed(seed)
    v_s, v_t = case.inputs["student_lm_head"].shape[0], case.inputs["teacher_lm_head"].shape[0]
    n = min(v_s, v_t) * 2 // 3
    student_ids = torch.randperm(v_s, generator=g)[:n].sort().values
    return student_ids, torch.randperm(v_t, generator=g)[:n]


@pytest.mark.parametrize("mask", ["attention", "everywhere"])
@pytest.mark.parametrize("mode", ["same", "exact", "exact+cma"])
@pytest.mark.parametrize("chunk_size", (1, None), ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "adaptive_kl"])
def test_shared_vocabulary_target_matches_reference(divergence, chunk_size, mode, mask):
    """``student_space_target: shared_vocabulary``: where a teacher state is paired position by
    position, kd_student compares both models' distributions over the shared tokens; attention's
    rows keep the projected teacher. Value, metrics and gradients as the reference writes them."""
    settings_ = {"student_space_target": "shared_vocabulary", "divergence": divergence,
                 "chunk_size": chunk_size, "kd_student_accuracy_mask": mask}  # fmt: skip
    if mode == "same":
        case = same_vocab_case(seed=44)
        check_against_reference(case, case.config(**settings_))
        return
    case = cma_case(seed=45)
    alignment = case.token_alignment.clone()
    alignment[:, ::3] = -1
    shared = some_shared_tokens(case, seed=45)
    out, _, _ = check_against_reference(
        case,
        case.config(token_alignment=mode, **settings_),
        token_alignment=alignment,
        shared_vocabulary=shared,
    )
    projected = dskd_loss(
        case.proj,
        **case.inputs,
        token_alignment=alignment,
        config=case.config(token_alignment=mode, **settings_ | {"student_space_target": "projected"}),
    )
    assert float(out.metrics["kd_student"]) != pytest.approx(float(projected.metrics["kd_student"]), rel=1e-3)


def test_shared_vocabulary_target_of_one_vocabulary_is_vanilla_kd():
    """With one vocabulary the student-space term is vanilla KD's, toward the teacher's own
    distribution; CE is unchanged."""
    case = same_vocab_case(seed=46)
    config = case.config(student_space_target="shared_vocabulary")
    dskd = dskd_loss(case.proj, **case.inputs, config=config)
    plain = {k: v for k, v in case.inputs.items() if k != "teacher_labels"}
    vanilla = vanilla_kd_loss(**plain, config=config)
    for name in ("ce", "kd_student"):
        assert_rel(dskd.metrics[name], vanilla.metrics[name], name)


@pytest.mark.parametrize("mode", ["same", "exact", "exact+cma"])
def test_shared_vocabulary_target_reads_t2s_only_through_attention(mode):
    """With the shared-vocabulary target only attention's rows read the projected teacher: with
    one vocabulary or exact pairs alone t2s is not computed (t2s_ce and t2s_acc 0, no gradient),
    and what the student learns does not depend on it."""
    if mode == "same":
        case, extra = same_vocab_case(seed=48), {}
        config = case.config(student_space_target="shared_vocabulary")
    else:
        case = cma_case(seed=48)
        alignment = case.token_alignment.clone()
        alignment[:, ::3] = -1  # rows without a partner: attention's, with exact+cma
        extra = {"token_alignment": alignment, "shared_vocabulary": some_shared_tokens(case, seed=48)}
        config = case.config(student_space_target="shared_vocabulary", token_alignment=mode)

    def run() -> tuple[DSKDLossOutput, Tensor, Tensor | None]:
        out = dskd_loss(case.proj, **case.inputs, config=config, **extra)
        wrt = (case.inputs["student_hidden"], case.proj.t2s.weight)
        return out, *torch.autograd.grad(out.loss, wrt, allow_unused=True)

    out, student_grad, t2s_grad = run()
    with torch.no_grad():
        case.proj.t2s.weight.mul_(-3.0)
    scrambled, scrambled_grad, _ = run()
    if mode == "exact+cma":
        assert float(out.metrics["t2s_ce"]) > 0 and not _zero_or_none(t2s_grad)
        assert not torch.allclose(student_grad, scrambled_grad)
        return
    assert float(out.metrics["t2s_ce"]) == float(out.metrics["t2s_acc"]) == 0.0
    assert _zero_or_none(t2s_grad)
    assert torch.equal(out.loss, scrambled.loss) and torch.equal(student_grad, scrambled_grad)


def test_shared_vocabulary_target_across_tokenizers_needs_the_shared_ids():
    case = cma_case(seed=47)
    config = case.config(token_alignment="exact", student_space_target="shared_vocabulary")
    with pytest.raises(ValueError, match="shared_vocabulary"):
        dskd_loss(case.proj, **case.inputs, token_alignment=case.token_alignment, config=config)


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
    config = case.config(token_alignment="exact")
    out = dskd_loss(case.proj, **case.inputs, token_alignment=nothing, config=config)
    assert_rel(out.loss, (1 - config.kd_rate) * out.metrics["ce"], "loss")
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


def test_config_defaults_are_the_papers_but_kd_rate_and_alignment():
    """kd_rate 1/3 and exact alignment were chosen on real models (docs/benchmarks.md)."""
    cfg = DSKDLossConfig()
    assert (cfg.kd_rate, cfg.temperature) == (1 / 3, 2.0)
    assert (cfg.token_alignment, cfg.kd_student_accuracy_mask) == ("exact", "attention")
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


# ============================================================================================
# fp16 logits beyond fp16's range
# ============================================================================================


FP16_MAX = torch.finfo(torch.float16).max


def _huge_fp16_inputs(cross_tokenizer: bool) -> tuple[Projectors, dict]:
    """fp16 hidden states and LM heads whose products reach ~80000, past fp16's 65504."""
    g = torch.Generator().manual_seed(0)
    B, L, d_s, d_t, V_s, V_t = 2, 7, 8, 12, 32, 40
    torch.manual_seed(0)
    proj = Projectors(d_s, d_t, cross_tokenizer=cross_tokenizer)
    h_s, h_t = torch.randn(B, L, d_s, generator=g) * 30, torch.randn(B, L, d_t, generator=g) * 30
    W_s, W_t = torch.randn(V_s, d_s, generator=g) * 30, torch.randn(V_t, d_t, generator=g) * 30
    h_s[:, :, :] = h_s.abs() + 60  # one direction everywhere: a head row along it gives huge logits
    W_s[3] = 120.0
    h_t[:, :, :] = h_t.abs() + 60
    W_t[5] = 120.0
    ids_s = torch.randint(1, V_s, (B, L), generator=g)
    labels = ids_s.clone()
    labels[:, :2] = -100
    inputs = {
        "student_hidden": h_s.half().requires_grad_(),
        "student_lm_head": W_s.half().requires_grad_(),
        "student_labels": labels,
        "teacher_hidden": h_t.half(),
        "teacher_lm_head": W_t.half(),
    }
    if cross_tokenizer:
        ids_t = torch.randint(1, V_t, (B, L + 2), generator=g)
        t_labels = ids_t.clone()
        t_labels[:, :3] = -100
        inputs.update(
            teacher_hidden=(torch.randn(B, L + 2, d_t, generator=g).abs() * 30 + 60).half(),
            teacher_labels=t_labels,
            student_input_ids=ids_s,
            teacher_input_ids=ids_t,
            student_embeddings=torch.randn(V_s, d_s, generator=g).half(),
            teacher_embeddings=torch.randn(V_t, d_t, generator=g).half(),
        )
    else:
        inputs["teacher_labels"] = labels
    return proj, inputs


def _as_float32(inputs: dict) -> dict:
    return {
        k: (v.detach().float().requires_grad_(v.requires_grad) if v.is_floating_point() else v)
        for k, v in inputs.items()
    }


@pytest.mark.parametrize("cross_tokenizer", [False, True], ids=["same_vocab", "cma"])
def test_fp16_logits_beyond_fp16_range_stay_finite_and_match_float32(cross_tokenizer):
    proj, fp16 = _huge_fp16_inputs(cross_tokenizer)
    logits = fp16["student_hidden"].float() @ fp16["student_lm_head"].float().T
    assert logits.abs().max() > FP16_MAX  # the case is what it claims: fp16 cannot hold these
    config = DSKDLossConfig(cross_tokenizer=cross_tokenizer, token_alignment="cma", chunk_size=5)
    f32 = _as_float32(fp16)

    out16 = dskd_loss(proj, **fp16, config=config)
    out32 = dskd_loss(proj, **f32, config=config)
    assert torch.isfinite(out16.loss)
    torch.testing.assert_close(out16.loss, out32.loss, rtol=1e-4, atol=1e-3)
    for term in ("ce", "kd_student", "kd_teacher", "t2s_ce", "t2s_acc"):
        assert math.isfinite(float(out16.metrics[term])), term
        torch.testing.assert_close(out16.metrics[term], out32.metrics[term], rtol=1e-4, atol=1e-3)
    trainable = [fp16["student_hidden"], fp16["student_lm_head"], *proj.parameters()]
    for grad in torch.autograd.grad(out16.loss, trainable, allow_unused=True):
        assert grad is None or torch.isfinite(grad).all()


# ============================================================================================
# Malformed dataset rows through the teacher-token builder and the loss
# ============================================================================================


def _row(tokenizer, prompt: str, response: str, *, eos: bool) -> tuple[list[int], list[int]]:
    """Student ids and labels as Axolotl builds them: BOS and prompt untrained, response (and
    EOS) trained."""
    prompt_ids = tokenizer(prompt)["input_ids"]  # with the student's BOS
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if eos:
        response_ids = [*response_ids, tokenizer.eos_token_id]
    return prompt_ids + response_ids, [-100] * len(prompt_ids) + response_ids


def test_malformed_rows_pass_the_builder_and_the_loss_without_nan(assets):
    """Empty response, a response that is nothing to the teacher, whitespace only, and text
    longer than both models' contexts, batched with one ordinary row through the real
    tokenizers and models: nothing crashes, every term and gradient is finite, and a row
    without a trained teacher token adds nothing to the distillation terms."""
    from axolotl_dskd.core.models import final_hidden_states, input_embedding_weight, lm_head_weight
    from axolotl_dskd.core.teacher_tokens import TeacherTokenBuilder

    student_tok = AutoTokenizer.from_pretrained(assets["student_sp"])
    teacher_tok = AutoTokenizer.from_pretrained(assets["teacher"])
    student = AutoModelForCausalLM.from_pretrained(assets["student_sp"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(assets["teacher"], dtype=torch.float32)
    context = min(student.config.max_position_embeddings, teacher.config.max_position_embeddings)
    long_prompt = "Add the numbers 12 and 30, then say the sum. " * 80

    rows = {
        "ordinary": _row(student_tok, "What is 12 + 30?", " 42", eos=True),
        "empty response": _row(student_tok, "Say nothing.", "", eos=False),
        "empty response, EOS": _row(student_tok, "Say nothing.", "", eos=True),
        "nothing for the teacher": _row(student_tok, "Say a marker.", "<s>", eos=False),
        "whitespace only": _row(student_tok, " \n ", " \n\t ", eos=True),
        "longer than both contexts": _row(student_tok, long_prompt, " 42", eos=True),
    }
    ids, labels = rows["longer than both contexts"]
    assert len(ids) > context and len(teacher_tok(long_prompt)["input_ids"]) > context
    rows["longer than both contexts"] = (ids[:context], labels[:context])  # Axolotl's truncation
    assert student_tok.convert_ids_to_tokens(rows["nothing for the teacher"][0][-1:]) == ["<s>"]

    width = max(len(ids) for ids, _ in rows.values())
    pad = student_tok.pad_token_id if student_tok.pad_token_id is not None else student_tok.eos_token_id
    batch = {
        "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows.values()]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows.values()]),
        "attention_mask": torch.tensor(
            [[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows.values()]
        ),
    }
    builder = TeacherTokenBuilder(student_tok, teacher_tok, max_length=teacher.config.max_position_embeddings)
    teacher_batch = builder(batch)
    assert teacher_batch["teacher_input_ids"].shape[1] <= teacher.config.max_position_embeddings
    names = list(rows)
    untrained_for_teacher = {
        names[i] for i, row in enumerate(teacher_batch["teacher_labels"][:, 1:]) if (row == -100).all()
    }
    assert untrained_for_teacher >= {"empty response", "nothing for the teacher", "longer than both contexts"}
    assert "ordinary" not in untrained_for_teacher

    h_s = final_hidden_states(student, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        h_t = final_hidden_states(
            teacher,
            input_ids=teacher_batch["teacher_input_ids"],
            attention_mask=teacher_batch["teacher_attention_mask"],
        )
    torch.manual_seed(0)
    proj = Projectors(student.config.hidden_size, teacher.config.hidden_size, cross_tokenizer=True)
    config = DSKDLossConfig(cross_tokenizer=True, token_alignment="cma", chunk_size=16)

    def loss_of(keep: list[int]):
        return dskd_loss(
            proj,
            student_hidden=h_s[keep], student_lm_head=lm_head_weight(student),
            student_labels=batch["labels"][keep],
            teacher_hidden=h_t[keep], teacher_lm_head=lm_head_weight(teacher),
            teacher_labels=teacher_batch["teacher_labels"][keep],
            student_input_ids=batch["input_ids"][keep],
            teacher_input_ids=teacher_batch["teacher_input_ids"][keep],
            student_embeddings=input_embedding_weight(student),
            teacher_embeddings=input_embedding_weight(teacher),
            config=config, num_items=1,  # sums, not means: rows can be compared term by term
        )  # fmt: skip

    def assert_finite(out, what: str) -> None:
        assert torch.isfinite(out.loss), what
        for term, value in out.metrics.items():
            assert math.isfinite(float(value)), (what, term)
        trainable = [h_s, lm_head_weight(student), *proj.parameters()]
        if out.loss.requires_grad:
            grads = torch.autograd.grad(out.loss, trainable, allow_unused=True, retain_graph=True)
            assert all(g is None or torch.isfinite(g).all() for g in grads), what

    out = loss_of(list(range(len(names))))
    assert_finite(out, "the whole batch")

    distillation = ("kd_student", "kd_teacher", "t2s_ce")
    for name in untrained_for_teacher:
        alone = loss_of([names.index(name)])
        assert_finite(alone, name)
        assert all(float(alone.metrics[t]) == 0.0 for t in distillation), (name, alone.metrics)
    assert_finite(loss_of([names.index(name) for name in untrained_for_teacher]), "only malformed rows")

    rest = loss_of([i for i, name in enumerate(names) if name not in untrained_for_teacher])
    for term in distillation:
        torch.testing.assert_close(out.metrics[term], rest.metrics[term], rtol=1e-5, atol=1e-6)
