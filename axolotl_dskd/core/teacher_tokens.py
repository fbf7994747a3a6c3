"""The teacher's own tokens of a batch the student tokenizer produced (cross-tokenizer DSKD).

Axolotl tokenizes the data with the student tokenizer. Cross-model attention and exact alignment
need the teacher's tokenization of the same text, with the same trained / untrained marking. Per
(packed) sample of each row, the builder takes the teacher's reading prepared with the dataset
when there is one (chat samples the teacher reads in its own chat template,
:mod:`axolotl_dskd.core.teacher_chat`) and otherwise rebuilds it from the student's tokens
(:mod:`axolotl_dskd.core.retokenize`); then packs, truncates and pads the teacher's rows as the
student's, with each student position's exact partner in its row.

Framework-free: torch and a Hugging Face tokenizer only, picklable for DataLoader workers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from axolotl_dskd.core.loss import IGNORE_INDEX
from axolotl_dskd.core.packing import segment_rows
from axolotl_dskd.core.retokenize import Retokenizer, RoundTripStats, SampleTokens
from axolotl_dskd.core.teacher_chat import TeacherChatSample
from axolotl_dskd.core.vocabulary import encodes_text

__all__ = ["RoundTripStats", "TeacherTokenBuilder"]

LOG = logging.getLogger(__name__)


@dataclass
class _Row:
    """One batch row on the teacher's side, and each student position's partner in it."""

    ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    segments: list[int] = field(default_factory=list)
    alignment: list[int] = field(default_factory=list)


class TeacherTokenBuilder:
    """Makes the teacher's tokens and labels for batches tokenized by the student tokenizer."""

    def __init__(
        self,
        student_tokenizer: Any,
        teacher_tokenizer: Any,
        max_length: int,
        pad_to_multiple_of: int | None = None,
        check_round_trip: bool = True,
    ) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        if not encodes_text(teacher_tokenizer):
            raise ValueError(
                "dskd_teacher_tokenizer: the teacher's tokenizer turns text into no tokens, so nothing "
                "would be distilled (an empty tokenizer: a teacher folder without tokenizer files). "
                "Set dskd_teacher_tokenizer to the teacher's tokenizer folder or hub id."
            )
        self.student_tokenizer = student_tokenizer
        self.teacher_tokenizer = teacher_tokenizer
        self.max_length = int(max_length)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.stats = RoundTripStats()
        self._retokenize = Retokenizer(student_tokenizer, teacher_tokenizer, self.stats, check_round_trip)
        self._reported_mismatch = False
        self._reported_fallbacks = False
        pad, eos = teacher_tokenizer.pad_token_id, teacher_tokenizer.eos_token_id
        self.teacher_pad_id: int = pad if pad is not None else (eos if eos is not None else 0)

    def sample(self, input_ids: Sequence[int], labels: Sequence[int]) -> tuple[list[int], list[int]]:
        """Teacher ids and teacher labels (-100 untrained) for one unpacked sample without
        padding, truncated to ``max_length`` as in a batch."""
        row = self._row(list(input_ids), list(labels), [0] * len(input_ids))
        return row.ids, row.labels

    def __call__(
        self,
        batch: Mapping[str, Any],
        prepared: Sequence[Sequence[TeacherChatSample | None]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The teacher's tokens of a student batch, to merge into the batch.

        Args:
            batch: A collated student batch: ``input_ids`` and ``labels`` ``[B, L]`` (``-100``
                untrained), optionally ``attention_mask`` ``[B, L]`` (0 on padding) and
                ``position_ids`` ``[B, L]`` (a restart begins a packed sample).
            prepared: Per row, per packed sample in order, the teacher's reading of the sample
                made with the dataset (:mod:`axolotl_dskd.core.teacher_chat`), or ``None`` to rebuild
                it from the student's tokens (:mod:`axolotl_dskd.core.retokenize`). A row whose sample count differs (position
                ids that do not restart per sample) is rebuilt whole.

        Returns:
            Only the new keys: ``teacher_input_ids``, ``teacher_attention_mask``,
            ``teacher_labels`` and ``teacher_position_ids`` ``[B, L_t]`` (right-padded to the
            longest row, or to a multiple of ``pad_to_multiple_of``), ``student_segment_ids``
            ``[B, L]`` and ``teacher_segment_ids`` ``[B, L_t]`` (the packed sample of each
            position, -1 on padding), ``token_alignment`` ``[B, L]`` (each student position's
            exact teacher partner in its row, -1 where none; see :mod:`axolotl_dskd.core.retokenize`).
        """
        input_ids = torch.as_tensor(batch["input_ids"])
        device = input_ids.device
        ids_rows = input_ids.tolist()
        label_rows = torch.as_tensor(batch["labels"]).tolist()
        student_segments = segment_rows(batch)
        prepared_rows = prepared if prepared is not None else [None] * len(ids_rows)
        rows = [
            self._row(ids, labels, segments, readings)
            for ids, labels, segments, readings in zip(ids_rows, label_rows, student_segments, prepared_rows)
        ]

        width = max([len(r.ids) for r in rows] + [1])
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        out_ids, out_labels, out_mask, out_pos, out_seg = [], [], [], [], []
        for row in rows:
            n_pad = width - len(row.ids)
            next_pos = row.positions[-1] + 1 if row.positions else 0
            out_ids.append(row.ids + [self.teacher_pad_id] * n_pad)
            out_labels.append(row.labels + [IGNORE_INDEX] * n_pad)
            out_mask.append([1] * len(row.ids) + [0] * n_pad)
            out_pos.append(row.positions + [min(next_pos + k, self.max_length - 1) for k in range(n_pad)])
            out_seg.append(row.segments + [-1] * n_pad)

        self._report_mismatch()
        self._report_prepared_fallbacks()

        def tensor(x: list[list[int]]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.long, device=device)

        return {
            "teacher_input_ids": tensor(out_ids),
            "teacher_attention_mask": tensor(out_mask),
            "teacher_labels": tensor(out_labels),
            "teacher_position_ids": tensor(out_pos),
            "student_segment_ids": tensor(student_segments),
            "teacher_segment_ids": tensor(out_seg),
            "token_alignment": tensor([row.alignment for row in rows]),
        }

    def _report_mismatch(self) -> None:
        """Say once (per process), with a count and an example, that the teacher saw other text."""
        if self._reported_mismatch or not self.stats.mismatched_runs:
            return
        self._reported_mismatch = True
        student_text, teacher_text = self.stats.examples[0]
        LOG.warning(
            "DSKD: %d of %d text runs so far do not survive the round trip from the student's "
            "tokens to the teacher's (the teacher sees slightly different text), e.g. %r became "
            "%r. Distillation goes on; such text is usually outside one tokenizer's vocabulary.",
            self.stats.mismatched_runs, self.stats.runs, student_text, teacher_text,
        )  # fmt: skip

    def _report_prepared_fallbacks(self) -> None:
        """Say once (per process), with a count, that prepared samples reached the teacher in the
        student's rendering."""
        if self._reported_fallbacks or not self.stats.prepared_fallbacks:
            return
        self._reported_fallbacks = True
        LOG.warning(
            "DSKD: %d of %d samples prepared in the teacher's chat template reach it in the student's "
            "rendering instead: their student tokens no longer match the reading prepared with the "
            "dataset (cut by excess_length_strategy: truncate before any content token both sides "
            "read). Raise sequence_len, or drop such samples (excess_length_strategy: drop).", self.stats.prepared_fallbacks, self.stats.samples,
        )  # fmt: skip

    def _row(
        self,
        ids: list[int],
        labels: list[int],
        segments: list[int],
        readings: Sequence[TeacherChatSample | None] | None = None,
    ) -> _Row:
        """Teacher ids, labels, positions and segments of one (packed) row, truncated, and the
        exact partner of each student position in it."""
        positions: dict[int, list[int]] = {}
        for i, seg in enumerate(segments):
            if seg >= 0:
                positions.setdefault(seg, []).append(i)
        if readings is None or len(readings) != len(positions):
            readings = [None] * len(positions)
        row = _Row(alignment=[-1] * len(ids))
        for seg, reading in zip(sorted(positions), readings):
            room = max(self.max_length - len(row.ids), 0)
            if room == 0:  # nothing of it fits: skip the work
                self.stats.samples += 1
                self.stats.truncated_samples += 1
                self.stats.samples_without_trained += 1
                continue
            at = positions[seg]
            seg_labels = [labels[i] for i in at]
            usable = reading
            if usable is not None and len(usable.alignment) > len(at):  # Axolotl cut the sample
                usable = usable.truncated(len(at))
            if usable is not None and len(usable.alignment) == len(at):
                sample = self._prepared(usable, seg_labels)
            else:
                self.stats.prepared_fallbacks += reading is not None
                sample = self._retokenize([ids[i] for i in at], seg_labels)
            if len(sample.ids) > room:
                self.stats.truncated_samples += 1
            s_ids, s_labels = sample.ids[:room], sample.labels[:room]
            if all(lab == IGNORE_INDEX for lab in s_labels):
                self.stats.samples_without_trained += 1
            for i, j in zip(at, sample.partners):
                if 0 <= j < len(s_ids):
                    row.alignment[i] = len(row.ids) + j
            row.ids += s_ids
            row.labels += s_labels
            row.positions += range(len(s_ids))
            row.segments += [seg] * len(s_ids)
        return row

    def _prepared(self, sample: TeacherChatSample, labels: list[int]) -> SampleTokens:
        """A sample whose teacher reading was prepared with the dataset (its own chat template)."""
        self.stats.samples += 1
        self.stats.teacher_rendered += 1
        self.stats.count_aligned(labels, sample.alignment)
        return SampleTokens(sample.input_ids, sample.labels, sample.alignment)
