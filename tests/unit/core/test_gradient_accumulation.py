"""Gradient accumulation: ``num_items`` makes DSKD a global token mean.

The trainer passes ``num_items_in_batch``, the number of trained student targets in the whole
optimizer step (every accumulated micro-batch, on every GPU), and DSKD divides its token sums by
it. Then accumulating the gradients of micro-batches with *different* numbers of trained tokens
gives exactly the gradients of one batch holding all of them, which is what makes several GPUs
(or several accumulation steps) train the same model as one large batch.

The student here is a linear map ``h_s = X @ P`` with a trainable ``P`` (it stands for the
student's weights, whose gradients accumulate over micro-batches); the LM head is trainable in
the full fine-tune variant. Everything the optimizer sees is compared: ``P``, the LM head and
every projector parameter.

Cross-model attention has one batch-level statistic: ``Norm(x) = x / std(x)`` takes the std over
the valid positions *of the micro-batch* (``docs/dskd.md``, cross-model attention). Split a batch and those
three scalars change a little, so CMA is exact only with them held fixed; the CMA test replays
the one-batch scalars in the micro-batches (and a second test checks that ``num_items`` itself
only rescales each micro-batch). Everything else in CMA is per sample. The same through the real
``DSKDTrainer``: ``integration/test_trainer.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

import axolotl_dskd.core.loss as dskd_loss_module
from axolotl_dskd.core.loss import DSKDLossConfig, Projectors, dskd_loss

# Same vocabulary runs in float64 (logits and softmaxes still run in float32 inside the loss, by
# the spec, so results agree to float32 rounding). CMA's attention mixes float32 keys with the
# projectors' dtype, so it runs as in training: float32 projectors and inputs.
RTOL, ATOL = 2e-5, 1e-8
RTOL_CMA, ATOL_CMA = 1e-4, 1e-7


# ============================================================================================
# A tiny differentiable "student" and the two sides' data
# ============================================================================================


@dataclass
class World:
    """Weights shared by every micro-batch: student map ``P``, LM heads, embeddings, projectors."""

    P: Tensor  # [f, d_s] trainable: h_s = X @ P
    W_s: Tensor  # [V_s, d_s]
    W_t: Tensor  # [V_t, d_t]
    E_s: Tensor
    E_t: Tensor
    proj: Projectors
    features: int
    d_t: int
    V_s: int
    V_t: int

    def trainable(self) -> dict[str, Tensor]:
        out = {"P": self.P}
        if self.W_s.requires_grad:
            out["W_s"] = self.W_s
        out.update({f"proj.{k}": p for k, p in self.proj.named_parameters()})
        return out

    def zero_grad(self) -> None:
        for p in self.trainable().values():
            p.grad = None

    def grads(self) -> dict[str, Tensor]:
        return {k: p.grad.detach().clone() for k, p in self.trainable().items()}


def make_world(seed: int, *, cross: bool, full_ft: bool) -> World:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dtype = torch.float32 if cross else torch.float64
    f, d_s, d_t, V_s = 10, 12, 16, 48
    V_t = 64 if cross else V_s
    proj = Projectors(d_s, d_t, cross_tokenizer=cross).to(dtype)

    def leaf(shape, scale, requires_grad=False):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_(requires_grad)

    return World(
        P=leaf((f, d_s), 1 / math.sqrt(f), True),
        W_s=leaf((V_s, d_s), 2 / math.sqrt(d_s), full_ft),
        W_t=leaf((V_t, d_t), 2 / math.sqrt(d_t)),
        E_s=leaf((V_s, d_s), 1.0),
        E_t=leaf((V_t, d_t), 1.0),
        proj=proj,
        features=f,
        d_t=d_t,
        V_s=V_s,
        V_t=V_t,
    )


@dataclass
class Row:
    """One sample: both sides' ids, labels (-100 = not trained), features and teacher states."""

    s_ids: Tensor
    s_labels: Tensor
    x: Tensor  # [L_s, f] student features
    t_ids: Tensor
    t_labels: Tensor
    h_t: Tensor  # [L_t, d_t]


def make_row(world: World, g: torch.Generator, length: int, prompt: int, *, cross: bool) -> Row:
    s_ids = torch.randint(1, world.V_s, (length,), generator=g)
    s_labels = torch.where(torch.arange(length) < prompt, -100, s_ids)
    x = torch.randn(length, world.features, generator=g, dtype=world.P.dtype)
    if not cross:
        t_ids, t_labels = s_ids, s_labels
    else:
        # the teacher splits some student tokens in two: a different tokenization, longer
        t_ids_l, t_lab_l = [], []
        for k, tok in enumerate(s_ids.tolist()):
            pieces = [tok] if tok % 3 else [tok, world.V_s + tok % (world.V_t - world.V_s)]
            t_ids_l += pieces
            t_lab_l += [-100 if k < prompt else p for p in pieces]
        t_ids, t_labels = torch.tensor(t_ids_l), torch.tensor(t_lab_l)
    h_t = torch.randn(len(t_ids), world.d_t, generator=g, dtype=world.P.dtype)
    return Row(s_ids, s_labels, x, t_ids, t_labels, h_t)


