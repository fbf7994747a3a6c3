"""DSKDTrainer built in this process, as Axolotl builds it (``axolotl_dskd.integration.trainer``):
every ``dskd_*`` key of a YAML reaches the trainer and its loss, the logged perplexity is the
student's own, gradient accumulation equals one batch, and an out-of-memory error names the
settings to lower."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from pydantic import Field
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from axolotl_dskd.core.loss import DSKDLossConfig, Projectors
from axolotl_dskd.core.teacher import load_teacher
from axolotl_dskd.core.vocabulary import shared_vocabulary
from axolotl_dskd.integration.args import DSKDArgs
from dskd_devkit.axolotl_runs import dskd_config, dskd_trainer, load_config

pytestmark = pytest.mark.usefixtures("fresh_plugin_manager")

NOT_DEFAULT = {
    "kd_rate": 0.25,
    "kd_teacher_weight": 0.5,
    "temperature": 3.5,
    "divergence": "adaptive_kl",
    "teacher_space_divergence": "js",
    "skew_lambda": 0.3,
    "akl_alpha": 0.7,
    "chunk_size": 17,
    "compile": True,
    "token_alignment": "cma",
    "kd_student_accuracy_mask": "everywhere",
    "student_space_target": "shared_vocabulary",
}
"""A value other than the default for every loss setting with a YAML key."""


def test_every_loss_setting_has_a_yaml_key_with_its_default():
    """The loss config is the one source of the loss settings: each (but ``cross_tokenizer``,
    resolved from ``dskd_cross_tokenizer``) is a ``dskd_`` key with its default, bounds and help;
    the keys of ``student_space_target`` and ``kd_teacher_weight`` default to ``auto``, which
    validation resolves to a value of the setting."""
    loss_fields = [f for f in dataclasses.fields(DSKDLossConfig) if f.name != "cross_tokenizer"]
    assert set(NOT_DEFAULT) == {f.name for f in loss_fields}
    defaults = DSKDLossConfig()
    for f in loss_fields:
        key = DSKDArgs.model_fields[f"dskd_{f.name}"]
        if f.name in ("student_space_target", "kd_teacher_weight"):
            assert key.default == "auto" and key.description.startswith(f.metadata["doc"])
            continue
        assert key.default == getattr(defaults, f.name) != NOT_DEFAULT[f.name]
        assert key.description == f.metadata["doc"]
        assert repr(key.metadata) == repr(Field(**f.metadata["bounds"]).metadata)  # no __eq__ on some


def _trainer_from_yaml(assets, tmp_path, training_args: dict | None = None, **yaml_keys):
    """Validate a YAML with Axolotl's load_cfg, pass the plugin's training args as Axolotl's
    builder does (with ``training_args`` for the rest), and build the trainer."""
    from axolotl.integrations.base import PluginManager

    cfg = load_config(dskd_config(assets, tmp_path, **yaml_keys), tmp_path)
    plugin_args = PluginManager.get_instance().get_training_args(cfg)
    student = AutoModelForCausalLM.from_pretrained(cfg.base_model)
    teacher = load_teacher(cfg.dskd_teacher, device=torch.device("cpu"), dtype=torch.float32)
    projectors = Projectors(64, 128, cross_tokenizer=cfg.dskd_cross_tokenizer)
    shared = None
    if cfg.dskd_cross_tokenizer and cfg.dskd_student_space_target == "shared_vocabulary":
        shared = shared_vocabulary(
            *(AutoTokenizer.from_pretrained(p) for p in (cfg.base_model, cfg.dskd_teacher))
        )
    return dskd_trainer(
        student, teacher, projectors, output_dir=str(tmp_path / "out"), shared_vocabulary=shared,
        **plugin_args, **(training_args or {}),
    )  # fmt: skip


def test_every_dskd_key_reaches_the_trainer_and_its_loss(assets, tmp_path):
    trainer = _trainer_from_yaml(
        assets, tmp_path, dskd_projector_lr=0.02, dskd_on_nonfinite="skip",
        **{f"dskd_{name}": value for name, value in NOT_DEFAULT.items()},
    )  # fmt: skip
    assert trainer.loss_config == DSKDLossConfig(cross_tokenizer=False, **NOT_DEFAULT)
    assert trainer.args.dskd_on_nonfinite == "skip"
    for name in DSKDArgs.model_fields:
        assert hasattr(trainer.args, name), name
    optimizer = trainer.create_optimizer()
    projector_ids = {id(p) for p in trainer.projectors.parameters()}
    groups = [g for g in optimizer.param_groups if projector_ids & {id(p) for p in g["params"]}]
    assert [g["lr"] for g in groups] == [0.02, 0.02]
    assert sum(len(g["params"]) for g in groups) == len(projector_ids)


def test_projector_biases_are_not_decayed(assets, tmp_path):
    """The projectors' group follows HF's rule for the model: weights decay, biases do not."""
    trainer = _trainer_from_yaml(assets, tmp_path, {"weight_decay": 0.1}, student="student_sp")
    decay_of = {
        id(p): group["weight_decay"]
        for group in trainer.create_optimizer().param_groups
        for p in group["params"]
    }
    for name, p in trainer.projectors.named_parameters():
        assert decay_of[id(p)] == (0.0 if name.endswith("bias") else 0.1), name


def test_defaults_reach_the_loss_unchanged(assets, tmp_path):
    trainer = _trainer_from_yaml(assets, tmp_path)
    assert trainer.loss_config == DSKDLossConfig()
    assert trainer.args.dskd_method == "dskd" and trainer.args.dskd_on_nonfinite == "stop"


class _Logs(TrainerCallback):
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.rows.append(dict(logs))


@pytest.mark.parametrize("split", ["train", "eval"])
def test_logged_perplexity_is_the_students_own(assets, tmp_path, split):
    """Axolotl logs ppl = exp(loss); under DSKD the loss mixes in the distillation terms, so the
    plugin logs exp(dskd/ce), the student's own cross-entropy (train and eval)."""
    trainer = _trainer_from_yaml(assets, tmp_path)
    logs = _Logs()
    trainer.add_callback(logs)
    prefix = "" if split == "train" else "eval_"
    trainer.store_metrics({f"{prefix}dskd/ce": 2.0}, train_eval=split)
    trainer.log({f"{prefix}loss": 9.0})
    (row,) = logs.rows
    assert row[f"{prefix}ppl"] == pytest.approx(math.exp(2.0))
    assert row[f"{prefix}loss"] == 9.0


