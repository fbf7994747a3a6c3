"""The Axolotl trainer that distills: student and teacher forwards, the DSKD loss, projectors.

Every setting comes from the training arguments (``self.args.dskd_*``, see
:mod:`axolotl_dskd.integration.args`); the plugin hands over only what it loads, the teacher and the
projectors. The projectors live beside the model, not in it, so the student's saved weights
stay a plain model; they get their own optimizer group (``dskd_projector_lr``, same schedule)
and are saved into every checkpoint and restored on resume. The trainer zeroes only the
model's gradients after each optimizer step, so a callback zeroes the projectors' too.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import asdict
from typing import Any

import torch
from axolotl.core.trainers.base import AxolotlTrainer
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback
from typing_extensions import override

from axolotl_dskd.core.loss import (
    IGNORE_INDEX,
    METRIC_NAMES,
    RATIO_METRICS,
    DSKDLossOutput,
    Projectors,
    dskd_loss,
    uld_loss,
    vanilla_kd_loss,
)
from axolotl_dskd.core.models import (
    final_hidden_states,
    input_embedding_weight,
    lm_head_weight,
    teacher_forward_inputs,
    teacher_hidden_states,
)
from axolotl_dskd.core.projector_io import META_NAME, load_projectors, projectors_file, save_projectors
from axolotl_dskd.core.teacher import TeacherHead
from axolotl_dskd.integration.args import loss_config
from axolotl_dskd.integration.chat_data import TEACHER_COLUMNS

LOG = logging.getLogger(__name__)

TEACHER_KEYS = ("teacher_input_ids", "teacher_attention_mask", "teacher_labels", "teacher_position_ids")
ALIGNMENT_KEYS = ("student_segment_ids", "teacher_segment_ids", "token_alignment")
"""Batch keys of the teacher-token builder that only the loss reads."""


@contextlib.contextmanager
def explain_out_of_memory():
    """Re-raise an out-of-memory error in distillation with the settings that lower memory."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        raise torch.OutOfMemoryError(
            f"{exc}\nDSKD ran out of memory in the student/teacher forward or the loss. Lower "
            "dskd_chunk_size (tokens per vocabulary chunk), micro_batch_size or sequence_len, "
            "or load the teacher with dskd_teacher_load_in_4bit: true."
        ) from exc


class ZeroProjectorGrads(TrainerCallback):
    """Clear the projectors' gradients after every optimizer step (skipped steps included)."""

    def __init__(self, projectors: Projectors) -> None:
        self.projectors = projectors

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.projectors.zero_grad(set_to_none=True)


class _StudentPerplexityLog(Trainer):
    """Axolotl logs ``ppl`` as ``exp(loss)``; under DSKD the loss mixes in the distillation
    terms, so the perplexity worth reading is the student's own, ``exp(dskd/ce)``. This class
    sits between AxolotlTrainer and Trainer in the MRO: there the stored ``dskd/*`` metrics
    are already in ``logs`` and the callbacks have not seen them yet."""

    @override
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        for prefix in ("", "eval_"):
            ce = logs.get(f"{prefix}dskd/ce")
            if ce is not None and f"{prefix}ppl" in logs:
                logs[f"{prefix}ppl"] = math.exp(ce) if ce < 700 else float("inf")
        super().log(logs, start_time)


