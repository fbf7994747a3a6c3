"""Token-chunked sums whose backward memory grows with the chunk, not with the batch.

A DSKD term needs ``[tokens, V]`` logits for four heads. :func:`chunked_token_sum` evaluates a
per-chunk function and, in the same pass, takes the gradients of the chunk's loss with respect
to its inputs (as fused linear-cross-entropy kernels do), so only one chunk's logits are ever
alive and backward is a multiply by the upstream gradient: no recomputation, no stored logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

ChunkFn = Callable[..., tuple[Tensor, Tensor]]
"""``fn(*token_chunks, *shared) -> (loss, stats)``: a 0-d loss to differentiate and a 1-d
vector of detached statistics, both sums over the chunk's tokens."""


def chunked_token_sum(
    fn: ChunkFn,
    token_inputs: Sequence[Tensor],
    shared_inputs: Sequence[Tensor],
    chunk_size: int,
) -> tuple[Tensor, Tensor]:
    """Sum ``fn`` over chunks of ``chunk_size`` rows of every token input.

    Args:
        fn: ``fn(*token_chunks, *shared_inputs) -> (loss, stats)``: a 0-d loss and a 1-d vector
            of detached statistics, both sums over the chunk's rows.
        token_inputs: Tensors of shape ``[N, ...]`` sharing their first dimension, one row per
            token (hidden states ``[N, d]``, targets ``[N]``, masks ``[N]``).
        shared_inputs: Tensors passed whole to every chunk (LM-head weights ``[V, d]``).
        chunk_size: Rows per chunk; one chunk's ``[chunk_size, V]`` logits exist at a time.

    Returns:
        ``(loss, stats)``: the 0-d sum of the chunks' losses, differentiable with respect to
        every input that requires grad, and the sum of their statistics.
    """
    inputs = (*token_inputs, *shared_inputs)
    requires = tuple(t.requires_grad for t in inputs)
    if torch.is_grad_enabled() and any(requires):
        return _ChunkedSum.apply(fn, chunk_size, len(token_inputs), requires, *inputs)
    with torch.no_grad():
        return _forward(fn, chunk_size, token_inputs, shared_inputs, (False,) * len(inputs))[:2]


def _forward(
    fn: ChunkFn,
    chunk_size: int,
    token_inputs: Sequence[Tensor],
    shared_inputs: Sequence[Tensor],
    requires: tuple[bool, ...],
) -> tuple[Tensor, Tensor, list[Tensor | None]]:
    n_token = len(token_inputs)
    n_rows = token_inputs[0].shape[0]
    token_grads = [torch.empty_like(t) if r else None for t, r in zip(token_inputs, requires)]
    shared_grads = [
        torch.zeros_like(s, dtype=torch.float32) if r else None
        for s, r in zip(shared_inputs, requires[n_token:])
    ]
    shared = [s.detach().requires_grad_(r) for s, r in zip(shared_inputs, requires[n_token:])]
    loss_sum: Tensor | None = None
    stats_sum: Tensor | None = None
    # one pass even with no rows, so that empty batches give correctly shaped zeros
    for start in range(0, max(n_rows, 1), chunk_size):
        rows = slice(start, start + chunk_size)
        chunk = [t[rows].detach().requires_grad_(r) for t, r in zip(token_inputs, requires)]
        leaves = [*chunk, *shared]
        with torch.enable_grad() if any(requires) else torch.no_grad():
            loss, stats = fn(*leaves)
        wrt = [leaf for leaf, r in zip(leaves, requires) if r]
        if wrt:
            grads = iter(torch.autograd.grad(loss, wrt, allow_unused=True))
            for i, r in enumerate(requires):
                if not r:
                    continue
                g = next(grads)
                if i < n_token:
                    token_grads[i][rows] = 0 if g is None else g
                elif g is not None:
                    shared_grads[i - n_token] += g
        loss, stats = loss.detach(), stats.detach()
        loss_sum = loss if loss_sum is None else loss_sum + loss
        stats_sum = stats if stats_sum is None else stats_sum + stats
    grads = token_grads + [None if g is None else g.to(s.dtype) for g, s in zip(shared_grads, shared_inputs)]
    return loss_sum, stats_sum, grads


class _ChunkedSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, chunk_size, n_token, requires, *inputs):  # type: ignore[override]
        loss, stats, grads = _forward(fn, chunk_size, inputs[:n_token], inputs[n_token:], requires)
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):  # type: ignore[override]
        grads = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return (None, None, None, None, *grads)
