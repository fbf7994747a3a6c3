"""Hardening: what the plugin lets in, what it never loses, what it never lets pass silently.

Users leave distillation runs going for hours and point the plugin at models and files from
the internet. Each test states one promise and checks it on real objects: the tiny local models
and tokenizers of the ``assets`` fixture, real safetensors and pickle files, Axolotl's own
config loading and, for non-finite losses, real CPU training runs through Axolotl's CLI.

- Nothing let in: a teacher's own Python code runs only with ``dskd_teacher_trust_remote_code``;
  projectors are read only from safetensors whose shapes fit the pair.
- Nothing lost: a failed projector write leaves the previous file whole.
- No silent failure: a non-finite DSKD term stops the run (naming term and step) or is skipped
  and counted; fp16 logits beyond fp16's range stay finite; special tokens that are text to
  the other model are reported once; an out-of-memory error names the settings to lower.
- Bad input: generated plugin configs are refused by key exactly when they are invalid;
  malformed dataset rows go through the teacher-token builder and the loss without a NaN.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import pickle
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save
from transformers import AutoModelForCausalLM, AutoTokenizer

from axolotl_dskd.core import projector_io
from axolotl_dskd.core.divergences import DIVERGENCES
from axolotl_dskd.core.loss import DSKDLossConfig, Projectors, dskd_loss
from axolotl_dskd.core.projector_io import META_NAME, WEIGHTS_NAME, load_projectors, save_projectors
from dskd_devkit.axolotl_runs import (
    dskd_config,
    load_config,
    refusal,
)

pytestmark = pytest.mark.usefixtures("fresh_plugin_manager")

STUDENT_HIDDEN, TEACHER_HIDDEN = 64, 128  # the fixture's students and teacher
FP16_MAX = torch.finfo(torch.float16).max


# ============================================================================================
# Nothing let in, nothing lost: projector files
# ============================================================================================


class RunsCodeWhenUnpickled:
    """What a malicious pickle does: unpickling it calls ``Path.write_text`` on a marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


@pytest.mark.parametrize("name", ["projectors.bin", "projectors.pt", "projectors.pth", "pickled.safetensors"])
def test_pickled_projectors_are_refused_unopened(assets, tmp_path, name):
    """A pickle given as dskd_projectors (even one named .safetensors) stops validation with a
    message naming the key, and is never unpickled."""
    marker = tmp_path / "marker"
    payload = pickle.dumps({"t2s.weight": RunsCodeWhenUnpickled(marker)})
    file = tmp_path / name
    file.write_bytes(payload)

    message = refusal(dskd_config(assets, tmp_path, dskd_projectors=str(file)), tmp_path)
    assert "dskd_projectors" in message and str(file) in message, message
    with pytest.raises(ValueError, match="dskd_projectors"):
        load_projectors(Projectors(STUDENT_HIDDEN, TEACHER_HIDDEN), file, key="dskd_projectors")
    assert not marker.exists()

    pickle.loads(payload)  # the file really is dangerous: unpickling it runs its code
    assert marker.exists()


def test_projectors_for_another_pair_are_refused_with_both_shapes(assets, tmp_path):
    """Projectors whose shapes do not fit the student/teacher pair stop validation (before any
    weights load) and the trainer's load, naming the key and both sets of shapes."""
    wrong = save_projectors(Projectors(STUDENT_HIDDEN, 2 * TEACHER_HIDDEN), tmp_path / "wrong", {})
    found = {"s2t.bias": (256,), "s2t.weight": (256, 64), "t2s.bias": (64,), "t2s.weight": (64, 256)}
    needed = {"s2t.bias": (128,), "s2t.weight": (128, 64), "t2s.bias": (64,), "t2s.weight": (64, 128)}

    message = refusal(dskd_config(assets, tmp_path, dskd_projectors=str(wrong)), tmp_path)
    assert "dskd_projectors" in message, message
    for shapes in (found, needed):
        for key, shape in shapes.items():
            assert f"'{key}': {shape}" in message, (key, message)

    with pytest.raises(ValueError) as info:
        load_projectors(Projectors(STUDENT_HIDDEN, TEACHER_HIDDEN), wrong, key="dskd_projectors")
    assert (
        "dskd_projectors" in str(info.value)
        and str(found) in str(info.value)
        and str(needed) in str(info.value)
    )

    # same dimensions, other kind: CMA projectors (with a query) for a same-vocabulary pair
    cma = save_projectors(
        Projectors(STUDENT_HIDDEN, TEACHER_HIDDEN, cross_tokenizer=True), tmp_path / "cma", {}
    )
    assert "query.weight" in refusal(dskd_config(assets, tmp_path, dskd_projectors=str(cma.parent)), tmp_path)


