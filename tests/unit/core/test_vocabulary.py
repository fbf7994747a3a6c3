"""``axolotl_dskd.core.vocabulary``: which tokens two vocabularies share (by the text they stand
for) and which special tokens of one model are plain text to the other."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from transformers import AutoTokenizer

from axolotl_dskd.core.vocabulary import shared_vocabulary, token_bytes


@pytest.fixture(scope="module")
def tiny() -> dict:
    from dskd_devkit.task import task_corpus
    from dskd_devkit.tiny_tokenizers import bpe_tokenizer, sentencepiece_tokenizer

    corpus = task_corpus()
    return {"bpe": bpe_tokenizer(corpus), "sp": sentencepiece_tokenizer(corpus)}


def _sp_text(tokenizer, token_id: int) -> str:
    """What a sentencepiece token stands for, leading space included: its decoder strips the
    first space of a text, so decode it after a token without one."""
    anchor = tokenizer.convert_tokens_to_ids("W")
    return tokenizer.decode([anchor, token_id])[1:]


def test_identical_tokenizers_pair_every_complete_token_with_itself(tiny):
    tok = tiny["bpe"]
    student_ids, teacher_ids = shared_vocabulary(tok, tok)
    assert student_ids.dtype == teacher_ids.dtype == torch.long
    assert torch.equal(student_ids, teacher_ids)
    special = set(tok.all_special_ids)
    complete = {i for i in range(len(tok)) if i not in special and "\ufffd" not in tok.decode([i])}
    assert set(student_ids.tolist()) == complete  # only partial UTF-8 byte tokens are left out
    assert len(complete) > 300


def test_byte_level_and_sentencepiece_pairs_stand_for_the_same_text(tiny):
    bpe, sp = tiny["bpe"], tiny["sp"]
    sp_ids, bpe_ids = shared_vocabulary(sp, bpe)
    assert len(sp_ids) > 50
    assert len(set(sp_ids.tolist())) == len(set(bpe_ids.tolist())) == len(sp_ids)
    assert not set(sp_ids.tolist()) & set(sp.all_special_ids)
    assert not any(re.fullmatch(r"<0x..>", t) for t in sp.convert_ids_to_tokens(sp_ids.tolist()))
    for i, j in zip(sp_ids.tolist(), bpe_ids.tolist()):
        assert _sp_text(sp, i) == bpe.decode([j])
    assert any(_sp_text(sp, i).startswith(" ") for i in sp_ids.tolist())  # "▁x" pairs with "Ġx"


def test_real_llama2_and_qwen3_share_words_by_their_text(real_tokenizer):
    llama2, qwen3 = real_tokenizer("llama2"), real_tokenizer("qwen3")
    student_ids, teacher_ids = shared_vocabulary(llama2, qwen3)
    pairs = dict(zip(student_ids.tolist(), teacher_ids.tolist()))
    assert len(pairs) > 20_000
    assert len(set(pairs.values())) == len(pairs)  # one to one

    def pair(student_token: str, teacher_token: str) -> None:
        assert pairs[llama2.convert_tokens_to_ids(student_token)] == qwen3.convert_tokens_to_ids(
            teacher_token
        )

    pair("▁the", "Ġthe")
    pair("the", "the")
    cjk = [i for i in pairs if re.fullmatch(r"[\u4e00-\u9fff]", llama2.convert_ids_to_tokens(i))]
    assert cjk
    assert all(qwen3.decode([pairs[i]]) == llama2.convert_ids_to_tokens(i) for i in cjk)
    assert not set(pairs) & set(llama2.all_special_ids)
    assert not set(pairs.values()) & {i for i, t in qwen3.added_tokens_decoder.items() if t.special}
    byte_pieces = {llama2.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(256)}
    assert not set(pairs) & byte_pieces
    for i in list(pairs)[::997]:  # a sample checked against the tokenizers' own decoders
        assert _sp_text(llama2, i) == qwen3.decode([pairs[i]])


def test_real_gemma3_runs_of_spaces_stand_for_spaces(real_tokenizer):
    """Gemma 3 keeps runs of spaces (``▁▁`` ... ) as added tokens of its vocabulary: they stand for
    spaces, in the bytes the teacher's tokens are measured by and in the vocabulary it shares
    with a byte-level model (``▁▁`` pairs with Qwen's ``ĠĠ``)."""
    gemma3, qwen3 = real_tokenizer("gemma3"), real_tokenizer("qwen3")
    text = "def f(a,  b):\n        return a  +  b   # 12345"
    ids = gemma3(text, add_special_tokens=False)["input_ids"]
    assert {"▁▁", "▁▁▁▁▁▁▁▁"} <= set(gemma3.convert_ids_to_tokens(ids))
    assert {t.content for t in gemma3.added_tokens_decoder.values()} >= {"▁▁", "▁▁▁▁▁▁▁▁"}
    table = token_bytes(gemma3)
    assert b"".join(table[i] for i in ids) == text.encode() == gemma3.decode(ids).encode()

    student_ids, teacher_ids = shared_vocabulary(qwen3, gemma3)
    pairs = dict(zip(student_ids.tolist(), teacher_ids.tolist()))
    assert pairs[qwen3.convert_tokens_to_ids("ĠĠ")] == gemma3.convert_tokens_to_ids("▁▁")
    assert pairs[qwen3.convert_tokens_to_ids("Ġthe")] == gemma3.convert_tokens_to_ids("▁the")


def test_special_token_differences_name_the_marker_and_an_example(assets, caplog):
    from axolotl_dskd.core.vocabulary import special_token_differences
    from axolotl_dskd.integration.plugin import warn_special_token_differences

    student = AutoTokenizer.from_pretrained(assets["student_sp"])
    teacher = AutoTokenizer.from_pretrained(assets["teacher"])
    notes = special_token_differences(student, teacher)
    assert len(notes) == 2
    assert notes[0].startswith("the teacher's special token '<|im_start|>' is plain text to the other model")
    assert "['▁', '<0x3C>', '<0x7C>', 'i', 'm'" in notes[0]  # how the student spells it
    assert special_token_differences(teacher, AutoTokenizer.from_pretrained(assets["student"])) == []

    with caplog.at_level(logging.WARNING, logger="axolotl_dskd"):
        warn_special_token_differences(student, teacher)
        warn_special_token_differences(teacher, teacher)  # nothing to say: says nothing
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "<|im_end|>" in caplog.records[0].getMessage()
