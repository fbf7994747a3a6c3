"""Axolotl's collators plus the teacher's own tokens of each batch (cross-tokenizer runs).

Re-tokenizing happens here, in the data loader workers, off the training step's critical path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from axolotl.monkeypatch.multipack import SUPPORTED_MULTIPACK_MODEL_TYPES
from axolotl.utils.collators.batching import (
    BatchSamplerDataCollatorForSeq2Seq,
    DataCollatorForSeq2Seq,
    V2BatchSamplerDataCollatorForSeq2Seq,
)

from axolotl_dskd.teacher_tokens import TeacherTokenBuilder


@dataclass
class _WithTeacherTokens:
    teacher_tokens: TeacherTokenBuilder | None = None

    def __call__(self, features: Any, return_tensors: str | None = None) -> dict[str, Any]:
        batch = dict(super().__call__(features, return_tensors=return_tensors))  # type: ignore[misc]
        return {**batch, **self.teacher_tokens(batch)}


@dataclass
class DSKDDataCollator(_WithTeacherTokens, DataCollatorForSeq2Seq):
    pass


@dataclass
class DSKDBatchSamplerDataCollator(_WithTeacherTokens, BatchSamplerDataCollatorForSeq2Seq):
    pass


@dataclass
class DSKDV2BatchSamplerDataCollator(_WithTeacherTokens, V2BatchSamplerDataCollatorForSeq2Seq):
    pass


def collator_class(cfg: Any, is_eval: bool) -> type:
    """The DSKD twin of the collator Axolotl itself would pick for this config and split."""
    packed = cfg.eval_sample_packing if is_eval else cfg.sample_packing
    if not packed:
        return DSKDDataCollator
    if (
        cfg.attn_implementation == "flex_attention"
        or cfg.model_config_type in SUPPORTED_MULTIPACK_MODEL_TYPES
        or (cfg.model_config_type == "llama" and cfg.attn_implementation != "flash_attention_2")
    ):
        return DSKDV2BatchSamplerDataCollator
    return DSKDBatchSamplerDataCollator
