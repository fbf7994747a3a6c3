"""The paper's evaluation command and the Dolly split helper, on a tiny random Llama (CPU, fast).

Covers: ROUGE-L against hand-computed cases, alpaca prompts byte-identical to Axolotl's prompter,
``main`` end to end for a full model and a LoRA adapter (scores, mean, determinism per seed,
seeds differ, the adapter really applies), and the Dolly converter's split sizes and fields.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

from axolotl_dskd import dolly
from axolotl_dskd.evaluate import (
    SamplingConfig,
    format_alpaca,
    generate,
    is_adapter_dir,
    load_examples,
    load_model_and_tokenizer,
    main,
    rouge_l,
)
from dskd_devkit.task import BASE_CORPUS, task_corpus
from dskd_devkit.tiny_tokenizers import bpe_tokenizer
from dskd_devkit.training import tiny_model

# a long reference of common corpus words, so that even random samples overlap it (score > 0)
WORDY = " ".join(BASE_CORPUS)
ROWS = [
    {"prompt": "Add the two numbers.\nthree plus four\n", "output": WORDY},
    {"instruction": "Add the two numbers.", "input": "ten plus two", "output": "twelve"},
    {"instruction": "Name a colour of the sky.", "output": ["blue", WORDY]},
    {"instruction": "Say hello.", "input": "", "output": ["hello", "hi there"]},
]
MAX_NEW = 12


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A saved tiny Llama + tokenizer, a random-B LoRA adapter of it (with tokenizer), 4-row data."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("eval")
    tok = bpe_tokenizer(task_corpus(n=100))
    full = root / "full"
    tiny_model("llama", tok, hidden_size=32, num_layers=1).save_pretrained(full)
    tok.save_pretrained(full)

    base = AutoModelForCausalLM.from_pretrained(full)  # so the adapter records base_model_name_or_path
    torch.manual_seed(0)
    lora = LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "o_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    adapter = root / "adapter"
    peft_model = get_peft_model(base, lora)
    with torch.no_grad():  # make the adapter's effect large enough to change samples
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(adapter)
    tok.save_pretrained(adapter)

    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return {"root": root, "full": full, "adapter": adapter, "data": data}


def run(assets: dict[str, Path], model: Path, seeds: list[int], name: str, *extra: str) -> dict:
    out = assets["root"] / f"{name}.json"
    result = main(
        [
            "--model",
            str(model),
            "--data",
            str(assets["data"]),
            "--seeds",
            *map(str, seeds),
            "--max-new-tokens",
            str(MAX_NEW),
            "--batch-size",
            "3",
            "--device",
            "cpu",
            "--out",
            str(out),
            *extra,
        ]
    )
    written = json.loads(out.read_text(encoding="utf-8"))
    assert written == json.loads(json.dumps(result))  # the file is what main returned
    return written


@pytest.fixture(scope="module")
def full_run(assets: dict[str, Path]) -> dict:
    return run(assets, assets["full"], [10, 20], "full")


@pytest.fixture(scope="module")
def adapter_run(assets: dict[str, Path]) -> dict:
    return run(assets, assets["adapter"], [10, 20], "adapter")


# --------------------------------------------------------------------------- metric


def test_rouge_l_hand_cases() -> None:
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == [100.0]
    assert rouge_l(["dogs bark loudly"], ["cats purr softly"]) == [0.0]
    # Porter stemming: "running" -> "run"
    assert rouge_l(["running"], ["run"]) == [100.0]
    # LCS "the cat" (2 tokens) of a 4-token prediction and a 3-token reference: P=1/2, R=2/3
    p, r = 2 / 4, 2 / 3
    assert rouge_l(["the big cat sleeps"], ["the cat purrs"])[0] == pytest.approx(100 * 2 * p * r / (p + r))
    # case and punctuation are ignored by rouge_score's tokenizer
    assert rouge_l(["Hello, World!"], ["hello world"]) == [100.0]
    # several references: the best one counts
    assert rouge_l(["blue sky"], [["red", "blue sky"]]) == [100.0]
    with pytest.raises(ValueError):
        rouge_l(["a"], ["a", "b"])


# --------------------------------------------------------------------------- prompts


@pytest.mark.parametrize(
    "instruction,input",
    [
        ("Add the two numbers.", "three plus four"),
        ("Name a colour of the sky.", None),
        ("Say hello.", ""),
        ("Summarize.", "Line one.\nLine two with ### Input: inside."),
    ],
)
def test_alpaca_prompt_matches_axolotl(instruction: str, input: str | None) -> None:
    from axolotl.prompters import AlpacaPrompter

    # `type: alpaca` builds AlpacaPrompter(prompt_style=None) -> instruct style
    expected = next(AlpacaPrompter(None).build_prompt(instruction, input))
    assert format_alpaca(instruction, input) == expected


def test_load_examples_row_kinds(assets: dict[str, Path]) -> None:
    ex = load_examples(assets["data"])
    assert ex[0].prompt == ROWS[0]["prompt"]  # prompt rows are used verbatim
    assert ex[1].prompt == format_alpaca("Add the two numbers.", "ten plus two")
    assert ex[2].prompt == format_alpaca("Name a colour of the sky.")
    assert ex[3].references == ["hello", "hi there"]
    plain = load_examples(assets["data"], template="none", limit=2)
    assert [e.prompt for e in plain] == [ROWS[0]["prompt"], "Add the two numbers.\n\nten plus two"]


# --------------------------------------------------------------------------- end to end


def check_result(res: dict, seeds: list[int]) -> None:
    assert list(res["per_seed"]) == [str(s) for s in seeds]
    for score in res["per_seed"].values():
        assert 0.0 <= score <= 100.0
    assert res["mean"] == pytest.approx(statistics.fmean(res["per_seed"].values()))
    assert len(res["generations"]) == len(ROWS)
    for item in res["generations"]:
        assert item["prompt"] and item["reference"]
        assert set(item["generations"]) == {str(s) for s in seeds}
        assert all(isinstance(g, str) for g in item["generations"].values())
    # the per-seed score is the mean of the per-sample scores
    for s in res["per_seed"]:
        per_sample = [g["rougeL"][s] for g in res["generations"]]
        assert res["per_seed"][s] == pytest.approx(statistics.fmean(per_sample))
    cfg = res["config"]
    assert cfg["sampling"] == {
        "do_sample": True,
        "top_k": 0,
        "top_p": 1.0,
        "temperature": 1.0,
        "no_repeat_ngram_size": 6,
        "max_new_tokens": MAX_NEW,
    }
    assert cfg["n_samples"] == len(ROWS) and cfg["seeds"] == seeds


def gens(res: dict, seed: int) -> list[str]:
    return [g["generations"][str(seed)] for g in res["generations"]]


def test_full_model(assets: dict[str, Path], full_run: dict) -> None:
    check_result(full_run, [10, 20])
    assert full_run["config"]["adapter"] is False
    assert gens(full_run, 10) != gens(full_run, 20)  # different seeds sample differently
    assert any(g.strip() for g in gens(full_run, 10))
    assert max(full_run["per_seed"].values()) > 0  # some overlap with the wordy reference
    # determinism: the same seed again, in a fresh run, gives the same generations
    again = run(assets, assets["full"], [10], "full_again")
    assert gens(again, 10) == gens(full_run, 10)
    assert again["per_seed"]["10"] == full_run["per_seed"]["10"]


def test_adapter(assets: dict[str, Path], full_run: dict, adapter_run: dict) -> None:
    assert is_adapter_dir(assets["adapter"]) and not is_adapter_dir(assets["full"])
    check_result(adapter_run, [10, 20])
    cfg = adapter_run["config"]
    assert cfg["adapter"] is True
    assert Path(cfg["base_model"]) == assets["full"]
    assert Path(cfg["tokenizer"]) == assets["adapter"]  # the adapter's own tokenizer is used
    assert gens(adapter_run, 10) != gens(adapter_run, 20)
    assert gens(adapter_run, 10) != gens(full_run, 10)  # the LoRA weights are applied
    # --base-model overrides adapter_config.json's base, same weights -> same samples
    again = run(
        assets, assets["adapter"], [10], "adapter_again", "--base-model", str(assets["full"]), "--limit", "4"
    )
    assert gens(again, 10) == gens(adapter_run, 10)


def test_checkpoint_sampling_defaults_do_not_leak(assets: dict[str, Path]) -> None:
    """A checkpoint's generation_config (e.g. Llama 2's temperature 0.6, top_p 0.9) must not
    change the paper's sampling: transformers would fill every unset field from it."""
    model, tok, _ = load_model_and_tokenizer(str(assets["full"]), device="cpu")
    prompts = [e.prompt for e in load_examples(assets["data"])]
    plain = generate(model, tok, prompts, 10, SamplingConfig(max_new_tokens=8), 2, progress=False)
    cfg = model.generation_config
    cfg.temperature, cfg.top_p, cfg.top_k, cfg.repetition_penalty, cfg.min_p = 0.05, 0.5, 3, 5.0, 0.3
    assert generate(model, tok, prompts, 10, SamplingConfig(max_new_tokens=8), 2, progress=False) == plain


