"""axolotl_dskd.tiny: deterministic tokenizers, models and data; make_assets reuses its cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from axolotl_dskd import tiny

REPO = Path(__file__).resolve().parent.parent

CORPUS = tiny.task_corpus(200, seed=0, max_operand=30, max_second=10)

# a spec whose every training step runs, in a second or two
SMALL = tiny.TinySpec(
    max_operand=20, max_second=5, tokenizer_rows=100, teacher_steps=3, teacher_batch=8,
    student_pretrain_steps=2, student_rows=16, noise=0.5, eval_rows=10,
)  # fmt: skip


@pytest.fixture(scope="module")
def toks():
    return tiny.bpe_tokenizer(CORPUS), tiny.sentencepiece_tokenizer(CORPUS, pad_token="</s>")


def test_tokenizers_are_deterministic_across_processes(toks) -> None:
    bpe, sp = toks
    assert tiny.tokenizer_fingerprint(tiny.bpe_tokenizer(CORPUS)) == tiny.tokenizer_fingerprint(bpe)
    assert tiny.tokenizer_fingerprint(tiny.sentencepiece_tokenizer(CORPUS, pad_token="</s>")) == (
        tiny.tokenizer_fingerprint(sp)
    )
    # another process, another hash seed: the same tokenizers (tiny loads without transformers)
    code = textwrap.dedent(
        """
        import sys
        from axolotl_dskd import tiny
        c = tiny.task_corpus(200, seed=0, max_operand=30, max_second=10)
        print(tiny.tokenizer_fingerprint(tiny.train_bpe(c)))
        print(tiny.tokenizer_fingerprint(tiny.train_unigram(c)))
        print("transformers" in sys.modules)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONHASHSEED": "123", "TOKENIZERS_PARALLELISM": "true"},
    ).stdout.split()  # fmt: skip
    here = [tiny.tokenizer_fingerprint(tiny.train_bpe(CORPUS)), tiny.tokenizer_fingerprint(tiny.train_unigram(CORPUS))]
    assert out == [*here, "False"]


def test_tokenizer_styles_and_round_trip(toks) -> None:
    bpe, sp = toks
    row = tiny.addition_row(43, 9)
    assert row == {"instruction": tiny.INSTRUCTION, "input": "forty-three plus nine", "output": "fifty-two"}
    for tok in toks:
        ids, labels = tiny.encode_row(tok, row)
        prompt = tiny.encode_prompt(tok, row)
        assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [-100] * len(prompt)
        assert ids[-1] == labels[-1] == tok.eos_token_id
        assert tok.decode(labels[len(prompt) : -1]).strip() == "fifty-two"
        text = "Café 机器学习 🚀 forty-three plus nine = fifty-two"
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert sp("a")["input_ids"][0] == sp.bos_token_id and sp.pad_token == "</s>"
    assert bpe.bos_token_id is None and bpe.pad_token_id == bpe.eos_token_id
    assert bpe.chat_template == sp.chat_template == tiny.CHATML_TEMPLATE
    assert bpe.get_vocab() != sp.get_vocab()


