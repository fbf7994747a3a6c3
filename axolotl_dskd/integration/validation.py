"""Config checks that need the teacher's config and tokenizer (no weights).

Runs inside Axolotl's config validation, so a bad teacher stops the run before datasets are
prepared or any model loads, with a message naming the YAML key.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from jinja2 import TemplateError
from transformers import AutoConfig
from transformers.utils.chat_template_utils import _compile_jinja_template

from axolotl_dskd.core.loss import Projectors
from axolotl_dskd.core.projector_io import check_projector_shapes, read_projector_shapes
from axolotl_dskd.core.teacher import (
    adapter_changed_heads,
    check_has_weights,
    inspect_teacher,
    require_bitsandbytes,
)
from axolotl_dskd.core.vocabulary import shared_vocabulary, token_bytes
from axolotl_dskd.integration.cache_identity import cache_identity, check_cache
from axolotl_dskd.integration.chat_data import KEY, resolve_template
from axolotl_dskd.integration.configured import student_tokenizer

LOG = logging.getLogger(__name__)


def check_teacher_setup(cfg: Any) -> None:
    """Validate the teacher against the student and resolve the ``auto`` keys:
    ``dskd_cross_tokenizer``, ``dskd_student_space_target``, ``dskd_kd_teacher_weight``."""
    check_weights_stay_whole(cfg)
    if cfg.dskd_teacher_cache and getattr(cfg, "pretraining_dataset", None):
        raise ValueError(
            "dskd_teacher_cache: pretraining_dataset streams its samples, and a teacher cache holds "
            "prepared ones. Use datasets: for the data, or remove dskd_teacher_cache to run the teacher live."
        )
    if cfg.dskd_teacher_load_in_4bit:
        require_bitsandbytes("dskd_teacher_load_in_4bit")
    if cfg.dskd_teacher_load_in_8bit:
        require_bitsandbytes("dskd_teacher_load_in_8bit")
    student = student_tokenizer(cfg)
    info = inspect_teacher(
        cfg.dskd_teacher,
        tokenizer=cfg.dskd_teacher_tokenizer,
        student_tokenizer=student,
        trust_remote_code=cfg.dskd_teacher_trust_remote_code,
    )
    check_has_weights(cfg.dskd_teacher)
    if cfg.dskd_cross_tokenizer is False and not info.same_vocabulary:
        raise ValueError(
            "dskd_cross_tokenizer: false, but the teacher and student tokenizers have different "
            "vocabularies (their token-to-id maps differ). Set dskd_cross_tokenizer: auto (or true) "
            "to distill through cross-model attention, or use a teacher with the student's tokenizer."
        )
    if cfg.dskd_method == "vanilla_kd" and not info.same_vocabulary:
        raise ValueError(
            "dskd_method: vanilla_kd compares logits token by token and needs the teacher and "
            "student to share a vocabulary, but their tokenizers differ. Use dskd_method: dskd."
        )
    if cfg.dskd_cross_tokenizer == "auto":
        cfg.dskd_cross_tokenizer = not info.same_vocabulary
    unreadable = without_token_bytes(student, info.tokenizer) if cfg.dskd_cross_tokenizer else None
    if unreadable and cfg.dskd_token_alignment != "cma":
        raise ValueError(
            f"dskd_token_alignment: {cfg.dskd_token_alignment} needs the bytes of each token, but the "
            f"{unreadable} has no fast (Rust) backend to read them from. Use a fast tokenizer, or set "
            "dskd_token_alignment: cma."
        )
    shared_share = resolve_student_space_target(cfg, student, info.tokenizer, unreadable)
    resolve_kd_teacher_weight(cfg, shared_share)
    check_teacher_chat_template(cfg, info.tokenizer, unreadable)
    sequence_len = getattr(cfg, "sequence_len", None)
    if info.max_length is not None and sequence_len and info.max_length < sequence_len:
        raise ValueError(
            f"dskd_teacher: the teacher's context is {info.max_length} tokens, shorter than "
            f"sequence_len: {sequence_len}. Lower sequence_len to at most {info.max_length} "
            "or choose a teacher with a longer context."
        )
    if cfg.dskd_projectors:
        check_projectors_fit(cfg, teacher_hidden_size=info.hidden_size)
    if cfg.dskd_teacher_cache:
        check_adapter_keeps_heads(cfg, info.config)
        check_cache(cfg.dskd_teacher_cache, cache_identity(cfg, info.config, student, info.tokenizer))


def check_adapter_keeps_heads(cfg: Any, teacher_config: Any) -> None:
    """Training from a cache reads the LM head and embeddings from the base teacher's files."""
    if not cfg.dskd_teacher_adapter:
        return
    changed = adapter_changed_heads(
        cfg.dskd_teacher_adapter, teacher_config, trust_remote_code=cfg.dskd_teacher_trust_remote_code
    )
    if changed:
        raise ValueError(
            f"dskd_teacher_adapter: {cfg.dskd_teacher_adapter} changes the teacher's {' and '.join(changed)}, "
            "and training from dskd_teacher_cache reads those from the base teacher's safetensors. Merge "
            "the adapter into the teacher (PEFT's merge_and_unload, then save_pretrained) and point "
            "dskd_teacher to the merged folder, or remove dskd_teacher_cache to run the teacher live."
        )


