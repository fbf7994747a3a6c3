"""databricks-dolly-15k -> Axolotl alpaca train/dev files and an evaluation test file.

DSKD (Zhang et al., 2024) trains on MiniLLM's Dolly split (about 11k train / 1k dev / 500 test).
What we could confirm about how that split was made:

- MiniLLM paper (Gu et al., ICLR 2024, sec. "Experimental Setup"/appendix): "We construct the
  training data from databricks-dolly-15K ... Then, we randomly split 0.5K and 1K samples for
  validation and testing, respectively, leaving about 12.5K examples for training."
- microsoft/LMOps ``minillm/tools/process_data_dolly.py``: reads ``data/dolly/raw.jsonl``
  (alpaca fields ``instruction``/``input``/``output``), takes the first ``--dev-num 1000`` lines
  as the dev split and the rest as train, and drops a sample only when its alpaca prompt is longer
  than ``--max-prompt-length 256`` tokens (``scripts/*/tools/process_data_dolly.sh``). The
  500-row test file is released separately (HF ``MiniLLM/dolly`` ``valid.jsonl``, derived from
  ``aisquared/databricks-dolly-15k``); the script that produced it is not published.
- No rule dropping Dolly samples with *short responses* appears in that code. The "11" in
  DSKD's ``scripts/*/run_eval.sh`` (``sinst/11_``, ``uinst/11_``) names MiniLLM's S-NI/UnNI test
  sets restricted to long references, not Dolly.

So the split here is the documented fallback, not a byte-for-byte reproduction: drop rows with an
empty instruction or response and exact duplicates, shuffle with ``--seed`` (default 42), take
500 test rows, 1000 dev rows, and the rest as train. ``--max-prompt-tokens 256 --tokenizer PATH``
adds MiniLLM's prompt-length filter (tokenizer-dependent, off by default; unverified whether it
alone accounts for the papers' 11-12.5k train size).

Usage::

    python -m axolotl_dskd.dolly --input databricks-dolly-15k.jsonl --out-dir data/dolly [--seed 42]

Writes ``train.jsonl`` and ``dev.jsonl`` (alpaca: instruction/input/output, for Axolotl's
``type: alpaca``) and ``test.jsonl`` (``prompt``/``output`` plus the alpaca fields and category,
read by ``python -m axolotl_dskd.evaluate``).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from axolotl_dskd.evaluate import format_alpaca

DEV_SIZE = 1000
TEST_SIZE = 500


def to_alpaca(row: dict[str, Any]) -> dict[str, str]:
    """Dolly fields to alpaca fields: context is the input; surrounding whitespace is dropped."""
    return {
        "instruction": str(row.get("instruction") or "").strip(),
        "input": str(row.get("context") or "").strip(),
        "output": str(row.get("response") or "").strip(),
    }


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file, blank lines skipped."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> int:
    """Write rows as UTF-8 JSONL (creating the folder); returns how many."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def clean(
    rows: Sequence[dict[str, Any]], max_prompt_tokens: int | None = None, tokenizer: Any = None
) -> list[dict[str, str]]:
    """Alpaca rows kept for splitting: non-empty instruction and response, no exact duplicates,
    and (optionally) a prompt of at most ``max_prompt_tokens`` tokens, as MiniLLM filters."""
    seen: set[tuple[str, str, str]] = set()
    kept = []
    for raw in rows:
        row = to_alpaca(raw)
        key = (row["instruction"], row["input"], row["output"])
        if not row["instruction"] or not row["output"] or key in seen:
            continue
        if max_prompt_tokens is not None:
            prompt = format_alpaca(row["instruction"], row["input"])
            if len(tokenizer.encode(prompt, add_special_tokens=False)) > max_prompt_tokens:
                continue
        seen.add(key)
        if "category" in raw:
            row["category"] = str(raw["category"])
        kept.append(row)
    return kept


def split(
    rows: Sequence[dict[str, str]], seed: int = 42, dev_size: int = DEV_SIZE, test_size: int = TEST_SIZE
) -> dict[str, list[dict[str, str]]]:
    """Shuffle with a fixed seed; the first ``test_size`` rows are test, the next ``dev_size``
    dev, the rest train, so the splits are disjoint and reproducible."""
    if len(rows) <= dev_size + test_size:
        raise ValueError(
            f"{len(rows)} rows after filtering; need more than dev {dev_size} + test {test_size}"
        )
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    shuffled = [rows[i] for i in order]
    return {
        "test": shuffled[:test_size],
        "dev": shuffled[test_size : test_size + dev_size],
        "train": shuffled[test_size + dev_size :],
    }


def _alpaca_only(row: dict[str, str]) -> dict[str, str]:
    return {"instruction": row["instruction"], "input": row["input"], "output": row["output"]}


def _test_row(row: dict[str, str]) -> dict[str, str]:
    out = {
        "prompt": format_alpaca(row["instruction"], row["input"]),
        "output": row["output"],
        **_alpaca_only(row),
    }
    if "category" in row:
        out["category"] = row["category"]
    return out


def convert(
    input_path: str | Path,
    out_dir: str | Path,
    seed: int = 42,
    dev_size: int = DEV_SIZE,
    test_size: int = TEST_SIZE,
    max_prompt_tokens: int | None = None,
    tokenizer_path: str | None = None,
) -> dict[str, int]:
    """Read Dolly JSONL, filter, split, write train/dev/test; returns the row counts."""
    tokenizer = None
    if max_prompt_tokens is not None:
        if not tokenizer_path:
            raise ValueError("--max-prompt-tokens needs --tokenizer (prompt length is counted in tokens)")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    raw = read_jsonl(input_path)
    rows = clean(raw, max_prompt_tokens, tokenizer)
    parts = split(rows, seed, dev_size, test_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {
        "input": len(raw),
        "kept": len(rows),
        "train": write_jsonl(map(_alpaca_only, parts["train"]), out / "train.jsonl"),
        "dev": write_jsonl(map(_alpaca_only, parts["dev"]), out / "dev.jsonl"),
        "test": write_jsonl(map(_test_row, parts["test"]), out / "test.jsonl"),
    }
    return counts


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    """Command line entry; prints and returns the split sizes."""
    p = argparse.ArgumentParser(prog="python -m axolotl_dskd.dolly", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--input", required=True, help="databricks-dolly-15k.jsonl (instruction/context/response/category)"
    )
    p.add_argument("--out-dir", required=True)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--dev-size", type=int, default=DEV_SIZE)
    p.add_argument("--test-size", type=int, default=TEST_SIZE)
    p.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=None,
        help="drop rows whose alpaca prompt is longer (MiniLLM uses 256); needs --tokenizer",
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer for --max-prompt-tokens (the student's)")
    args = p.parse_args(argv)
    counts = convert(
        args.input,
        args.out_dir,
        args.seed,
        args.dev_size,
        args.test_size,
        args.max_prompt_tokens,
        args.tokenizer,
    )
    print(
        f"{counts['input']} rows read, {counts['kept']} kept: train {counts['train']}, "
        f"dev {counts['dev']}, test {counts['test']} -> {args.out_dir}"
    )
    return counts


if __name__ == "__main__":
    main()
