"""What a teacher cache is built from, and the check that refuses a stale one.

:func:`cache_identity` lists everything the cached states depend on (the teacher's config and
tensors, how it is loaded, both tokenizers, the teacher's chat template, the dataset settings,
``sequence_len``, the pairing, the storage dtype). The build stores it in the cache's manifest;
config validation compares it with this run's (:func:`check_cache`), so a stale cache is refused,
naming what differs, before anything loads.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel

from axolotl_dskd.core import teacher_cache
from axolotl_dskd.core.teacher import tensor_digests
from axolotl_dskd.integration.chat_data import resolve_template
from axolotl_dskd.integration.configured import (
    student_tokenizer,
    teacher_config,
    teacher_dtype,
    teacher_tokenizer,
)

KEY = "dskd_teacher_cache"

DATASET_SETTINGS = (
    "datasets", "test_datasets", "train_on_inputs", "chat_template", "chat_template_jinja",
    "chat_template_kwargs", "default_system_message", "eot_tokens", "special_tokens",
    "added_tokens_overrides",
)  # fmt: skip
"""Config keys that change what Axolotl's prepared samples hold (not which split they go to:
both splits are cached)."""
STALE = {
    "format_version": "an older cache format",
    "teacher_config": "another teacher (dskd_teacher, by its config.json)",
    "teacher_tensors": "other teacher weights (dskd_teacher's LM head, embeddings, first or last "
    "layer differ from those the cache was built from, or the cache predates this check)",
    "teacher_weights": "another loading of the teacher (dskd_teacher_load_in_4bit / _8bit, "
    "dskd_teacher_dtype or the bf16 / fp16 it follows, dskd_teacher_adapter)",
    "student_tokenizer": "another student tokenizer",
    "teacher_tokenizer": "another teacher tokenizer (dskd_teacher_tokenizer)",
    "teacher_chat_template": "another teacher chat template (dskd_teacher_chat_template)",
    "dataset": "other datasets or dataset settings (datasets, chat_template, train_on_inputs, ...)",
    "sequence_len": "another sequence_len",
    "pairing": "another pairing of the two models (dskd_cross_tokenizer: one vocabulary or two)",
    "storage_dtype": "another storage dtype (dskd_teacher_cache_dtype)",
}
"""Each part of a cache's identity, as a stale-cache message names it."""
_BUILDING = contextvars.ContextVar("dskd_building_teacher_cache", default=False)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _plain(value: Any) -> Any:
    """A config value as JSON data, unset entries dropped (pydantic models as Axolotl dumps them)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_none=True)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def tokenizer_digest(tokenizer: Any) -> str:
    """Of everything that decides the ids of a text: a fast tokenizer's whole definition, else
    its vocabulary and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return _sha256(backend.to_str())
    return _sha256(
        json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.special_tokens_map], default=str)
    )


def cache_identity(
    cfg: Any, teacher_config: Any, student_tokenizer: Any, teacher_tokenizer: Any
) -> dict[str, Any]:
    """What the states of a cache depend on; two runs with equal identities read the same states."""
    cross = bool(cfg.dskd_cross_tokenizer)
    template = resolve_template(cfg.dskd_teacher_chat_template, teacher_tokenizer) if cross else None
    config = {
        k: v
        for k, v in teacher_config.to_dict().items()
        if not k.startswith("_") and k != "transformers_version"
    }
    return {
        "format_version": teacher_cache.FORMAT_VERSION,
        "teacher_config": _sha256(json.dumps(config, sort_keys=True, default=str)),
        "teacher_tensors": tensor_digests(cfg.dskd_teacher),
        "teacher_weights": {
            "load_in_4bit": bool(cfg.dskd_teacher_load_in_4bit),
            "load_in_8bit": bool(cfg.dskd_teacher_load_in_8bit),
            "dtype": str(teacher_dtype(cfg)),  # "auto" resolved: it follows bf16 / fp16
            "adapter": cfg.dskd_teacher_adapter,
        },
        "student_tokenizer": tokenizer_digest(student_tokenizer),
        "teacher_tokenizer": tokenizer_digest(teacher_tokenizer),
        "teacher_chat_template": _sha256(template) if template else None,
        "dataset": _sha256(
            json.dumps({k: _plain(getattr(cfg, k, None)) for k in DATASET_SETTINGS}, sort_keys=True)
        ),
        "sequence_len": cfg.sequence_len,
        "pairing": "two tokenizers" if cross else "one vocabulary",
        "storage_dtype": cfg.dskd_teacher_cache_dtype,
    }


@contextlib.contextmanager
def building_cache() -> Iterator[None]:
    """Validate a config for building its cache: the cache it names need not exist yet."""
    token = _BUILDING.set(True)
    try:
        yield
    finally:
        _BUILDING.reset(token)


def check_cache(folder: str, identity: dict[str, Any]) -> None:
    """Refuse, naming ``dskd_teacher_cache``, a cache that is missing, unfinished or built for
    another run (config validation, before anything loads)."""
    if _BUILDING.get():
        return
    rebuild = (
        f"Build it with `axolotl dskd-cache-teacher config.yml` (or `python -m "
        f"axolotl_dskd.cache_teacher config.yml`) on this config, or remove {KEY} to run the teacher live."
    )
    manifest = teacher_cache.read_manifest(folder)
    if manifest is None:
        raise ValueError(f"{KEY}: {folder} holds no teacher cache. {rebuild}")
    built = manifest.get("identity", {})
    stale = [name for name in STALE if _differs(name, built.get(name), identity[name])]
    if stale:
        readable = ("sequence_len", "pairing", "storage_dtype", "format_version")
        details = [
            STALE[name]
            + (f" (cache: {built.get(name)!r}, this run: {identity[name]!r})" if name in readable else "")
            for name in stale
        ]
        raise ValueError(
            f"{KEY}: the cache in {folder} was built for {'; '.join(details)}. Rebuild it with "
            f"`axolotl dskd-cache-teacher config.yml` on this config (it replaces the old one), or set "
            f"{KEY} to another folder."
        )
    if not manifest.get("complete"):
        raise ValueError(f"{KEY}: the cache in {folder} is unfinished (its build stopped). {rebuild} "
                         "The build resumes where it stopped.")  # fmt: skip


def _differs(name: str, built: Any, now: Any) -> bool:
    """Whether one part of a cache's identity differs from this run's. The teacher's tensors are
    compared where both have them: training may read a folder holding only the LM head and
    embeddings of the teacher the cache was built from."""
    if name != "teacher_tensors":
        return built != now
    shared = set(built or {}) & set(now)
    return not shared or any(built[k] != now[k] for k in shared)


def run_identity(cfg: Any) -> dict[str, Any]:
    """The identity of the cache this run reads (or builds)."""
    return cache_identity(cfg, teacher_config(cfg), student_tokenizer(cfg), teacher_tokenizer(cfg))
