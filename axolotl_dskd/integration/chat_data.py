"""``dskd_teacher_chat_template``: the teacher's rendering of chat data, made where Axolotl
prepares the dataset.

The messages are gone by the time a batch is collated, so the teacher's tokens, labels and the
student tokens' partners (:mod:`axolotl_dskd.core.teacher_chat`) are computed while Axolotl tokenizes
each conversation and stored beside ``input_ids`` in :data:`TEACHER_COLUMNS`: prepared once, saved
with Axolotl's prepared dataset, read by the collator. The plugin's ``load_datasets`` hook runs
Axolotl's own preparation (:func:`load_datasets`) with two of its functions wrapped for the
duration of that call only (:func:`teacher_columns_added`; no hook reaches inside):

- the prompt-strategy loader, so that a ``chat_template`` strategy's output carries the columns
  (empty for a sample that falls back; rows of other dataset types, mixed in, get none: null);
- the prepared-dataset fingerprint, which ignores ``dskd_*`` keys: with the columns it also
  covers the teacher and its template, so changing either prepares the data anew.

Only runs that use the teacher's template (:func:`teacher_template`) take this path, and one
whose prepared data lacks the columns stops naming the key (:func:`require_teacher_columns`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from axolotl_dskd.core.teacher_chat import TeacherChatRenderer, TeacherChatSample, UnrenderableSample
from axolotl_dskd.integration.configured import teacher_tokenizer

LOG = logging.getLogger(__name__)

TEACHER_COLUMNS = ("dskd_teacher_input_ids", "dskd_teacher_labels", "dskd_token_alignment")
"""Dataset columns: the teacher's ids and labels of a conversation, and each student token's
teacher partner (-1: none); empty or null where the teacher reads the student's rendering."""
FORMAT_VERSION = 2
"""Of the columns; part of the dataset fingerprint. 2: added tokens of a sentencepiece-style
teacher read with ``▁`` as a space (Gemma's runs of spaces), so such data is prepared anew."""
KEY = "dskd_teacher_chat_template"


def resolve_template(setting: str, tokenizer: Any) -> str | None:
    """The teacher's Jinja chat template for ``dskd_teacher_chat_template``; ``None`` when the
    teacher reads the student's rendering (``student``, or ``auto`` without a template)."""
    if setting == "student":
        return None
    if setting == "auto":
        template = tokenizer.chat_template
        if isinstance(template, dict):  # named templates: the default one
            template = template.get("default")
        return template or None
    if "{{" in setting or "{%" in setting:
        return setting
    if Path(setting).is_file():
        return Path(setting).read_text(encoding="utf-8")
    from axolotl.utils.chat_templates.base import _CHAT_TEMPLATES

    if setting in _CHAT_TEMPLATES:
        return _CHAT_TEMPLATES[setting]
    raise ValueError(
        f"{KEY}: {setting!r} is neither auto, student, a Jinja template, an existing file nor one "
        f"of Axolotl's chat templates ({', '.join(sorted(_CHAT_TEMPLATES))}). Set it to one of those."
    )


def teacher_template(cfg: Any) -> str | None:
    """The template the teacher renders this run's chat data with; ``None`` when it reads the
    student's rendering (one vocabulary, no teacher template, ``student``, RL)."""
    if not cfg.get("dskd_teacher") or cfg.get("dskd_cross_tokenizer") is not True or cfg.get("rl"):
        return None
    return resolve_template(cfg.get(KEY) or "auto", teacher_tokenizer(cfg))


def fingerprint(cfg: Any) -> str | None:
    """What the teacher columns depend on beyond Axolotl's own fingerprint (``None`` when the run
    adds no columns): the teacher, its tokenizer and its template."""
    template = teacher_template(cfg)
    if template is None:
        return None
    return json.dumps(
        {
            "teacher": cfg.dskd_teacher,
            "tokenizer": cfg.dskd_teacher_tokenizer,
            "template": hashlib.sha256(template.encode()).hexdigest(),
            "format": FORMAT_VERSION,
        },
        sort_keys=True,
    )


class TeacherColumns:
    """A ``chat_template`` strategy's ``tokenize_prompt`` that also returns
    :data:`TEACHER_COLUMNS`. Picklable, for ``datasets.map`` workers."""

    def __init__(self, strategy: Any, renderer: TeacherChatRenderer) -> None:
        self.strategy = strategy
        self.tokenize_prompt = strategy.tokenize_prompt
        self.renderer = renderer
        self._reported = False

    def __call__(self, prompt: dict[str, Any]) -> dict[str, Any]:
        from axolotl.utils.dict import remove_none_values

        out = dict(self.tokenize_prompt(prompt))
        if not out:
            return out
        prompt = remove_none_values(prompt)  # as the strategy reads it
        if out["input_ids"] and not isinstance(out["input_ids"][0], list):  # one sample
            return {**out, **self._columns(prompt, out["input_ids"], out["labels"])}
        rows = [dict(zip(prompt, values)) for values in zip(*prompt.values())]
        columns: dict[str, list[np.ndarray]] = {name: [] for name in TEACHER_COLUMNS}
        for row, ids, labels in zip(rows, out["input_ids"], out["labels"]):
            for name, value in self._columns(row, ids, labels).items():
                columns[name].append(value)
        return {**out, **columns}

    def _columns(self, row: dict[str, Any], ids: list[int], labels: list[int]) -> dict[str, np.ndarray]:
        sample = self._render(row, ids, labels)
        values = (sample.input_ids, sample.labels, sample.alignment) if sample else ([], [], [])
        # typed arrays: a batch of fallbacks alone would otherwise make Arrow infer list<null>
        return {name: np.asarray(v, dtype=np.int32) for name, v in zip(TEACHER_COLUMNS, values)}

    def _render(self, row: dict[str, Any], ids: list[int], labels: list[int]) -> TeacherChatSample | None:
        try:
            turns = self.strategy.get_conversation_thread(row)
            return self.renderer(turns, ids, labels, tools=self.strategy._get_tools(row))
        except UnrenderableSample as exc:
            if not self._reported:
                self._reported = True
                LOG.warning(
                    "DSKD: a conversation falls back to the student's rendering for the teacher: %s. "
                    "The count of such samples is reported when training starts.", exc,
                )  # fmt: skip
            return None


