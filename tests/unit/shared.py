"""Helpers shared by the core and integration tests (their fixtures are in ``conftest.py``):
cross-tokenizer chat data prepared by Axolotl for a real pair of tokenizers
(``core/test_teacher_chat.py``, ``integration/test_chat_data.py``, ``integration/test_collator.py``),
and a teacher cache built by the plugin's command on the tiny assets (``core/test_teacher_cache.py``,
``integration/test_cache_identity.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from axolotl_dskd.core.loss import IGNORE_INDEX
from dskd_devkit.axolotl_runs import dskd_config, load_config, prepared_datasets, write_config
from dskd_devkit.chat_pairs import END_OF_TURN, chat_config, chat_model, write_conversations

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


SHARD_MB = 0.05  # three shards of the 63 samples


def build(cfg: dict, workdir: Path, overwrite: bool = False) -> dict:
    """``python -m axolotl_dskd.cache_teacher config.yml --shard-size 0.05 [--overwrite]``, in
    this process."""
    from axolotl.integrations.base import PluginManager

    from axolotl_dskd.cache_teacher import build as build_cache

    PluginManager.get_instance().plugins.clear()
    return build_cache(write_config(cfg, workdir / "config.yml"), shard_size_mb=SHARD_MB, overwrite=overwrite)


def cache_config(assets: dict, workdir: Path, cache: Path, **overrides: Any) -> dict:
    return dskd_config(
        assets, workdir, student="student_sp", dskd_teacher_cache=str(cache),
        dskd_teacher_cache_dtype="float32", **overrides,
    )  # fmt: skip
