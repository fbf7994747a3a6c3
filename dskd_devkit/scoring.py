"""Scores on the task: greedy exact match and the reference answer's NLL."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from axolotl_dskd.core.loss import IGNORE_INDEX
from dskd_devkit.task import PROMPT_FORMAT, encode_prompt, encode_row
from dskd_devkit.training import pad_batch, pad_id_of

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast


@dataclass
class TaskScores:
    exact_match: float
    """Greedy answers equal to the reference, as text (whitespace-stripped)."""
    token_nll: float
    """Mean negative log-likelihood (nats) of the reference's tokens (EOS included)."""
    answer_nll: float
    """Mean total NLL of a reference answer: comparable across tokenizers."""
    n: int
    examples: list[dict[str, str]] = field(default_factory=list)


def evaluate_task(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    rows: Sequence[dict[str, str]],
    *,
    fmt: str = PROMPT_FORMAT,
    batch_size: int = 64,
    max_new_tokens: int = 12,
    keep_examples: int = 5,
) -> TaskScores:
    """Greedy exact match and answer NLL of ``model`` on ``rows`` (prompts as Axolotl makes them)."""
    import torch

    model.eval()
    pad = pad_id_of(tokenizer)
    eos = tokenizer.eos_token_id
    correct, nll_sum, n_tokens, examples = 0, 0.0, 0, []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            # answer NLL, teacher-forced (right padding)
            batch = pad_batch([encode_row(tokenizer, r, fmt) for r in chunk], pad)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            logp = torch.log_softmax(logits[:, :-1].float(), -1)
            mask = targets != IGNORE_INDEX
            token_logp = logp.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
            nll_sum += float(-(token_logp * mask).sum())
            n_tokens += int(mask.sum())
            # greedy decoding (left padding), stopped at EOS
            prompts = [encode_prompt(tokenizer, r, fmt) for r in chunk]
            width = max(map(len, prompts))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
            attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            out = model.generate(
                input_ids=ids,
                attention_mask=attn,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=pad,
            )[:, width:]
            for row, gen in zip(chunk, out.tolist()):
                if eos in gen:
                    gen = gen[: gen.index(eos)]
                text = tokenizer.decode(gen, skip_special_tokens=True).strip()
                correct += text == row["output"].strip()
                if len(examples) < keep_examples:
                    examples.append({"prompt": fmt.format(**row), "reference": row["output"], "greedy": text})
    n = len(rows)
    return TaskScores(
        exact_match=correct / max(n, 1),
        token_nll=nll_sum / max(n_tokens, 1),
        answer_nll=nll_sum / max(n, 1),
        n=n,
        examples=examples,
    )
