"""The teacher's tokens of student-tokenized batches: lossless text, aligned labels, packing.

Two tokenizers that disagree on everything (byte-level BPE without BOS, sentencepiece-style
Unigram with byte fallback and BOS), both directions, on ASCII, accented, CJK and emoji text.
The reference texts below are computed independently of the module: per token, by decoding
every prefix of the sequence (quadratic, fine for test-sized samples).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator

import pytest
import torch

from axolotl_dskd.core.loss import IGNORE_INDEX
from axolotl_dskd.core.teacher_tokens import RoundTripStats, TeacherTokenBuilder
from dskd_devkit.tiny_tokenizers import mixed_text_bpe, mixed_text_sentencepiece

EOS_MARK = "<EOS>"

# (prompt, response): untrained prompt, trained response; boundaries fall between words
TEXTS = {
    "ascii": ("Question: What is the capital of France?\nAnswer:", " The capital of France is Paris."),
    "accents": (
        "Où est la bibliothèque? Réponds en français.\n",
        "Voilà: la bibliothèque est déjà fermée, Größe ŕ ő.",
    ),
    "cjk": ("问题:老师模型很大吗?\n", "是的,老师模型很大,学生模型很小。東京は日本の首都です。한국어"),
    "emoji": ("Reply with emoji 😀 only:", " 🎉🚀 👍🏽 ❤️ 🇫🇷 👨\u200d👩\u200d👧 🦀🦀 ✨"),
    "unseen": ("Rare letters ζ ψ ж and ñ:", "ǅ ǈ ῷ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and ﬁne ligatures\ttabs  two spaces"),
    "mixed": ("Translate 'cat' into Chinese, then add an emoji.\n\n", "猫 🐈 (māo), done!\n"),
}

CHAT = [
    (
        (
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi! Who are you?<|im_end|>\n"
            "<|im_start|>assistant\n"
        ),
        False,
    ),
    ("I am a small assistant. 😀<|im_end|>", True),
    ("\n<|im_start|>user\nSay 你好 in French.<|im_end|>\n<|im_start|>assistant\n", False),
    ("Bonjour, ça va? 🇫🇷<|im_end|>", True),
    ("\n<|im_start|>user\nThanks.<|im_end|>\n<|im_start|>assistant\n", False),
    ("De rien!<|im_end|>", True),
    ("\n", False),
]


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def bpe(tmp_path_factory: pytest.TempPathFactory):
    return mixed_text_bpe(tmp_path_factory.mktemp("tok") / "bpe")


@pytest.fixture(scope="session")
def sp(tmp_path_factory: pytest.TempPathFactory):
    return mixed_text_sentencepiece(tmp_path_factory.mktemp("tok") / "sentencepiece")


@pytest.fixture(scope="session")
def totals() -> Iterator[RoundTripStats]:
    """Round-trip statistics over every builder the tests make (shown with ``pytest -s``)."""
    stats = RoundTripStats()
    yield stats
    print(f"\nteacher_tokens round trip over the tests: {stats.as_dict()}")


@pytest.fixture
def builder(totals: RoundTripStats) -> Iterator[Callable[..., TeacherTokenBuilder]]:
    made: list[TeacherTokenBuilder] = []

    def make(student, teacher, max_length: int = 4096, **kw) -> TeacherTokenBuilder:
        made.append(TeacherTokenBuilder(student, teacher, max_length=max_length, **kw))
        return made[-1]

    yield make
    for b in made:
        totals.merge(b.stats)


@pytest.fixture(params=["sp->bpe", "bpe->sp"])
def pair(request: pytest.FixtureRequest, bpe, sp):
    return (sp, bpe) if request.param == "sp->bpe" else (bpe, sp)


# -- helpers ----------------------------------------------------------------------------------------


def encode_parts(tok, parts: list[tuple[str, bool]], eos: bool | None = True) -> tuple[list[int], list[int]]:
    """Student ids and labels as a data pipeline makes them: tokenize the whole text once, train
    the tokens that start inside a trained part; ``eos``: append EOS (trained iff True)."""
    text = "".join(p for p, _ in parts)
    enc = tok(text, return_offsets_mapping=True)
    spans, at = [], 0
    for part, trained in parts:
        spans.append((at, at + len(part), trained))
        at += len(part)
    ids, labels = list(enc["input_ids"]), []
    for tid, (a, b) in zip(ids, enc["offset_mapping"]):
        trained = b > a and any(s <= a < e and t for s, e, t in spans)
        labels.append(tid if trained else IGNORE_INDEX)
    if eos is not None:
        ids.append(tok.eos_token_id)
        labels.append(tok.eos_token_id if eos else IGNORE_INDEX)
    return ids, labels


def contributions(tok, ids: list[int]) -> list[str]:
    """Each token's text in context (EOS as a marker); a character split over several tokens is
    credited to the token it starts in. A leading BOS contributes nothing."""
    bos, eos = tok.bos_token_id, tok.eos_token_id
    start = 1 if bos is not None and ids[:1] == [bos] else 0
    out = [""] * len(ids)
    done, pending = "", None
    for i in range(start, len(ids)):
        if ids[i] == eos and (pending is None):
            out[i] = EOS_MARK
            done = tok.decode(ids[start : i + 1], skip_special_tokens=False)
            continue
        text = tok.decode(ids[start : i + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        owner = i if pending is None else pending
        if text.endswith("\ufffd") and i + 1 < len(ids):
            # an incomplete character, unless the whole text reads the same (a real U+FFFD)
            full = tok.decode(ids[start:], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if not full.startswith(text):
                pending = owner
                continue
        assert text.startswith(done), (done, text)
        out[owner] += text[len(done) :]
        done, pending = text, None
    return out


def runs(tok, ids: list[int], labels: list[int]) -> list[tuple[bool, str]]:
    """Maximal (trained, text) runs, EOS marked, empty texts left out."""
    result: list[tuple[bool, str]] = []
    for piece, lab in zip(contributions(tok, ids), labels):
        trained = lab != IGNORE_INDEX
        if not piece:
            continue
        if result and result[-1][0] == trained and EOS_MARK not in (piece, result[-1][1][-5:]):
            result[-1] = (trained, result[-1][1] + piece)
        else:
            result.append((trained, piece))
    return result


def text_of(rs: list[tuple[bool, str]], trained: bool | None = None) -> str:
    return "".join(t for tr, t in rs if trained is None or tr == trained)


def assert_same_text(student, teacher, s_ids, s_labels, t_ids, t_labels) -> None:
    s_runs, t_runs = runs(student, s_ids, s_labels), runs(teacher, t_ids, t_labels)
    assert text_of(t_runs) == text_of(s_runs)
    assert text_of(t_runs, True) == text_of(s_runs, True)
    assert text_of(t_runs, False) == text_of(s_runs, False)
    assert t_runs == s_runs
    assert "\ufffd" not in text_of(t_runs)


# -- one sample -------------------------------------------------------------------------------------


def test_fixture_tokenizers_are_lossless_and_deterministic(bpe, sp) -> None:
    for tok in (bpe, sp):
        for prompt, response in TEXTS.values():
            text = prompt + response
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.decode(ids) == text
    assert sp("a")["input_ids"][0] == sp.bos_token_id  # sentencepiece style: BOS added
    assert bpe("a")["input_ids"] == bpe("a", add_special_tokens=False)["input_ids"]  # no BOS
    assert mixed_text_bpe().get_vocab() == bpe.get_vocab()
    assert mixed_text_sentencepiece().backend_tokenizer.to_str() == sp.backend_tokenizer.to_str()


@pytest.mark.parametrize("name", list(TEXTS))
def test_round_trip_per_run(pair, builder, name: str) -> None:
    student, teacher = pair
    b = builder(student, teacher)
    prompt, response = TEXTS[name]
    s_ids, s_labels = encode_parts(student, [(prompt, False), (response, True)])
    t_ids, t_labels = b.sample(s_ids, s_labels)
    assert_same_text(student, teacher, s_ids, s_labels, t_ids, t_labels)
    # the whole sample reads as the original text on the teacher side
    body = [t for t in t_ids if t not in (teacher.bos_token_id, teacher.eos_token_id)]
    assert teacher.decode(body) == prompt + response
    assert t_ids[-1] == teacher.eos_token_id and t_labels[-1] == teacher.eos_token_id
    if teacher.bos_token_id is not None:
        assert t_ids[0] == teacher.bos_token_id and t_labels[0] == IGNORE_INDEX
    assert b.stats.runs >= 2 and b.stats.mismatched_runs == 0, b.stats.examples
    assert all(lab in (IGNORE_INDEX, tid) for tid, lab in zip(t_ids, t_labels))


def test_untrained_eos_and_no_eos(pair, builder) -> None:
    student, teacher = pair
    b = builder(student, teacher)
    prompt, response = TEXTS["mixed"]
    ids, labels = encode_parts(student, [(prompt, False), (response, True)], eos=None)
    t_ids, t_labels = b.sample(ids, labels)
    assert teacher.eos_token_id not in t_ids
    ids, labels = encode_parts(student, [(prompt, False), (response, True)], eos=False)
    t_ids, t_labels = b.sample(ids, labels)
    assert t_ids[-1] == teacher.eos_token_id and t_labels[-1] == IGNORE_INDEX
    assert t_labels[-2] != IGNORE_INDEX
    assert b.stats.mismatched_runs == 0


def test_chat_keeps_exactly_the_assistant_turns_trained(pair, builder) -> None:
    student, teacher = pair
    b = builder(student, teacher)
    s_ids, s_labels = encode_parts(student, CHAT, eos=None)
    t_ids, t_labels = b.sample(s_ids, s_labels)
    assert_same_text(student, teacher, s_ids, s_labels, t_ids, t_labels)
    trained = [text for tr, text in runs(teacher, t_ids, t_labels) if tr]
    assert len(trained) == 3
    for got, want in zip(trained, [p for p, tr in CHAT if tr]):
        assert got.rstrip("\n") == want  # a student piece may carry the newline after <|im_end|>
    assert b.stats.mismatched_runs == 0, b.stats.examples
    # chat markers are special tokens for the byte-level BPE and plain text for the other
    im_start = teacher.get_vocab().get("<|im_start|>")
    if im_start is not None:
        assert t_ids.count(im_start) == "".join(p for p, _ in CHAT).count("<|im_start|>")
    assert teacher.unk_token_id not in t_ids or teacher.unk_token_id == teacher.eos_token_id


@pytest.mark.parametrize("which", ["bpe", "sp"])
def test_same_tokenizer_reproduces_student_ids(request, builder, which: str) -> None:
    tok = request.getfixturevalue(which)
    b = builder(tok, tok)
    samples = [encode_parts(tok, [(p, False), (r, True)]) for p, r in TEXTS.values()]
    samples.append(encode_parts(tok, CHAT, eos=None))
    for ids, labels in samples:
        assert b.sample(ids, labels) == (ids, labels)
    assert b.stats.mismatched_runs == 0


@pytest.mark.parametrize("direction", ["bpe->sp", "sp->bpe"])
def test_boundary_inside_a_character_moves(bpe, sp, builder, direction: str) -> None:
    student, teacher = (bpe, sp) if direction == "bpe->sp" else (sp, bpe)
    b = builder(student, teacher)
    text = "Crab 🦀 and 東京 end"
    ids = student(text)["input_ids"]
    pieces = [student.decode(ids[: i + 1]) for i in range(len(ids))]
    # the first token that leaves a character incomplete: cut right after it
    cut = next(i + 1 for i, p in enumerate(pieces) if p.endswith("\ufffd"))
    labels = [IGNORE_INDEX] * cut + ids[cut:]
    t_ids, t_labels = b.sample(ids, labels)
    assert b.stats.moved_boundaries >= 1
    assert b.stats.mismatched_runs == 0, b.stats.examples
    t_runs = runs(teacher, t_ids, t_labels)
    assert text_of(t_runs) == text
    assert [tr for tr, _ in t_runs] == [False, True]
    assert text_of(t_runs, False).endswith("🦀")  # the whole crab went to the run it starts in


@pytest.mark.parametrize("response", ["", "   ", "\n", " \n\t "])
def test_empty_or_whitespace_response(pair, builder, response: str) -> None:
    student, teacher = pair
    b = builder(student, teacher)
    prompt = "Question: say nothing.\nAnswer:"
    ids, labels = encode_parts(student, [(prompt, False), (response, True)], eos=None)
    t_ids, t_labels = b.sample(ids, labels)  # must not crash
    s_runs, t_runs = runs(student, ids, labels), runs(teacher, t_ids, t_labels)
    assert text_of(t_runs) == text_of(s_runs)
    assert b.stats.mismatched_runs == 0, b.stats.examples
    if all(lab == IGNORE_INDEX for lab in t_labels):
        assert b.stats.samples_without_trained == 1
    else:
        assert text_of(t_runs, True) == text_of(s_runs, True)
    # with an untrained EOS: nothing trained anywhere, counted
    b.stats.reset()
    b.sample([*ids, student.eos_token_id], [IGNORE_INDEX] * (len(ids) + 1))
    assert b.stats.samples == 1 and b.stats.samples_without_trained == 1


def test_mismatch_is_counted_when_the_teacher_cannot_represent_the_text(bpe, sp, builder) -> None:
    # a sentencepiece (Metaspace) teacher reads a literal "▁" as a space: the check must say so
    b = builder(bpe, sp)
    ids, labels = encode_parts(bpe, [("Draw a line:", False), (" ▁▁▁ done", True)])
    b.sample(ids, labels)
    assert b.stats.mismatched_runs == 1 and b.stats.runs == 2
    assert b.stats.examples == [(" ▁▁▁ done", "     done")]
    b.stats.reset()


def test_round_trip_mismatch_is_reported_once_with_a_count(bpe, sp, builder, caplog) -> None:
    b = builder(bpe, sp)
    ids, labels = encode_parts(bpe, [("Draw a line:", False), (" ▁▁▁ done", True)])
    batch = {"input_ids": [ids], "labels": [labels], "attention_mask": [[1] * len(ids)]}
    with caplog.at_level("WARNING", logger="axolotl_dskd"):
        b(batch)
        b(batch)
    warnings = [r.getMessage() for r in caplog.records if "round trip" in r.getMessage()]
    assert len(warnings) == 1
    assert "1 of 2 text runs" in warnings[0] and "' ▁▁▁ done'" in warnings[0]


def test_a_teacher_tokenizer_that_makes_no_tokens_stops_the_run(bpe, tmp_path) -> None:
    """A teacher folder without tokenizer files loads as an empty tokenizer (validation refuses
    it; this is the run-time guard, where a run's batches are made): the run stops, naming the
    key, instead of training with no distillation."""
    from transformers import AutoTokenizer, Qwen2Config

    Qwen2Config(vocab_size=64, hidden_size=8, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        tmp_path
    )
    empty = AutoTokenizer.from_pretrained(tmp_path)
    assert empty("Hello, world!")["input_ids"] == []
    with pytest.raises(
        ValueError, match="dskd_teacher_tokenizer: the teacher's tokenizer turns text into no"
    ):
        TeacherTokenBuilder(bpe, empty, max_length=64)


def test_student_bos_equal_to_eos(bpe, sp, builder) -> None:
    # GPT-2 style: <|endoftext|> is BOS, EOS and pad at once; at the start it is BOS (dropped)
    from transformers import PreTrainedTokenizerFast

    gpt2_like = PreTrainedTokenizerFast(
        tokenizer_object=bpe.backend_tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
    )
    b = builder(gpt2_like, sp)
    eot = gpt2_like.eos_token_id
    ids, labels = encode_parts(gpt2_like, [("Hi there.\n", False), ("Hello!", True)])
    t_ids, t_labels = b.sample([eot, *ids], [IGNORE_INDEX, *labels])
    assert t_ids[0] == sp.bos_token_id and t_ids.count(sp.eos_token_id) == 1
    assert t_ids[-1] == sp.eos_token_id and t_labels[-1] == sp.eos_token_id
    assert sp.decode(t_ids[1:-1]) == "Hi there.\nHello!"


def test_pickle_round_trip(pair, builder) -> None:
    student, teacher = pair
    b = builder(student, teacher)
    clone = pickle.loads(pickle.dumps(b))
    ids, labels = encode_parts(student, [(p, tr) for p, tr in CHAT], eos=None)
    assert clone.sample(ids, labels) == b.sample(ids, labels)


# -- batches ----------------------------------------------------------------------------------------


def pack(samples: list[tuple[list[int], list[int]]], width: int, pad_id: int) -> dict[str, torch.Tensor]:
    """One packed row as Axolotl's multipack collator makes it (padding at the end)."""
    ids = [t for s, _ in samples for t in s]
    labels = [t for _, s in samples for t in s]
    pos = [p for s, _ in samples for p in range(len(s))]
    mask = [k + 1 for k, (s, _) in enumerate(samples) for _ in s]  # sample index, as Axolotl's V2
    n = width - len(ids)
    assert n >= 0
    return {
        "input_ids": torch.tensor([ids + [pad_id] * n]),
        "labels": torch.tensor([labels + [IGNORE_INDEX] * n]),
        "attention_mask": torch.tensor([mask + [0] * n]),
        "position_ids": torch.tensor([pos + list(range(n))]),
    }


def teacher_samples(out: dict[str, torch.Tensor], row: int = 0) -> dict[int, tuple[list[int], list[int]]]:
    seg = out["teacher_segment_ids"][row].tolist()
    ids, labels = out["teacher_input_ids"][row].tolist(), out["teacher_labels"][row].tolist()
    result: dict[int, tuple[list[int], list[int]]] = {}
    for s, t, lab in zip(seg, ids, labels):
        if s >= 0:
            result.setdefault(s, ([], []))
            result[s][0].append(t)
            result[s][1].append(lab)
    return result


def test_packing_keeps_samples_apart(pair, builder) -> None:
    student, teacher = pair
    b = builder(student, teacher)
    a = encode_parts(student, [(TEXTS["accents"][0], False), (TEXTS["accents"][1], True)])
    c = encode_parts(student, [(TEXTS["cjk"][0], False), (TEXTS["cjk"][1], True)])
    d = encode_parts(student, [(TEXTS["emoji"][0], False), (TEXTS["emoji"][1], True)])
    width = len(a[0]) + len(c[0]) + len(d[0]) + 7
    out = b(pack([a, c], width, student.pad_token_id or 0))
    out2 = b(pack([a, d], width, student.pad_token_id or 0))

    s_seg = out["student_segment_ids"][0].tolist()
    assert s_seg == [0] * len(a[0]) + [1] * len(c[0]) + [-1] * (width - len(a[0]) - len(c[0]))
    samples = teacher_samples(out)
    assert sorted(samples) == [0, 1]
    # each packed sample gets exactly its standalone teacher tokens; changing one leaves the other
    assert samples[0] == b.sample(*a) == teacher_samples(out2)[0]
    assert samples[1] == b.sample(*c)
    assert teacher_samples(out2)[1] == b.sample(*d)
    assert_same_text(student, teacher, *c, *samples[1])

    seg = out["teacher_segment_ids"][0].tolist()
    pos = out["teacher_position_ids"][0].tolist()
    n0, n1 = len(samples[0][0]), len(samples[1][0])
    assert seg == [0] * n0 + [1] * n1 + [-1] * (len(seg) - n0 - n1)
    assert pos[: n0 + n1] == list(range(n0)) + list(range(n1))
    assert pos[n0 + n1 :] == list(range(n1, n1 + len(seg) - n0 - n1))  # padding continues
    mask = out["teacher_attention_mask"][0].tolist()
    assert mask == [1] * (n0 + n1) + [0] * (len(seg) - n0 - n1)
    assert b.stats.mismatched_runs == 0


def test_unpacked_batch_padding_and_shapes(pair, builder) -> None:
    student, teacher = pair
    b = builder(student, teacher, pad_to_multiple_of=8)
    rows = [encode_parts(student, [(p, False), (r, True)]) for p, r in list(TEXTS.values())[:3]]
    width = max(len(r[0]) for r in rows) + 3
    pad = student.pad_token_id if student.pad_token_id is not None else student.eos_token_id
    batch = {
        "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
        "labels": torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in rows]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
    }
    out = b(batch)
    lt = out["teacher_input_ids"].shape[1]
    assert lt % 8 == 0
    keys = ("input_ids", "attention_mask", "labels", "position_ids", "segment_ids")
    for key in (f"teacher_{k}" for k in keys):
        assert out[key].shape == (3, lt) and out[key].dtype == torch.long
    assert out["student_segment_ids"].shape == (3, width)
    t_pad = teacher.pad_token_id if teacher.pad_token_id is not None else teacher.eos_token_id
    for r, (ids, labels) in enumerate(rows):
        t_ids, t_labels = b.sample(ids, labels)
        n = len(t_ids)
        assert out["teacher_input_ids"][r, :n].tolist() == t_ids
        assert out["teacher_labels"][r, :n].tolist() == t_labels
        assert set(out["teacher_input_ids"][r, n:].tolist()) <= {t_pad}
        assert set(out["teacher_labels"][r, n:].tolist()) <= {IGNORE_INDEX}
        assert out["teacher_attention_mask"][r].tolist() == [1] * n + [0] * (lt - n)
        assert out["teacher_position_ids"][r, :n].tolist() == list(range(n))
        assert out["student_segment_ids"][r].tolist() == [0] * len(ids) + [-1] * (width - len(ids))
        assert out["teacher_segment_ids"][r].tolist() == [0] * n + [-1] * (lt - n)