class DSKDTrainer(AxolotlTrainer, _StudentPerplexityLog):
    """AxolotlTrainer whose loss is DSKD against a frozen teacher (see ``attach_teacher``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not hasattr(self.args, "dskd_kd_rate"):
            raise TypeError(
                f"DSKDTrainer needs training arguments with the dskd_* fields, but got "
                f"{type(self.args).__name__} without them: Axolotl adds a plugin's fields when "
                "axolotl.core.training_args is first imported, so register the plugin before that."
            )
        self.loss_config = loss_config(self.args)
        self.teacher: nn.Module | None = None
        self.projectors: Projectors | None = None
        self.shared_vocabulary: tuple[Tensor, Tensor] | None = None
        self.nonfinite_skipped = 0
        self._last_projector_save: tuple[str, int] | None = None
        # the loss is a sum over tokens divided by the trainer's global token count
        self.model_accepts_loss_kwargs = True

    @override
    def _set_signature_columns_if_needed(self) -> None:
        """Keep the teacher's prepared columns (chat data in the teacher's own template) through
        the Trainer's removal of columns the model does not take: the collator reads them."""
        super()._set_signature_columns_if_needed()
        missing = [name for name in TEACHER_COLUMNS if name not in self._signature_columns]
        self._signature_columns = [*self._signature_columns, *missing]

    def attach_teacher(
        self,
        teacher: nn.Module,
        projectors: Projectors | None,
        shared_vocabulary: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        """Distill from ``teacher`` from now on; called once, before training starts.

        The baselines ``dskd_method: vanilla_kd`` and ``uld`` take no projectors.
        ``shared_vocabulary``: the student's and the teacher's ids of the tokens both spell alike,
        for ``dskd_student_space_target: shared_vocabulary`` across tokenizers.
        """
        self.teacher = teacher
        self.shared_vocabulary = (
            None
            if shared_vocabulary is None
            else tuple(ids.to(self.args.device) for ids in shared_vocabulary)
        )
        self.projectors = None if projectors is None else projectors.to(self.args.device)
        if self.projectors is not None:
            if self._data_parallel():  # one set of projectors: rank 0's, as DDP does for the model
                for tensor in self.projectors.state_dict().values():
                    torch.distributed.broadcast(tensor, src=0)
            self.add_callback(ZeroProjectorGrads(self.projectors))

    @override
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        if self.projectors is None:
            return optimizer
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if any(id(p) in known for p in self.projectors.parameters()):
            return optimizer  # asked again: HF returns the optimizer it already made
        decayed = set(self.get_decay_parameter_names(self.projectors))
        for decay in (True, False):  # biases are not decayed, as in HF's groups of the model
            params = [p for name, p in self.projectors.named_parameters() if (name in decayed) == decay]
            weight_decay = self.args.weight_decay if decay else 0.0
            optimizer.add_param_group(
                {"params": params, "lr": self.args.dskd_projector_lr, "weight_decay": weight_decay}
            )
        return optimizer

    def _trained_parameters(self, model: nn.Module) -> list[Tensor]:
        """The model's parameters and the projectors': one global gradient norm, as one model."""
        projectors = [] if self.projectors is None else list(self.projectors.parameters())
        return [*model.parameters(), *projectors]

    def _data_parallel(self) -> bool:
        """Several processes whose gradients this trainer must synchronize itself (DeepSpeed owns
        the projectors with the optimizer and reduces their gradients)."""
        return self.accelerator.num_processes > 1 and not self.is_deepspeed_enabled

    def _sync_projector_gradients(self) -> None:
        """Average the projectors' gradients over the processes, as DDP does for the model it
        wraps: the projectors live beside it. Runs once per optimizer step, before clipping."""
        if self.projectors is None or not self._data_parallel():
            return
        params = list(self.projectors.parameters())
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
        )
        torch.distributed.all_reduce(flat)
        flat /= self.accelerator.num_processes
        for p, grad in zip(params, flat.split([p.numel() for p in params])):
            p.grad = grad.view_as(p).clone()

    @override
    def _clip_grad_norm(self, model: nn.Module) -> Tensor:
        self._sync_projector_gradients()
        if self.args.dskd_grad_clip == "separate" and self.projectors is not None:
            # the projectors on their own norm; the returned (logged) norm is the student's
            torch.nn.utils.clip_grad_norm_(list(self.projectors.parameters()), self.args.max_grad_norm)
            return self.accelerator.clip_grad_norm_(list(model.parameters()), self.args.max_grad_norm)
        return self.accelerator.clip_grad_norm_(self._trained_parameters(model), self.args.max_grad_norm)

    @override
    def _get_grad_norm(self, model: nn.Module, grad_norm: Tensor | float | None = None) -> float:
        if grad_norm is None:  # no clipping (max_grad_norm 0): still one step's synchronization
            self._sync_projector_gradients()
            grad_norm = self.accelerator.clip_grad_norm_(self._trained_parameters(model), float("inf"))
        return super()._get_grad_norm(model, grad_norm)

    @override
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ):
        if self.teacher is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        teacher_inputs = {k: inputs.pop(k) for k in TEACHER_KEYS if k in inputs}
        alignment = {k: inputs.pop(k) for k in ALIGNMENT_KEYS if k in inputs}
        cached = inputs.pop("teacher_hidden", None)
        labels = inputs.pop("labels")
        inputs.pop("num_items_in_batch", None)

        with explain_out_of_memory():
            teacher_hidden = cached if cached is not None else self._teacher_hidden(inputs, teacher_inputs)
            out = self._distill(
                model, inputs, labels, teacher_hidden, teacher_inputs, alignment, num_items_in_batch
            )
        loss = out.loss
        if not self._finite_everywhere(loss):
            loss = self._non_finite(out, model)
        else:
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            self._store_dskd_metrics(out.metrics, num_items_in_batch, labels)
        return (loss, {"loss": loss}) if return_outputs else loss

    def _distill(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor],
        labels: Tensor,
        teacher_hidden: Tensor,
        teacher_inputs: dict[str, Tensor],
        alignment: dict[str, Tensor],
        num_items_in_batch: Tensor | int | None,
    ) -> DSKDLossOutput:
        student_hidden = final_hidden_states(model, **inputs)
        common = {
            "student_hidden": student_hidden,
            "student_lm_head": lm_head_weight(model),
            "student_labels": labels,
            "teacher_hidden": teacher_hidden,
            "teacher_lm_head": lm_head_weight(self.teacher),
            "config": self.loss_config,
            "num_items": num_items_in_batch,
        }
        if self.args.dskd_method == "vanilla_kd":
            return vanilla_kd_loss(**common)
        if self.args.dskd_method == "uld":
            segments = {k: v for k, v in alignment.items() if k != "token_alignment"}
            teacher_labels = teacher_inputs["teacher_labels"] if self.loss_config.cross_tokenizer else labels
            return uld_loss(**common, teacher_labels=teacher_labels, **segments)
        if self.loss_config.cross_tokenizer:
            return dskd_loss(
                self.projectors,
                **common,
                teacher_labels=teacher_inputs["teacher_labels"],
                student_input_ids=inputs["input_ids"],
                teacher_input_ids=teacher_inputs["teacher_input_ids"],
                student_embeddings=input_embedding_weight(model),
                teacher_embeddings=input_embedding_weight(self.teacher),
                shared_vocabulary=self.shared_vocabulary,
                **alignment,
            )
        return dskd_loss(self.projectors, **common, teacher_labels=labels)

    def _finite_everywhere(self, loss: Tensor) -> bool:
        """Whether the loss is finite on every process: they skip (or stop) together, so that
        none waits in a gradient all-reduce that another never joins."""
        finite = torch.isfinite(loss.detach()).to(torch.int32)
        if self._data_parallel():
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        return bool(finite)

    def _non_finite(self, out: DSKDLossOutput, model: nn.Module) -> Tensor:
        """Stop, naming the term and the step, or skip this micro-batch (``dskd_on_nonfinite``)."""
        terms = ("ce", "kd_student", "t2s_ce", "kd_teacher")
        bad = [name for name in terms if not math.isfinite(float(out.metrics[name]))]
        if not bad:  # the total only, or this micro-batch is finite and another process's is not
            bad = ["the total" if not torch.isfinite(out.loss) else "a term on another process"]
        where = f"{', '.join(bad)} at step {self.state.global_step + 1}"
        if self.args.dskd_on_nonfinite == "stop":
            raise FloatingPointError(
                f"DSKD: non-finite {where}. Common causes: fp16 overflow in the models, a diverging "
                "learning rate, a broken teacher. Set dskd_on_nonfinite: skip to skip such steps."
            )
        self.nonfinite_skipped += 1
        LOG.warning("DSKD: non-finite %s; micro-batch skipped (%d so far)", where, self.nonfinite_skipped)
        self.store_metrics({"dskd/nonfinite_skipped": (self.nonfinite_skipped, "max")})
        # A zero built from the parameters, not from the loss (0 * nan is nan): every trainable
        # parameter gets an exact zero gradient, so data-parallel reducers see every gradient.
        trained = [p for p in self._trained_parameters(model) if p.requires_grad]
        return 0.0 * sum(p.float().sum() for p in trained)

    def _teacher_hidden(self, inputs: dict[str, Tensor], teacher_inputs: dict[str, Tensor]) -> Tensor:
        """The teacher's forward; a teacher whose states are cached has only its head here."""
        if isinstance(self.teacher, TeacherHead):
            raise TypeError(
                "dskd_teacher_cache is set, but this batch has no cached teacher states: it did not "
                "come through the DSKD collator (a custom data collator or trainer?)"
            )
        forward = teacher_forward_inputs(
            {**inputs, **teacher_inputs},
            cross_tokenizer=self.loss_config.cross_tokenizer,
            packed=self._packed(),
        )
        return teacher_hidden_states(self.teacher, **forward)

    def _packed(self) -> bool:
        if self.model.training:
            return bool(self.args.sample_packing)
        return bool(getattr(self.args, "eval_sample_packing", False))

    def _store_dskd_metrics(
        self, metrics: dict[str, Tensor], num_items: Tensor | int | None, labels: Tensor
    ) -> None:
        # metrics are divided by the global token count: rescale to a per-micro-batch mean
        local = (labels[:, 1:] != IGNORE_INDEX).sum().clamp_min(1)
        scale = 1.0 if num_items is None else float(num_items) / float(local)
        prefix = "dskd/" if self.model.training else "eval_dskd/"
        values = {
            f"{prefix}{name}": float(metrics[name]) * (1.0 if name in RATIO_METRICS else scale)
            for name in METRIC_NAMES
        }
        if self.nonfinite_skipped:
            values[f"{prefix}nonfinite_skipped"] = (self.nonfinite_skipped, "max")
        self.store_metrics(values, train_eval="train" if self.model.training else "eval")

    def projector_metadata(self) -> dict[str, Any]:
        return {"loss_config": asdict(self.loss_config), "global_step": self.state.global_step}

    def save_projectors(self, output_dir: str | os.PathLike) -> None:
        """Write the projectors into ``output_dir``, once per folder and step (Axolotl's
        ``post_train`` and ``save_model`` may both ask)."""
        saved = (os.path.abspath(output_dir), self.state.global_step)
        if self.projectors is None or not self.args.should_save or saved == self._last_projector_save:
            return
        path = save_projectors(self.projectors, output_dir, self.projector_metadata())
        self._last_projector_save = saved
        LOG.info("DSKD projectors saved to %s", path)

    @override
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        self.save_projectors(output_dir or self.args.output_dir)

    @override
    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Restore the projectors with the optimizer: every resume path calls this (DeepSpeed's
        resume never calls ``_load_from_checkpoint``)."""
        if checkpoint is not None and self.projectors is not None:
            weights = projectors_file(checkpoint)
            if not weights.is_file():
                written = (weights.parent / META_NAME).is_file()
                raise FileNotFoundError(
                    f"resume_from_checkpoint: {checkpoint} has no DSKD projectors ({weights.name}); "
                    + (
                        f"its {META_NAME} shows a DSKD run wrote it, and the weights file was removed "
                        f"since. Put {weights.name} back, or resume from another checkpoint-N folder."
                        if written
                        else "it was not written by a DSKD run. Resume from one of this run's "
                        "checkpoint-N folders, or start afresh (to keep trained projectors, set "
                        "dskd_projectors to their file)."
                    )
                )
            load_projectors(self.projectors, checkpoint, key="resume_from_checkpoint")
            LOG.info("DSKD projectors restored from %s", checkpoint)
        super()._load_optimizer_and_scheduler(checkpoint)
