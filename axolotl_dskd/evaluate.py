"""The DSKD paper's evaluation protocol: sampled generations scored by ROUGE-L over several seeds.

Zhang et al. (EMNLP 2024), following MiniLLM (Gu et al., ICLR 2024), report ROUGE-L between a
model's *sampled* responses and the references, averaged over five generation seeds
(10, 20, 30, 40, 50). Their generation settings (DSKD ``code/arguments.py`` and
``scripts/*/eval_main.sh``): ``do_sample``, ``top_k=0``, ``top_p=1.0``, ``temperature=1.0``,
``no_repeat_ngram_size=6``; the metric is MiniLLM's ``rouge_metric.py``: rouge_score's ROUGE-L
F-measure with the Porter stemmer, max over references, times 100.

Usage::

    python -m axolotl_dskd.evaluate --model outputs/student --data data/dolly/test.jsonl \\
        --seeds 10 20 30 40 50 --max-new-tokens 256 --batch-size 8 --out results.json

``--model`` is a full model directory (or hub id) or a LoRA adapter directory
(``adapter_config.json``), loaded over ``base_model_name_or_path`` or ``--base-model``.

Data rows (JSONL) are either ``{"prompt", "output"}`` (the prompt is used verbatim) or alpaca
rows ``{"instruction", "input"?, "output"}``, formatted with the same template Axolotl's
``type: alpaca`` trains on, so the model sees at test time exactly what it saw in training.
``output`` may be a list of references (the score is the max over them, as in MiniLLM).

Nothing here imports Axolotl: the evaluator runs wherever torch + transformers (+ peft for
adapters) + rouge-score are installed.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

LOG = logging.getLogger("axolotl_dskd.evaluate")

PAPER_SEEDS: tuple[int, ...] = (10, 20, 30, 40, 50)

# Axolotl's AlpacaPrompter (prompt_style "instruct", what `type: alpaca` uses): system text, a
# blank line, then the turn. The no-input variant has its own system text and no Input block.
# Kept byte-identical to axolotl/prompters.py (checked by tests/unit/test_evaluate.py).
ALPACA_SYSTEM = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request."
)
ALPACA_SYSTEM_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request."
)
ALPACA_TURN = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_TURN_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class SamplingConfig:
    """The paper's sampling settings; only ``max_new_tokens`` is meant to change."""

    do_sample: bool = True
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    no_repeat_ngram_size: int = 6
    max_new_tokens: int = 256


@dataclass
class Example:
    """One evaluation item: the exact prompt text fed to the model and its reference(s)."""

    prompt: str
    references: list[str]
    source: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- prompts and data


def format_alpaca(instruction: str, input: str | None = None) -> str:
    """Axolotl's ``type: alpaca`` prompt for a row, so evaluation prompts match training prompts.

    Like Axolotl, an empty or missing input selects the no-input template.
    """
    if input:
        return f"{ALPACA_SYSTEM}\n\n" + ALPACA_TURN.format(instruction=instruction, input=input)
    return f"{ALPACA_SYSTEM_NO_INPUT}\n\n" + ALPACA_TURN_NO_INPUT.format(instruction=instruction)


def format_plain(instruction: str, input: str | None = None) -> str:
    """``--prompt-template none`` for instruction rows: the instruction, then the input if any."""
    return f"{instruction}\n\n{input}" if input else instruction


def row_to_example(row: dict[str, Any], template: str = "alpaca") -> Example:
    """Map one JSONL row to an :class:`Example`; ``prompt`` rows win over ``instruction`` rows.

    MiniLLM/DSKD test files store prompts with newlines escaped as ``<n>``; they are restored.
    """
    if "output" not in row:
        raise ValueError(f"row has no 'output' (the reference): keys {sorted(row)}")
    refs = row["output"] if isinstance(row["output"], list) else [row["output"]]
    refs = [str(r) for r in refs]
    if "prompt" in row:
        prompt = str(row["prompt"]).replace("<n>", "\n")
    elif "instruction" in row:
        fmt = format_alpaca if template == "alpaca" else format_plain
        prompt = fmt(str(row["instruction"]), row.get("input") or None)
    else:
        raise ValueError(f"row needs 'prompt' or 'instruction': keys {sorted(row)}")
    return Example(prompt=prompt, references=refs, source=row)


def load_examples(path: str | Path, template: str = "alpaca", limit: int | None = None) -> list[Example]:
    """Read a JSONL file of prompt/output or alpaca rows (blank lines skipped)."""
    examples: list[Example] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                examples.append(row_to_example(json.loads(line), template))
            except (ValueError, json.JSONDecodeError) as err:
                raise ValueError(f"{path}:{lineno}: {err}") from err
            if limit is not None and len(examples) >= limit:
                break
    if not examples:
        raise ValueError(f"{path}: no rows")
    return examples


