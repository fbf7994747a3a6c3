"""Helpers shared by the tests of the core's loss (``test_loss.py``, ``test_divergences.py``):
one micro-batch as ``dskd_loss`` takes it, and a tensor read as a float."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from axolotl_dskd.core.loss import DSKDLossConfig, Projectors


@dataclass
class Case:
    """One micro-batch: the projectors and the keyword tensors ``dskd_loss`` takes."""

    proj: Projectors
    inputs: dict[str, Tensor | None]
    cross_tokenizer: bool
    token_alignment: Tensor | None = None
    """Cross-tokenizer cases: each student token's exact partner (the teacher position of its
    last piece), ``-1`` on padding."""

    def config(self, **kw) -> DSKDLossConfig:
        """The loss settings; a cross-tokenizer case pairs its tokens by cross-model attention
        unless ``token_alignment`` says otherwise (the reference's sections 3 and 3b)."""
        if self.cross_tokenizer:
            kw.setdefault("token_alignment", "cma")
        return DSKDLossConfig(cross_tokenizer=self.cross_tokenizer, **kw)

    def trainable(self) -> dict[str, Tensor]:
        """What the student's optimizer sees: student hidden (stands for the student's
        parameters), the LM head when it is trained, and every projector parameter."""
        out = {"student_hidden": self.inputs["student_hidden"]}
        if self.inputs["student_lm_head"].requires_grad:
            out["student_lm_head"] = self.inputs["student_lm_head"]
        for name, p in self.proj.named_parameters():
            out[f"proj.{name}"] = p
        return out

    def n_trained(self) -> int:
        return int((self.inputs["student_labels"][:, 1:] != -100).sum())


def as_float(x) -> float:
    return float(torch.as_tensor(x).detach())