def with_teacher_columns(strategy: Any, cfg: Any) -> Any:
    """``strategy`` (a prompt strategy Axolotl loaded), its output extended with the teacher
    columns when this run uses the teacher's template."""
    from axolotl.prompt_strategies.chat_template import ChatTemplateStrategy

    if (
        not isinstance(strategy, ChatTemplateStrategy)
        or strategy.prompter.processor is not None
        or not strategy.prompter.chat_template  # mistral-common tokenizes without a template
    ):
        return strategy  # other types, multimodal chat and mistral-common keep the student's rendering
    template = teacher_template(cfg)
    if template is None:
        return strategy
    renderer = TeacherChatRenderer(
        strategy.tokenizer,
        teacher_tokenizer(cfg),
        template,
        student_template=strategy.prompter.chat_template,
        template_kwargs=strategy.prompter.chat_template_kwargs,
    )
    strategy.tokenize_prompt = TeacherColumns(strategy, renderer)
    return strategy


@contextlib.contextmanager
def teacher_columns_added() -> Iterator[None]:
    """Within: Axolotl's prompt-strategy loader adds the teacher columns (:func:`with_teacher_columns`)
    and its prepared-dataset fingerprint covers the teacher and its template (:func:`fingerprint`).
    Axolotl's own functions are put back on exit."""
    from axolotl.utils.data import sft, wrappers

    load_strategy, dataset_hash = wrappers.load, sft.generate_dataset_hash_from_config

    @functools.wraps(load_strategy)
    def load(strategy: str, tokenizer: Any, cfg: Any, ds_cfg: Any, *args: Any, **kwargs: Any) -> Any:
        return with_teacher_columns(load_strategy(strategy, tokenizer, cfg, ds_cfg, *args, **kwargs), cfg)

    @functools.wraps(dataset_hash)
    def generate_dataset_hash_from_config(cfg: Any, cfg_datasets: list, tokenizer_name: str) -> str:
        base = dataset_hash(cfg, cfg_datasets, tokenizer_name)
        extra = fingerprint(cfg)
        return base if extra is None else hashlib.md5(f"{base}|dskd:{extra}".encode()).hexdigest()

    wrappers.load, sft.generate_dataset_hash_from_config = load, generate_dataset_hash_from_config
    try:
        yield
    finally:
        wrappers.load, sft.generate_dataset_hash_from_config = load_strategy, dataset_hash


def load_datasets(cfg: Any) -> Any:
    """Axolotl's own ``load_datasets`` for a run whose teacher reads its own chat template, with
    the teacher columns; Axolotl's ``TrainDatasetMeta``."""
    from axolotl.common.datasets import load_datasets as axolotl_load_datasets

    with teacher_columns_added():
        meta = axolotl_load_datasets(cfg=cfg)
    require_teacher_columns(cfg, meta.train_dataset)
    return meta


def columns_expected(cfg: Any) -> bool:
    """Whether this run's prepared chat data must carry the teacher columns: the teacher reads its
    own template and a ``chat_template`` dataset is tokenized with a template (not by a
    multimodal processor or mistral-common, which keep the student's rendering)."""
    return (
        teacher_template(cfg) is not None
        and not cfg.get("processor_type")
        and not cfg.get("tokenizer_use_mistral_common")
        and any(str(d.get("type") or "").startswith("chat_template") for d in cfg.get("datasets") or [])
    )


def require_teacher_columns(cfg: Any, dataset: Any) -> None:
    """Stop, naming the key, where chat data meant for the teacher's template was prepared without
    its columns (the teacher would silently read the student's rendering instead)."""
    if dataset is None or not columns_expected(cfg):
        return
    if TEACHER_COLUMNS[0] not in (getattr(dataset, "column_names", None) or []):
        raise ValueError(
            f"{KEY}: the teacher should read the chat data in its own template, but the prepared data "
            "has no teacher columns: it was prepared without the plugin's load_datasets hook (the "
            "train and preprocess commands call it; `axolotl evaluate` does not) or by an Axolotl "
            f"version whose data preparation the plugin does not reach. Set {KEY}: student for such "
            "a run, or prepare the data with `axolotl preprocess` / `axolotl train`."
        )


def fallback_count(dataset: Any) -> tuple[int, int] | None:
    """(samples the teacher reads in the student's rendering, all samples) of a prepared dataset,
    or ``None`` if it has no teacher columns."""
    if dataset is None or TEACHER_COLUMNS[0] not in (getattr(dataset, "column_names", None) or []):
        return None
    import pyarrow.compute as pc

    lengths = pc.fill_null(pc.list_value_length(dataset.with_format("arrow")[TEACHER_COLUMNS[0]]), 0)
    return int(pc.sum(pc.equal(lengths, 0)).as_py() or 0), len(dataset)


def columns_of(feature: dict[str, Any]) -> TeacherChatSample | None:
    """The teacher's reading of one dataset row, or ``None`` (the student's rendering: no
    columns, null or empty ones)."""
    if feature.get(TEACHER_COLUMNS[0]) is None:
        return None
    values = [np.asarray(feature[name]).tolist() for name in TEACHER_COLUMNS]
    return TeacherChatSample(*values) if values[0] else None
