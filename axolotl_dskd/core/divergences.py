"""Per-token divergences between a student-side and a teacher-side distribution.

Every function takes log-probabilities in float32 (``log_q`` student side, ``log_p`` teacher
side, ``[tokens, V]``) and returns one value per token. Working from log-softmax keeps them
finite for any finite logits: no ``log(softmax(x))``, no log of zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch import Tensor

Divergence = Literal[
    "forward_kl",
    "reverse_kl",
    "js",
    "skew_forward_kl",
    "skew_reverse_kl",
    "adaptive_kl",
]
DIVERGENCES: tuple[str, ...] = get_args(Divergence)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) per row. Finite logs make an underflowed ``a = 0`` contribute exactly 0."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """``log(weight_a * a + (1 - weight_a) * b)`` without leaving log space."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def forward_kl(log_q: Tensor, log_p: Tensor) -> Tensor:
    return _kl(log_p, log_q)


def reverse_kl(log_q: Tensor, log_p: Tensor) -> Tensor:
    return _kl(log_q, log_p)


def js(log_q: Tensor, log_p: Tensor) -> Tensor:
    log_m = _log_mix(log_p, log_q, 0.5)
    return 0.5 * _kl(log_p, log_m) + 0.5 * _kl(log_q, log_m)


def skew_forward_kl(log_q: Tensor, log_p: Tensor, skew_lambda: float) -> Tensor:
    return _kl(log_p, _log_mix(log_p, log_q, skew_lambda))


def skew_reverse_kl(log_q: Tensor, log_p: Tensor, skew_lambda: float) -> Tensor:
    return _kl(log_q, _log_mix(log_p, log_q, 1.0 - skew_lambda))


def adaptive_kl(log_q: Tensor, log_p: Tensor, alpha: float) -> Tensor:
    """AKL (Wu et al. 2024): FKL and RKL weighted by the teacher's head/tail probability gap."""
    with torch.no_grad():
        p_sorted, order = log_p.exp().sort(dim=-1)
        gap = (p_sorted - log_q.exp().gather(-1, order)).abs()
        tail = p_sorted.cumsum(-1) <= alpha
        g_tail = torch.where(tail, gap, 0.0).sum(-1)
        g_head = gap.sum(-1) - g_tail
        total = g_head + g_tail
        # identical distributions: both gaps 0 and both KLs 0; any weights give the spec's 0
        w_head = torch.where(total > 0, g_head / total.clamp_min(1e-30), 0.5)
    return w_head * forward_kl(log_q, log_p) + (1.0 - w_head) * reverse_kl(log_q, log_p)


def get_divergence(
    name: str, skew_lambda: float = 0.1, akl_alpha: float = 0.5
) -> Callable[[Tensor, Tensor], Tensor]:
    """The per-token divergence ``D(log_q, log_p)`` called ``name``, parameters bound."""
    if name == "forward_kl":
        return forward_kl
    if name == "reverse_kl":
        return reverse_kl
    if name == "js":
        return js
    if name == "skew_forward_kl":
        return lambda log_q, log_p: skew_forward_kl(log_q, log_p, skew_lambda)
    if name == "skew_reverse_kl":
        return lambda log_q, log_p: skew_reverse_kl(log_q, log_p, skew_lambda)
    if name == "adaptive_kl":
        return lambda log_q, log_p: adaptive_kl(log_q, log_p, akl_alpha)
    raise ValueError(f"unknown divergence {name!r}; choose one of {', '.join(DIVERGENCES)}")
