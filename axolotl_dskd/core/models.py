"""What DSKD needs from a causal LM: final hidden states, LM-head and embedding weights.

The loss computes logits itself, from the tensor the LM head consumes, so a model whose logits
are not ``lm_head(h)`` has to be made to fit (a constant logit scale folds into ``h``) or be
refused by name (soft-capping is not linear).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel


def causal_lm(model: nn.Module) -> PreTrainedModel:
    """The ``*ForCausalLM`` under PEFT / DDP / compile wrappers."""
    while True:
        if hasattr(model, "get_base_model"):  # peft.PeftModel
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


def logit_scale(config: PretrainedConfig, role: str) -> float:
    """The constant ``c`` with ``logits = lm_head(c * h)``; raises for non-linear logits."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    if softcap:
        raise ValueError(
            f"the {role} ({text_config.model_type}) soft-caps its logits "
            f"(final_logit_softcapping={softcap}); DSKD's divergences assume logits = lm_head(h). "
            f"Use a model without logit soft-capping as the {role}."
        )
    scale = 1.0
    if getattr(text_config, "logit_scale", None):  # Cohere: logits * logit_scale
        scale *= float(text_config.logit_scale)
    if getattr(text_config, "logits_scaling", None):  # Granite: logits / logits_scaling
        scale /= float(text_config.logits_scaling)
    return scale


def lm_head_weight(model: nn.Module) -> Tensor:
    return causal_lm(model).get_output_embeddings().weight


def input_embedding_weight(model: nn.Module) -> Tensor:
    return causal_lm(model).get_input_embeddings().weight


def final_hidden_states(model: nn.Module, **inputs: Any) -> Tensor:
    """The hidden states the LM head consumes, scaled so that ``logits = h @ W.T``.

    The model is called as usual (through any DDP/PEFT wrapper, so their hooks run) with
    ``logits_to_keep=1``: no full-vocabulary logits are materialized; the decoder's output is
    captured with a forward hook.
    """
    lm = causal_lm(model)
    captured: list[Tensor] = []

    def capture(_module: nn.Module, _args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = lm.get_decoder().register_forward_hook(capture)
    try:
        model(**inputs, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    scale = logit_scale(lm.config, "model")
    return captured[-1] * scale if scale != 1.0 else captured[-1]


def teacher_forward_inputs(
    batch: Mapping[str, Tensor], *, cross_tokenizer: bool, packed: bool
) -> dict[str, Tensor]:
    """What the teacher's forward reads of a collated batch: its own tokens (``teacher_input_ids``,
    ``teacher_attention_mask``, ``teacher_position_ids``, ``[B, L_t]``) across tokenizers, the
    student's (``[B, L]``) with one vocabulary. Packed rows separate their samples by position ids
    that restart, which an attention mask would override: then it is left out."""
    names = ("input_ids", "attention_mask", "position_ids")
    prefix = "teacher_" if cross_tokenizer else ""
    forward = {name: batch[prefix + name] for name in names if prefix + name in batch}
    if packed:
        forward.pop("attention_mask", None)
    return forward


def teacher_hidden_states(teacher: nn.Module, **inputs: Any) -> Tensor:
    """The frozen teacher's final hidden states, without autograd."""
    with torch.no_grad():
        return final_hidden_states(teacher, **inputs)
