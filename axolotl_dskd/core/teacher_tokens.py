"""The teacher's own tokens of a batch the student tokenizer produced (cross-tokenizer DSKD).

Axolotl tokenizes the data with the student tokenizer. Cross-model attention needs the teacher's
tokenization of the same text, with the same trained / untrained marking, so this module rebuilds
it per (packed) sample: split the student tokens into maximal runs of trained and untrained
positions, decode each run to text *in context*, encode it with the teacher tokenizer, and
concatenate (see "Two tokenizations of one text" in the DSKD spec).

The hard parts are all about decoding text losslessly:

- A run is decoded as ``decode(ids[p:end])`` minus ``decode(ids[p:start])`` with ``p`` the start
  of the previous piece, never on its own: a sentencepiece decoder strips the leading space of
  whatever it decodes, so a run decoded alone loses the space it begins with.
- A multi-byte UTF-8 character can be split over several byte tokens (byte-level BPE, byte
  fallback). A run boundary inside such a character would make both sides U+FFFD garbage; the
  boundary is moved forward (else backward) to the nearest character boundary.
- A sentencepiece-style teacher prepends ``▁`` to every text it encodes. That is right at the
  start of a sample and wrong anywhere else, so later runs are encoded behind a sentinel
  (``"\\n" + text``) whose tokens are then removed. At the start, a text that begins with a space
  gets one more (such a teacher does not prepend ``▁`` there but its decoder strips one).
- Every run is checked: its student text against the teacher's decode of its tokens, in context.
  ``stats`` counts the runs and the mismatches.

Special tokens: the student's BOS and pad are not text (dropped); the teacher gets its own BOS
(whatever prefix ``teacher_tokenizer("a")`` adds) at each sample start, untrained. The student's
EOS becomes the teacher's EOS, trained iff the student's was. Every other student token, chat
markers included, is text and the teacher encodes it as whatever it is for the teacher.

Limits (inherent to the tokenizers, not fixable here): text the *student* tokenizer already lost
is not recovered (a sentencepiece student drops a space at the very start of a sample, reads
``▁`` as a space, turns unknown characters into ``<unk>`` without byte fallback, and encodes a
literal ``<s>`` / ``</s>`` in the data as its special tokens); a sentencepiece teacher cannot
represent a literal ``▁`` (counted as a mismatch). Around run boundaries the teacher's tokens can
differ from its tokenization of the whole text, since each run is encoded on its own.
Teacher labels mirror the student's marking exactly: as on the student side, a trained first
token of a packed sample is a target of the previous sample's last position, which the loss must
mask with the segment ids if the data has such samples.

Exact alignment: a student position and a teacher position are partners when the tokens up to
and including them cover the same text, so that both hidden states have read the same prefix and
predict the same continuation. Each side's token ends are measured as byte offsets inside a
shared text run (from the bytes each vocabulary entry stands for, :mod:`axolotl_dskd.core.vocabulary`)
and matched; the tokens of a run whose bytes do not spell its text, the student's BOS and
padding, and the teacher's own BOS get no partner.

Chat samples the teacher reads in its own chat template are not rebuilt here: their teacher
tokens, labels and partners were made with the dataset (:mod:`axolotl_dskd.core.teacher_chat`, the same
rule over each message's content) and are only placed into the row, packed and truncated alike.

Framework-free: torch and a Hugging Face tokenizer only, picklable for DataLoader workers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from axolotl_dskd.core.loss import IGNORE_INDEX
from axolotl_dskd.core.teacher_chat import TeacherChatSample
from axolotl_dskd.core.vocabulary import encodes_text, token_bytes

__all__ = [
    "RoundTripStats",
    "TeacherTokenBuilder",
    "sample_segments",
    "segment_rows",
    "special_token_differences",
]

_REPLACEMENT = "\ufffd"
# Texts put in front of a run so that a sentencepiece-style teacher does not prepend "▁" to it;
# the first whose tokens stay a separate prefix of the encoding is used.
_SENTINELS = ("\n", "§", "¶", "#", "a", "0")
_MAX_EXAMPLES = 8
LOG = logging.getLogger(__name__)

_TEXT, _EOS = 0, 1


@dataclass
class RoundTripStats:
    """Counters over everything a builder has processed (per process: each DataLoader worker
    holds its own copy). ``mismatched_runs`` should stay 0: a non-zero value means the teacher
    saw text other than the student's, and ``examples`` shows the first few cases."""

    samples: int = 0
    runs: int = 0
    mismatched_runs: int = 0
    truncated_samples: int = 0
    samples_without_trained: int = 0
    moved_boundaries: int = 0
    trained_tokens: int = 0
    """Trained student tokens, and of those, the ones with an exact teacher partner."""
    aligned_tokens: int = 0
    teacher_rendered: int = 0
    """Samples the teacher read in its own chat template (prepared with the dataset)."""
    prepared_fallbacks: int = 0
    """Samples prepared in the teacher's template whose student tokens no longer fit the prepared
    reading, so that the teacher read the student's rendering instead (should stay 0)."""
    examples: list[tuple[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        """Counts only, for logging."""
        d = asdict(self)
        d.pop("examples")
        return d

    def merge(self, other: RoundTripStats) -> None:
        """Add another worker's counts to these."""
        for name, value in other.as_dict().items():
            setattr(self, name, getattr(self, name) + value)
        self.examples = (self.examples + other.examples)[:_MAX_EXAMPLES]

    def reset(self) -> None:
        for name in self.as_dict():
            setattr(self, name, 0)
        self.examples = []


@dataclass
class _Sample:
    """One sample's teacher tokens and labels, and for each kept student token the index of its
    exact teacher partner (``-1``: none)."""

    ids: list[int]
    labels: list[int]
    partners: list[int]


@dataclass
class _Row:
    """One batch row on the teacher's side, and each student position's partner in it."""

    ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    segments: list[int] = field(default_factory=list)
    alignment: list[int] = field(default_factory=list)


@dataclass
class _Piece:
    """A stretch of one student sample's kept tokens ``[start, end)``: text of one trainedness, or
    one EOS."""

    kind: int
    start: int
    end: int
    trained: bool
    text: str = ""


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


def _is_plain_fast(tokenizer: Any) -> bool:
    """Whether the tokenizer is a Rust-backed fast tokenizer whose encode / decode transformers
    does not customise, so that calling the Rust tokenizer directly gives the same ids and text."""
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:  # pragma: no cover
        return False
    cls = type(tokenizer)
    return (
        isinstance(tokenizer, PreTrainedTokenizerFast)
        and getattr(tokenizer, "backend_tokenizer", None) is not None
        and not getattr(tokenizer, "split_special_tokens", False)
        and all(
            getattr(cls, name, None) is getattr(PreTrainedTokenizerFast, name, None)
            for name in ("decode", "_decode", "encode", "_encode_plus", "tokenize")
        )
    )


class TeacherTokenBuilder:
    """Rebuilds the teacher's tokens and labels for batches tokenized by the student tokenizer."""

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
        self.check_round_trip = check_round_trip
        self.stats = RoundTripStats()
        self._reported_mismatch = False
        self._reported_fallbacks = False

        self._s_bos = student_tokenizer.bos_token_id
        self._s_eos = student_tokenizer.eos_token_id
        self._s_pad = student_tokenizer.pad_token_id
        self._t_eos = teacher_tokenizer.eos_token_id
        pad = teacher_tokenizer.pad_token_id
        self.teacher_pad_id: int = pad if pad is not None else (self._t_eos if self._t_eos is not None else 0)
        self._s_bytes = token_bytes(student_tokenizer)
        self._t_bytes = token_bytes(teacher_tokenizer)
        self._s_fast = _is_plain_fast(student_tokenizer)
        self._t_fast = _is_plain_fast(teacher_tokenizer)
        self._s_ctx = list(student_tokenizer.encode("a", add_special_tokens=False))
        self._t_prefix = self._teacher_prefix()
        self._invents_space = self._teacher_invents_space()
        self._sentinels = [(s, self._t_encode(s)) for s in _SENTINELS]
        self._sentinels = [(s, ids, self._t_decode(ids)) for s, ids in self._sentinels if ids]

    # -- tokenizer access ------------------------------------------------------------------------
    # A run costs a few decodes and one encode. Through transformers each call first walks the id
    # list in Python (to_py_obj); for a plain fast tokenizer the Rust tokenizer gives the same
    # result directly, several times faster.

    @staticmethod
    def _decode(tokenizer: Any, fast: bool, ids: list[int]) -> str:
        if not ids:
            return ""
        if fast:
            return tokenizer.backend_tokenizer.decode(ids, skip_special_tokens=False)
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _s_decode(self, ids: list[int]) -> str:
        return self._decode(self.student_tokenizer, self._s_fast, ids)

    def _t_decode(self, ids: list[int]) -> str:
        return self._decode(self.teacher_tokenizer, self._t_fast, ids)

    def _t_encode(self, text: str) -> list[int]:
        if not text:
            return []
        if self._t_fast:
            return self.teacher_tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
        return list(self.teacher_tokenizer.encode(text, add_special_tokens=False))

    def _teacher_prefix(self) -> list[int]:
        """The tokens the teacher puts in front of a text by default (its BOS, or nothing)."""
        tok = self.teacher_tokenizer
        with_special = list(tok("a")["input_ids"])
        plain = self._t_encode("a")
        for k in range(len(with_special) - len(plain) + 1):
            if with_special[k : k + len(plain)] == plain:
                return with_special[:k]
        bos = tok.bos_token_id
        return [bos] if bos is not None and with_special[:1] == [bos] else []

    def _teacher_invents_space(self) -> bool:
        """Whether texts encoded one after the other decode with a space between them ("▁b▁a")."""
        return self._t_decode(self._t_encode("b") + self._t_encode("a")) != "ba"

    # -- one sample -------------------------------------------------------------------------------

    def sample(self, input_ids: Sequence[int], labels: Sequence[int]) -> tuple[list[int], list[int]]:
        """Teacher ids and teacher labels (-100 untrained) for one unpacked sample without
        padding, truncated to ``max_length`` as in a batch."""
        row = self._row(list(input_ids), list(labels), [0] * len(input_ids))
        return row.ids, row.labels

    def _sample(self, ids: list[int], labels: list[int]) -> _Sample:
        """Teacher ids, labels and each student token's partner, of one sample, not truncated."""
        self.stats.samples += 1
        kept, pieces, kept_at = self._pieces(ids, labels)
        self._fix_boundaries(kept, pieces)
        self._fill_texts(kept, pieces)

        t_ids: list[int] = list(self._t_prefix)
        t_labels: list[int] = [IGNORE_INDEX] * len(t_ids)
        spans: list[tuple[int, int]] = []
        for piece in pieces:
            if piece.kind == _EOS:
                new = [self._t_eos] if self._t_eos is not None else []
            else:
                new = self._encode_run(piece.text, at_start=len(t_ids) == len(self._t_prefix))
            spans.append((len(t_ids), len(t_ids) + len(new)))
            t_ids.extend(new)
            t_labels.extend(new if piece.trained else [IGNORE_INDEX] * len(new))
        if self.check_round_trip:
            self._check(pieces, spans, t_ids)
        partners = [-1] * len(ids)
        for k, j in enumerate(self._partners(kept, pieces, spans, t_ids)):
            partners[kept_at[k]] = j
        self._count_aligned(labels, partners)
        return _Sample(t_ids, t_labels, partners)

    def _prepared(self, sample: TeacherChatSample, labels: list[int]) -> _Sample:
        """A sample whose teacher reading was prepared with the dataset (its own chat template)."""
        self.stats.samples += 1
        self.stats.teacher_rendered += 1
        self._count_aligned(labels, sample.alignment)
        return _Sample(sample.input_ids, sample.labels, sample.alignment)

    def _count_aligned(self, labels: list[int], partners: Sequence[int]) -> None:
        trained = [i for i in range(len(labels) - 1) if labels[i + 1] != IGNORE_INDEX]
        self.stats.trained_tokens += len(trained)
        self.stats.aligned_tokens += sum(partners[i] >= 0 for i in trained)

    def _pieces(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[_Piece], list[int]]:
        """Drop BOS / pad, make EOS its own piece, and group the rest into maximal runs. Also
        returns where each kept token is in ``ids``."""
        kept: list[int] = []
        kept_at: list[int] = []
        pieces: list[_Piece] = []
        for i, (tid, lab) in enumerate(zip(ids, labels)):
            trained = lab != IGNORE_INDEX
            if tid == self._s_bos and (i == 0 or tid != self._s_eos):
                continue
            if tid == self._s_eos:
                kind = _EOS
            elif tid == self._s_pad:
                continue
            else:
                kind = _TEXT
            n = len(kept)
            kept.append(tid)
            kept_at.append(i)
            last = pieces[-1] if pieces else None
            if kind == _TEXT and last is not None and last.kind == _TEXT and last.trained == trained:
                last.end = n + 1
            else:
                pieces.append(_Piece(kind, n, n + 1, trained))
        return kept, pieces, kept_at

    def _fix_boundaries(self, kept: list[int], pieces: list[_Piece]) -> None:
        """Move each boundary between two text runs off the inside of a multi-byte character."""
        i = 1
        while i < len(pieces):
            left, right = pieces[i - 1], pieces[i]
            if left.kind != _TEXT or right.kind != _TEXT or self._clean(kept, left.start, right.start):
                i += 1
                continue
            self.stats.moved_boundaries += 1
            candidates = [*range(right.start + 1, right.end), *range(right.start - 1, left.start, -1)]
            cut = next((c for c in candidates if self._clean(kept, left.start, c)), None)
            if cut is None:  # no character boundary between the two runs' starts and ends: merge
                left.end = right.end
                del pieces[i]
                if i < len(pieces) and pieces[i].kind == _TEXT and pieces[i].trained == left.trained:
                    left.end = pieces[i].end
                    del pieces[i]
                continue
            left.end = right.start = cut
            i += 1

    def _clean(self, kept: list[int], start: int, cut: int) -> bool:
        """Whether ``cut`` falls between characters, given that ``start`` does.

        Decoding stops mid-character only with a trailing U+FFFD. Then (rare) the cut is between
        characters iff the two sides, decoded apart, add up to the whole: a real U+FFFD does, the
        bytes of a split character turn into extra U+FFFDs on the right side. The right side is
        decoded behind a plain-text token, so that a decoder's leading-space strip is harmless.
        """
        left = self._s_decode(kept[start:cut])
        if not left.endswith(_REPLACEMENT):
            return True
        end = cut
        while end < len(kept) and kept[end] != self._s_eos:
            end += 1
        ctx_text = self._s_decode(self._s_ctx)
        right = self._s_decode(self._s_ctx + kept[cut:end])
        if not right.startswith(ctx_text):
            return False
        return self._s_decode(kept[start:end]) == left + right[len(ctx_text) :]

    def _fill_texts(self, kept: list[int], pieces: list[_Piece]) -> None:
        """Each text run's text, decoded in the context of the piece before it."""
        for k, piece in enumerate(pieces):
            if piece.kind != _TEXT:
                continue
            context = pieces[k - 1].start if k > 0 else piece.start
            piece.text = self._in_context(self._s_decode, kept, 0, context, piece.start, piece.end)

    @staticmethod
    def _in_context(decode: Any, ids: list[int], base: int, context: int, start: int, end: int) -> str:
        """Text of ``ids[start:end]`` as it reads after ``ids[context:start]`` (``base``: where
        the sample's text starts)."""
        if context == start:
            return decode(ids[start:end])
        before = decode(ids[context:start])
        both = decode(ids[context:end])
        if both.startswith(before):
            return both[len(before) :]
        # Not expected past _fix_boundaries; fall back to the whole prefix, then to the run alone.
        before = decode(ids[base:start])
        both = decode(ids[base:end])
        return both[len(before) :] if both.startswith(before) else decode(ids[start:end])

    def _encode_run(self, text: str, at_start: bool) -> list[int]:
        """Teacher tokens of one run, without a leading space the text does not have.

        At a sample start the teacher's own encoding is the natural one (``▁Hello`` for a
        sentencepiece teacher, whose decoder strips that space again). But such a teacher does not
        prepend ``▁`` to a text that starts with a space, and its decoder still strips one, so a
        leading space would be lost: then the text is encoded with one more space in front.
        """
        if not text:
            return []
        if not self._invents_space:
            return self._t_encode(text)
        if not at_start:
            return self._behind_sentinel(text)
        ids = self._t_encode(text)
        if self._t_decode(ids) == text:
            return ids
        for candidate in (self._behind_sentinel(text), self._behind_sentinel(" " + text)):
            if self._t_decode(candidate) == text:
                return candidate
        return ids

    def _behind_sentinel(self, text: str) -> list[int]:
        """Tokens of ``text`` as the teacher encodes it after other text: no ``▁`` prepended."""
        fallback: list[int] | None = None
        for sentinel, prefix, prefix_text in self._sentinels:
            ids = self._t_encode(sentinel + text)
            if ids[: len(prefix)] != prefix:
                continue
            rest = ids[len(prefix) :]
            if self._t_decode(ids) == prefix_text + text:
                return rest
            fallback = fallback if fallback is not None else rest
        return fallback if fallback is not None else self._t_encode(text)

    def _partners(
        self, kept: list[int], pieces: list[_Piece], spans: list[tuple[int, int]], t_ids: list[int]
    ) -> list[int]:
        """For each kept student token, the teacher token that ends at the same character of the
        same text run (an EOS with the teacher's EOS), or -1."""
        partners = [-1] * len(kept)
        for piece, (start, end) in zip(pieces, spans):
            if piece.kind == _EOS:
                if end > start:
                    partners[piece.start] = start
                continue
            s_ends = self._token_ends(self._s_bytes, kept[piece.start : piece.end], piece.text)
            t_ends = self._token_ends(self._t_bytes, t_ids[start:end], piece.text)
            at_end = {offset: j for j, offset in zip(range(start, end), t_ends) if offset is not None}
            for k, offset in zip(range(piece.start, piece.end), s_ends):
                partners[k] = at_end.get(offset, -1)
        return partners

    @staticmethod
    def _token_ends(table: dict[int, bytes] | None, ids: list[int], text: str) -> list[int | None]:
        """Where in ``text`` (a UTF-8 byte offset) each token of a run ends; all ``None`` when the
        tokens' bytes do not spell ``text``. Byte offsets, so that tokens ending inside a
        character (byte fallback, byte-level pieces) align too."""
        pieces = [table.get(i) for i in ids] if table is not None else [None]
        want = text.encode()
        got = b"".join(p for p in pieces if p is not None)
        if None in pieces or got not in (want, b" " + want):
            return [None] * len(ids)
        # a sentencepiece decoder drops the space its first token starts with: so did ``text``
        offset = len(want) - len(got)
        ends: list[int | None] = []
        for piece in pieces:
            offset += len(piece)
            ends.append(max(offset, 0))
        return ends

    def _check(self, pieces: list[_Piece], spans: list[tuple[int, int]], t_ids: list[int]) -> None:
        """Compare each run's student text with the teacher's decode of its tokens, in context."""
        base = context = len(self._t_prefix)
        for piece, (start, end) in zip(pieces, spans):
            if piece.kind == _TEXT:
                self.stats.runs += 1
                text = self._in_context(self._t_decode, t_ids, base, min(context, start), start, end)
                if text != piece.text:
                    self.stats.mismatched_runs += 1
                    if len(self.stats.examples) < _MAX_EXAMPLES:
                        self.stats.examples.append((piece.text, text))
            if end > start:
                context = start

    # -- a batch ------------------------------------------------------------------------------------

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
                it from the student's tokens as above. A row whose sample count differs (position
                ids that do not restart per sample) is rebuilt whole.

        Returns:
            Only the new keys: ``teacher_input_ids``, ``teacher_attention_mask``,
            ``teacher_labels`` and ``teacher_position_ids`` ``[B, L_t]`` (right-padded to the
            longest row, or to a multiple of ``pad_to_multiple_of``), ``student_segment_ids``
            ``[B, L]`` and ``teacher_segment_ids`` ``[B, L_t]`` (the packed sample of each
            position, -1 on padding), ``token_alignment`` ``[B, L]`` (each student position's
            exact teacher partner in its row, -1 where none; see the module docstring).
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
                sample = self._sample([ids[i] for i in at], seg_labels)
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


def special_token_differences(student_tokenizer: Any, teacher_tokenizer: Any) -> list[str]:
    """Control tokens of one model that are plain text to the other, each with an example.

    BOS, EOS, pad and unk are mapped or dropped by the builder; any other special token (chat
    markers) keeps its text, so a marker the other model reads as ordinary characters changes
    what the two models see, not only the ids.
    """
    mapped = {"bos_token", "eos_token", "pad_token", "unk_token"}
    notes = []
    for side, this, other in (("student", student_tokenizer, teacher_tokenizer),
                              ("teacher", teacher_tokenizer, student_tokenizer)):  # fmt: skip
        skip = {getattr(this, attr, None) for attr in mapped}
        for token in this.all_special_tokens:
            if token in skip:
                continue
            ids = other.encode(token, add_special_tokens=False)
            if len(ids) == 1 and ids[0] in other.all_special_ids:
                continue
            pieces = other.convert_ids_to_tokens(ids)
            notes.append(
                f"the {side}'s special token {token!r} is plain text to the other model "
                f"({len(ids)} tokens: {pieces})"
            )
    return notes