def test_projectors_that_fit_validate_and_load_exactly(assets, tmp_path):
    """The counterpart: a file (or its folder) for this pair validates and loads bit for bit;
    with dskd_method: vanilla_kd, which has no projectors, it is refused rather than ignored."""
    torch.manual_seed(0)
    saved = Projectors(STUDENT_HIDDEN, TEACHER_HIDDEN)
    file = save_projectors(saved, tmp_path / "good", {"global_step": 3})
    for path in (file, file.parent):
        assert load_config(
            dskd_config(assets, tmp_path, dskd_projectors=str(path)), tmp_path
        ).dskd_projectors == str(path)
    loaded = Projectors(STUDENT_HIDDEN, TEACHER_HIDDEN)
    load_projectors(loaded, file.parent, key="dskd_projectors")
    for name, value in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    message = refusal(
        dskd_config(assets, tmp_path, dskd_projectors=str(file), dskd_method="vanilla_kd"), tmp_path
    )
    assert "dskd_projectors" in message and "vanilla_kd" in message, message


def test_a_failed_projector_write_keeps_the_previous_file(tmp_path, monkeypatch):
    """The disk fills up halfway through writing new projectors: the write fails loudly, the
    previous file is intact and still loads, and no partial or temporary file is left."""
    torch.manual_seed(0)
    old, new = Projectors(STUDENT_HIDDEN, TEACHER_HIDDEN), Projectors(STUDENT_HIDDEN, TEACHER_HIDDEN)
    save_projectors(old, tmp_path, {"global_step": 1})
    weights, meta = tmp_path / WEIGHTS_NAME, tmp_path / META_NAME
    before = weights.read_bytes(), meta.read_bytes()

    def disk_full_halfway(tensors, filename, metadata=None):
        data = save(tensors, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(projector_io, "save_file", disk_full_halfway)
    with pytest.raises(OSError, match="No space left"):
        save_projectors(new, tmp_path, {"global_step": 2})

    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([WEIGHTS_NAME, META_NAME])
    assert (weights.read_bytes(), meta.read_bytes()) == before
    restored = Projectors(STUDENT_HIDDEN, TEACHER_HIDDEN)
    load_projectors(restored, tmp_path, key="resume_from_checkpoint")
    assert torch.equal(restored.t2s.weight, old.t2s.weight)

    monkeypatch.undo()  # once the disk has room again, the new projectors replace the old
    save_projectors(new, tmp_path, {"global_step": 2})
    assert torch.equal(load_file(weights)["t2s.weight"], new.t2s.weight.detach())
    assert json.loads(meta.read_text())["global_step"] == 2


# ============================================================================================
# No silent failure: fp16 logits, special tokens, out of memory
# ============================================================================================


def _huge_fp16_inputs(cross_tokenizer: bool) -> tuple[Projectors, dict]:
    """fp16 hidden states and LM heads whose products reach ~80000, past fp16's 65504."""
    g = torch.Generator().manual_seed(0)
    B, L, d_s, d_t, V_s, V_t = 2, 7, 8, 12, 32, 40
    torch.manual_seed(0)
    proj = Projectors(d_s, d_t, cross_tokenizer=cross_tokenizer)
    h_s, h_t = torch.randn(B, L, d_s, generator=g) * 30, torch.randn(B, L, d_t, generator=g) * 30
    W_s, W_t = torch.randn(V_s, d_s, generator=g) * 30, torch.randn(V_t, d_t, generator=g) * 30
    h_s[:, :, :] = h_s.abs() + 60  # one direction everywhere: a head row along it gives huge logits
    W_s[3] = 120.0
    h_t[:, :, :] = h_t.abs() + 60
    W_t[5] = 120.0
    ids_s = torch.randint(1, V_s, (B, L), generator=g)
    labels = ids_s.clone()
    labels[:, :2] = -100
    inputs = {
        "student_hidden": h_s.half().requires_grad_(),
        "student_lm_head": W_s.half().requires_grad_(),
        "student_labels": labels,
        "teacher_hidden": h_t.half(),
        "teacher_lm_head": W_t.half(),
    }
    if cross_tokenizer:
        ids_t = torch.randint(1, V_t, (B, L + 2), generator=g)
        t_labels = ids_t.clone()
        t_labels[:, :3] = -100
        inputs.update(
            teacher_hidden=(torch.randn(B, L + 2, d_t, generator=g).abs() * 30 + 60).half(),
            teacher_labels=t_labels,
            student_input_ids=ids_s,
            teacher_input_ids=ids_t,
            student_embeddings=torch.randn(V_s, d_s, generator=g).half(),
            teacher_embeddings=torch.randn(V_t, d_t, generator=g).half(),
        )
    else:
        inputs["teacher_labels"] = labels
    return proj, inputs


def _as_float32(inputs: dict) -> dict:
    return {
        k: (v.detach().float().requires_grad_(v.requires_grad) if v.is_floating_point() else v)
        for k, v in inputs.items()
    }


@pytest.mark.parametrize("cross_tokenizer", [False, True], ids=["same_vocab", "cma"])
def test_fp16_logits_beyond_fp16_range_stay_finite_and_match_float32(cross_tokenizer):
    proj, fp16 = _huge_fp16_inputs(cross_tokenizer)
    logits = fp16["student_hidden"].float() @ fp16["student_lm_head"].float().T
    assert logits.abs().max() > FP16_MAX  # the case is what it claims: fp16 cannot hold these
    config = DSKDLossConfig(cross_tokenizer=cross_tokenizer, token_alignment="cma", chunk_size=5)
    f32 = _as_float32(fp16)

    out16 = dskd_loss(proj, **fp16, config=config)
    out32 = dskd_loss(proj, **f32, config=config)
    assert torch.isfinite(out16.loss)
    torch.testing.assert_close(out16.loss, out32.loss, rtol=1e-4, atol=1e-3)
    for term in ("ce", "kd_student", "kd_teacher", "t2s_ce", "t2s_acc"):
        assert math.isfinite(float(out16.metrics[term])), term
        torch.testing.assert_close(out16.metrics[term], out32.metrics[term], rtol=1e-4, atol=1e-3)
    trainable = [fp16["student_hidden"], fp16["student_lm_head"], *proj.parameters()]
    for grad in torch.autograd.grad(out16.loss, trainable, allow_unused=True):
        assert grad is None or torch.isfinite(grad).all()


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


def test_out_of_memory_names_the_settings_to_lower():
    from axolotl_dskd.integration.trainer import explain_out_of_memory

    original = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    with pytest.raises(torch.OutOfMemoryError) as info, explain_out_of_memory():
        raise original
    message = str(info.value)
    assert message.startswith("CUDA out of memory. Tried to allocate 20.00 GiB")
    for setting in ("dskd_chunk_size", "micro_batch_size", "sequence_len"):
        assert setting in message, setting
    assert info.value.__cause__ is original
    with pytest.raises(ValueError, match="^unrelated$"), explain_out_of_memory():  # others pass untouched
        raise ValueError("unrelated")


# ============================================================================================
# Bad input: generated configs
# ============================================================================================


def _values(valid, invalid: list) -> tuple[st.SearchStrategy, st.SearchStrategy]:
    return (valid if isinstance(valid, st.SearchStrategy) else st.sampled_from(valid)), st.sampled_from(
        invalid
    )


NONFINITE = [math.nan, math.inf, -math.inf]
unit = st.floats(0.0, 1.0)
KEY_VALUES: dict[str, tuple[st.SearchStrategy, st.SearchStrategy]] = {
    "dskd_kd_rate": _values(unit, [-0.1, 1.5, 100.0, "half", *NONFINITE]),
    "dskd_temperature": _values(st.floats(0.05, 50.0), [0.0, -1.0, "warm", *NONFINITE]),
    "dskd_divergence": _values(list(DIVERGENCES), ["kl", "tvd", "Forward_KL", "", "js "]),
    "dskd_teacher_space_divergence": _values(list(DIVERGENCES), ["kl", "jsd", "cross_entropy"]),
    "dskd_skew_lambda": _values(st.floats(0.01, 0.99), [0.0, 1.0, -0.5, 1.5, *NONFINITE]),
    "dskd_akl_alpha": _values(unit, [-0.1, 1.1, 3.0, *NONFINITE]),
    "dskd_cross_tokenizer": _values([True, False, "auto"], ["sometimes", 2, "off-ish"]),
    "dskd_projector_lr": _values(st.floats(1e-6, 1.0), [0.0, -1e-3, *NONFINITE]),
    "dskd_chunk_size": _values(st.integers(1, 4096), [0, -8, 2.5, "big"]),
    "dskd_on_nonfinite": _values(["stop", "skip"], ["ignore", "STOP", "warn"]),
    "dskd_method": _values(["dskd", "vanilla_kd", "uld"], ["kd", "DSKD", "distill"]),
}


@st.composite
def plugin_configs(draw) -> tuple[dict, set[str]]:
    """Plugin keys over a valid base config, and the ``dskd_`` keys that make it invalid
    (empty: it must validate). Each value is invalid one time in five."""
    student = draw(st.sampled_from(["student", "student_sp"]))  # same vocabulary / not
    teacher = draw(st.sampled_from(["fixture"] * 4 + ["missing folder", "absent"]))
    overrides = {}
    bad: set[str] = set()
    for key in draw(st.lists(st.sampled_from(sorted(KEY_VALUES)), unique=True, max_size=4)):
        valid, invalid = KEY_VALUES[key]
        if draw(st.integers(0, 4)) == 0:
            overrides[key] = draw(invalid)
            bad.add(key)
        else:
            overrides[key] = draw(valid)
    quantization = draw(st.sampled_from([(False, False), (True, False), (False, True)] * 2 + [(True, True)]))
    overrides["dskd_teacher_load_in_4bit"], overrides["dskd_teacher_load_in_8bit"] = quantization
    if all(quantization):
        bad.add("dskd_teacher_load_in_4bit")
    different_vocab = student == "student_sp"
    if different_vocab and overrides.get("dskd_cross_tokenizer") is False:
        bad.add("dskd_cross_tokenizer")
    if different_vocab and overrides.get("dskd_method") == "vanilla_kd":
        bad.add("dskd_method")
    if teacher == "missing folder":
        overrides["dskd_teacher"] = "/nonexistent/teacher"
        bad.add("dskd_teacher")
    elif teacher == "absent":
        overrides["dskd_teacher"] = None  # left out of the YAML; the other dskd_ keys stay
        bad.add("dskd_teacher")  # dskd_ keys without a teacher would silently do nothing
    event("invalid" if bad else "valid")
    return {"student": student, **overrides}, bad


def _fixed(bad: set[str], **overrides) -> tuple[dict, set[str]]:
    return {"student": "student", "dskd_teacher_load_in_4bit": False, **overrides}, bad


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=plugin_configs())
@example(case=_fixed({"dskd_temperature"}, dskd_temperature=math.inf))  # a schema without an upper
@example(case=_fixed({"dskd_projector_lr"}, dskd_projector_lr=math.inf))  # bound lets inf through
@example(case=_fixed({"dskd_teacher"}, dskd_teacher=None, dskd_kd_rate=0.3))  # would be plain SFT
@example(
    case=_fixed({"dskd_teacher_load_in_4bit"}, dskd_teacher_load_in_4bit=True, dskd_teacher_load_in_8bit=True)
)
@example(case=_fixed(set(), student="student_sp", dskd_cross_tokenizer=True, dskd_on_nonfinite="skip"))
def test_generated_configs_are_refused_by_key_exactly_when_invalid(assets, case):
    overrides, bad = case
    overrides = dict(overrides)
    student = overrides.pop("student")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = dskd_config(assets, Path(tmp), student=student, **overrides)
        if bad:
            message = refusal(cfg, Path(tmp))
            assert any(key in message for key in bad), (bad, message)
        else:
            loaded = load_config(cfg, Path(tmp))
            for key, value in overrides.items():
                if key != "dskd_cross_tokenizer" and value is not None:
                    assert loaded[key] == value, key
            cross = overrides.get("dskd_cross_tokenizer", "auto")
            assert loaded.dskd_cross_tokenizer is (student == "student_sp" if cross == "auto" else cross)


