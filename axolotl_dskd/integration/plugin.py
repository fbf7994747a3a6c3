"""The Axolotl plugin: ``plugins: [axolotl_dskd.DSKDPlugin]`` (or the bare ``axolotl_dskd``).

Every hook is a no-op unless ``dskd_teacher`` is set. The teacher is loaded once the trainer
exists (model-loading hooks also fire for merge-lora and inference, which need no teacher).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import time
from typing import Any

import torch
from axolotl.integrations.base import BasePlugin
from torch import Tensor
from transformers import TrainingArguments, set_seed

from axolotl_dskd.core.loss import Projectors
from axolotl_dskd.core.models import causal_lm, lm_head_weight
from axolotl_dskd.core.projector_init import logit_equivalent_projectors
from axolotl_dskd.core.projector_io import load_projectors
from axolotl_dskd.core.teacher import load_teacher_head
from axolotl_dskd.core.teacher_cache import TeacherCache, read_manifest
from axolotl_dskd.core.vocabulary import shared_vocabulary, special_token_differences
from axolotl_dskd.integration import chat_data
from axolotl_dskd.integration.args import PREFIX, DSKDArgs, loss_config, training_args
from axolotl_dskd.integration.collator import collator_class
from axolotl_dskd.integration.configured import (
    configured_teacher,
    teacher_dtype,
    teacher_token_builder,
    teacher_tokenizer,
)
from axolotl_dskd.integration.trainer import DSKDTrainer

LOG = logging.getLogger(__name__)
_PAIRING = {
    "cma": "cross-tokenizer, cross-model attention (CMA)",
    "exact": "cross-tokenizer, exact token alignment",
    "exact+cma": "cross-tokenizer, exact token alignment + cross-model attention (CMA)",
}
# Axolotl shows INFO only for loggers named "axolotl*" whose level allows it; ours would
# inherit the root's WARNING, hiding the teacher/CMA choices it reports once per run.
_PACKAGE_LOG = logging.getLogger("axolotl_dskd")
if _PACKAGE_LOG.level == logging.NOTSET:
    _PACKAGE_LOG.setLevel(os.getenv("AXOLOTL_LOG_LEVEL", "INFO").upper())


def warn_special_token_differences(student_tokenizer: Any, teacher_tokenizer: Any) -> None:
    """Once per run: markers one model reads as control tokens and the other as text."""
    notes = special_token_differences(student_tokenizer, teacher_tokenizer)
    if notes:
        LOG.warning(
            "DSKD: the two tokenizations of a text can differ in meaning, not only in ids: %s. "
            "For example a chat-template sample containing such a marker is one control token "
            "for one model and several characters of text for the other. Distillation still "
            "runs; prefer data without these markers, or templates both models know.",
            "; ".join(notes),
        )


class DSKDPlugin(BasePlugin):
    """Dual-Space Knowledge Distillation from a (4/8-bit) teacher, across tokenizers."""

    def __init__(self) -> None:
        super().__init__()
        self._trainer: Any = None

    def register(self, cfg: Any) -> None:
        """Refuse a misspelled ``dskd_*`` key (Axolotl would drop it and train with the default)."""
        check_known_keys(cfg)

    def load_datasets(self, cfg: Any, preprocess: bool = False) -> Any:
        """A run whose teacher reads chat data in its own template prepares its data here:
        Axolotl's own preparation, with the teacher's columns (:mod:`axolotl_dskd.integration.chat_data`).
        Every other run declines, and Axolotl prepares the data as usual."""
        if chat_data.teacher_template(cfg) is None:
            return None
        return chat_data.load_datasets(cfg)

    def get_input_args(self) -> str:
        return "axolotl_dskd.integration.args.DSKDArgs"

    def get_training_args_mixin(self) -> str:
        return "axolotl_dskd.integration.args.DSKDTrainingArgsMixin"

    def get_training_args(self, cfg: Any) -> dict[str, Any]:
        return training_args(cfg)

    def get_trainer_cls(self, cfg: Any) -> type | None:
        if not cfg.dskd_teacher:
            return None
        if cfg.rl:
            raise ValueError(
                f"dskd_teacher is set in an RL run (rl: {cfg.rl}); DSKD distills during "
                "supervised fine-tuning only. Remove dskd_teacher or rl."
            )
        return DSKDTrainer

    def get_collator_cls_and_kwargs(self, cfg: Any, is_eval: bool = False):  # type: ignore[no-untyped-def]
        """The teacher's tokens of each batch (cross-tokenizer) and its cached states
        (``dskd_teacher_cache``); otherwise Axolotl's own collator."""
        if not cfg.dskd_teacher or cfg.rl or not (cfg.dskd_cross_tokenizer or cfg.dskd_teacher_cache):
            return None
        config = loss_config(cfg)
        if cfg.dskd_method == "uld":  # ULD reads every trained teacher position, as attention does
            config = dataclasses.replace(config, token_alignment="exact+cma")
        kwargs: dict[str, Any] = {"loss_config": config}
        if cfg.dskd_cross_tokenizer:
            kwargs["teacher_tokens"] = teacher_token_builder(cfg)
        if cfg.dskd_teacher_cache:
            kwargs["teacher_cache"] = TeacherCache(cfg.dskd_teacher_cache)
        return collator_class(cfg, is_eval), kwargs

    def pre_model_load(self, cfg: Any) -> None:
        """Seed before the student (and its LoRA) is built: Axolotl seeds only when the trainer
        exists, so two runs with one ``seed`` would start from different adapter weights. Also
        without a teacher, so that an SFT baseline that lists the plugin starts where its
        distilled twin does."""
        set_seed(cfg.seed if cfg.seed is not None else TrainingArguments.seed)

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        if not cfg.dskd_teacher or not isinstance(trainer, DSKDTrainer):
            return
        cross_tokenizer = trainer.loss_config.cross_tokenizer
        LOG.info(
            "DSKD: %s (teacher %s)",
            _PAIRING[trainer.loss_config.token_alignment] if cross_tokenizer else "same vocabulary",
            cfg.dskd_teacher,
        )
        t_tokenizer = teacher_tokenizer(cfg)
        if report_chat_rendering(cfg, trainer, t_tokenizer):
            warn_special_token_differences(trainer.processing_class, t_tokenizer)
        dskd = cfg.dskd_method == "dskd"
        pinv = dskd and not cfg.dskd_projectors and cfg.dskd_projector_init == "pinv"
        own_target = dskd and cross_tokenizer and cfg.dskd_student_space_target == "shared_vocabulary"
        vocabulary = shared_vocabulary(trainer.processing_class, t_tokenizer) if pinv or own_target else None
        teacher = self._load_teacher(cfg, trainer.args.device, cross_tokenizer)
        projectors = None
        if dskd:
            projectors = Projectors(
                causal_lm(trainer.model).config.get_text_config().hidden_size,
                teacher.config.get_text_config().hidden_size,
                cross_tokenizer=cross_tokenizer,
            )
            if cfg.dskd_projectors:
                load_projectors(projectors, cfg.dskd_projectors, key="dskd_projectors")
                LOG.info("DSKD projectors warm-started from %s", cfg.dskd_projectors)
            elif pinv:
                initialize_by_logit_equivalence(projectors, trainer.model, teacher, vocabulary)
        if own_target:
            LOG.info(
                "DSKD: kd_student distils the teacher's own distribution over the %d tokens both "
                "vocabularies spell alike at exact pairs%s", len(vocabulary[0]),
                "" if trainer.loss_config.reads_t2s else "; no term reads t2s: no t2s_ce, t2s not trained",
            )  # fmt: skip
        if dskd and not cfg.dskd_kd_teacher_weight:
            LOG.info(
                "DSKD: the teacher's space is left out (dskd_kd_teacher_weight: 0): no kd_teacher, s2t unused"
            )
        trainer.attach_teacher(teacher, projectors, shared_vocabulary=vocabulary if own_target else None)
        self._trainer = trainer

    @staticmethod
    def _load_teacher(cfg: Any, device: torch.device, cross_tokenizer: bool) -> torch.nn.Module:
        """The teacher as configured, or only its LM head and embeddings (``dskd_teacher_cache``)."""
        if cfg.dskd_teacher_cache:
            manifest = read_manifest(cfg.dskd_teacher_cache)
            LOG.info(
                "DSKD: the teacher's hidden states come from the cache in %s (%d samples, %s); its "
                "transformer is not loaded", cfg.dskd_teacher_cache, manifest["samples"],
                manifest["identity"]["storage_dtype"],
            )  # fmt: skip
            if manifest["teacher"] != str(cfg.dskd_teacher):
                LOG.info(
                    "DSKD: the cache was built from the teacher in %s, which has this teacher's config "
                    "and tokenizer; the LM head is read from %s", manifest["teacher"], cfg.dskd_teacher,
                )  # fmt: skip
            return load_teacher_head(
                cfg.dskd_teacher,
                device=device,
                dtype=teacher_dtype(cfg),
                with_embeddings=cross_tokenizer,
                trust_remote_code=cfg.dskd_teacher_trust_remote_code,
            )
        return configured_teacher(cfg, device)

    def post_train(self, cfg: Any, model: Any) -> None:
        if self._trainer is not None:
            self._trainer.save_projectors(cfg.output_dir)


