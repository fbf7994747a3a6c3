"""The plugin's YAML keys, validated with the rest of the Axolotl config.

Value checks run per key; the checks that need the teacher's config and tokenizer (readable,
long enough, vocabulary, logit form) run once the whole config is known, and still before any
weights load. Every message names the ``dskd_`` key to change.
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from axolotl_dskd.divergences import DIVERGENCES

LOG = logging.getLogger(__name__)

Divergence = Literal[DIVERGENCES]  # type: ignore[valid-type]


class DSKDArgs(BaseModel):
    """Input args for Dual-Space Knowledge Distillation (all inactive without ``dskd_teacher``)."""

    dskd_teacher: str | None = Field(
        default=None, description="Teacher model: a local folder or a Hugging Face hub id."
    )
    dskd_teacher_tokenizer: str | None = Field(
        default=None, description="Teacher tokenizer, if not stored with the teacher."
    )
    dskd_teacher_load_in_4bit: bool = False
    dskd_teacher_load_in_8bit: bool = False
    dskd_teacher_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    dskd_teacher_adapter: str | None = Field(
        default=None, description="A LoRA adapter merged into the teacher after loading."
    )
    dskd_teacher_trust_remote_code: bool = False
    dskd_method: Literal["dskd", "vanilla_kd"] = Field(
        default="dskd",
        description="vanilla_kd: the paper's baseline, (1-r) CE + r KL(teacher || student) "
        "on logits, same vocabulary only, no projectors.",
    )
    dskd_kd_rate: float = Field(default=0.5, ge=0.0, le=1.0)
    dskd_temperature: float = Field(default=2.0, gt=0.0, allow_inf_nan=False)
    dskd_divergence: Divergence = "forward_kl"
    dskd_teacher_space_divergence: Divergence = "forward_kl"
    dskd_skew_lambda: float = Field(default=0.1, gt=0.0, lt=1.0)
    dskd_akl_alpha: float = Field(default=0.5, ge=0.0, le=1.0)
    dskd_cross_tokenizer: bool | Literal["auto"] = "auto"
    dskd_projector_lr: float = Field(default=1e-3, gt=0.0, allow_inf_nan=False)
    dskd_projectors: str | None = Field(
        default=None, description="Projectors to start from (a .safetensors file or a folder)."
    )
    dskd_chunk_size: int | None = Field(default=None, ge=1)
    dskd_on_nonfinite: Literal["stop", "skip"] = Field(
        default="stop",
        description="A NaN/inf loss term stops the run naming the term and step, or skips the micro-batch.",
    )
    dskd_compile: bool = False

    @model_validator(mode="after")
    def _check_teacher(self):  # type: ignore[no-untyped-def]
        if self.dskd_teacher is None:
            orphans = sorted(k for k in self.model_fields_set if k.startswith("dskd_") and k != "dskd_teacher")
            if orphans:
                raise ValueError(
                    f"{', '.join(orphans)} set without dskd_teacher: the plugin would do nothing "
                    "and the run would be plain fine-tuning. Set dskd_teacher to the teacher "
                    "model, or remove the dskd_ keys."
                )
            return self
        if self.dskd_teacher_load_in_4bit and self.dskd_teacher_load_in_8bit:
            raise ValueError(
                "dskd_teacher_load_in_4bit and dskd_teacher_load_in_8bit are both true; "
                "set at most one of them."
            )
        from axolotl_dskd.validation import check_teacher_setup

        check_teacher_setup(self)
        return self
