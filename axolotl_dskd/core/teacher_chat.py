"""The teacher's own rendering of a conversation (cross-tokenizer chat data).

A chat sample reaches the student as the student's chat template renders it. Handed that text,
a teacher from another family reads markup it has never seen (``<|start_header_id|>`` spelled
out as characters) and predicts worse. So the teacher renders the conversation with its own
template, and the two renderings share only the messages' contents; everything between them is
template text that belongs to one side.

:class:`TeacherChatRenderer` turns a conversation, with the student's token ids and labels, into
the teacher's ids and labels and the exact teacher partner of each student token:

- Both renderings are measured in UTF-8 bytes: where each token ends, from the bytes each
  vocabulary entry stands for (:mod:`axolotl_dskd.core.vocabulary`), and where each message's content
  lies, by the template's structure: the conversation rendered again with each content replaced
  by a marker gives the template text around it (a template that trims a content is matched on
  the trimmed text; a content equal to template text is never taken for it).
- Labels follow the student's: a teacher token ending inside a content is trained iff the student
  token covering the same byte of that content is (a token that begins in template text and
  reaches no further than the content's leading whitespace is template text). In the template
  text between two contents, if the student trains all of its tokens the teacher trains all of its
  own; if it trains some (its end-of-turn marker), the teacher trains its own end-of-turn marker,
  the first special token of the stretch.
- A student token and a teacher token that end at the same byte of the same content are partners
  (both have read that content up to there); template text aligns with nothing.

A conversation the teacher's template rejects (a role it does not know), or one where the student
trains text the teacher's rendering does not contain, raises :class:`UnrenderableSample`; the
caller then hands the teacher the student's rendering, re-tokenized, for that sample.

Framework-free: Hugging Face tokenizers only, picklable for dataset ``map`` workers.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from axolotl_dskd.core.loss import IGNORE_INDEX
from axolotl_dskd.core.vocabulary import token_bytes

__all__ = ["TeacherChatRenderer", "TeacherChatSample", "UnrenderableSample", "special_token_ids"]


class UnrenderableSample(ValueError):
    """The teacher cannot read this conversation in its own template; the message says why."""


@dataclass(frozen=True)
class TeacherChatSample:
    """One conversation as the teacher reads it."""

    input_ids: list[int]
    labels: list[int]
    """``IGNORE_INDEX`` where untrained, as the student's labels."""
    alignment: list[int]
    """For each student token, the index of its teacher partner, or -1."""

    def truncated(self, n: int) -> TeacherChatSample | None:
        """The reading of the same conversation with the student's tokens cut to the first ``n``
        (Axolotl's ``excess_length_strategy: truncate``): the teacher keeps the text the student
        keeps, up to the last partner of a kept student token; ``None`` if no kept token has one."""
        partners = [j for j in self.alignment[:n] if j >= 0]
        if not partners:
            return None
        keep = max(partners) + 1
        return TeacherChatSample(self.input_ids[:keep], self.labels[:keep], self.alignment[:n])


@dataclass(frozen=True)
class _Rendering:
    """One side's rendering: where each token ends and where each shared content lies (bytes)."""

    ends: list[int]
    spans: dict[int, tuple[int, int, int, int]]
    """Message index -> (start, content start, content end, end): the located text, and inside
    it the content without surrounding whitespace (what both sides are compared on)."""


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's control tokens (BOS/EOS and chat markers such as ``<|im_end|>``)."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return ids


def byte_ends(table: Mapping[int, bytes], ids: Sequence[int], text: bytes) -> list[int] | None:
    """Where in ``text`` each token ends, or ``None`` if the tokens do not spell all of it.

    A sentencepiece tokenizer prepends a space (``▁``) to the text after a control token that the
    text itself does not have; such a leading space is allowed to match nothing.
    """
    ends: list[int] = []
    at = 0
    for token in ids:
        piece = table.get(token)
        if piece is None:
            return None
        if text.startswith(piece, at):
            at += len(piece)
        elif piece[:1] == b" " and text.startswith(piece[1:], at):
            at += len(piece) - 1
        else:
            return None
        ends.append(at)
    return ends if at == len(text) else None


