"""The plugin's YAML keys (:class:`DSKDArgs`), validated with the rest of the Axolotl config, and
the training arguments that carry them to the trainer.

:class:`DSKDArgs` lists every key. The loss keys (``dskd_kd_rate`` ...) take their default,
bounds and help from the matching field of :class:`~axolotl_dskd.core.loss.DSKDLossConfig`, the one
source of the loss settings (:func:`loss_key`); :data:`DSKDTrainingArgsMixin` repeats every key as
a training argument, so :class:`~axolotl_dskd.integration.trainer.DSKDTrainer` reads ``self.args.dskd_*``
(the layout of Axolotl's own KD plugin). ``docs/configuration.md`` is generated from this class.

Value checks run per key; the checks that need the teacher's config and tokenizer (readable,
long enough, vocabulary, logit form) run once the whole config is known, and still before any
weights load. Every message names the ``dskd_`` key to change.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, model_validator

from axolotl_dskd.core.divergences import Divergence
from axolotl_dskd.core.loss import AccuracyMask, DSKDLossConfig, StudentSpaceTarget, TokenAlignment
from axolotl_dskd.integration.validation import check_teacher_setup

PREFIX = "dskd_"
_LOSS_FIELDS = {f.name: f for f in dataclasses.fields(DSKDLossConfig)}


def loss_key(name: str) -> Any:
    """The YAML key of the loss setting ``name``: its default, bounds and help as
    :class:`~axolotl_dskd.core.loss.DSKDLossConfig` declares them."""
    setting = _LOSS_FIELDS[name]
    return Field(default=setting.default, description=setting.metadata["doc"], **setting.metadata["bounds"])


class DSKDArgs(BaseModel):
    """Input args for Dual-Space Knowledge Distillation (all inactive without ``dskd_teacher``)."""

    # -- the teacher --------------------------------------------------------------------------------
    dskd_teacher: str | None = Field(
        default=None, description="Teacher model: a local folder or a Hugging Face hub id."
    )
    dskd_teacher_tokenizer: str | None = Field(
        default=None, description="Teacher tokenizer, if not stored with the teacher."
    )
    dskd_teacher_load_in_4bit: bool = Field(
        default=False, description="Load the teacher in 4-bit (nf4, double quantization; bitsandbytes)."
    )
    dskd_teacher_load_in_8bit: bool = Field(
        default=False, description="Load the teacher in 8-bit (bitsandbytes)."
    )
    dskd_teacher_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="The teacher's compute dtype; auto follows the run's bf16 / fp16."
    )
    dskd_teacher_adapter: str | None = Field(
        default=None, description="A LoRA adapter merged into the teacher after loading."
    )
    dskd_teacher_trust_remote_code: bool = Field(
        default=False, description="Run Python code that ships with the teacher (read it first)."
    )

    # -- the method and its loss --------------------------------------------------------------------
    dskd_method: Literal["dskd", "vanilla_kd", "uld"] = Field(
        default="dskd",
        description="The paper's baselines, without projectors: vanilla_kd, (1-r) CE + r "
        "KL(teacher || student) on logits, one vocabulary only; uld, (1-r) CE + r ULD (Universal "
        "Logit Distillation: sorted next-token distributions, answer tokens paired in order), any "
        "two vocabularies.",
    )
    dskd_cross_tokenizer: bool | Literal["auto"] = Field(
        default="auto",
        description="Two tokenizations (the teacher reads its own tokens); auto: when the two "
        "vocabularies differ.",
    )
    dskd_kd_rate: float = loss_key("kd_rate")
    dskd_kd_teacher_weight: (
        Annotated[float, Field(**_LOSS_FIELDS["kd_teacher_weight"].metadata["bounds"])] | Literal["auto"]
    ) = Field(
        default="auto",
        description=_LOSS_FIELDS["kd_teacher_weight"].metadata["doc"] + " auto: 0 across tokenizers "
        "where kd_student distils the teacher's own distribution (dskd_student_space_target "
        "resolved to shared_vocabulary) over tokens that cover at least half of the student's "
        "vocabulary, 1 otherwise.",
    )
    dskd_temperature: float = loss_key("temperature")
    dskd_divergence: Divergence = loss_key("divergence")
    dskd_teacher_space_divergence: Divergence = loss_key("teacher_space_divergence")
    dskd_skew_lambda: float = loss_key("skew_lambda")
    dskd_akl_alpha: float = loss_key("akl_alpha")
    dskd_token_alignment: TokenAlignment = loss_key("token_alignment")
    dskd_kd_student_accuracy_mask: AccuracyMask = loss_key("kd_student_accuracy_mask")
    dskd_student_space_target: StudentSpaceTarget | Literal["auto"] = Field(
        default="auto",
        description=_LOSS_FIELDS["student_space_target"].metadata["doc"] + " auto: shared_vocabulary "
        "when a cross-tokenizer run pairs positions exactly and both tokenizers are fast and share "
        "tokens, projected otherwise (the winner of each on real models).",
    )
    dskd_chunk_size: int | None = loss_key("chunk_size")
    dskd_compile: bool = loss_key("compile")

    # -- the projectors -----------------------------------------------------------------------------
    dskd_projector_lr: float = Field(
        default=3e-4,
        gt=0.0,
        allow_inf_nan=False,
        description="Learning rate of the projectors (the paper: 1e-3). Lower moves the projected "
        "teacher, the target of kd_student, more slowly; on two real students 3e-4 gained most on "
        "average (1e-4, 1e-3 and 3e-3 measured).",
    )
    dskd_grad_clip: Literal["joint", "separate"] = Field(
        default="separate",
        description="How max_grad_norm clips: joint, one norm over the student and the projectors "
        "together; separate, the student's parameters on their own norm (as Hugging Face clips a "
        "model) and the projectors on theirs, so the projectors' large early gradients do not "
        "shrink the student's step.",
    )
    dskd_projectors: str | None = Field(
        default=None, description="Projectors to start from (a .safetensors file or a folder)."
    )
    dskd_projector_init: Literal["pinv", "random"] = Field(
        default="pinv",
        description="pinv: t2s and s2t start as the least-squares maps under which one model's LM "
        "head reproduces the other's logits on the tokens both vocabularies share (DSKDv2); "
        "random: nn.Linear's initialization. Ignored when dskd_projectors is set.",
    )

    # -- chat data, the teacher cache, failures -----------------------------------------------------
    dskd_teacher_chat_template: str = Field(
        default="auto",
        description="How the teacher reads chat_template datasets in cross-tokenizer runs. auto: "
        "in the teacher tokenizer's own chat template (the student's rendering if it has none); "
        "a Jinja string, a file, or one of Axolotl's chat_template names: in that template; "
        "student: the student's rendering, re-tokenized.",
    )
    dskd_teacher_cache: str | None = Field(
        default=None,
        description="A folder of the teacher's hidden states, built once by `axolotl dskd-cache-teacher "
        "config.yml`: training then reads them instead of running the teacher.",
    )
    dskd_teacher_cache_dtype: Literal["bfloat16", "float32", "int8"] = Field(
        default="bfloat16",
        description="How the cache stores the states: bfloat16, float32 (exact) or int8 (per-token "
        "scale, each token's 4 largest channels in bfloat16).",
    )
    dskd_on_nonfinite: Literal["stop", "skip"] = Field(
        default="stop",
        description="A NaN/inf loss term stops the run naming the term and step, or skips the micro-batch.",
    )

    @model_validator(mode="after")
    def _check_teacher(self):  # type: ignore[no-untyped-def]
        if self.dskd_teacher is None:
            orphans = sorted(k for k in self.model_fields_set if k.startswith(PREFIX) and k != "dskd_teacher")
            if orphans:
                raise ValueError(
                    f"{', '.join(orphans)} set without dskd_teacher: the plugin would do nothing "
                    "and the run would be plain fine-tuning. Set dskd_teacher to the teacher "
                    "model, or remove the dskd_ keys."
                )
            return self
        if "dskd_teacher_cache_dtype" in self.model_fields_set and not self.dskd_teacher_cache:
            raise ValueError(
                "dskd_teacher_cache_dtype is set without dskd_teacher_cache: it is how a teacher cache "
                "stores its states. Set dskd_teacher_cache to the cache folder, or remove the key."
            )
        if self.dskd_teacher_load_in_4bit and self.dskd_teacher_load_in_8bit:
            raise ValueError(
                "dskd_teacher_load_in_4bit and dskd_teacher_load_in_8bit are both true; "
                "set at most one of them."
            )
        check_teacher_setup(self)
        return self


DSKDTrainingArgsMixin = dataclasses.make_dataclass(
    "DSKDTrainingArgsMixin",
    [
        (name, info.annotation, dataclasses.field(default=info.default, metadata={"help": info.description}))
        for name, info in DSKDArgs.model_fields.items()
    ],
)
DSKDTrainingArgsMixin.__module__ = __name__
DSKDTrainingArgsMixin.__doc__ = "Every ``dskd_*`` key of :class:`DSKDArgs`, as a training argument."


def training_args(cfg: Any) -> dict[str, Any]:
    """The validated ``dskd_*`` values of an Axolotl config, for :data:`DSKDTrainingArgsMixin`."""
    return {name: cfg[name] for name in DSKDArgs.model_fields}


def loss_config(args: Any) -> DSKDLossConfig:
    """The loss settings of a run, read by field name from its ``dskd_*`` training arguments."""
    for key in ("dskd_cross_tokenizer", "dskd_student_space_target", "dskd_kd_teacher_weight"):
        if getattr(args, key) == "auto":
            raise TypeError(
                f"{key}: 'auto' reached the trainer unresolved; Axolotl's config validation "
                "resolves it from the teacher and student tokenizers."
            )
    return DSKDLossConfig(
        **{f.name: getattr(args, PREFIX + f.name) for f in dataclasses.fields(DSKDLossConfig)}
    )