def test_a_trainer_without_the_plugins_training_args_is_refused(assets, tmp_path):
    """Training arguments without the dskd_* fields (the plugin registered too late) stop the
    trainer with a message, instead of training with silent defaults."""
    from axolotl.core.training_args_base import AxolotlTrainingMixins
    from transformers import TrainingArguments

    from axolotl_dskd.integration.trainer import DSKDTrainer

    @dataclasses.dataclass
    class WithoutPlugins(AxolotlTrainingMixins, TrainingArguments):
        """Axolotl's training arguments as they are when no plugin was registered in time."""

    student = AutoModelForCausalLM.from_pretrained(assets["student"])
    args = WithoutPlugins(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(TypeError, match="dskd_\\* fields"):
        DSKDTrainer(model=student, args=args)


def test_loss_config_fields_carry_docs_and_bounds():
    """Each loss setting says what it means: the YAML schema shows it as the key's description."""
    for f in dataclasses.fields(DSKDLossConfig):
        assert f.metadata["doc"], f.name
    assert (
        DSKDArgs.model_fields["dskd_kd_rate"].description
        == dataclasses.fields(DSKDLossConfig)[0].metadata["doc"]
    )


def _one_clipped_sgd_step(assets, tmp_path, grad_clip: str) -> dict[str, dict[str, Tensor]]:
    """One optimizer step of SGD (lr 1, student and projectors) with max_grad_norm 1e-3 and
    ``dskd_grad_clip``: how far each parameter moved, ``{"student": {...}, "projectors": {...}}``."""
    from datasets import Dataset
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq

    from dskd_devkit.task import arithmetic_rows, encode_row

    tokenizer = AutoTokenizer.from_pretrained(assets["student"])
    rows = []
    for row in arithmetic_rows(4, seed=5):
        ids, labels = encode_row(tokenizer, row)
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    trainer = _trainer_from_yaml(
        assets, tmp_path,
        {"per_device_train_batch_size": 4, "optim": "sgd", "learning_rate": 1.0, "lr_scheduler_type": "constant",
         "max_grad_norm": 1e-3, "weight_decay": 0.0},
        dskd_projector_lr=1.0, dskd_grad_clip=grad_clip,
    )  # fmt: skip
    trainer.train_dataset = Dataset.from_list(rows)
    trainer.data_collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    groups = {
        "student": dict(trainer.model.named_parameters()),
        "projectors": dict(trainer.projectors.named_parameters()),
    }
    before = {g: {n: p.detach().clone() for n, p in ps.items()} for g, ps in groups.items()}
    trainer.train()
    return {g: {n: (p.detach() - before[g][n]).norm() for n, p in ps.items()} for g, ps in groups.items()}


def test_max_grad_norm_clips_the_projectors_with_the_student(assets, tmp_path):
    """dskd_grad_clip: joint: one global gradient norm over the student and the projectors, as
    if they were one model: one step moves all their parameters together by at most
    max_grad_norm, the projectors included (HF's Trainer clips only the model's own parameters)."""
    steps = _one_clipped_sgd_step(assets, tmp_path, "joint")
    everything = [norm for group in steps.values() for norm in group.values()]
    assert torch.stack(everything).norm() <= 1e-3 * (1 + 1e-4)
    assert all(norm > 0 for norm in steps["projectors"].values())


@pytest.mark.parametrize("meta", [True, False], ids=["weights_removed", "not_a_dskd_checkpoint"])
def test_resuming_without_projectors_says_what_to_do(assets, tmp_path, meta):
    """A checkpoint without ``dskd_projectors.safetensors`` stops the resume, telling a DSKD
    checkpoint whose weights file was removed (its ``dskd_projectors.json`` is there) from one
    that another run wrote."""
    trainer = _trainer_from_yaml(assets, tmp_path)
    checkpoint = tmp_path / "checkpoint-2"
    trainer.save_projectors(str(checkpoint))
    (checkpoint / "dskd_projectors.safetensors").unlink()
    if not meta:
        (checkpoint / "dskd_projectors.json").unlink()
    with pytest.raises(FileNotFoundError) as raised:
        trainer._load_optimizer_and_scheduler(str(checkpoint))
    message = str(raised.value)
    assert message.startswith(f"resume_from_checkpoint: {checkpoint} has no DSKD projectors")
    if meta:
        assert "shows a DSKD run wrote it" in message and "Put dskd_projectors.safetensors back" in message
    else:
        assert "not written by a DSKD run" in message and "set dskd_projectors" in message


def test_uld_runs_the_uld_loss_on_the_teachers_own_labels(assets, tmp_path):
    """``dskd_method: uld`` across tokenizers: the trainer's loss is ULD between the student's
    trained tokens and the teacher's (its own labels), with no projectors."""
    from axolotl_dskd.core.loss import uld_loss
    from axolotl_dskd.core.models import final_hidden_states, lm_head_weight

    trainer = _trainer_from_yaml(assets, tmp_path, student="student_sp", dskd_method="uld")
    trainer.attach_teacher(trainer.teacher, None)
    torch.manual_seed(0)
    ids = torch.randint(100, (2, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    teacher_labels = torch.randint(100, (2, 15))
    teacher_labels[:, :6] = -100
    teacher_hidden = torch.randn(2, 15, 128)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out = trainer._distill(
        trainer.model, inputs, labels, teacher_hidden, {"teacher_labels": teacher_labels}, {}, None
    )
    expected = uld_loss(
        student_hidden=final_hidden_states(trainer.model, **inputs),
        student_lm_head=lm_head_weight(trainer.model),
        student_labels=labels,
        teacher_hidden=teacher_hidden,
        teacher_lm_head=lm_head_weight(trainer.teacher),
        teacher_labels=teacher_labels,
        config=trainer.loss_config,
    )
    torch.testing.assert_close(out.loss, expected.loss)
    assert float(out.metrics["aligned_frac"]) == 1.0  # 8 student answer tokens, 9 teacher ones


def test_shared_vocabulary_target_distils_over_the_tokens_both_vocabularies_spell_alike(assets, tmp_path):
    """Across tokenizers the default target (``auto``) is ``shared_vocabulary``: the trainer hands
    the loss the shared tokens it was given (as the plugin gives them), and the step's loss is
    DSKD's with them, not the projected target's."""
    from axolotl_dskd.core.loss import dskd_loss
    from axolotl_dskd.core.models import final_hidden_states, input_embedding_weight, lm_head_weight

    trainer = _trainer_from_yaml(assets, tmp_path, student="student_sp")
    assert trainer.loss_config.student_space_target == "shared_vocabulary"
    shared = trainer.shared_vocabulary
    assert len(shared[0]) > 0
    torch.manual_seed(0)
    ids = torch.randint(100, (2, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    teacher = {
        "teacher_input_ids": torch.randint(100, (2, 15)),
        "teacher_labels": torch.randint(100, (2, 15)),
    }
    teacher["teacher_labels"][:, :6] = -100
    alignment = {"token_alignment": torch.tensor([list(range(12)), [-1, *range(11)]])}
    teacher_hidden = torch.randn(2, 15, 128)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out = trainer._distill(trainer.model, inputs, labels, teacher_hidden, teacher, alignment, None)
    common = {
        "student_hidden": final_hidden_states(trainer.model, **inputs),
        "student_lm_head": lm_head_weight(trainer.model),
        "student_labels": labels,
        "teacher_hidden": teacher_hidden,
        "teacher_lm_head": lm_head_weight(trainer.teacher),
        "teacher_labels": teacher["teacher_labels"],
        "student_input_ids": ids,
        "teacher_input_ids": teacher["teacher_input_ids"],
        "student_embeddings": input_embedding_weight(trainer.model),
        "teacher_embeddings": input_embedding_weight(trainer.teacher),
        "config": trainer.loss_config,
        **alignment,
    }
    expected = dskd_loss(trainer.projectors, **common, shared_vocabulary=shared)
    torch.testing.assert_close(out.loss, expected.loss)
    projected = dataclasses.replace(trainer.loss_config, student_space_target="projected")
    other = dskd_loss(trainer.projectors, **{**common, "config": projected})
    assert float(out.metrics["kd_student"]) != pytest.approx(float(other.metrics["kd_student"]), rel=1e-3)


def test_separate_grad_clip_clips_student_and_projectors_each_on_their_own(assets, tmp_path):
    """dskd_grad_clip: separate: the student's step and the projectors' step are each at most
    max_grad_norm, and together more than it (both clipped)."""
    steps = _one_clipped_sgd_step(assets, tmp_path, "separate")
    for g, group in steps.items():
        norm = torch.stack(list(group.values())).norm()
        assert norm <= 1e-3 * (1 + 1e-4), g
        assert norm > 0.5e-3, g  # clipped to the bound, not shrunk by the other group's norm


# ============================================================================================
# Through the real DSKDTrainer: gradient_accumulation_steps=2 x 2 == 1 x 4
# ============================================================================================


def _features(tokenizer, n: int) -> list[dict]:
    """Prompt (untrained) + response rows of different lengths, so micro-batches differ."""
    from dskd_devkit.task import arithmetic_rows

    rows = []
    for i, r in enumerate(arithmetic_rows(n, seed=7)):
        prompt = tokenizer(f"{r['instruction']} {r['input']} =")["input_ids"]
        answer = tokenizer(" " + " ".join([r["output"]] * (1 + 3 * (i % 2))))["input_ids"]
        rows.append(
            {
                "input_ids": prompt + answer,
                "attention_mask": [1] * (len(prompt) + len(answer)),
                "labels": [-100] * len(prompt) + answer,
            }
        )
    return rows


def _trainable(student, proj) -> dict[str, Tensor]:
    out = {k: v.detach().clone() for k, v in student.named_parameters() if v.requires_grad}
    out.update({f"proj.{k}": v.detach().clone() for k, v in proj.named_parameters()})
    return out


def _train_one_step(assets, tmp_path, state, *, micro_batch: int, accumulation: int):
    """One optimizer step of ``DSKDTrainer``; returns (initial state, params before, after,
    the projector gradients left over after the step)."""
    import copy

    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

    from axolotl_dskd.core.teacher import load_teacher
    from dskd_devkit.axolotl_runs import dskd_trainer

    tokenizer = AutoTokenizer.from_pretrained(assets["student"])
    student = AutoModelForCausalLM.from_pretrained(assets["student"], dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    student = get_peft_model(student, lora)
    teacher = load_teacher(str(assets["teacher"]), device=torch.device("cpu"), dtype=torch.float32)
    proj = Projectors(student.config.hidden_size, teacher.config.hidden_size)
    if state is None:  # PEFT starts lora_B at 0; make the student's LoRA path live
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in student.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        state = (copy.deepcopy(student.state_dict()), copy.deepcopy(proj.state_dict()))
    student.load_state_dict(state[0])
    proj.load_state_dict(state[1])
    before = _trainable(student, proj)
    trainer = dskd_trainer(
        student, teacher, proj, train_dataset=Dataset.from_list(_features(tokenizer, 4)),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        output_dir=str(tmp_path), per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=accumulation, learning_rate=1.0, optim="sgd",
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,
        dskd_projector_lr=1.0, curriculum_sampling=True,  # sequential order: both runs see the same 4 rows
    )  # fmt: skip
    trainer.train()
    return state, before, _trainable(student, proj), [p.grad for p in proj.parameters()]


def test_dskd_trainer_accumulation_equals_one_batch(assets, tmp_path):
    """One SGD step (lr 1, no clipping, no decay) of the real trainer: 2 micro-batches of 2 rows
    with gradient_accumulation_steps=2 give the update of 1 micro-batch of all 4 rows."""
    state, before, acc, _leftover = _train_one_step(
        assets, tmp_path / "acc", None, micro_batch=2, accumulation=2
    )
    _, before_one, one, _ = _train_one_step(assets, tmp_path / "one", state, micro_batch=4, accumulation=1)
    assert acc.keys() == one.keys() == before.keys()
    for name in acc:
        torch.testing.assert_close(before_one[name], before[name], rtol=0, atol=0)
        torch.testing.assert_close(acc[name], one[name], rtol=1e-4, atol=1e-6, msg=f"{name}: updates differ")
    moved = [n for n in acc if not torch.allclose(acc[n], before[n], rtol=1e-3, atol=1e-6)]
    assert any("lora" in n for n in moved) and any(n.startswith("proj.") for n in moved), moved


def test_projector_gradients_are_cleared_after_each_optimizer_step(assets, tmp_path):
    """The trainer zeroes only the model's gradients; the projectors' must not leak into the
    next step (they would act as an unbounded running sum)."""
    *_, leftover = _train_one_step(assets, tmp_path, None, micro_batch=2, accumulation=2)
    assert all(grad is None for grad in leftover)


# ============================================================================================
# Out of memory
# ============================================================================================


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