def test_truncation(pair, builder) -> None:
    student, teacher = pair
    a = encode_parts(student, [(TEXTS["ascii"][0], False), (TEXTS["ascii"][1], True)])
    c = encode_parts(student, [(TEXTS["cjk"][0], False), (TEXTS["cjk"][1], True)])
    full = builder(student, teacher).sample(*a)[0]
    n_a = len(full)

    # one sample: cut inside the response, the kept part is a prefix of the full teacher sample
    b = builder(student, teacher, max_length=n_a - 3)
    ids, labels = b.sample(*a)
    assert ids == full[: n_a - 3] and len(labels) == n_a - 3
    assert b.stats.truncated_samples == 1 and b.stats.samples_without_trained == 0

    # packed: the later sample loses tokens first; here it keeps only prompt tokens, then nothing
    for max_length, kept_c in [(n_a + 2, 2), (n_a, 0)]:
        b = builder(student, teacher, max_length=max_length)
        width = len(a[0]) + len(c[0])
        out = b(pack([a, c], width, 0))
        assert out["teacher_input_ids"].shape[1] == max_length
        samples = teacher_samples(out)
        assert samples[0][0] == full
        assert len(samples.get(1, ([], []))[0]) == kept_c
        assert b.stats.truncated_samples == 1 and b.stats.samples_without_trained == 1
        assert max(out["teacher_position_ids"][0].tolist()) < max_length

    # a whole prompt longer than the limit: the response is gone, counted
    b = builder(student, teacher, max_length=4)
    ids, labels = b.sample(*c)
    assert len(ids) == 4 and all(lab == IGNORE_INDEX for lab in labels)
    assert b.stats.samples_without_trained == 1


