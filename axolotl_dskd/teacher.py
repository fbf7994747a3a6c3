"""Inspecting and loading the frozen teacher (transformers, PEFT and bitsandbytes only).

:func:`inspect_teacher` reads only configs and tokenizers, so every mistake it can find is
reported before a single weight is loaded; :func:`load_teacher` then loads the weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from axolotl_dskd.models import logit_scale

LOG = logging.getLogger(__name__)


class TeacherConfigError(ValueError):
    """A teacher setting that cannot work; the message names the YAML key."""


@dataclass(frozen=True)
class TeacherInfo:
    config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase
    hidden_size: int
    max_length: int | None
    same_vocabulary: bool


def same_vocabulary(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """Equal token-to-id maps: equal sizes with different tokens is a different vocabulary."""
    return a.get_vocab() == b.get_vocab()


def context_length(config: PretrainedConfig) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _refuse_custom_code(exc: Exception, source: str, trust_remote_code: bool) -> None:
    """transformers refuses a model whose config or tokenizer needs its own Python code (an
    ``auto_map`` to a module in the repository) unless trusted; say which YAML key trusts it."""
    if not trust_remote_code and "trust_remote_code" in str(exc):
        raise TeacherConfigError(
            f"dskd_teacher_trust_remote_code: {source!r} needs its own Python code to load (its "
            "config's auto_map names a module in the repository), which the plugin does not run "
            "by default. Read that code, then set dskd_teacher_trust_remote_code: true if you "
            "trust it, or choose a teacher that transformers supports natively."
        ) from exc


def inspect_teacher(
    teacher: str,
    *,
    tokenizer: str | None,
    student_tokenizer: PreTrainedTokenizerBase,
    trust_remote_code: bool = False,
) -> TeacherInfo:
    """Read the teacher's config and tokenizer; raise naming the key if either is unusable."""
    try:
        config = AutoConfig.from_pretrained(teacher, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        _refuse_custom_code(exc, teacher, trust_remote_code)
        raise TeacherConfigError(
            f"dskd_teacher: cannot read a model config from {teacher!r} ({exc}). "
            "Set dskd_teacher to a local model folder or a Hugging Face hub id you can access."
        ) from exc
    text_config = config.get_text_config()
    try:
        logit_scale(text_config, "teacher")
    except ValueError as exc:
        raise TeacherConfigError(f"dskd_teacher: {exc}") from exc
    source = tokenizer or teacher
    try:
        teacher_tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        _refuse_custom_code(exc, source, trust_remote_code)
        key = "dskd_teacher_tokenizer" if tokenizer else "dskd_teacher"
        raise TeacherConfigError(
            f"{key}: cannot load a tokenizer from {source!r} ({exc}). "
            "Set dskd_teacher_tokenizer to the teacher's tokenizer folder or hub id."
        ) from exc
    return TeacherInfo(
        config=config,
        tokenizer=teacher_tokenizer,
        hidden_size=text_config.hidden_size,
        max_length=context_length(text_config),
        same_vocabulary=same_vocabulary(student_tokenizer, teacher_tokenizer),
    )


def require_bitsandbytes(key: str) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise TeacherConfigError(
            f"{key}: true needs bitsandbytes, which cannot be imported ({exc}). "
            f"Run `pip install bitsandbytes` or set {key}: false."
        ) from exc


def quantization_config(
    load_in_4bit: bool, load_in_8bit: bool, compute_dtype: torch.dtype
) -> BitsAndBytesConfig | None:
    """nf4 with double quantization and the training precision as compute dtype, or int8."""
    if load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_teacher(
    teacher: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    adapter: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """The teacher, frozen, in eval mode, on ``device``, quantized as asked."""
    quantization = quantization_config(load_in_4bit, load_in_8bit, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        teacher,
        dtype=dtype,
        quantization_config=quantization,
        device_map={"": device} if quantization is not None else None,
        trust_remote_code=trust_remote_code,
    )
    if quantization is None:
        model.to(device)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.eval()
    model.requires_grad_(False)
    LOG.info(
        "DSKD teacher %s loaded on %s (%s%s)",
        teacher,
        device,
        dtype,
        ", 4-bit nf4" if load_in_4bit else ", 8-bit" if load_in_8bit else "",
    )
    return model