# ============================================================================================
# Bad input: malformed dataset rows through the teacher-token builder and the loss
# ============================================================================================


def _row(tokenizer, prompt: str, response: str, *, eos: bool) -> tuple[list[int], list[int]]:
    """Student ids and labels as Axolotl builds them: BOS and prompt untrained, response (and
    EOS) trained."""
    prompt_ids = tokenizer(prompt)["input_ids"]  # with the student's BOS
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if eos:
        response_ids = [*response_ids, tokenizer.eos_token_id]
    return prompt_ids + response_ids, [-100] * len(prompt_ids) + response_ids


def test_malformed_rows_pass_the_builder_and_the_loss_without_nan(assets):
    """Empty response, a response that is nothing to the teacher, whitespace only, and text
    longer than both models' contexts, batched with one ordinary row through the real
    tokenizers and models: nothing crashes, every term and gradient is finite, and a row
    without a trained teacher token adds nothing to the distillation terms."""
    from axolotl_dskd.core.models import final_hidden_states, input_embedding_weight, lm_head_weight
    from axolotl_dskd.core.teacher_tokens import TeacherTokenBuilder

    student_tok = AutoTokenizer.from_pretrained(assets["student_sp"])
    teacher_tok = AutoTokenizer.from_pretrained(assets["teacher"])
    student = AutoModelForCausalLM.from_pretrained(assets["student_sp"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(assets["teacher"], dtype=torch.float32)
    context = min(student.config.max_position_embeddings, teacher.config.max_position_embeddings)
    long_prompt = "Add the numbers 12 and 30, then say the sum. " * 80

    rows = {
        "ordinary": _row(student_tok, "What is 12 + 30?", " 42", eos=True),
        "empty response": _row(student_tok, "Say nothing.", "", eos=False),
        "empty response, EOS": _row(student_tok, "Say nothing.", "", eos=True),
        "nothing for the teacher": _row(student_tok, "Say a marker.", "<s>", eos=False),
        "whitespace only": _row(student_tok, " \n ", " \n\t ", eos=True),
        "longer than both contexts": _row(student_tok, long_prompt, " 42", eos=True),
    }
    ids, labels = rows["longer than both contexts"]
    assert len(ids) > context and len(teacher_tok(long_prompt)["input_ids"]) > context
    rows["longer than both contexts"] = (ids[:context], labels[:context])  # Axolotl's truncation
    assert student_tok.convert_ids_to_tokens(rows["nothing for the teacher"][0][-1:]) == ["<s>"]

    width = max(len(ids) for ids, _ in rows.values())
    pad = student_tok.pad_token_id if student_tok.pad_token_id is not None else student_tok.eos_token_id
    batch = {
        "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows.values()]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows.values()]),
        "attention_mask": torch.tensor(
            [[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows.values()]
        ),
    }
    builder = TeacherTokenBuilder(student_tok, teacher_tok, max_length=teacher.config.max_position_embeddings)
    teacher_batch = builder(batch)
    assert teacher_batch["teacher_input_ids"].shape[1] <= teacher.config.max_position_embeddings
    names = list(rows)
    untrained_for_teacher = {
        names[i] for i, row in enumerate(teacher_batch["teacher_labels"][:, 1:]) if (row == -100).all()
    }
    assert untrained_for_teacher >= {"empty response", "nothing for the teacher", "longer than both contexts"}
    assert "ordinary" not in untrained_for_teacher

    h_s = final_hidden_states(student, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        h_t = final_hidden_states(
            teacher,
            input_ids=teacher_batch["teacher_input_ids"],
            attention_mask=teacher_batch["teacher_attention_mask"],
        )
    torch.manual_seed(0)
    proj = Projectors(student.config.hidden_size, teacher.config.hidden_size, cross_tokenizer=True)
    config = DSKDLossConfig(cross_tokenizer=True, token_alignment="cma", chunk_size=16)

    def loss_of(keep: list[int]):
        return dskd_loss(
            proj,
            student_hidden=h_s[keep], student_lm_head=lm_head_weight(student),
            student_labels=batch["labels"][keep],
            teacher_hidden=h_t[keep], teacher_lm_head=lm_head_weight(teacher),
            teacher_labels=teacher_batch["teacher_labels"][keep],
            student_input_ids=batch["input_ids"][keep],
            teacher_input_ids=teacher_batch["teacher_input_ids"][keep],
            student_embeddings=input_embedding_weight(student),
            teacher_embeddings=input_embedding_weight(teacher),
            config=config, num_items=1,  # sums, not means: rows can be compared term by term
        )  # fmt: skip

    def assert_finite(out, what: str) -> None:
        assert torch.isfinite(out.loss), what
        for term, value in out.metrics.items():
            assert math.isfinite(float(value)), (what, term)
        trainable = [h_s, lm_head_weight(student), *proj.parameters()]
        if out.loss.requires_grad:
            grads = torch.autograd.grad(out.loss, trainable, allow_unused=True, retain_graph=True)
            assert all(g is None or torch.isfinite(g).all() for g in grads), what

    out = loss_of(list(range(len(names))))
    assert_finite(out, "the whole batch")

    distillation = ("kd_student", "kd_teacher", "t2s_ce")
    for name in untrained_for_teacher:
        alone = loss_of([names.index(name)])
        assert_finite(alone, name)
        assert all(float(alone.metrics[t]) == 0.0 for t in distillation), (name, alone.metrics)
    assert_finite(loss_of([names.index(name) for name in untrained_for_teacher]), "only malformed rows")

    rest = loss_of([i for i, name in enumerate(names) if name not in untrained_for_teacher])
    for term in distillation:
        torch.testing.assert_close(out.metrics[term], rest.metrics[term], rtol=1e-5, atol=1e-6)
