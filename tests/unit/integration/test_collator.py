"""``axolotl_dskd.integration.collator``: the plugin's collator places the prepared teacher columns
(packed samples kept apart, rows cut to the teacher's context or to ``sequence_len``), and the
trainer hands those columns to it."""

from __future__ import annotations

from axolotl_dskd.integration.chat_data import TEACHER_COLUMNS
from dskd_devkit.axolotl_runs import dskd_trainer
from dskd_devkit.chat_pairs import CONVERSATIONS
from tests.unit.shared import collate, make_collator, prepare


def test_packed_samples_stay_apart(prepared):
    """Packed into one row, each conversation keeps its own teacher rendering, positions restart,
    and no student token is paired with another sample's teacher token."""
    p = prepared["llama3", "qwen3"]
    rows = [dict(r) for r in p.dataset]
    pack = [{**r, "position_ids": list(range(len(r["input_ids"])))} for r in rows]
    batch, builder = collate(p, [pack], packed=True)
    assert builder.stats.teacher_rendered == len(rows)
    t_seg, s_seg = batch["teacher_segment_ids"][0].tolist(), batch["student_segment_ids"][0].tolist()
    t_ids = batch["teacher_input_ids"][0].tolist()
    for seg, row in enumerate(rows):
        assert [t for t, s in zip(t_ids, t_seg) if s == seg] == row["dskd_teacher_input_ids"]
    positions = batch["teacher_position_ids"][0].tolist()
    assert [positions[i] for i, s in enumerate(t_seg) if s >= 0 and (i == 0 or t_seg[i - 1] != s)] == [
        0
    ] * len(rows)
    for i, j in enumerate(batch["token_alignment"][0].tolist()):
        if j >= 0:
            assert t_seg[j] == s_seg[i]
    assert any(j >= 0 for j in batch["token_alignment"][0].tolist())


def test_the_trainer_hands_the_teacher_columns_to_the_collator(prepared):
    """Unpacked, the Trainer drops the dataset columns the model's forward does not take; the
    teacher's reach the collator, which places them instead of rebuilding the samples."""
    from transformers import AutoConfig, AutoModelForCausalLM

    p = prepared["llama3", "qwen3"]
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(p.cfg.base_model))
    collator = make_collator(p, packed=False)
    trainer = dskd_trainer(
        model, model, None, train_dataset=p.dataset, data_collator=collator, remove_unused_columns=True,
        per_device_train_batch_size=len(p.dataset), dskd_cross_tokenizer=True,
    )  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    assert collator.teacher_tokens.stats.teacher_rendered == len(p.dataset)
    assert not set(TEACHER_COLUMNS) & set(batch)


def test_a_teacher_row_longer_than_its_context_is_cut(prepared):
    """Truncated to the teacher's context, a row keeps a prefix of the teacher's rendering and no
    student token is paired with a position that was cut."""
    p = prepared["qwen3", "llama3"]
    rows = [dict(r) for r in p.dataset]
    collator = make_collator(p, packed=False)
    collator.teacher_tokens.max_length = limit = 20
    batch = collator(rows)
    for b, row in enumerate(rows):
        kept = row["dskd_teacher_input_ids"][:limit]
        assert batch["teacher_input_ids"][b, : len(kept)].tolist() == kept
        assert int(batch["teacher_attention_mask"][b].sum()) == len(kept)
        assert max(batch["token_alignment"][b].tolist()) < len(kept)


def test_samples_cut_to_sequence_len_keep_the_text_both_sides_read(real_tokenizer, tmp_path, caplog):
    """``excess_length_strategy: truncate`` cuts the student's tokens after the teacher's reading
    was made: the teacher keeps a prefix of its own rendering that ends where a kept student token
    has its partner, trains only what the kept student tokens train, and nothing falls back. A row
    cut before any shared content falls back to the student's rendering, counted and reported."""
    p = prepare(
        tmp_path, "llama3", "qwen3", CONVERSATIONS, sequence_len=48, excess_length_strategy="truncate"
    )
    rows = [dict(r) for r in p.dataset]
    cut = [r for r in rows if len(r["dskd_token_alignment"]) > len(r["input_ids"])]
    assert cut and all(len(r["input_ids"]) == 48 for r in cut)
    batch, builder = collate(p, cut, packed=False)
    assert builder.stats.teacher_rendered == len(cut) and builder.stats.prepared_fallbacks == 0
    for b, row in enumerate(cut):
        [conversation] = [
            c for c in p.conversations
            if p.student_tokenizer.apply_chat_template(c, tokenize=True, return_dict=False)[:48] == row["input_ids"]
        ]  # fmt: skip
        full = p.teacher_tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False)
        kept = int(batch["teacher_attention_mask"][b].sum())
        alignment = batch["token_alignment"][b].tolist()
        assert batch["teacher_input_ids"][b, :kept].tolist() == full[:kept] and kept < len(full)
        assert max(alignment) == kept - 1  # the teacher's last kept token partners a kept student token
        s_text = p.student_tokenizer.decode(row["input_ids"][: alignment.index(kept - 1) + 1])
        assert s_text.endswith(p.teacher_tokenizer.decode(full[kept - 1 : kept]))
        assert batch["teacher_labels"][b, :kept].tolist() == row["dskd_teacher_labels"][:kept]

    before = {**cut[0], "input_ids": cut[0]["input_ids"][:3], "labels": cut[0]["labels"][:3]}
    before.pop("attention_mask", None)
    with caplog.at_level("WARNING"):
        _, builder = collate(p, [before], packed=False)
    assert builder.stats.prepared_fallbacks == 1 and builder.stats.teacher_rendered == 0
    assert "1 of 1 samples prepared in the teacher's chat template" in caplog.text