def test_rows_without_position_ids_are_one_sample_each(pair, builder) -> None:
    student, teacher = pair
    b = builder(student, teacher)
    a = encode_parts(student, [(TEXTS["ascii"][0], False), (TEXTS["ascii"][1], True)])
    out = b({"input_ids": torch.tensor([a[0]]), "labels": torch.tensor([a[1]])})
    assert set(out["student_segment_ids"][0].tolist()) == {0}
    assert set(out["teacher_segment_ids"][0].tolist()) == {0}
    assert teacher_samples(out)[0] == b.sample(*a)


# -- random texts, random run boundaries (inside characters too) -------------------------------------

POOL = [
    *"abcdefghij ABC  \n\t.,!?éèàüößñçœ",
    *"我们老师东京한국ζψж",
    "😀",
    "🦀",
    "👍🏽",
    "🇫🇷",
    "👨\u200d👩\u200d👧",
    "❤️",
    "\ufffd",
    "<|im_start|>",
    "<|im_end|>",
    "  ",
    "<0x41>",
    "𝔘",
]


def random_sample(tok, rng) -> tuple[list[int], list[int]]:
    text = "".join(rng.choice(POOL) for _ in range(rng.randint(1, 30)))
    ids = list(tok(text)["input_ids"])
    labels, trained = [], rng.random() < 0.5
    for tid in ids:
        if rng.random() < 0.25:
            trained = not trained
        labels.append(tid if trained else IGNORE_INDEX)
    if rng.random() < 0.5:
        ids.append(tok.eos_token_id)
        labels.append(tok.eos_token_id if rng.random() < 0.5 else IGNORE_INDEX)
    return ids, labels