def n_trained(rows: list[Row]) -> int:
    return sum(int((r.s_labels[1:] != -100).sum()) for r in rows)


def _pad(seqs: list[Tensor], fill: float, length: int) -> Tensor:
    out = []
    for s in seqs:
        extra = length - s.shape[0]
        pad_shape = (extra, *s.shape[1:])
        # padded positions get loud garbage: they must not matter
        filler = (
            torch.full(pad_shape, fill, dtype=s.dtype)
            if s.dim() == 1
            else 40 * torch.randn(pad_shape, dtype=s.dtype)
        )
        out.append(torch.cat([s, filler]))
    return torch.stack(out)


def loss_of(world: World, rows: list[Row], *, cross: bool, num_items=None, chunk_size=None):
    """``dskd_loss`` of one micro-batch built from ``rows`` (padded to a common length)."""
    L_s = max(r.s_ids.shape[0] for r in rows)
    L_t = max(r.t_ids.shape[0] for r in rows)
    x = _pad([r.x for r in rows], 0.0, L_s)
    inputs = {
        "student_hidden": x @ world.P,
        "student_lm_head": world.W_s,
        "student_labels": _pad([r.s_labels for r in rows], -100, L_s),
        "teacher_hidden": _pad([r.h_t for r in rows], 0.0, L_t),
        "teacher_lm_head": world.W_t,
    }
    if cross:
        inputs.update(
            teacher_labels=_pad([r.t_labels for r in rows], -100, L_t),
            student_input_ids=_pad([r.s_ids for r in rows], 0, L_s),
            teacher_input_ids=_pad([r.t_ids for r in rows], 0, L_t),
            student_embeddings=world.E_s,
            teacher_embeddings=world.E_t,
        )
    else:
        inputs["teacher_labels"] = inputs["student_labels"]
    config = DSKDLossConfig(cross_tokenizer=cross, token_alignment="cma", chunk_size=chunk_size)
    return dskd_loss(world.proj, **inputs, config=config, num_items=num_items)


def make_batches(world: World, seed: int, *, cross: bool) -> tuple[list[Row], list[Row]]:
    """Two micro-batches of different shapes and different numbers of trained tokens."""
    g = torch.Generator().manual_seed(100 + seed)
    mb1 = [make_row(world, g, 7, 2, cross=cross), make_row(world, g, 6, 4, cross=cross)]
    mb2 = [make_row(world, g, 11, 3, cross=cross)]
    assert n_trained(mb1) != n_trained(mb2)
    return mb1, mb2


def assert_grads_close(actual: dict, expected: dict, rtol: float, atol: float, what: str) -> None:
    assert actual.keys() == expected.keys()
    for name, e in expected.items():
        a = actual[name]
        assert torch.isfinite(a).all(), f"{what}: non-finite gradient of {name}"
        assert e.abs().max() > 0, f"{what}: {name} gets no gradient at all; the test proves nothing"
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=f"{what}, {name}: gradients differ")


def accumulate(world: World, micro_batches: list[list[Row]], *, cross: bool, scale: float = 1.0, **kw):
    """Backward each micro-batch with the global count; returns (summed loss, grads)."""
    total = n_trained([r for mb in micro_batches for r in mb])
    world.zero_grad()
    loss_sum = 0.0
    for mb in micro_batches:
        loss = loss_of(world, mb, cross=cross, num_items=total, **kw).loss * scale
        loss.backward()
        loss_sum += float(loss.detach())
    return loss_sum, world.grads()


def one_batch(world: World, rows: list[Row], *, cross: bool, **kw):
    world.zero_grad()
    loss = loss_of(world, rows, cross=cross, **kw).loss
    loss.backward()
    return float(loss.detach()), world.grads()


# ============================================================================================
# Same vocabulary: exact
# ============================================================================================


@pytest.mark.parametrize("full_ft", [False, True], ids=["lora", "full_ft"])
@pytest.mark.parametrize("chunk_size", [None, 2], ids=["chunk_auto", "chunk_2"])
def test_same_vocab_accumulation_equals_one_batch(full_ft, chunk_size):
    world = make_world(0, cross=False, full_ft=full_ft)
    mb1, mb2 = make_batches(world, 0, cross=False)
    acc_loss, acc = accumulate(world, [mb1, mb2], cross=False, chunk_size=chunk_size)
    ref_loss, ref = one_batch(world, mb1 + mb2, cross=False, chunk_size=chunk_size)
    assert acc_loss == pytest.approx(ref_loss, rel=RTOL)
    assert_grads_close(acc, ref, RTOL, ATOL, "same-vocab, 2 micro-batches vs 1 batch")


def test_same_vocab_per_micro_batch_mean_is_not_the_global_mean():
    """The reason for num_items: averaging two micro-batch means (what gradient accumulation
    without it does) weights the tokens of the smaller micro-batch more."""
    world = make_world(0, cross=False, full_ft=False)
    mb1, mb2 = make_batches(world, 0, cross=False)
    world.zero_grad()
    for mb in (mb1, mb2):
        (loss_of(world, mb, cross=False).loss / 2).backward()
    naive = world.grads()
    _, ref = one_batch(world, mb1 + mb2, cross=False)
    assert not torch.allclose(naive["P"], ref["P"], rtol=1e-3, atol=0)


