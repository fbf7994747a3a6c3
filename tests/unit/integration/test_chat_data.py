"""``axolotl_dskd.integration.chat_data``: the teacher's columns added to chat data inside Axolotl's
own preparation (ShareGPT mappings, per-message training, dropped long samples), the prepared-data
fingerprint that covers them, and data prepared without them refused."""

from __future__ import annotations

import json
from typing import Any

import pytest

from axolotl_dskd.integration.chat_data import TEACHER_COLUMNS
from dskd_devkit.axolotl_runs import load_config
from dskd_devkit.chat_pairs import CONVERSATIONS, chat_dataset, chat_model
from tests.unit.shared import assert_teacher_reads_its_own_template, prepare, trained_runs


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


def test_samples_longer_than_sequence_len_are_dropped_whole(real_tokenizer, tmp_path):
    """``excess_length_strategy: drop`` (Axolotl's default): a long conversation is dropped with
    its teacher columns; the others reach the teacher in its own template."""
    p = prepare(tmp_path, "llama3", "qwen3", CONVERSATIONS, sequence_len=48, excess_length_strategy="drop")
    assert 0 < len(p.dataset) < len(CONVERSATIONS)
    assert_teacher_reads_its_own_template(p)


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
