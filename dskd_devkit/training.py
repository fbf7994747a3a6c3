"""Random-weight ``Qwen2`` / ``Llama`` models small enough to train on a laptop CPU, and a plain
torch loop that trains them (the teacher learns the task; student bases learn to count)."""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from axolotl_dskd.core.loss import IGNORE_INDEX
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
    used_vocab: bool = False,
    **kw: Any,
) -> list[float]:
    """Full fine-tuning on task rows, on the response tokens only (see :func:`fit`; ``used_vocab``:
    :func:`fit_used_vocab`, for large vocabularies)."""
    train = fit_used_vocab if used_vocab else fit
    return train(
        model, [encode_row(tokenizer, r, fmt) for r in rows], pad_id_of(tokenizer), steps=steps, **kw
    )


def pretrain_lm(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    texts: Sequence[str],
    *,
    steps: int,
    used_vocab: bool = False,
    **kw: Any,
) -> list[float]:
    """Plain language modelling on ``texts`` (every token trained, EOS appended)."""
    examples = []
    for text in texts:
        ids = list(tokenizer(text)["input_ids"]) + [tokenizer.eos_token_id]
        examples.append((ids, ids))
    train = fit_used_vocab if used_vocab else fit
    return train(model, examples, pad_id_of(tokenizer), steps=steps, **kw)


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
    loss_fn: Callable[[PreTrainedModel, dict[str, Any]], Any] | None = None,
) -> list[float]:
    """A plain torch training loop over ``(input_ids, labels)`` examples: AdamW, linear warmup,
    cosine decay, gradient clipping; examples are shuffled each epoch. Returns every step's loss.

    ``loss_fn(model, batch)``: the loss of a padded batch (default: the model's own, ``.loss``)."""
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
        loss = model(**batch).loss if loss_fn is None else loss_fn(model, batch)
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


def fit_used_vocab(
    model: PreTrainedModel, examples: Sequence[tuple[list[int], list[int]]], pad_id: int, **kw: Any
) -> list[float]:
    """:func:`fit` for a model whose vocabulary is far larger than what ``examples`` use (a real
    tokenizer's 32k-151k tokens, a few dozen of which spell numbers): as cheap as a tiny vocabulary.

    It trains the same model with the LM-head rows of the unused tokens tied to one shared row
    (set to zero first). The softmax still spans the whole vocabulary: the shared logit counts
    once per unused token, so the loss is the full model's, and the tied rows get the gradient
    full training would give each of them (they are never targets, so it is the same for all).
    Only used tokens' logits are computed, and only at trained positions; the unused tokens'
    embeddings, which no example reads, keep their initialization (no weight decay either).
    Training runs on a compact copy (used tokens, then the shared row), written back at the end.
    """
    import torch
    import torch.nn.functional as F

    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    config = model.config
    specials = {pad_id, config.bos_token_id, config.eos_token_id, config.pad_token_id} - {None}
    used = sorted({t for ids, labels in examples for t in (*ids, *labels)} - {IGNORE_INDEX} | specials)
    index = {t: i for i, t in enumerate(used)}
    unused = emb.shape[0] - len(used)

    small_config = copy.deepcopy(config)
    small_config.vocab_size = len(used) + 1
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, attr)
        setattr(small_config, attr, None if value is None else index[value])
    small = type(model)(small_config)
    vocab_params = {name for name, p in model.named_parameters() if p is emb or p is head}
    shared = {k: v for k, v in model.state_dict().items() if k not in vocab_params}
    rows = torch.tensor(used)
    with torch.no_grad():
        small.load_state_dict(shared, strict=False)
        zero = torch.zeros(1, emb.shape[1], dtype=emb.dtype)
        small.get_input_embeddings().weight.copy_(torch.cat([emb[rows], zero]))
        small.get_output_embeddings().weight.copy_(torch.cat([head[rows], zero]))

    offset = torch.zeros(len(used) + 1)
    offset[-1] = math.log(unused) if unused else -math.inf

    def loss_fn(m: PreTrainedModel, batch: dict[str, Any]) -> Any:
        hidden = m.get_decoder()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        targets = batch["labels"][:, 1:]
        trained = targets != IGNORE_INDEX
        logits = m.get_output_embeddings()(hidden[:, :-1][trained]).float() + offset
        return F.cross_entropy(logits, targets[trained])

    remapped = [
        ([index[t] for t in ids], [t if t == IGNORE_INDEX else index[t] for t in labels])
        for ids, labels in examples
    ]
    losses = fit(small, remapped, index[pad_id], loss_fn=loss_fn, **kw)

    trained_state = {k: v for k, v in small.state_dict().items() if k not in vocab_params}
    with torch.no_grad():
        model.load_state_dict(trained_state, strict=False)
        small_emb, small_head = small.get_input_embeddings().weight, small.get_output_embeddings().weight
        emb[rows] = small_emb[:-1]
        head.copy_(small_head[-1:].expand_as(head))
        head[rows] = small_head[:-1]
    model.eval()
    return losses


def head_only_copy(teacher: Path, folder: Path) -> Path:
    """The teacher's folder without its transformer: config, tokenizer and generation files, and
    a ``model.safetensors`` with only the LM head and input embeddings (all that training from a
    teacher cache reads)."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder.mkdir(parents=True, exist_ok=True)
    for path in Path(teacher).iterdir():
        if path.is_file() and not path.name.startswith("model.safetensors"):
            shutil.copy(path, folder / path.name)
    weights = load_file(Path(teacher) / "model.safetensors")
    kept = {k: v for k, v in weights.items() if k in ("lm_head.weight", "model.embed_tokens.weight")}
    save_file(kept, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