def check_known_keys(cfg: Any) -> None:
    """Every ``dskd_*`` key of the raw config is one of the plugin's."""
    known = [name.removeprefix(PREFIX) for name in DSKDArgs.model_fields]
    for key in sorted(
        str(k) for k in cfg if str(k).startswith(PREFIX) and str(k)[len(PREFIX) :] not in known
    ):
        close = difflib.get_close_matches(key.removeprefix(PREFIX), known, n=1)
        hint = f"did you mean {PREFIX}{close[0]}?" if close else "docs/configuration.md lists its keys"
        raise ValueError(
            f"{key}: not a key of the axolotl_dskd plugin ({hint}) Axolotl would ignore it and train "
            "with the default. Fix the spelling or remove the key."
        )


def report_chat_rendering(cfg: Any, trainer: Any, teacher_tokenizer: Any) -> bool:
    """Say once how the teacher reads chat data; whether it reads the student's rendering in a
    cross-tokenizer run (so that the student's markers reach it as text)."""
    cross_tokenizer = trainer.loss_config.cross_tokenizer
    if cross_tokenizer and chat_data.teacher_template(cfg) is not None:
        chat_data.require_teacher_columns(cfg, trainer.train_dataset)
        student_rendered = False
        for split, dataset in (("training", trainer.train_dataset), ("evaluation", trainer.eval_dataset)):
            counts = chat_data.fallback_count(dataset)
            if counts is None:  # no chat data: every sample is the student's rendering
                student_rendered |= dataset is not None
                continue
            LOG.info(
                "DSKD: the teacher reads chat data in its own chat template; %d of %d %s samples "
                "fall back to the student's rendering (a template that cannot render them, or "
                "another dataset type)", *counts, split,
            )  # fmt: skip
            student_rendered |= counts[0] > 0
        return student_rendered
    chat = [d for d in cfg.datasets or [] if str(d.get("type") or "").startswith("chat_template")]
    if not chat:
        return cross_tokenizer
    if cross_tokenizer:
        LOG.info(
            "DSKD: the teacher reads chat data in the student's chat template (%s: %s%s)",
            chat_data.KEY, cfg.dskd_teacher_chat_template,
            ", the teacher's tokenizer has no chat template" if cfg.dskd_teacher_chat_template == "auto" else "",
        )  # fmt: skip
        return True
    teacher_template = chat_data.resolve_template(cfg.dskd_teacher_chat_template, teacher_tokenizer)
    student_template = getattr(trainer.processing_class, "chat_template", None)
    if teacher_template is not None and teacher_template != student_template:
        LOG.info(
            "DSKD: teacher and student share a vocabulary but not a chat template; with one "
            "vocabulary positions pair one to one, so the teacher reads the student's rendering"
        )
    return False


def initialize_by_logit_equivalence(
    projectors: Projectors, student: Any, teacher: Any, vocabulary: tuple[Tensor, Tensor]
) -> None:
    """``dskd_projector_init: pinv``: t2s and s2t as the least-squares maps between the two LM
    heads over the tokens both vocabularies spell alike (``vocabulary``, student and teacher ids;
    the LM heads stay unquantized in a 4-bit teacher). Cross-model attention feeds t2s a rescaled
    teacher state plus a target embedding; it starts from the same map there, and training adapts it."""
    started = time.time()
    student_ids, teacher_ids = vocabulary
    if len(student_ids) == 0:
        LOG.warning("DSKD: the two vocabularies spell no token alike; projectors keep a random start")
        return
    residuals = logit_equivalent_projectors(
        projectors, lm_head_weight(student), lm_head_weight(teacher), student_ids, teacher_ids
    )
    LOG.info(
        "DSKD projectors initialized by logit equivalence over %d shared tokens in %.1fs "
        "(relative residual: t2s %.3f, s2t %.3f)",
        len(student_ids), time.time() - started,
        residuals["t2s_relative_residual"], residuals["s2t_relative_residual"],
    )  # fmt: skip