# --------------------------------------------------------------------------- metric

_SCORER = None


def _scorer():
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _SCORER


def rouge_l(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> list[float]:
    """Per-sample ROUGE-L F1 x 100 (rouge_score, Porter stemmer), max over a sample's references.

    This is MiniLLM's ``rouge_metric.py`` per sample; the corpus score is the plain mean.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions vs {len(references)} references")
    scorer = _scorer()
    scores = []
    for pred, refs in zip(predictions, references):
        refs = [refs] if isinstance(refs, str) else list(refs)
        best = max(scorer.score(target=ref, prediction=pred)["rougeL"].fmeasure for ref in refs)
        scores.append(100.0 * best)
    return scores


# --------------------------------------------------------------------------- model loading


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` is CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on GPUs that support it, float32 otherwise (CPU bf16 is slow)."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]


def is_adapter_dir(path: str | Path) -> bool:
    """A PEFT adapter directory is recognised by its ``adapter_config.json``."""
    return (Path(path) / "adapter_config.json").is_file()


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in TOKENIZER_FILES)


def load_model_and_tokenizer(
    model_path: str | Path,
    base_model: str | Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> tuple[Any, Any, dict[str, Any]]:
    """Load a full model or a LoRA adapter over its base, ready for left-padded batched sampling.

    For an adapter, the adapter dir's tokenizer is preferred (training may have added tokens);
    the base's embeddings are resized to it before the adapter loads, and LoRA is merged for
    speed. Returns ``(model, tokenizer, info)`` where ``info`` records what was loaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    load_kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if dev.type == "cuda":
        load_kwargs["device_map"] = {"": dev.index if dev.index is not None else 0}

    adapter = is_adapter_dir(model_path)
    info: dict[str, Any] = {
        "model": str(model_path),
        "adapter": adapter,
        "device": str(dev),
        "dtype": str(torch_dtype).removeprefix("torch."),
    }
    if adapter:
        cfg = json.loads((Path(model_path) / "adapter_config.json").read_text())
        base = base_model or cfg.get("base_model_name_or_path")
        if not base:
            raise ValueError(
                f"{model_path}: adapter_config.json has no base_model_name_or_path; pass --base-model"
            )
        tok_src = model_path if _has_tokenizer(Path(model_path)) else base
        tokenizer = AutoTokenizer.from_pretrained(tok_src)
        model = AutoModelForCausalLM.from_pretrained(base, **load_kwargs)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the adapter holds the rows
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, model_path)
        model = model.merge_and_unload()
        info.update(base_model=base, tokenizer=tok_src)
    else:
        if base_model:
            LOG.warning("--base-model is ignored: %s is a full model, not an adapter", model_path)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, **load_kwargs)
        info.update(base_model=None, tokenizer=model_path)
    if dev.type != "cuda":
        model.to(dev)
    model.eval()

    tokenizer.padding_side = "left"  # decoder-only batching: prompts end where generation starts
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # as DSKD/MiniLLM do (pad = eos)
    return model, tokenizer, info


# --------------------------------------------------------------------------- generation


def _isolate_generation_config(model: Any, tokenizer: Any) -> None:
    """Drop the checkpoint's own sampling defaults (e.g. Llama 2's temperature 0.6, top_p 0.9).

    transformers fills every generation field we leave unset from ``model.generation_config``;
    only the paper's settings may apply, so keep just the special-token ids.
    """
    from transformers import GenerationConfig

    old = model.generation_config
    eos: list[int] = []
    for ids in (old.eos_token_id, tokenizer.eos_token_id):
        for i in ids if isinstance(ids, list) else [ids]:
            if i is not None and i not in eos:
                eos.append(i)
    model.generation_config = GenerationConfig(
        bos_token_id=old.bos_token_id,
        eos_token_id=eos or None,
        pad_token_id=tokenizer.pad_token_id,
    )


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    seed: int,
    sampling: SamplingConfig = SamplingConfig(),
    batch_size: int = 8,
    progress: bool = True,
) -> list[str]:
    """Sample one response per prompt for one seed, in batches, in the given prompt order.

    ``set_seed(seed)`` once before the pass (as DSKD seeds each evaluation run), so a seed's
    generations are reproducible for the same model, data order, batch size and device.
    """
    from tqdm.auto import tqdm
    from transformers import GenerationConfig, set_seed

    _isolate_generation_config(model, tokenizer)
    gen_config = GenerationConfig(
        do_sample=sampling.do_sample,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        temperature=sampling.temperature,
        no_repeat_ngram_size=sampling.no_repeat_ngram_size,
        max_new_tokens=sampling.max_new_tokens,
        repetition_penalty=1.0,
        num_beams=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=model.generation_config.eos_token_id,
    )
    device = next(model.parameters()).device
    set_seed(seed)
    outputs: list[str] = []
    batches = range(0, len(prompts), batch_size)
    bar = tqdm(batches, desc=f"seed {seed}", unit="batch", disable=not progress, file=sys.stderr)
    for start in bar:
        batch = list(prompts[start : start + batch_size])
        enc = tokenizer(batch, return_tensors="pt", padding=True).to(device)
        with torch.inference_mode():
            out = model.generate(**enc, generation_config=gen_config)
        new_tokens = out[:, enc["input_ids"].shape[1] :]
        outputs.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return outputs


