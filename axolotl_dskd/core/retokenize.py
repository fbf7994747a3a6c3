"""One sample's tokens in the teacher's tokenizer, rebuilt from the student's, and the exact
partner of each student token (cross-tokenizer DSKD; framework-free).

Split the student tokens into maximal runs of trained and untrained positions, decode each run to
text *in context*, encode it with the teacher tokenizer, and concatenate (see "Two tokenizations
of one text" in docs/dskd.md). The hard parts are all about decoding text losslessly:

- A run is decoded as ``decode(ids[p:end])`` minus ``decode(ids[p:start])`` with ``p`` the start
  of the previous piece, never on its own: a sentencepiece decoder strips the leading space of
  whatever it decodes, so a run decoded alone loses the space it begins with.
- A multi-byte UTF-8 character can be split over several byte tokens (byte-level BPE, byte
  fallback). A run boundary inside such a character would make both sides U+FFFD garbage; the
  boundary is moved forward (else backward) to the nearest character boundary.
- The teacher encodes each run without a space the run does not have
  (:meth:`~axolotl_dskd.core.codec.TeacherCodec.encode_run`).
- Every run is checked: its student text against the teacher's decode of its tokens, in context.
  :class:`RoundTripStats` counts the runs and the mismatches.

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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from axolotl_dskd.core.codec import TeacherCodec, TokenizerCodec
from axolotl_dskd.core.loss import IGNORE_INDEX

__all__ = ["Retokenizer", "RoundTripStats", "SampleTokens"]

_REPLACEMENT = "\ufffd"
_MAX_EXAMPLES = 8
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

    def count_aligned(self, labels: Sequence[int], partners: Sequence[int]) -> None:
        """Count a sample's trained positions and those of them with an exact partner."""
        trained = [i for i in range(len(labels) - 1) if labels[i + 1] != IGNORE_INDEX]
        self.trained_tokens += len(trained)
        self.aligned_tokens += sum(partners[i] >= 0 for i in trained)


@dataclass
class SampleTokens:
    """One sample's teacher tokens and labels, and for each student token the index of its exact
    teacher partner (``-1``: none)."""

    ids: list[int]
    labels: list[int]
    partners: list[int]


@dataclass
class _Piece:
    """A stretch of one student sample's kept tokens ``[start, end)``: text of one trainedness, or
    one EOS."""

    kind: int
    start: int
    end: int
    trained: bool
    text: str = ""


class Retokenizer:
    """Rebuilds one sample's teacher tokens, labels and partners from its student tokens."""

    def __init__(
        self,
        student_tokenizer: Any,
        teacher_tokenizer: Any,
        stats: RoundTripStats,
        check_round_trip: bool = True,
    ) -> None:
        self.student = TokenizerCodec(student_tokenizer)
        self.teacher = TeacherCodec(teacher_tokenizer)
        self.stats = stats
        self.check_round_trip = check_round_trip
        self._s_bos = student_tokenizer.bos_token_id
        self._s_eos = student_tokenizer.eos_token_id
        self._s_pad = student_tokenizer.pad_token_id
        self._t_eos = teacher_tokenizer.eos_token_id
        self._s_ctx = list(student_tokenizer.encode("a", add_special_tokens=False))

    def __call__(self, ids: list[int], labels: list[int]) -> SampleTokens:
        """Teacher ids, labels and each student token's partner, of one sample, not truncated."""
        self.stats.samples += 1
        kept, pieces, kept_at = self._pieces(ids, labels)
        self._fix_boundaries(kept, pieces)
        self._fill_texts(kept, pieces)

        prefix = self.teacher.prefix
        t_ids: list[int] = list(prefix)
        t_labels: list[int] = [IGNORE_INDEX] * len(t_ids)
        spans: list[tuple[int, int]] = []
        for piece in pieces:
            if piece.kind == _EOS:
                new = [self._t_eos] if self._t_eos is not None else []
            else:
                new = self.teacher.encode_run(piece.text, at_start=len(t_ids) == len(prefix))
            spans.append((len(t_ids), len(t_ids) + len(new)))
            t_ids.extend(new)
            t_labels.extend(new if piece.trained else [IGNORE_INDEX] * len(new))
        if self.check_round_trip:
            self._check(pieces, spans, t_ids)
        partners = [-1] * len(ids)
        for k, j in enumerate(self._partners(kept, pieces, spans, t_ids)):
            partners[kept_at[k]] = j
        self.stats.count_aligned(labels, partners)
        return SampleTokens(t_ids, t_labels, partners)

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
        decode = self.student.decode
        left = decode(kept[start:cut])
        if not left.endswith(_REPLACEMENT):
            return True
        end = cut
        while end < len(kept) and kept[end] != self._s_eos:
            end += 1
        ctx_text = decode(self._s_ctx)
        right = decode(self._s_ctx + kept[cut:end])
        if not right.startswith(ctx_text):
            return False
        return decode(kept[start:end]) == left + right[len(ctx_text) :]

    def _fill_texts(self, kept: list[int], pieces: list[_Piece]) -> None:
        """Each text run's text, decoded in the context of the piece before it."""
        for k, piece in enumerate(pieces):
            if piece.kind != _TEXT:
                continue
            context = pieces[k - 1].start if k > 0 else piece.start
            piece.text = _in_context(self.student.decode, kept, 0, context, piece.start, piece.end)

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
            s_ends = _token_ends(self.student.token_bytes, kept[piece.start : piece.end], piece.text)
            t_ends = _token_ends(self.teacher.token_bytes, t_ids[start:end], piece.text)
            at_end = {offset: j for j, offset in zip(range(start, end), t_ends) if offset is not None}
            for k, offset in zip(range(piece.start, piece.end), s_ends):
                partners[k] = at_end.get(offset, -1)
        return partners

    def _check(self, pieces: list[_Piece], spans: list[tuple[int, int]], t_ids: list[int]) -> None:
        """Compare each run's student text with the teacher's decode of its tokens, in context."""
        base = context = len(self.teacher.prefix)
        for piece, (start, end) in zip(pieces, spans):
            if piece.kind == _TEXT:
                self.stats.runs += 1
                text = _in_context(self.teacher.decode, t_ids, base, min(context, start), start, end)
                if text != piece.text:
                    self.stats.mismatched_runs += 1
                    if len(self.stats.examples) < _MAX_EXAMPLES:
                        self.stats.examples.append((piece.text, text))
            if end > start:
                context = start


def _in_context(decode: Any, ids: list[int], base: int, context: int, start: int, end: int) -> str:
    """Text of ``ids[start:end]`` as it reads after ``ids[context:start]`` (``base``: where the
    sample's text starts)."""
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


def _token_ends(table: dict[int, bytes] | None, ids: list[int], text: str) -> list[int | None]:
    """Where in ``text`` (a UTF-8 byte offset) each token of a run ends; all ``None`` when the
    tokens' bytes do not spell ``text``. Byte offsets, so that tokens ending inside a character
    (byte fallback, byte-level pieces) align too."""
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