@pytest.mark.parametrize("direction", ["sp->bpe", "bpe->sp", "sp->sp", "bpe->bpe"])
def test_random_texts_and_boundaries(bpe, sp, builder, direction: str) -> None:
    import random

    toks = {"sp": sp, "bpe": bpe}
    student, teacher = (toks[n] for n in direction.split("->"))
    b = builder(student, teacher)
    rng = random.Random(direction)
    for _ in range(120):
        ids, labels = random_sample(student, rng)
        t_ids, t_labels = b.sample(ids, labels)
        s_text = student.decode([t for t in ids if t != student.bos_token_id])
        t_text = teacher.decode([t for t in t_ids if t != teacher.bos_token_id])
        s_text, t_text = (
            s_text.replace(student.eos_token, EOS_MARK),
            t_text.replace(teacher.eos_token, EOS_MARK),
        )
        assert t_text == s_text
        assert all(lab in (IGNORE_INDEX, tid) for tid, lab in zip(t_ids, t_labels))
    assert b.stats.mismatched_runs == 0, b.stats.examples
    assert b.stats.moved_boundaries > 0  # the random cuts did land inside characters


def test_rust_shortcut_matches_transformers(pair, builder, monkeypatch) -> None:
    """Calling the Rust tokenizer directly (the builder's fast path) gives transformers' results."""
    import random

    from axolotl_dskd.core import codec

    student, teacher = pair
    assert codec._is_plain_fast(student) and codec._is_plain_fast(teacher)
    fast = builder(student, teacher)
    monkeypatch.setattr(codec, "_is_plain_fast", lambda tokenizer: False)
    slow = builder(student, teacher)
    rng = random.Random(1)
    for _ in range(40):
        ids, labels = random_sample(student, rng)
        assert fast.sample(ids, labels) == slow.sample(ids, labels)
    assert fast.stats.as_dict() == slow.stats.as_dict()