def evaluate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    seeds: Iterable[int] = PAPER_SEEDS,
    sampling: SamplingConfig = SamplingConfig(),
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate for every seed and score: per-seed mean ROUGE-L, mean and std over seeds."""
    seeds = list(seeds)
    prompts = [e.prompt for e in examples]
    refs = [e.references for e in examples]
    per_seed: dict[str, float] = {}
    gens: dict[str, list[str]] = {}
    sample_scores: dict[str, list[float]] = {}
    for seed in seeds:
        t0 = time.perf_counter()
        gens[str(seed)] = generate(model, tokenizer, prompts, seed, sampling, batch_size, progress)
        sample_scores[str(seed)] = rouge_l(gens[str(seed)], refs)
        per_seed[str(seed)] = statistics.fmean(sample_scores[str(seed)])
        LOG.info(
            "seed %d: ROUGE-L %.2f (%d samples, %.1fs)",
            seed,
            per_seed[str(seed)],
            len(prompts),
            time.perf_counter() - t0,
        )
    scores = list(per_seed.values())
    return {
        "per_seed": per_seed,
        "mean": statistics.fmean(scores),
        "std": statistics.pstdev(scores) if len(scores) > 1 else 0.0,
        "generations": [
            {
                "prompt": e.prompt,
                "reference": e.references[0] if len(e.references) == 1 else e.references,
                "generations": {s: gens[s][i] for s in gens},
                "rougeL": {s: sample_scores[s][i] for s in sample_scores},
            }
            for i, e in enumerate(examples)
        ],
    }


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m axolotl_dskd.evaluate",
        description="DSKD/MiniLLM evaluation: sampled responses, ROUGE-L x100, mean over seeds.",
    )
    p.add_argument("--model", required=True, help="full model dir/hub id, or LoRA adapter dir")
    p.add_argument(
        "--base-model", default=None, help="base for an adapter (default: its base_model_name_or_path)"
    )
    p.add_argument("--data", required=True, help="JSONL with prompt/output or instruction/input/output rows")
    p.add_argument("--seeds", type=int, nargs="+", default=list(PAPER_SEEDS))
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default="results.json", help="where to write the JSON results")
    p.add_argument(
        "--prompt-template",
        choices=["alpaca", "none"],
        default="alpaca",
        help="how instruction rows become prompts (prompt rows are used verbatim)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the protocol from the command line; writes ``--out`` and returns the results dict."""
    args = build_parser().parse_args(argv)
    if not LOG.handlers:  # our progress lines only; other libraries' loggers stay as configured
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[evaluate] %(message)s"))
        LOG.addHandler(handler)
        LOG.setLevel(logging.INFO)
        LOG.propagate = False
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise SystemExit("--batch-size and --max-new-tokens must be >= 1")

    examples = load_examples(args.data, args.prompt_template, args.limit)
    LOG.info("%d examples from %s", len(examples), args.data)
    model, tokenizer, info = load_model_and_tokenizer(args.model, args.base_model, args.device, args.dtype)
    LOG.info(
        "loaded %s%s on %s (%s)",
        args.model,
        f" over {info['base_model']}" if info["adapter"] else "",
        info["device"],
        info["dtype"],
    )
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)
    t0 = time.perf_counter()
    result = evaluate(model, tokenizer, examples, args.seeds, sampling, args.batch_size)

    import transformers

    out = {
        "config": {
            **info,
            "data": str(args.data),
            "n_samples": len(examples),
            "seeds": args.seeds,
            "batch_size": args.batch_size,
            "prompt_template": args.prompt_template,
            "limit": args.limit,
            "sampling": asdict(sampling),
            "metric": "ROUGE-L F1 x100 (rouge_score, use_stemmer=True), max over references",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "seconds": round(time.perf_counter() - t0, 2),
        },
        **result,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    per_seed = ", ".join(f"{s}: {v:.2f}" for s, v in out["per_seed"].items())
    print(
        f"ROUGE-L {out['mean']:.2f} ± {out['std']:.2f} over seeds ({per_seed})"
        + (f"; wrote {args.out}" if args.out else "")
    )
    return out


if __name__ == "__main__":
    main()
