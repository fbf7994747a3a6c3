"""Axolotl's collators plus the teacher's own tokens of each batch (cross-tokenizer runs).

Re-tokenizing happens here, in the data loader workers, off the training step's critical path.
Chat samples the teacher reads in its own template carry their teacher tokens as dataset columns
(:mod:`axolotl_dskd.chat_data`): they are taken off the features before Axolotl pads them and
placed into the teacher's rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from axolotl.monkeypatch.multipack import SUPPORTED_MULTIPACK_MODEL_TYPES
from axolotl.utils.collators.batching import (
    BatchSamplerDataCollatorForSeq2Seq,
    DataCollatorForSeq2Seq,
    V2BatchSamplerDataCollatorForSeq2Seq,
)

from axolotl_dskd.chat_data import TEACHER_COLUMNS, columns_of
from axolotl_dskd.teacher_tokens import TeacherTokenBuilder


@dataclass
class _WithTeacherTokens:
    teacher_tokens: TeacherTokenBuilder | None = None
    packs: ClassVar[bool] = False
    """Whether each batch row is a list of samples packed into it (multipack collators)."""

    def __call__(self, features: Any, return_tensors: str | None = None) -> dict[str, Any]:
        if self.packs:
            rows = features if isinstance(features[0], list) else [features]
        else:
            rows = [[feature] for feature in features]
        prepared = [[columns_of(f) for f in row] for row in rows]
        stripped = [[{k: v for k, v in f.items() if k not in TEACHER_COLUMNS} for f in row] for row in rows]
        features = stripped if self.packs else [row[0] for row in stripped]
        batch = dict(super().__call__(features, return_tensors=return_tensors))  # type: ignore[misc]
        return {**batch, **self.teacher_tokens(batch, prepared)}


@dataclass
class DSKDDataCollator(_WithTeacherTokens, DataCollatorForSeq2Seq):
    pass


@dataclass
class DSKDBatchSamplerDataCollator(_WithTeacherTokens, BatchSamplerDataCollatorForSeq2Seq):
    packs: ClassVar[bool] = True


@dataclass
class DSKDV2BatchSamplerDataCollator(_WithTeacherTokens, V2BatchSamplerDataCollatorForSeq2Seq):
    packs: ClassVar[bool] = True


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