def without_token_bytes(student_tokenizer: Any, teacher_tokenizer: Any) -> str | None:
    """Which tokenizer, if any, cannot give the bytes each of its tokens stands for (only a
    Rust-backed, fast one can); exact alignment and the teacher's chat rendering measure token
    ends with them. Named as messages name it: "student's tokenizer (LlamaTokenizer)"."""
    for role, tokenizer in (("student", student_tokenizer), ("teacher", teacher_tokenizer)):
        if token_bytes(tokenizer) is None:
            return f"{role}'s tokenizer ({type(tokenizer).__name__})"
    return None


def resolve_student_space_target(
    cfg: Any, student_tokenizer: Any, teacher_tokenizer: Any, unreadable: str | None
) -> float | None:
    """``dskd_student_space_target: shared_vocabulary`` distils over the tokens both vocabularies
    spell alike: their bytes must be readable, and there must be some. ``auto`` resolves to it
    where it applies (a DSKD run across tokenizers with exact pairs) and is possible, and to
    ``projected`` otherwise. Returns the share of the student's vocabulary the shared tokens
    cover where the run distils over them across tokenizers, else None."""
    target = cfg.dskd_student_space_target
    applies = cfg.dskd_method == "dskd" and cfg.dskd_cross_tokenizer and cfg.dskd_token_alignment != "cma"
    if target == "projected" or (target == "auto" and (not applies or unreadable)):
        cfg.dskd_student_space_target = "projected"
        return None
    if unreadable:
        raise ValueError(
            f"dskd_student_space_target: shared_vocabulary pairs the tokens both vocabularies spell "
            f"alike by their bytes, but the {unreadable} has no fast (Rust) backend to read them "
            "from. Use a fast tokenizer, or set dskd_student_space_target: projected."
        )
    if not applies:
        return None
    shared = len(shared_vocabulary(student_tokenizer, teacher_tokenizer)[0])
    if target == "auto":
        cfg.dskd_student_space_target = "shared_vocabulary" if shared else "projected"
    elif shared == 0:
        raise ValueError(
            "dskd_student_space_target: shared_vocabulary, but the student's and the teacher's "
            "vocabularies spell no token alike, so there is nothing to distil over. Set "
            "dskd_student_space_target: projected."
        )
    return shared / len(student_tokenizer) if shared else None


STUDENT_SPACE_ONLY_SHARE = 0.5
"""The share of the student's vocabulary that the shared tokens must cover for ``auto`` to leave
the teacher's space out: measured, 79 % (Qwen2.5-Coder -> SmolLM2, where it helped) and 26 %
(the quickstart's tiny pair, where it hurt)."""


def resolve_kd_teacher_weight(cfg: Any, shared_share: float | None) -> None:
    """``dskd_kd_teacher_weight: auto``: 0 where kd_student distils the teacher's own
    distribution over shared tokens that cover most of the student's vocabulary (kd_teacher
    would compare the same two distributions again, through s2t), 1 (the paper) otherwise."""
    if cfg.dskd_kd_teacher_weight != "auto":
        return
    student_space_only = shared_share is not None and shared_share >= STUDENT_SPACE_ONLY_SHARE
    cfg.dskd_kd_teacher_weight = 0.0 if student_space_only else 1.0
    if shared_share is not None:
        LOG.info(
            "DSKD: the shared tokens cover %.0f%% of the student's vocabulary: dskd_kd_teacher_weight "
            "auto -> %g", 100 * shared_share, cfg.dskd_kd_teacher_weight,
        )  # fmt: skip