def test_same_vocab_loss_scaled_by_process_count_and_averaged_equals_one_batch():
    """The arithmetic of data parallelism, on one process: scaling each micro-batch's loss by the
    number of processes (as the trainer does with ``average_tokens_across_devices``) and then
    averaging the gradients (as DDP's all-reduce would) gives the one-batch gradients. Real
    process groups are not involved: this checks the loss's normalization, not synchronization."""
    world = make_world(1, cross=False, full_ft=True)
    mb1, mb2 = make_batches(world, 1, cross=False)
    ranks = 2
    _, summed = accumulate(world, [mb1, mb2], cross=False, scale=ranks)
    averaged = {k: g / ranks for k, g in summed.items()}  # DDP all-reduce: mean over ranks
    _, ref = one_batch(world, mb1 + mb2, cross=False)
    assert_grads_close(averaged, ref, RTOL, ATOL, "same-vocab, 2 ranks vs 1 batch")


# ============================================================================================
# Cross-tokenizer (CMA)
# ============================================================================================


class ReplayNorm:
    """Stand-in for ``axolotl_dskd.core.loss._normalized`` that records the std scalars of one call
    of ``dskd_loss`` (key, teacher hidden, teacher target embedding: in that order) and then
    divides by the recorded scalars in later calls."""

    CALLS_PER_LOSS = 3

    def __init__(self) -> None:
        self.scales: list[Tensor] = []
        self.replaying = False
        self.calls = 0

    def __call__(self, x: Tensor, valid: Tensor) -> Tensor:
        if not self.replaying:
            scale = x[valid].std() if valid.any() else torch.ones((), dtype=x.dtype)
            self.scales.append(scale.detach())
        else:
            scale = self.scales[self.calls % self.CALLS_PER_LOSS]
            self.calls += 1
        return x / scale


@pytest.mark.parametrize("full_ft", [False, True], ids=["lora", "full_ft"])
@pytest.mark.parametrize("chunk_size", [None, 3], ids=["chunk_auto", "chunk_3"])
def test_cma_accumulation_equals_one_batch_with_the_batch_norm_scalars(monkeypatch, full_ft, chunk_size):
    world = make_world(2, cross=True, full_ft=full_ft)
    mb1, mb2 = make_batches(world, 2, cross=True)
    norm = ReplayNorm()
    monkeypatch.setattr(dskd_loss_module, "_normalized", norm)
    ref_loss, ref = one_batch(world, mb1 + mb2, cross=True, chunk_size=chunk_size)
    assert len(norm.scales) == ReplayNorm.CALLS_PER_LOSS, "CMA's Norm is no longer 3 calls per loss"
    norm.replaying = True
    acc_loss, acc = accumulate(world, [mb1, mb2], cross=True, chunk_size=chunk_size)
    assert norm.calls == 2 * ReplayNorm.CALLS_PER_LOSS
    assert acc_loss == pytest.approx(ref_loss, rel=RTOL_CMA)
    assert_grads_close(acc, ref, RTOL_CMA, ATOL_CMA, "CMA, 2 micro-batches vs 1 batch (batch Norm)")


def test_cma_num_items_only_rescales_a_micro_batch():
    """Unpatched CMA: passing the global count N divides the micro-batch's token sums by N
    instead of its own count n, and changes nothing else (loss and every gradient scale by n/N)."""
    world = make_world(3, cross=True, full_ft=True)
    mb1, mb2 = make_batches(world, 3, cross=True)
    n, total = n_trained(mb1), n_trained(mb1 + mb2)
    local_loss, local = one_batch(world, mb1, cross=True)
    global_loss, glob = accumulate(world, [mb1], cross=True)  # num_items = n here
    assert global_loss == pytest.approx(local_loss, rel=1e-12)
    world.zero_grad()
    out = loss_of(world, mb1, cross=True, num_items=total)
    out.loss.backward()
    scaled = {k: g * total / n for k, g in world.grads().items()}
    assert float(out.loss.detach()) * total / n == pytest.approx(local_loss, rel=1e-6)
    assert_grads_close(scaled, local, RTOL_CMA, ATOL_CMA, "CMA, num_items rescaling")
    assert_grads_close(glob, local, 1e-12, 0, "CMA, num_items = own count")


def test_cma_micro_batch_norm_is_the_only_coupling(monkeypatch):
    """Without the replay, the two ways differ (the Norm scalars differ per micro-batch), but
    only a little for micro-batches drawn from the same distribution; this pins the size so a
    change that couples micro-batches some other way shows up."""
    world = make_world(4, cross=True, full_ft=False)
    mb1, mb2 = make_batches(world, 4, cross=True)
    _, acc = accumulate(world, [mb1, mb2], cross=True)
    _, ref = one_batch(world, mb1 + mb2, cross=True)
    rel = (acc["P"] - ref["P"]).norm() / ref["P"].norm()
    assert 0 < rel < 0.2, f"relative gradient difference {float(rel):.3g}"