# --------------------------------------------------------------------------- Dolly


def dolly_rows(n: int) -> list[dict[str, str]]:
    cats = ["open_qa", "closed_qa", "summarization", "brainstorming"]
    return [
        {
            "instruction": f"Question number {i}?",
            "context": f"Context for {i}." if i % 3 == 0 else "",
            "response": f"Answer number {i}.",
            "category": cats[i % len(cats)],
        }
        for i in range(n)
    ]


def test_dolly_split(tmp_path: Path) -> None:
    src = tmp_path / "dolly.jsonl"
    rows = dolly_rows(1600)
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    counts = dolly.main(["--input", str(src), "--out-dir", str(tmp_path / "out")])
    assert counts == {"input": 1600, "kept": 1600, "train": 100, "dev": 1000, "test": 500}

    def read(name: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / "out" / name).read_text().splitlines()]

    train, dev, test = read("train.jsonl"), read("dev.jsonl"), read("test.jsonl")
    assert (len(train), len(dev), len(test)) == (100, 1000, 500)
    for row in train + dev:
        assert set(row) == {"instruction", "input", "output"}
    ids = [{r["instruction"] for r in part} for part in (train, dev, test)]  # unique per synthetic row
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert ids[0] | ids[1] | ids[2] == {r["instruction"] for r in rows}

    by_instruction = {r["instruction"]: r for r in rows}
    for row in train + dev + test:
        orig = by_instruction[row["instruction"]]
        assert row["input"] == orig["context"] and row["output"] == orig["response"]
    for row in test:
        orig = by_instruction[row["instruction"]]
        assert row["prompt"] == format_alpaca(orig["instruction"], orig["context"])
        assert row["category"] == orig["category"]
    # the test file is what the evaluator reads
    ex = load_examples(tmp_path / "out" / "test.jsonl")
    assert [e.prompt for e in ex] == [r["prompt"] for r in test]

    # same seed -> same split; another seed -> another split
    dolly.main(["--input", str(src), "--out-dir", str(tmp_path / "same"), "--seed", "42"])
    assert (tmp_path / "same" / "test.jsonl").read_text() == (tmp_path / "out" / "test.jsonl").read_text()
    dolly.main(["--input", str(src), "--out-dir", str(tmp_path / "other"), "--seed", "7"])
    assert (tmp_path / "other" / "test.jsonl").read_text() != (tmp_path / "out" / "test.jsonl").read_text()


