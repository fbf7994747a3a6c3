"""Axolotl's collators plus the teacher's own tokens of each batch (cross-tokenizer runs) and
its cached hidden states (``dskd_teacher_cache``).

Re-tokenizing happens here, in the data loader workers, off the training step's critical path.
Chat samples the teacher reads in its own template carry their teacher tokens as dataset columns
(:mod:`axolotl_dskd.integration.chat_data`): they are taken off the features before Axolotl pads them and
placed into the teacher's rows. Cached states are looked up per sample, by the same key the cache
was built with, and placed where that sample sits in its (packed) row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from axolotl.monkeypatch.multipack import SUPPORTED_MULTIPACK_MODEL_TYPES
from axolotl.utils.collators.batching import (
    BatchSamplerDataCollatorForSeq2Seq,
    DataCollatorForSeq2Seq,
    V2BatchSamplerDataCollatorForSeq2Seq,
)

from axolotl_dskd.core.loss import DSKDLossConfig, teacher_positions_read
from axolotl_dskd.core.packing import segment_rows
from axolotl_dskd.core.teacher_cache import TeacherCache, sample_key
from axolotl_dskd.core.teacher_tokens import TeacherTokenBuilder
from axolotl_dskd.integration.chat_data import TEACHER_COLUMNS, columns_of


@dataclass
class _WithTeacher:
    teacher_tokens: TeacherTokenBuilder | None = None
    teacher_cache: TeacherCache | None = None
    loss_config: DSKDLossConfig | None = None
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
        if self.teacher_tokens is not None:
            batch.update(self.teacher_tokens(batch, prepared))
        if self.teacher_cache is not None:
            batch["teacher_hidden"] = self._cached_states(rows, batch)
        return batch

    def _cached_states(self, rows: list[list[dict[str, Any]]], batch: dict[str, Any]) -> torch.Tensor:
        """``[B, L_t, d_t]``: each sample's cached states where it sits on the teacher's side."""
        assert self.teacher_cache is not None and self.loss_config is not None
        keys = [[sample_key(f, TEACHER_COLUMNS) for f in row] for row in rows]
        labels = torch.as_tensor(batch["labels"])
        if "teacher_segment_ids" in batch:  # the teacher reads its own tokens
            segments = batch["teacher_segment_ids"]
            read = teacher_positions_read(
                labels, self.loss_config, batch["teacher_labels"], batch["token_alignment"]
            )
        else:
            segments = torch.tensor(segment_rows(batch))
            read = teacher_positions_read(labels, self.loss_config)
        return self.teacher_cache.hidden_states(keys, segments, read)


@dataclass
class DSKDDataCollator(_WithTeacher, DataCollatorForSeq2Seq):
    pass


@dataclass
class DSKDBatchSamplerDataCollator(_WithTeacher, BatchSamplerDataCollatorForSeq2Seq):
    packs: ClassVar[bool] = True


@dataclass
class DSKDV2BatchSamplerDataCollator(_WithTeacher, V2BatchSamplerDataCollatorForSeq2Seq):
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
