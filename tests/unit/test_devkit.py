"""dskd_devkit: deterministic tokenizers, models and data; make_assets reuses its cache."""

from __future__ import annotations

import copy
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

from axolotl_dskd import dolly
from dskd_devkit import assets, axolotl_runs, real_models, scoring, task, tiny_tokenizers, training

REPO = Path(__file__).resolve().parents[2]

CORPUS = task.task_corpus(200, seed=0, max_operand=30, max_second=10)

# a spec whose every training step runs, in a second or two
SMALL = assets.TinySpec(
    max_operand=20, max_second=5, tokenizer_rows=100, teacher_steps=3, teacher_batch=8,
    student_pretrain_steps=2, student_rows=16, noise=0.5, eval_rows=10,
)  # fmt: skip


@pytest.fixture(scope="module")
def toks():
    return tiny_tokenizers.bpe_tokenizer(CORPUS), tiny_tokenizers.sentencepiece_tokenizer(
        CORPUS, pad_token="</s>"
    )


def test_tokenizers_are_deterministic_across_processes(toks) -> None:
    bpe, sp = toks
    assert tiny_tokenizers.tokenizer_fingerprint(
        tiny_tokenizers.bpe_tokenizer(CORPUS)
    ) == tiny_tokenizers.tokenizer_fingerprint(bpe)
    assert tiny_tokenizers.tokenizer_fingerprint(
        tiny_tokenizers.sentencepiece_tokenizer(CORPUS, pad_token="</s>")
    ) == (tiny_tokenizers.tokenizer_fingerprint(sp))
    # another process, another hash seed: the same tokenizers (tiny loads without transformers)
    code = textwrap.dedent(
        """
        import sys
        from dskd_devkit import task, tiny_tokenizers
        c = task.task_corpus(200, seed=0, max_operand=30, max_second=10)
        print(tiny_tokenizers.tokenizer_fingerprint(tiny_tokenizers.train_bpe(c)))
        print(tiny_tokenizers.tokenizer_fingerprint(tiny_tokenizers.train_unigram(c)))
        print("transformers" in sys.modules)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONHASHSEED": "123", "TOKENIZERS_PARALLELISM": "true"},
    ).stdout.split()  # fmt: skip
    here = [
        tiny_tokenizers.tokenizer_fingerprint(tiny_tokenizers.train_bpe(CORPUS)),
        tiny_tokenizers.tokenizer_fingerprint(tiny_tokenizers.train_unigram(CORPUS)),
    ]
    assert out == [*here, "False"]


def test_tokenizer_styles_and_round_trip(toks) -> None:
    bpe, sp = toks
    row = task.addition_row(43, 9)
    assert row == {"instruction": task.INSTRUCTION, "input": "forty-three plus nine", "output": "fifty-two"}
    for tok in toks:
        ids, labels = task.encode_row(tok, row)
        prompt = task.encode_prompt(tok, row)
        assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [-100] * len(prompt)
        assert ids[-1] == labels[-1] == tok.eos_token_id
        assert tok.decode(labels[len(prompt) : -1]).strip() == "fifty-two"
        text = "Café 机器学习 🚀 forty-three plus nine = fifty-two"
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert sp("a")["input_ids"][0] == sp.bos_token_id and sp.pad_token == "</s>"
    assert bpe.bos_token_id is None and bpe.pad_token_id == bpe.eos_token_id
    assert bpe.chat_template == sp.chat_template == tiny_tokenizers.CHATML_TEMPLATE
    assert bpe.get_vocab() != sp.get_vocab()


def test_models_are_deterministic_in_the_seed(toks) -> None:
    bpe, _ = toks
    a = training.tiny_model("qwen2", bpe, hidden_size=64, seed=3).state_dict()
    b = training.tiny_model("qwen2", bpe, hidden_size=64, seed=3).state_dict()
    c = training.tiny_model("qwen2", bpe, hidden_size=64, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    llama = training.tiny_model("llama", bpe, hidden_size=64, num_layers=1)
    assert llama.config.vocab_size == len(bpe) and not llama.config.tie_word_embeddings


def test_task_split_is_deterministic_disjoint_and_noisy() -> None:
    spec = assets.ARITHMETIC
    split = assets.task_split(spec)
    assert split == assets.task_split(spec)
    assert len(split["eval"]) == 200 and len(split["student"]) == 256 and len(split["teacher"]) == 800
    held_out = {r["input"] for r in split["eval"]}
    teacher = {r["input"]: r["output"] for r in split["teacher"]}
    assert not held_out & set(teacher)
    assert all(r["input"] in teacher for r in split["student"])  # the teacher knows them, clean
    assert all(r == task.addition_row(*_operands(r)) for r in split["eval"] + split["teacher"])
    wrong = sum(r["output"] != teacher[r["input"]] for r in split["student"])
    assert 0.1 < wrong / 256 < 0.2  # ~15% noise
    assert assets.task_split(replace(spec, seed=1)) != split
    # the historical default: 64 clean rows of arithmetic_rows
    assert assets.task_split(assets.TinySpec())["student"] == task.arithmetic_rows(64, 0)


def _operands(row: dict[str, str]) -> tuple[int, int]:
    words = {task.number_words(n): n for n in range(200)}
    a, b = row["input"].split(" plus ")
    return words[a], words[b]


def test_number_words() -> None:
    assert [task.number_words(n) for n in (0, 13, 40, 52, 100, 104, 999)] == [
        "zero", "thirteen", "forty", "fifty-two", "one hundred", "one hundred four",
        "nine hundred ninety-nine",
    ]  # fmt: skip


def test_make_assets_builds_once_and_reuses_its_cache(tmp_path: Path) -> None:
    logs: list[str] = []
    paths = assets.make_assets(tmp_path / "a", spec=SMALL, log=logs.append, threads=1)
    assert any("training the teacher" in m for m in logs)
    assert set(paths) == set(assets.ASSET_NAMES) and all(p.exists() for p in paths.values())
    assert json.loads((tmp_path / "a" / "assets.json").read_text())["key"] == SMALL.key()
    files = sorted(p for p in (tmp_path / "a").rglob("*") if p.is_file())
    stamps = {p: p.stat().st_mtime_ns for p in files}

    logs.clear()
    assert assets.make_assets(tmp_path / "a", spec=SMALL, log=logs.append) == paths
    assert logs == []  # nothing rebuilt
    assert {p: p.stat().st_mtime_ns for p in files} == stamps

    # another spec: rebuilt in place; the data follows the spec
    other = replace(SMALL, noise=0.0)
    assert other.key() != SMALL.key()
    assets.make_assets(tmp_path / "a", spec=other)
    assert json.loads((tmp_path / "a" / "assets.json").read_text())["key"] == other.key()
    assert dolly.read_jsonl(paths["data"]) == assets.task_split(other)["student"]

    # the same spec elsewhere: the same data and the same (trained) weights
    again = assets.make_assets(tmp_path / "b", spec=other)
    for name in ("data", "eval", "teacher_data"):
        assert again[name].read_text() == paths[name].read_text()
    from safetensors.torch import load_file

    w1, w2 = (load_file(p["teacher"] / "model.safetensors") for p in (paths, again))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)

    # cached_assets names the folder by the spec's hash (or the given name)
    cached = assets.cached_assets(other, tmp_path / "cache")
    assert cached["teacher"].parent.name == f"task-{other.key()}"
    assert assets.cached_assets(other, tmp_path / "cache", name="x")["teacher"].parent.name == "x"


def test_default_assets_keep_the_shapes_the_e2e_tests_use(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    paths = assets.make_assets(tmp_path)
    assert AutoConfig.from_pretrained(paths["teacher"]).hidden_size == 128
    assert AutoConfig.from_pretrained(paths["student"]).hidden_size == 64
    assert AutoConfig.from_pretrained(paths["student_sp"]).hidden_size == 64
    assert AutoTokenizer.from_pretrained(paths["student"]).get_vocab() == (
        AutoTokenizer.from_pretrained(paths["teacher"]).get_vocab()
    )
    assert len(dolly.read_jsonl(paths["data"])) == 64


def test_evaluate_task_scores_a_model(toks) -> None:
    bpe, _ = toks
    model = training.tiny_model("llama", bpe, hidden_size=64, num_layers=1)
    rows = [task.addition_row(a, 1) for a in range(5)]
    scores = scoring.evaluate_task(model, bpe, rows, max_new_tokens=4)
    assert scores.n == 5 and 0.0 <= scores.exact_match <= 1.0
    assert 0 < scores.token_nll < 20 and scores.answer_nll > scores.token_nll
    assert scores.examples[0]["prompt"] == "zero plus one ="


@pytest.fixture(scope="module")
def arithmetic_toks():
    return assets.tokenizers_for(assets.ARITHMETIC)


def test_student_pretraining_covers_the_answer_tokens(arithmetic_toks) -> None:
    """Every token an answer starts with (tokenized on its own, as Axolotl appends a response)
    is a target somewhere in the students' counting text: LoRA leaves the LM head frozen, so a
    base that never predicted a token can hardly learn to."""
    top = assets.ARITHMETIC.max_operand + assets.ARITHMETIC.max_second
    texts = task.counting_texts(4000, 1, top, separators=(" ", "\n"))
    assert any("\n" in t for t in texts) and any(" " in t and "\n" not in t for t in texts)
    for tok in arithmetic_toks:
        # ("zero", the sum of a single problem, only ever starts a run of counting)
        first = {task.encode_answer(tok, task.number_words(n))[0] for n in range(1, top)}
        targets = {i for t in texts for i in tok(t)["input_ids"][1:]}
        assert first <= targets, tok.convert_ids_to_tokens(sorted(first - targets))
    # with spaces only, a byte-level BPE never predicts a word without its space marker
    bpe = arithmetic_toks[0]
    spaced = {i for t in task.counting_texts(4000, 1, top) for i in bpe(t)["input_ids"][1:]}
    assert task.encode_answer(bpe, "forty-six")[0] not in spaced


def test_quickstart_config_fits_the_task(arithmetic_toks) -> None:
    """The quickstart YAML trains on the ARITHMETIC assets, and no row is longer than its
    sequence_len (Axolotl would drop it silently)."""
    cfg = yaml.safe_load((REPO / "example_configs" / "quickstart.yml").read_text())
    root = assets.DEFAULT_CACHE / assets.ARITHMETIC_NAME
    paths = assets.asset_paths(root)
    assert Path(cfg["base_model"]) == paths["student_sp"] and Path(cfg["dskd_teacher"]) == paths["teacher"]
    assert Path(cfg["datasets"][0]["path"]) == paths["data"]
    assert cfg["datasets"][0]["type"]["format"] == task.PROMPT_FORMAT
    assert cfg["plugins"] == ["axolotl_dskd"] and not cfg["bf16"]
    split = assets.task_split(assets.ARITHMETIC)
    longest = max(
        len(task.encode_row(tok, r)[0]) for tok in arithmetic_toks for r in split["student"] + split["eval"]
    )
    assert longest <= cfg["sequence_len"]


def test_without_distillation_keeps_everything_else() -> None:
    """Only the dskd_* keys go: the plugin stays listed, so the SFT run is seeded like the
    distilled one before its LoRA weights are drawn."""
    cfg = {"base_model": "s", "plugins": ["axolotl_dskd", "other.Plugin"], "dskd_teacher": "t", "dskd_kd_rate": 0.5,
           "max_steps": 3, "seed": 1}  # fmt: skip
    assert axolotl_runs.without_distillation(cfg) == {
        "base_model": "s",
        "plugins": ["axolotl_dskd", "other.Plugin"],
        "max_steps": 3,
        "seed": 1,
    }
    assert cfg["dskd_teacher"] == "t"  # the input is left alone
    command = axolotl_runs.train_command("c.yml")
    assert command[0].endswith("accelerate") and command[-3:] == ["-m", "axolotl.cli.train", "c.yml"]


def test_spec_keys_stay_put_when_fields_are_added() -> None:
    """The key names the cache folder and the benchmark's reuse of runs: pinned, so that only a
    deliberate change (a new ASSETS_VERSION) moves it; the tokenizer fields count only when set."""
    assert assets.ARITHMETIC.key() == "640774324d4f"
    assert assets.TinySpec().key() == "a4334c6297e2"
    real = assets.REAL_VOCAB
    assert (real.teacher_tokenizer, real.cross_tokenizer) == ("qwen3", "llama2")
    assert replace(real, teacher_tokenizer="tiny", cross_tokenizer="tiny") == assets.ARITHMETIC
    assert len({real.key(), replace(real, cross_tokenizer="tiny").key(), assets.ARITHMETIC.key()}) == 3
    assert assets.SETS["real"] == (real, "arithmetic-real-vocab")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        assets.TinySpec(cross_tokenizer="llama4")


@pytest.fixture
def one_torch_thread():
    """Tiny models train fastest on one thread, and two spin for minutes on a busy CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_fit_used_vocab_trains_the_full_vocabulary_model(toks, one_torch_thread) -> None:
    """The compact training's loss is the full model's (softmax over every token), and what it
    writes back is that model: unused LM-head rows tied, unused embeddings untouched."""
    bpe, _ = toks
    rows = task.arithmetic_rows(8, 0, 30, 10)
    batch = training.pad_batch([task.encode_row(bpe, r) for r in rows], training.pad_id_of(bpe))
    model = training.tiny_model("llama", bpe, hidden_size=64, num_layers=1)
    # lr 0: one step's loss, on the whole set at the initial weights (shared row zero)
    losses = training.train_causal_lm(
        model, bpe, rows, steps=1, batch_size=8, lr=0.0, log=None, used_vocab=True
    )
    with torch.no_grad():
        assert model(**batch).loss.item() == pytest.approx(losses[0], abs=1e-5)

    initial = {k: v.clone() for k, v in model.state_dict().items()}
    losses = training.train_causal_lm(model, bpe, rows, steps=30, batch_size=8, log=None, used_vocab=True)
    used = sorted({i for ids, _ in (task.encode_row(bpe, r) for r in rows) for i in ids} | {bpe.eos_token_id})
    unused = torch.ones(len(bpe), dtype=torch.bool)
    unused[used] = False
    head, emb = model.lm_head.weight, model.model.embed_tokens.weight
    assert torch.equal(head[unused], head[unused][:1].expand(int(unused.sum()), -1))
    assert torch.equal(emb[unused], initial["model.embed_tokens.weight"][unused])
    assert not torch.equal(emb[used], initial["model.embed_tokens.weight"][used])
    with torch.no_grad():
        assert model(**batch).loss.item() < losses[0] - 1


def test_real_vocab_assets_use_the_real_tokenizers(real_tokenizer, tmp_path: Path, one_torch_thread) -> None:
    """A REAL_VOCAB-like spec at test size: Qwen3 on the teacher's side, Llama 2 on the cross
    student's, full vocabularies; rows tokenized as Axolotl does (Llama 2's BOS, Qwen3's EOS)."""
    qwen3, llama2 = real_tokenizer("qwen3"), real_tokenizer("llama2")
    spec = replace(
        SMALL, teacher_tokenizer="qwen3", cross_tokenizer="llama2", teacher_hidden=64, student_hidden=32
    )
    teacher_tok, cross_tok = assets.tokenizers_for(spec)
    assert teacher_tok.get_vocab() == qwen3.get_vocab() and cross_tok.get_vocab() == llama2.get_vocab()
    row = task.addition_row(43, 9)
    for tok, bos, eos in ((qwen3, None, "<|im_end|>"), (llama2, "<s>", "</s>")):
        ids, labels = task.encode_row(tok, row)
        prompt = task.encode_prompt(tok, row)
        assert (tok.convert_ids_to_tokens(prompt[0]) == bos) == (bos is not None)
        assert (
            tok.convert_ids_to_tokens(ids[-1]) == eos and tok.decode(labels[len(prompt) : -1]) == "fifty-two"
        )
        # the answer's first token is a target of the students' counting text (see make_student)
        texts = task.counting_texts(4000, 1, 110, separators=(" ", "\n"))
        targets = {i for t in texts for i in tok(t)["input_ids"][1:]}
        assert {task.encode_answer(tok, task.number_words(n))[0] for n in range(1, 110)} <= targets

    from transformers import AutoConfig, AutoTokenizer

    paths = assets.make_assets(tmp_path, spec=spec, threads=1)
    for name, tok in (("teacher", qwen3), ("student", qwen3), ("student_sp", llama2)):
        assert AutoConfig.from_pretrained(paths[name]).vocab_size == len(tok)
        saved = AutoTokenizer.from_pretrained(paths[name])
        assert saved("forty-three plus nine")["input_ids"] == tok("forty-three plus nine")["input_ids"]
        assert saved.eos_token == tok.eos_token and saved.pad_token_id is not None


def test_prune_width_narrows_the_residual_stream_and_saves_a_loadable_model(tmp_path: Path) -> None:
    """The narrow student of the real-model benchmark: its hidden size cut, the channel that carries
    most of the activations kept, its LM head still tied to its embeddings, and the saved folder
    loads back to the same model. Cutting nothing leaves the model's outputs as they were."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] *= 50  # a massive-activation channel
    massive = model.model.embed_tokens.weight[:, 5].clone()
    inputs = [torch.randint(0, 50, (12,)).tolist() for _ in range(4)]
    ids = torch.tensor([inputs[0]])
    with torch.no_grad():
        before = model(input_ids=ids).logits

    whole = real_models.prune_width(copy.deepcopy(model), inputs, 32)
    with torch.no_grad():
        torch.testing.assert_close(whole(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)

    narrow = real_models.prune_width(model, inputs, 24)
    assert narrow.config.hidden_size == 24 and narrow.lm_head.weight is narrow.model.embed_tokens.weight
    assert any(torch.equal(column, massive) for column in narrow.model.embed_tokens.weight.T)
    narrow.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, narrow(input_ids=ids).logits)


def test_gemma_tokenizer_from_gguf_encodes_as_sentencepiece(tmp_path: Path) -> None:
    """The real-model benchmark's Gemma 3 tokenizer, rebuilt from a GGUF vocabulary (here a small
    one in Gemma's layout, trained by SentencePiece), encodes every text as SentencePiece does with
    the same pieces, whitespace runs, digits and byte fallback included; the whitespace pieces
    llama.cpp stores with real spaces are read back as ``▁``; BOS is prepended."""
    import io

    import gguf
    import sentencepiece as spm
    from transformers.utils import sentencepiece_model_pb2_new

    texts = [*tiny_tokenizers.TEST_CORPUS, "def f(a,  b):\n        return a+b  # 12345", "héllo, 日本 🤖!"]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_tokenizers.TEST_CORPUS), model_writer=proto, model_type="bpe",
        vocab_size=700, byte_fallback=True, split_digits=True, add_dummy_prefix=False,
        remove_extra_whitespaces=False, normalization_rule_name="identity", pad_id=0, eos_id=1, bos_id=2,
        unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        control_symbols=["<mask>"], user_defined_symbols=["▁▁", "▁▁▁▁", "<start_of_turn>"],
    )  # fmt: skip
    reference = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    pieces = sentencepiece_model_pb2_new.ModelProto.FromString(proto.getvalue()).pieces

    writer = gguf.GGUFWriter(tmp_path / "tiny.gguf", "gemma3")
    writer.add_token_list([p.piece.replace("▁", " ") if p.type == 4 and set(p.piece) == {"▁"} else p.piece
                           for p in pieces])  # fmt: skip
    writer.add_token_scores([p.score for p in pieces])
    writer.add_token_types([p.type for p in pieces])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tokenizer = real_models.gemma_tokenizer(tmp_path / "tiny.gguf")

    assert tokenizer.convert_ids_to_tokens(reference.piece_to_id("▁▁")) == "▁▁"
    for text in texts:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == reference.encode(text), text
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id == 2 and tokenizer.decode(ids[1:]) == text