class TeacherChatRenderer:
    """The teacher's tokens, labels and token partners of conversations the student trains on.

    Args:
        student_tokenizer: The student's tokenizer (fast), which produced the student's ids.
        teacher_tokenizer: The teacher's tokenizer (fast).
        teacher_template: The teacher's chat template (Jinja).
        student_template: The template the student's ids were rendered with (``None``: the
            student tokenizer's own).
        template_kwargs: Extra variables for both templates (Axolotl's ``chat_template_kwargs``).
    """

    def __init__(
        self,
        student_tokenizer: Any,
        teacher_tokenizer: Any,
        teacher_template: str,
        student_template: str | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.student_tokenizer = student_tokenizer
        self.teacher_tokenizer = teacher_tokenizer
        self.teacher_template = teacher_template
        self.student_template = student_template
        self.template_kwargs = dict(template_kwargs or {})
        tables = token_bytes(student_tokenizer), token_bytes(teacher_tokenizer)
        if tables[0] is None or tables[1] is None:
            raise ValueError("the teacher's chat rendering needs fast (Rust-backed) tokenizers on both sides")
        self._s_bytes, self._t_bytes = tables
        self._t_special = special_token_ids(teacher_tokenizer)

    def render(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None = None) -> str:
        """The conversation in the teacher's template (no generation prompt)."""
        return self._render(self.teacher_tokenizer, self.teacher_template, messages, tools, "teacher")

    def __call__(
        self,
        messages: Sequence[Mapping[str, Any]],
        student_ids: Sequence[int],
        student_labels: Sequence[int],
        tools: Sequence[Any] | None = None,
    ) -> TeacherChatSample:
        """The teacher's reading of one conversation; raises :class:`UnrenderableSample`."""
        student_ids, student_labels = list(student_ids), list(student_labels)
        student = self._measure(
            self.student_tokenizer,
            self.student_template,
            self._s_bytes,
            student_ids,
            messages,
            tools,
            "student",
        )
        t_text = self.render(messages, tools)
        teacher_ids = list(self.teacher_tokenizer(t_text, add_special_tokens=False)["input_ids"])
        teacher = self._measure(
            self.teacher_tokenizer,
            self.teacher_template,
            self._t_bytes,
            teacher_ids,
            messages,
            tools,
            "teacher",
        )

        shared = [k for k in student.spans if k in teacher.spans]
        s_regions, t_regions = self._regions(student, shared), self._regions(teacher, shared)
        s_trained = [label != IGNORE_INDEX for label in student_labels]
        for k in set(student.spans) - set(teacher.spans):
            start, _, _, end = student.spans[k]
            if any(t and start < e <= end for e, t in zip(student.ends, s_trained)):
                raise UnrenderableSample(
                    f"the teacher's template drops message {k}, which the student trains on"
                )
        t_trained = self._teacher_trained(
            student, teacher, shared, s_regions, t_regions, s_trained, teacher_ids
        )
        if any(s_trained) and not any(t_trained):
            raise UnrenderableSample("no teacher token is trained where the student trains")

        labels = [tid if trained else IGNORE_INDEX for tid, trained in zip(teacher_ids, t_trained)]
        at_key = {key: j for j, key in enumerate(_content_offsets(teacher, t_regions, shared)) if key}
        alignment = [
            at_key.get(key, -1) if key else -1 for key in _content_offsets(student, s_regions, shared)
        ]
        return TeacherChatSample(teacher_ids, labels, alignment)

    def _teacher_trained(
        self,
        student: _Rendering,
        teacher: _Rendering,
        shared: list[int],
        s_regions: list[int],
        t_regions: list[int],
        s_trained: list[bool],
        teacher_ids: list[int],
    ) -> list[bool]:
        """Which teacher tokens are trained: content by content byte, template text by stretch."""
        t_trained = [False] * len(teacher_ids)
        for j, region in enumerate(t_regions):
            if region % 2:
                t_trained[j] = self._content_trained(student, teacher, shared[region // 2], j, s_trained)
        s_gaps = _by_gap(s_regions)
        for region, t_tokens in _by_gap(t_regions).items():
            s_tokens = s_gaps.get(region, [])
            n = sum(s_trained[i] for i in s_tokens)
            if s_tokens and n == len(s_tokens):
                for j in t_tokens:
                    t_trained[j] = True
            elif n:
                marker = next((j for j in t_tokens if teacher_ids[j] in self._t_special), None)
                if marker is not None:
                    t_trained[marker] = True
        return t_trained

    # -- measuring a rendering ----------------------------------------------------------------------

    def _render(self, tokenizer: Any, template: str | None, messages: Any, tools: Any, side: str) -> str:
        try:
            text = tokenizer.apply_chat_template(
                list(messages), tools=tools or None, chat_template=template, tokenize=False,
                add_generation_prompt=False, **self.template_kwargs,
            )  # fmt: skip
        except Exception as exc:  # jinja's raise_exception, a missing variable, a bad role
            raise UnrenderableSample(f"the {side}'s chat template rejects it ({exc})") from exc
        if not isinstance(text, str):
            raise UnrenderableSample(f"the {side}'s chat template did not render text")
        return text

    def _measure(
        self,
        tokenizer: Any,
        template: str | None,
        table: Mapping[int, bytes],
        ids: list[int],
        messages: Sequence[Mapping[str, Any]],
        tools: Any,
        side: str,
    ) -> _Rendering:
        """Where ``ids`` (this side's rendering of ``messages``) end, and where each content lies.

        Contents are located by the template's structure, never by searching the text: the
        conversation is rendered a second time with each content replaced by a marker, and the
        template text between markers is matched piece by piece (a content equal to a role name
        or any other template word cannot be mistaken for the template's own text).
        """
        text = self._render(tokenizer, template, messages, tools, side)
        ends = byte_ends(table, ids, text.encode())
        if ends is None:
            raise UnrenderableSample(
                f"the {side}'s tokens are not its chat template's rendering of the conversation"
            )
        contents = {
            k: m["content"]
            for k, m in enumerate(messages)
            if isinstance(m.get("content"), str) and m["content"].strip()
        }
        if any(_MARK_CHARS & set(content) for content in contents.values()):
            raise UnrenderableSample("a message contains the private-use characters that mark contents")
        marked = [{**m, "content": _MARK.format(k)} if k in contents else m for k, m in enumerate(messages)]
        skeleton = self._render(tokenizer, template, marked, tools, side)
        spans = _locate_contents(text, skeleton, contents, side)
        return _Rendering(ends, {k: _to_bytes(text, span) for k, span in spans.items()})

    @staticmethod
    def _regions(rendering: _Rendering, shared: list[int]) -> list[int]:
        """Each token's region by where it ends: ``2m`` the template text before shared content
        ``m`` (``2 * len(shared)``: after the last), ``2m + 1`` content ``m`` itself."""
        bounds = [b for k in shared for b in (rendering.spans[k][0], rendering.spans[k][3])]
        return [bisect_left(bounds, end) for end in rendering.ends]

    @staticmethod
    def _content_trained(
        student: _Rendering, teacher: _Rendering, k: int, j: int, s_trained: list[bool]
    ) -> bool:
        """Whether the student trains the byte of content ``k`` where teacher token ``j`` ends."""
        t_start, t_core, t_core_end, _ = teacher.spans[k]
        _, s_core, _, _ = student.spans[k]
        if j and teacher.ends[j - 1] < t_start and teacher.ends[j] <= t_core:
            return False  # template text and the content's leading whitespace: not content
        offset = min(max(teacher.ends[j] - t_core, 1), t_core_end - t_core)
        return s_trained[bisect_right(student.ends, s_core + offset - 1)]


_MARK = "\ue000{}\ue001"
"""Stands in for message ``k``'s content in the structural rendering (private-use code points:
no template spells them)."""
_MARK_CHARS = {"\ue000", "\ue001"}
_MARK_PATTERN = re.compile("\ue000(\\d+)\ue001")


def _locate_contents(
    text: str, skeleton: str, contents: Mapping[int, str], side: str
) -> dict[int, tuple[int, int, int, int]]:
    """Character span of each content in ``text``, given ``skeleton``: the same rendering with
    content ``k`` replaced by ``_MARK.format(k)``. ``text`` must be the skeleton's template pieces
    with each content between them, as is or with surrounding whitespace trimmed.

    Returns: message index -> (start, content start, content end, end), as :class:`_Rendering`.
    """
    marks = list(_MARK_PATTERN.finditer(skeleton))
    keys = [int(m.group(1)) for m in marks]
    if len(set(keys)) != len(keys):
        raise UnrenderableSample(f"the {side}'s chat template renders a message's content twice")
    starts = [0] + [m.end() for m in marks]
    pieces = [skeleton[a:b] for a, b in zip(starts, [m.start() for m in marks] + [len(skeleton)])]
    unlike = UnrenderableSample(f"the {side}'s chat template renders a content other than as written")
    if not text.startswith(pieces[0]):
        raise unlike
    at = len(pieces[0])
    spans: dict[int, tuple[int, int, int, int]] = {}
    for k, piece, last in zip(keys, pieces[1:], range(len(keys) - 1, -1, -1)):
        core = contents[k].strip()
        core_start = at + len(text[at:]) - len(text[at:].lstrip())
        if not text.startswith(core, core_start):
            raise unlike
        end = core_start + len(core)
        while not (text.startswith(piece, end) and (last or end + len(piece) == len(text))):
            if end == len(text) or not text[end].isspace():
                raise unlike
            end += 1
        spans[k] = (at, core_start, core_start + len(core), end)
        at = end + len(piece)
    return spans


def _to_bytes(text: str, span: tuple[int, ...]) -> tuple[int, int, int, int]:
    """Character offsets in ``text`` as UTF-8 byte offsets."""
    return tuple(len(text[:i].encode()) for i in span)  # type: ignore[return-value]


def _by_gap(regions: list[int]) -> dict[int, list[int]]:
    """The tokens of each stretch of template text (even regions)."""
    gaps: dict[int, list[int]] = {}
    for i, region in enumerate(regions):
        if region % 2 == 0:
            gaps.setdefault(region, []).append(i)
    return gaps


def _content_offsets(
    rendering: _Rendering, regions: list[int], shared: list[int]
) -> list[tuple[int, int] | None]:
    """For each token ending inside a shared content, (message, byte offset in the content)."""
    keys: list[tuple[int, int] | None] = []
    for end, region in zip(rendering.ends, regions):
        key = None
        if region % 2:
            k = shared[region // 2]
            _, core, core_end, _ = rendering.spans[k]
            if core < end <= core_end:
                key = (k, end - core)
        keys.append(key)
    return keys