def test_models_are_deterministic_in_the_seed(toks) -> None:
    bpe, _ = toks
    a = tiny.tiny_model("qwen2", bpe, hidden_size=64, seed=3).state_dict()
    b = tiny.tiny_model("qwen2", bpe, hidden_size=64, seed=3).state_dict()
    c = tiny.tiny_model("qwen2", bpe, hidden_size=64, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    llama = tiny.tiny_model("llama", bpe, hidden_size=64, num_layers=1)
    assert llama.config.vocab_size == len(bpe) and not llama.config.tie_word_embeddings


def test_task_split_is_deterministic_disjoint_and_noisy() -> None:
    spec = tiny.ARITHMETIC
    split = tiny.task_split(spec)
    assert split == tiny.task_split(spec)
    assert len(split["eval"]) == 200 and len(split["student"]) == 256 and len(split["teacher"]) == 800
    held_out = {r["input"] for r in split["eval"]}
    teacher = {r["input"]: r["output"] for r in split["teacher"]}
    assert not held_out & set(teacher)
    assert all(r["input"] in teacher for r in split["student"])  # the teacher knows them, clean
    assert all(r == tiny.addition_row(*_operands(r)) for r in split["eval"] + split["teacher"])
    wrong = sum(r["output"] != teacher[r["input"]] for r in split["student"])
    assert 0.1 < wrong / 256 < 0.2  # ~15% noise
    assert tiny.task_split(replace(spec, seed=1)) != split
    # the historical default: 64 clean rows of arithmetic_rows
    assert tiny.task_split(tiny.TinySpec())["student"] == tiny.arithmetic_rows(64, 0)


def _operands(row: dict[str, str]) -> tuple[int, int]:
    words = {tiny.number_words(n): n for n in range(200)}
    a, b = row["input"].split(" plus ")
    return words[a], words[b]


def test_number_words() -> None:
    assert [tiny.number_words(n) for n in (0, 13, 40, 52, 100, 104, 999)] == [
        "zero", "thirteen", "forty", "fifty-two", "one hundred", "one hundred four",
        "nine hundred ninety-nine",
    ]  # fmt: skip


def test_make_assets_builds_once_and_reuses_its_cache(tmp_path: Path) -> None:
    logs: list[str] = []
    paths = tiny.make_assets(tmp_path / "a", spec=SMALL, log=logs.append, threads=1)
    assert any("training the teacher" in m for m in logs)
    assert set(paths) == set(tiny.ASSET_NAMES) and all(p.exists() for p in paths.values())
    assert json.loads((tmp_path / "a" / "assets.json").read_text())["key"] == SMALL.key()
    files = sorted(p for p in (tmp_path / "a").rglob("*") if p.is_file())
    stamps = {p: p.stat().st_mtime_ns for p in files}

    logs.clear()
    assert tiny.make_assets(tmp_path / "a", spec=SMALL, log=logs.append) == paths
    assert logs == []  # nothing rebuilt
    assert {p: p.stat().st_mtime_ns for p in files} == stamps

    # another spec: rebuilt in place; the data follows the spec
    other = replace(SMALL, noise=0.0)
    assert other.key() != SMALL.key()
    tiny.make_assets(tmp_path / "a", spec=other)
    assert json.loads((tmp_path / "a" / "assets.json").read_text())["key"] == other.key()
    assert tiny.read_jsonl(paths["data"]) == tiny.task_split(other)["student"]

    # the same spec elsewhere: the same data and the same (trained) weights
    again = tiny.make_assets(tmp_path / "b", spec=other)
    for name in ("data", "eval", "teacher_data"):
        assert again[name].read_text() == paths[name].read_text()
    from safetensors.torch import load_file

    w1, w2 = (load_file(p["teacher"] / "model.safetensors") for p in (paths, again))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)

    # cached_assets names the folder by the spec's hash (or the given name)
    cached = tiny.cached_assets(other, tmp_path / "cache")
    assert cached["teacher"].parent.name == f"task-{other.key()}"
    assert tiny.cached_assets(other, tmp_path / "cache", name="x")["teacher"].parent.name == "x"