def test_dolly_filters(tmp_path: Path, assets: dict[str, Path]) -> None:
    rows = dolly_rows(1600)
    # an exact duplicate, an empty response, an empty instruction: all dropped
    rows += [dict(rows[0]), {**rows[1], "response": "  "}, {**rows[2], "instruction": ""}]
    rows[5] = {**rows[5], "instruction": "  padded  ", "response": "\nspaced\n"}
    rows[6] = {**rows[6], "context": "word " * 300}  # a long prompt
    src = tmp_path / "dolly.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    counts = dolly.convert(src, tmp_path / "a")
    assert counts["input"] == 1603 and counts["kept"] == 1600
    out = [
        json.loads(line)
        for n in ("train", "dev", "test")
        for line in (tmp_path / "a" / f"{n}.jsonl").read_text().splitlines()
    ]
    assert {"instruction": "padded", "input": "", "output": "spaced"} in [
        {k: r[k] for k in ("instruction", "input", "output")} for r in out
    ]
    # MiniLLM's prompt-length filter, counted with the student's tokenizer
    counts = dolly.convert(src, tmp_path / "b", max_prompt_tokens=120, tokenizer_path=str(assets["full"]))
    assert counts["kept"] == 1599 and counts["train"] == 99
    with pytest.raises(ValueError):
        dolly.convert(src, tmp_path / "c", max_prompt_tokens=120)
    with pytest.raises(ValueError):
        dolly.convert(src, tmp_path / "d", dev_size=1000, test_size=600)