# -- exact alignment ----------------------------------------------------------------------------------
# ``token_alignment[b, i] = j``: the student's tokens up to ``i`` and the teacher's up to ``j`` cover
# the same text. The expected partners are computed independently, by decoding every prefix of
# both sides (a token ending inside a character decodes to U+FFFD and is left out of the check).

REAL_PAIRS = ["llama2->qwen3", "qwen3->llama2", "llama3->qwen3", "llama2->llama3"]


def prefix_texts(tok, ids: list[int], eos_text: str | None = None) -> list[str | None]:
    """The text read up to and including each token (BOS: nothing yet), ``None`` where that
    prefix ends inside a character. ``eos_text``: how an EOS reads instead of its own text (the
    builder turns the student's EOS into the teacher's)."""
    start = 1 if tok.bos_token_id is not None and ids[:1] == [tok.bos_token_id] else 0
    out: list[str | None] = [None] * start
    plain: list[int] = []
    marks: list[int] = []  # where in the text of ``plain`` each EOS stands

    def decode() -> str:
        text = tok.decode(plain, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        for at in reversed(marks):
            text = text[:at] + eos_text + text[at:]
        return text

    for i in range(start, len(ids)):
        if eos_text is not None and ids[i] == tok.eos_token_id:
            marks.append(
                len(tok.decode(plain, skip_special_tokens=False, clean_up_tokenization_spaces=False))
            )
        else:
            plain.append(ids[i])
        text = decode()
        out.append(None if text.endswith("\ufffd") else text)
    return out


def expected_partners(student, teacher, s_ids: list[int], t_ids: list[int]) -> dict[int, int]:
    """Student position -> the last teacher position whose prefix reads the same text."""
    by_text = {text: j for j, text in enumerate(prefix_texts(teacher, t_ids)) if text is not None}
    s_texts = prefix_texts(student, s_ids, eos_text=teacher.eos_token)
    return {i: by_text.get(text, -1) for i, text in enumerate(s_texts) if text is not None}


def sample_alignment(
    b: TeacherTokenBuilder, ids: list[int], labels: list[int]
) -> tuple[list[int], list[int]]:
    out = b({"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels])})
    return out["token_alignment"][0].tolist(), out["teacher_input_ids"][0].tolist()


def check_alignment(student, teacher, b: TeacherTokenBuilder, parts: list[tuple[str, bool]]) -> float:
    """Every partner reads the same text, every position that could have one has it, EOS pairs
    with EOS; returns the share of trained student tokens with a partner."""
    ids, labels = encode_parts(student, parts)
    alignment, t_ids = sample_alignment(b, ids, labels)
    assert len(alignment) == len(ids)
    for i, j in expected_partners(student, teacher, ids, t_ids).items():
        assert alignment[i] == j, (i, student.decode(ids[: i + 1]), j, alignment[i])
    for i, tid in enumerate(ids):
        if tid == student.eos_token_id:  # EOS pairs with the teacher's EOS
            assert t_ids[alignment[i]] == teacher.eos_token_id
    if ids[0] == student.bos_token_id:
        assert alignment[0] == -1  # the student's BOS has read no text
    trained = [i for i in range(len(ids) - 1) if labels[i + 1] != IGNORE_INDEX]
    return sum(alignment[i] >= 0 for i in trained) / len(trained)


@pytest.mark.parametrize("name", list(TEXTS))
def test_alignment_pairs_positions_that_have_read_the_same_text(pair, builder, name: str) -> None:
    student, teacher = pair
    check_alignment(
        student, teacher, builder(student, teacher), [(TEXTS[name][0], False), (TEXTS[name][1], True)]
    )


@pytest.mark.parametrize("direction", REAL_PAIRS)
def test_alignment_on_real_tokenizers(real_tokenizer, builder, direction: str) -> None:
    """Llama 2 (sentencepiece, byte fallback), Llama 3 and Qwen3 (byte-level BPE): prose with
    accents, CJK, emoji, code indentation and chat markers."""
    student, teacher = (real_tokenizer(name) for name in direction.split("->"))
    b = builder(student, teacher)
    shares = [check_alignment(student, teacher, b, [(p, False), (r, True)]) for p, r in TEXTS.values()]
    code = [("def add(a, b):\n", False), ("    return a + b\n\n\tif x:\n\t\tpass", True)]
    shares.append(check_alignment(student, teacher, b, code))
    shares.append(check_alignment(student, teacher, b, [(text, trained) for text, trained in CHAT]))
    assert b.stats.mismatched_runs == 0
    assert min(shares) > 0.3 and sum(shares) / len(shares) > 0.6, shares


@pytest.mark.parametrize("which", ["bpe", "sp", "llama2", "qwen3"])
def test_identical_tokenizers_align_every_position_with_itself(
    request, real_tokenizer, builder, which
) -> None:
    tok = request.getfixturevalue(which) if which in ("bpe", "sp") else real_tokenizer(which)
    b = builder(tok, tok)
    for prompt, response in [*TEXTS.values(), ("def f():\n", "    return {'a': 1}\n")]:
        ids, labels = encode_parts(tok, [(prompt, False), (response, True)])
        alignment, t_ids = sample_alignment(b, ids, labels)
        assert t_ids == ids
        first = 1 if tok.bos_token_id is not None else 0  # the teacher's own BOS never aligns
        assert alignment == [-1] * first + list(range(first, len(ids)))


def test_alignment_stays_inside_each_packed_sample(pair, builder) -> None:
    student, teacher = pair
    b = builder(student, teacher)
    a = encode_parts(student, [(TEXTS["accents"][0], False), (TEXTS["accents"][1], True)])
    c = encode_parts(student, [(TEXTS["cjk"][0], False), (TEXTS["cjk"][1], True)])
    out = b(pack([a, c], len(a[0]) + len(c[0]) + 5, student.pad_token_id or 0))
    alignment = out["token_alignment"][0].tolist()
    s_seg, t_seg = out["student_segment_ids"][0].tolist(), out["teacher_segment_ids"][0].tolist()
    for i, j in enumerate(alignment):
        if s_seg[i] < 0:
            assert j == -1  # padding
        elif j >= 0:
            assert t_seg[j] == s_seg[i]
    # each sample aligns as it does alone, shifted to where it sits in the row
    alone_a, t_a = sample_alignment(b, *a)
    alone_c, _ = sample_alignment(b, *c)
    assert alignment[: len(a[0])] == alone_a
    assert alignment[len(a[0]) : len(a[0]) + len(c[0])] == [j + len(t_a) if j >= 0 else -1 for j in alone_c]


def test_alignment_never_points_past_a_truncated_teacher_row(pair, builder) -> None:
    student, teacher = pair
    ids, labels = encode_parts(student, [(TEXTS["ascii"][0], False), (TEXTS["ascii"][1], True)])
    b = builder(student, teacher, max_length=10)
    alignment, t_ids = sample_alignment(b, ids, labels)
    assert len(t_ids) == 10 and max(alignment) <= 9
    full, _ = sample_alignment(builder(student, teacher), ids, labels)
    assert alignment == [j if j < 10 else -1 for j in full]
