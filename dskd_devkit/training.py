"""Random-weight ``Qwen2`` / ``Llama`` models small enough to train on a laptop CPU, and a plain
torch loop that trains them (the teacher learns the task; student bases learn to count)."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from axolotl_dskd.loss import IGNORE_INDEX
from dskd_devkit.task import PROMPT_FORMAT, encode_row

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast


def tiny_model(
    family: Literal["llama", "qwen2"],
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_layers: int = 2,
    max_position_embeddings: int = 512,
    seed: int = 0,
    *,
    intermediate_size: int | None = None,
    num_heads: int = 4,
    num_kv_heads: int = 2,
) -> PreTrainedModel:
    """A random-weight causal LM for ``tokenizer``, with untied LM head (same ``seed``, same
    weights)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size or 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": max_position_embeddings,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }
    torch.manual_seed(seed)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    return Qwen2ForCausalLM(Qwen2Config(**common))


def save_pair(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, directory: Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def pad_batch(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int):  # -> dict of tensors
    import torch

    width = max(len(ids) for ids, _ in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (x, y) in enumerate(pairs):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pad_id_of(tokenizer: PreTrainedTokenizerFast) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def train_causal_lm(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    rows: Sequence[dict[str, str]],
    *,
    steps: int,
    fmt: str = PROMPT_FORMAT,
    **kw: Any,
) -> list[float]:
    """Full fine-tuning on task rows, on the response tokens only (see :func:`fit`)."""
    return fit(model, [encode_row(tokenizer, r, fmt) for r in rows], pad_id_of(tokenizer), steps=steps, **kw)


def pretrain_lm(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, texts: Sequence[str], *, steps: int, **kw: Any
) -> list[float]:
    """Plain language modelling on ``texts`` (every token trained, EOS appended)."""
    examples = []
    for text in texts:
        ids = list(tokenizer(text)["input_ids"]) + [tokenizer.eos_token_id]
        examples.append((ids, ids))
    return fit(model, examples, pad_id_of(tokenizer), steps=steps, **kw)


def fit(
    model: PreTrainedModel,
    examples: Sequence[tuple[list[int], list[int]]],
    pad_id: int,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 0.01,
    warmup: int = 50,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
    log_every: int = 100,
) -> list[float]:
    """A plain torch training loop over ``(input_ids, labels)`` examples: AdamW, linear warmup,
    cosine decay, gradient clipping; examples are shuffled each epoch. Returns every step's loss."""
    import torch

    encoded, pad = list(examples), pad_id
    torch.manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    model.train()
    order: list[int] = []
    losses: list[float] = []
    start = time.time()
    for step in range(steps):
        if len(order) < batch_size:
            more = list(range(len(encoded)))
            rng.shuffle(more)
            order += more
        batch = pad_batch([encoded[i] for i in order[:batch_size]], pad)
        del order[:batch_size]
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log and ((step + 1) % log_every == 0 or step + 1 == steps):
            recent = losses[-log_every:]
            log(
                f"  step {step + 1}/{steps}  loss {sum(recent) / len(recent):.4f}  "
                f"({time.time() - start:.0f}s)"
            )
    model.eval()
    return losses
