"""The objects an Axolotl config describes: the teacher, its tokenizer, the student's tokenizer,
the re-tokenizer of student batches. One home for turning ``dskd_*`` keys into objects, shared by
config validation, the plugin and the ``dskd-cache-teacher`` command, so that training and
caching load the teacher the same way.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from axolotl.loaders import load_tokenizer
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from axolotl_dskd.core.teacher import context_length, load_teacher
from axolotl_dskd.core.teacher_tokens import TeacherTokenBuilder


def teacher_dtype(cfg: Any) -> torch.dtype:
    """``dskd_teacher_dtype``; ``auto`` follows the training precision."""
    if cfg.dskd_teacher_dtype != "auto":
        return getattr(torch, cfg.dskd_teacher_dtype)
    if cfg.bf16 is True or (
        cfg.bf16 == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    ):
        return torch.bfloat16
    if cfg.fp16:
        return torch.float16
    return torch.float32


def teacher_config(cfg: Any) -> PretrainedConfig:
    """The teacher's ``config.json``."""
    return AutoConfig.from_pretrained(cfg.dskd_teacher, trust_remote_code=cfg.dskd_teacher_trust_remote_code)


def teacher_tokenizer(cfg: Any) -> Any:
    """The teacher's tokenizer (``dskd_teacher_tokenizer``, else the teacher's folder), loaded
    once per process: dataset ``map`` workers and the collator ask for it per run."""
    return _teacher_tokenizer(
        cfg.dskd_teacher_tokenizer or cfg.dskd_teacher, bool(cfg.dskd_teacher_trust_remote_code)
    )


@functools.lru_cache(maxsize=4)
def _teacher_tokenizer(source: str, trust_remote_code: bool) -> Any:
    return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)


def student_tokenizer(cfg: Any) -> Any:
    """The student's tokenizer as its files define it (Axolotl's own loading may add tokens)."""
    return AutoTokenizer.from_pretrained(
        getattr(cfg, "tokenizer_config", None) or cfg.base_model,
        trust_remote_code=bool(getattr(cfg, "trust_remote_code", False)),
    )


def configured_teacher(cfg: Any, device: torch.device) -> torch.nn.Module:
    """The whole teacher, loaded as the ``dskd_teacher*`` keys say (for training and for caching)."""
    return load_teacher(
        cfg.dskd_teacher,
        device=device,
        dtype=teacher_dtype(cfg),
        load_in_4bit=cfg.dskd_teacher_load_in_4bit,
        load_in_8bit=cfg.dskd_teacher_load_in_8bit,
        adapter=cfg.dskd_teacher_adapter,
        trust_remote_code=cfg.dskd_teacher_trust_remote_code,
    )


def teacher_token_builder(cfg: Any) -> TeacherTokenBuilder:
    """The re-tokenizer of student batches for the teacher (cross-tokenizer runs), cutting rows
    to the teacher's context."""
    max_length = context_length(teacher_config(cfg).get_text_config()) or cfg.sequence_len
    return TeacherTokenBuilder(load_tokenizer(cfg), teacher_tokenizer(cfg), max_length=max_length)
