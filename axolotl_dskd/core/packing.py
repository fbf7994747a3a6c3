"""Which packed sample each position of a batch row belongs to (framework-free).

Axolotl's sample packing puts several samples in one row and restarts ``position_ids`` at each;
the teacher's tokens, the token alignment and the loss all work per sample.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["sample_segments", "segment_rows"]


def sample_segments(attention_mask: Sequence[int], position_ids: Sequence[int] | None) -> list[int]:
    """Packed-sample index of each position of one row, -1 for padding (attention mask 0).

    A new sample starts where ``position_ids`` restarts (is 0, or does not increase); without
    ``position_ids`` the whole row is one sample.
    """
    segments: list[int] = []
    current, previous = -1, None
    for i, mask in enumerate(attention_mask):
        if not mask:
            segments.append(-1)
            continue
        if position_ids is None:
            current = 0
        else:
            pos = int(position_ids[i])
            if current < 0 or pos == 0 or (previous is not None and pos <= previous):
                current += 1
            previous = pos
        segments.append(current)
    return segments


def segment_rows(batch: Mapping[str, Any]) -> list[list[int]]:
    """Per row of a collated batch, the packed sample of each position (:func:`sample_segments`),
    from its ``attention_mask`` (all ones if absent) and ``position_ids`` (if any), ``[B, L]``."""
    rows = torch.as_tensor(batch["input_ids"]).tolist()
    mask = batch.get("attention_mask")
    mask_rows = torch.as_tensor(mask).tolist() if mask is not None else [[1] * len(r) for r in rows]
    pos = batch.get("position_ids")
    pos_rows = torch.as_tensor(pos).tolist() if pos is not None else [None] * len(rows)
    return [sample_segments(m, p) for m, p in zip(mask_rows, pos_rows)]