def check_teacher_chat_template(cfg: Any, teacher_tokenizer: Any, unreadable: str | None) -> None:
    """``dskd_teacher_chat_template``: a template that exists and compiles, and tokenizers whose
    bytes can be read (``unreadable``: the one that cannot; the two renderings are aligned by
    byte offsets). ``auto`` resolves to ``student`` where they cannot be."""
    setting = cfg.dskd_teacher_chat_template
    template = resolve_template(setting, teacher_tokenizer)
    if template is None or not cfg.dskd_cross_tokenizer:
        return
    try:
        _compile_jinja_template(template)
    except TemplateError as exc:
        raise ValueError(
            f"{KEY}: the teacher's chat template does not compile ({exc}). Fix it, or set {KEY}: student."
        ) from exc
    if unreadable is None:
        return
    if setting == "auto":
        LOG.info("DSKD: the %s is not a fast one; the teacher reads the student's chat rendering", unreadable)
        cfg.dskd_teacher_chat_template = "student"
        return
    raise ValueError(
        f"{KEY}: {setting!r} needs the bytes of each token to align the teacher's rendering with the "
        f"student's, but the {unreadable} has no fast (Rust) backend. Use a fast tokenizer, or set "
        f"{KEY}: student."
    )


def check_projectors_fit(cfg: Any, teacher_hidden_size: int) -> None:
    """``dskd_projectors``: a safetensors file whose shapes fit this pair, read from its header
    only, so a wrong file stops the run before any weights load."""
    if cfg.dskd_method != "dskd":
        raise ValueError(
            f"dskd_projectors is set, but dskd_method: {cfg.dskd_method} trains no projectors. "
            "Remove dskd_projectors or use dskd_method: dskd."
        )
    file, found = read_projector_shapes(cfg.dskd_projectors, "dskd_projectors")
    student = AutoConfig.from_pretrained(
        getattr(cfg, "base_model_config", None) or cfg.base_model,
        trust_remote_code=bool(getattr(cfg, "trust_remote_code", False)),
    )
    with torch.device("meta"):
        projectors = Projectors(
            student.get_text_config().hidden_size,
            teacher_hidden_size,
            cross_tokenizer=bool(cfg.dskd_cross_tokenizer),
        )
    expected = {k: tuple(v.shape) for k, v in projectors.state_dict().items()}
    check_projector_shapes(file, found, expected, "dskd_projectors")


def check_weights_stay_whole(cfg: Any) -> None:
    """The loss reads the student's LM head (and, for CMA, its input embeddings) as whole
    matrices; ZeRO-3 and FSDP shard them across ranks, so refuse those before anything loads."""
    if deepspeed_stage(getattr(cfg, "deepspeed", None)) == 3:
        raise ValueError(
            "deepspeed: ZeRO-3 is not supported with dskd_teacher: the DSKD loss reads the "
            "student's LM head and embeddings as whole matrices, which ZeRO-3 partitions. Use "
            "ZeRO-2 or ZeRO-1 (example_configs/deepspeed/zero2.json); the teacher stays outside "
            "DeepSpeed either way."
        )
    for key in ("fsdp", "fsdp_config"):
        if getattr(cfg, key, None):
            raise ValueError(
                f"{key}: FSDP is not supported with dskd_teacher: the DSKD loss reads the "
                "student's LM head and embeddings as whole matrices, which FSDP shards. Use "
                "DeepSpeed ZeRO-2 (example_configs/deepspeed/zero2.json) for several GPUs."
            )


def deepspeed_stage(deepspeed: str | dict | None) -> int | None:
    """The ZeRO stage of Axolotl's ``deepspeed:`` value (a JSON path or the loaded dict)."""
    if isinstance(deepspeed, str):
        path = Path(deepspeed)
        if not path.is_file():
            return None  # Axolotl reports a missing file itself
        deepspeed = json.loads(path.read_text())
    if not isinstance(deepspeed, dict):
        return None
    return deepspeed.get("zero_optimization", {}).get("stage")