def test_default_assets_keep_the_shapes_the_e2e_tests_use(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    paths = tiny.make_assets(tmp_path)
    assert AutoConfig.from_pretrained(paths["teacher"]).hidden_size == 128
    assert AutoConfig.from_pretrained(paths["student"]).hidden_size == 64
    assert AutoConfig.from_pretrained(paths["student_sp"]).hidden_size == 64
    assert AutoTokenizer.from_pretrained(paths["student"]).get_vocab() == (
        AutoTokenizer.from_pretrained(paths["teacher"]).get_vocab()
    )
    assert len(tiny.read_jsonl(paths["data"])) == 64


def test_evaluate_task_scores_a_model(toks) -> None:
    bpe, _ = toks
    model = tiny.tiny_model("llama", bpe, hidden_size=64, num_layers=1)
    rows = [tiny.addition_row(a, 1) for a in range(5)]
    scores = tiny.evaluate_task(model, bpe, rows, max_new_tokens=4)
    assert scores.n == 5 and 0.0 <= scores.exact_match <= 1.0
    assert 0 < scores.token_nll < 20 and scores.answer_nll > scores.token_nll
    assert scores.examples[0]["prompt"] == "zero plus one ="


@pytest.fixture(scope="module")
def arithmetic_toks():
    return tiny.tokenizers_for(tiny.ARITHMETIC)


def test_student_pretraining_covers_the_answer_tokens(arithmetic_toks) -> None:
    """Every token an answer starts with (tokenized on its own, as Axolotl appends a response)
    is a target somewhere in the students' counting text: LoRA leaves the LM head frozen, so a
    base that never predicted a token can hardly learn to."""
    top = tiny.ARITHMETIC.max_operand + tiny.ARITHMETIC.max_second
    texts = tiny.counting_texts(4000, 1, top, separators=(" ", "\n"))
    assert any("\n" in t for t in texts) and any(" " in t and "\n" not in t for t in texts)
    for tok in arithmetic_toks:
        # ("zero", the sum of a single problem, only ever starts a run of counting)
        first = {tiny.encode_answer(tok, tiny.number_words(n))[0] for n in range(1, top)}
        targets = {i for t in texts for i in tok(t)["input_ids"][1:]}
        assert first <= targets, tok.convert_ids_to_tokens(sorted(first - targets))
    # with spaces only, a byte-level BPE never predicts a word without its space marker
    bpe = arithmetic_toks[0]
    spaced = {i for t in tiny.counting_texts(4000, 1, top) for i in bpe(t)["input_ids"][1:]}
    assert tiny.encode_answer(bpe, "forty-six")[0] not in spaced


def test_quickstart_config_fits_the_task(arithmetic_toks) -> None:
    """The quickstart YAML trains on the ARITHMETIC assets, and no row is longer than its
    sequence_len (Axolotl would drop it silently)."""
    cfg = yaml.safe_load((REPO / "example_configs" / "quickstart.yml").read_text())
    root = tiny.DEFAULT_CACHE / tiny.ARITHMETIC_NAME
    paths = tiny.asset_paths(root)
    assert Path(cfg["base_model"]) == paths["student_sp"] and Path(cfg["dskd_teacher"]) == paths["teacher"]
    assert Path(cfg["datasets"][0]["path"]) == paths["data"]
    assert cfg["datasets"][0]["type"]["format"] == tiny.PROMPT_FORMAT
    assert cfg["plugins"] == ["axolotl_dskd"] and not cfg["bf16"]
    split = tiny.task_split(tiny.ARITHMETIC)
    longest = max(len(tiny.encode_row(tok, r)[0]) for tok in arithmetic_toks for r in split["student"] + split["eval"])
    assert longest <= cfg["sequence_len"]


def test_without_distillation_keeps_everything_else() -> None:
    cfg = {"base_model": "s", "plugins": ["axolotl_dskd", "other.Plugin"], "dskd_teacher": "t", "dskd_kd_rate": 0.5,
           "max_steps": 3, "seed": 1}  # fmt: skip
    assert tiny.without_distillation(cfg) == {"base_model": "s", "plugins": ["other.Plugin"], "max_steps": 3, "seed": 1}
    assert tiny.without_distillation({**cfg, "plugins": ["axolotl_dskd.DSKDPlugin"]}) == {
        "base_model": "s", "max_steps": 3, "seed": 1,
    }  # fmt: skip
    assert cfg["dskd_teacher"] == "t"  # the input is left alone
    command = tiny.axolotl_train_command("c.yml")
    assert command[0].endswith("accelerate") and command[-3:] == ["-m", "axolotl.cli.train", "c.yml"]
