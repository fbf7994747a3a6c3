"""The offline teacher in this process: a cache built by the plugin's command on the tiny assets
(Axolotl's own preparation, the 4-bit teacher, a sentencepiece student across tokenizers), and
what a user relies on around it: the right states, resuming, corruption, stale caches, missing
samples, storage precision, a teacher folder without its transformer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from axolotl_dskd.core import teacher_cache
from axolotl_dskd.core.loss import IGNORE_INDEX, DSKDLossConfig, Projectors, dskd_loss, teacher_positions_read
from axolotl_dskd.core.teacher_cache import TeacherCache, TeacherCacheError, decode, encode
from dskd_devkit.axolotl_runs import dskd_config, load_config, prepared_datasets, refusal, write_config
from dskd_devkit.training import head_only_copy, save_pair, tiny_model

SHARD_MB = 0.05  # three shards of the 63 samples


def build(cfg: dict, workdir: Path, overwrite: bool = False) -> dict:
    """``python -m axolotl_dskd.cache_teacher config.yml --shard-size 0.05 [--overwrite]``, in
    this process."""
    from axolotl.integrations.base import PluginManager

    from axolotl_dskd.cache_teacher import build as build_cache

    PluginManager.get_instance().plugins.clear()
    return build_cache(write_config(cfg, workdir / "config.yml"), shard_size_mb=SHARD_MB, overwrite=overwrite)


def cache_config(assets: dict, workdir: Path, cache: Path, **overrides: Any) -> dict:
    return dskd_config(
        assets, workdir, student="student_sp", dskd_teacher_cache=str(cache),
        dskd_teacher_cache_dtype="float32", **overrides,
    )  # fmt: skip


@pytest.fixture(scope="module")
def built(assets, tmp_path_factory) -> tuple[dict, Path]:
    """A finished float32 cache across tokenizers, and its config."""
    workdir = tmp_path_factory.mktemp("built")
    cfg = cache_config(assets, workdir, workdir / "cache")
    build(cfg, workdir)
    return cfg, workdir / "cache"


@pytest.fixture(scope="module")
def prepared(built, tmp_path_factory) -> tuple[Any, Any]:
    """The validated config of ``built`` and its prepared training split."""
    cfg = load_config(built[0], tmp_path_factory.mktemp("prepared"))
    return cfg, prepared_datasets(cfg).train_dataset


def test_the_cache_holds_the_teachers_states_where_the_loss_reads_them(built, prepared):
    """For a sample, the states at every teacher position whose next teacher token is trained
    (what cross-model attention reads; exact alignment reads fewer) are the 4-bit teacher's own
    final hidden states over the teacher's tokens of the sample."""
    from axolotl_dskd.core.models import teacher_hidden_states
    from axolotl_dskd.core.teacher import load_teacher
    from axolotl_dskd.integration.chat_data import TEACHER_COLUMNS
    from axolotl_dskd.integration.configured import teacher_token_builder

    cfg, dataset = prepared
    cache = TeacherCache(built[1])
    builder = teacher_token_builder(cfg)
    teacher = load_teacher(
        cfg.dskd_teacher, device=torch.device("cpu"), dtype=torch.float32, load_in_4bit=True
    )
    for row in dataset.select(range(3)):
        ids, labels = builder.sample(row["input_ids"], row["labels"])
        hidden = teacher_hidden_states(teacher, input_ids=torch.tensor([ids]))[0]
        positions, states = cache.sample(teacher_cache.sample_key(row, TEACHER_COLUMNS))
        trained_next = {j for j in range(len(ids) - 1) if labels[j + 1] != IGNORE_INDEX}
        assert trained_next and trained_next <= set(positions.tolist())
        torch.testing.assert_close(states, hidden[positions], rtol=1e-5, atol=1e-5)


def test_an_interrupted_build_resumes_to_the_same_cache(assets, built, tmp_path, monkeypatch):
    """Stopped (Ctrl-C) while writing its second shard, the build run again keeps the first shard
    as written and ends with the same shards, byte for byte, as an uninterrupted build."""
    cfg = cache_config(assets, tmp_path, tmp_path / "cache")
    write_shard = teacher_cache.CacheWriter.write_shard
    calls = []

    def interrupted(self, name, samples):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return write_shard(self, name, samples)

    monkeypatch.setattr(teacher_cache.CacheWriter, "write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(cfg, tmp_path)
    monkeypatch.undo()
    first = tmp_path / "cache" / teacher_cache.shard_name(0)
    written = first.stat().st_mtime_ns
    with pytest.raises(ValueError, match="dskd_teacher_cache: the cache in .* is unfinished"):
        load_config({**cfg, "dskd_teacher_cache": str(tmp_path / "cache")}, tmp_path)

    manifest = build(cfg, tmp_path)
    assert first.stat().st_mtime_ns == written
    uninterrupted = teacher_cache.read_manifest(built[1])
    assert manifest["complete"] and manifest["shards"] == uninterrupted["shards"]
    assert json.loads((tmp_path / "cache" / "index.json").read_text()) == TeacherCache(built[1]).index


def test_a_corrupted_shard_is_detected(assets, built, tmp_path):
    """One changed byte in a shard: reading a sample of it and running the command again (which
    verifies a finished cache) both say which shard fails its checksum."""
    folder = tmp_path / "cache"
    shutil.copytree(built[1], folder)
    shard = folder / teacher_cache.shard_name(1)
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x01
    shard.write_bytes(bytes(data))
    cache = TeacherCache(folder)
    key = next(k for k, name in cache.index.items() if name == shard.name)
    fix = "Rebuild it with `axolotl dskd-cache-teacher config.yml --overwrite`"
    with pytest.raises(TeacherCacheError, match="shard-00001.safetensors of .* fails its checksum") as read:
        cache.sample(key)
    cfg = cache_config(assets, tmp_path, folder)
    with pytest.raises(TeacherCacheError, match="shard-00001.safetensors of .* fails its checksum") as rerun:
        build(cfg, tmp_path)
    for raised in (read, rerun):
        assert str(raised.value).startswith("dskd_teacher_cache: ") and fix in str(raised.value)
    manifest = build(cfg, tmp_path, overwrite=True)
    assert manifest["complete"] and manifest["shards"] == teacher_cache.read_manifest(built[1])["shards"]


def _other_teacher(assets: dict, folder: Path) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets["teacher"])
    return save_pair(tiny_model("qwen2", tokenizer, hidden_size=64, seed=3), tokenizer, folder)


def _other_weights(assets: dict, folder: Path) -> Path:
    """The teacher's config and tokenizer with other weights (a new fine-tune saved over it)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets["teacher"])
    return save_pair(tiny_model("qwen2", tokenizer, hidden_size=128, seed=3), tokenizer, folder)


def _other_tokenizer(assets: dict, folder: Path) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets["teacher"])
    tokenizer.add_tokens(["<other>"])
    tokenizer.save_pretrained(folder)
    return folder


def _other_data(assets: dict, folder: Path) -> list[dict]:
    data = folder / "other.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(Path(assets["data"]).read_text().splitlines(keepends=True)[:40]))
    return [{"path": str(data), "ds_type": "json", "type": "alpaca"}]


STALE_RUNS = {
    "another teacher": lambda a, p: {"dskd_teacher": str(_other_teacher(a, p / "teacher"))},
    "other teacher weights": lambda a, p: {"dskd_teacher": str(_other_weights(a, p / "teacher"))},
    "another loading of the teacher": lambda a, p: {"dskd_teacher_load_in_4bit": False},
    "another teacher tokenizer": lambda a, p: {"dskd_teacher_tokenizer": str(_other_tokenizer(a, p / "tok"))},
    "another teacher chat template": lambda a, p: {"dskd_teacher_chat_template": "chatml"},
    "other datasets": lambda a, p: {"datasets": _other_data(a, p)},
    "another sequence_len": lambda a, p: {"sequence_len": 128},
    "another pairing of the two models": lambda a, p: {"base_model": str(a["student"])},
    "another storage dtype": lambda a, p: {"dskd_teacher_cache_dtype": "bfloat16"},
}


@pytest.mark.parametrize("kind", list(STALE_RUNS))
def test_a_stale_cache_is_refused_at_validation(assets, built, tmp_path, kind):
    """A cache built for another run is refused before anything loads, naming
    dskd_teacher_cache, what differs and how to rebuild."""
    cfg = {**built[0], **STALE_RUNS[kind](assets, tmp_path)}
    message = refusal(cfg, tmp_path)
    assert f"dskd_teacher_cache: the cache in {built[1]} was built for " in message and kind in message
    assert "axolotl dskd-cache-teacher config.yml" in message


def test_a_missing_unfinished_or_older_cache_is_refused(built, tmp_path):
    older = tmp_path / "older"
    shutil.copytree(built[1], older)
    manifest = json.loads((older / "manifest.json").read_text())
    manifest["identity"]["format_version"] = 0
    (older / "manifest.json").write_text(json.dumps(manifest))
    message = refusal({**built[0], "dskd_teacher_cache": str(older)}, tmp_path)
    assert "built for an older cache format (cache: 0, this run: 1)" in message
    message = refusal({**built[0], "dskd_teacher_cache": str(tmp_path / "none")}, tmp_path)
    assert f"dskd_teacher_cache: {tmp_path / 'none'} holds no teacher cache. Build it with" in message


def test_a_sample_missing_from_the_cache_is_an_error_with_a_count(built, prepared):
    """The plugin's collator places each sample's states where the loss reads them; a sample the
    cache does not hold (its labels changed since) stops the batch with a count, never a silent
    fallback."""
    from axolotl.integrations.base import PluginManager
    from axolotl.loaders import load_tokenizer

    cfg, dataset = prepared
    cls, kwargs = PluginManager.get_instance().get_collator_cls_and_kwargs(cfg)
    collator = cls(tokenizer=load_tokenizer(cfg), padding=True, return_tensors="pt", **kwargs)
    features = [dict(row) for row in dataset.select(range(2))]
    batch = collator(features)
    read = teacher_positions_read(
        batch["labels"], collator.loss_config, batch["teacher_labels"], batch["token_alignment"]
    )
    assert read.any() and (batch["teacher_hidden"][read].abs().sum(-1) > 0).all()

    features[1]["labels"] = [IGNORE_INDEX] + features[1]["input_ids"][1:]  # trains the prompt too
    with pytest.raises(
        TeacherCacheError, match="1 of 2 samples of this batch are not in the teacher cache"
    ) as raised:
        collator(features)
    assert str(raised.value).startswith("dskd_teacher_cache: ")
    assert "dskd-cache-teacher config.yml --overwrite" in str(raised.value)


def _loss_and_gradients(teacher_hidden: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The same-vocabulary DSKD loss of fixed student states and projectors, and its gradient."""
    torch.manual_seed(0)
    batch, length, d_s, d_t, vocab = 4, 96, 32, teacher_hidden.shape[-1], 512
    student = torch.randn(batch, length, d_s, requires_grad=True)
    projectors = Projectors(d_s, d_t)
    labels = torch.randint(vocab, (batch, length))
    labels[:, :16] = IGNORE_INDEX
    out = dskd_loss(
        projectors, student_hidden=student, student_lm_head=torch.randn(vocab, d_s) * 0.1,
        student_labels=labels, teacher_hidden=teacher_hidden, teacher_lm_head=torch.randn(vocab, d_t) * 0.05,
        config=DSKDLossConfig(),
    )  # fmt: skip
    out.loss.backward()
    return out.loss.detach().item(), torch.cat(
        [student.grad.flatten(), *(p.grad.flatten() for p in projectors.parameters())]
    )


@pytest.mark.parametrize(("storage", "tolerance"), [("bfloat16", 1e-3), ("int8", 1e-2)])
def test_stored_states_keep_the_loss_and_gradients(storage, tolerance):
    """Teacher states shaped like a real model's (a few channels ~50 times the rest): the loss
    and its gradients from bfloat16 storage stay within 0.1 % of float32 storage, from int8
    within 1 %, at about half the bytes of bfloat16."""
    torch.manual_seed(1)
    states = torch.randn(4, 96, 256)
    states[..., :3] *= 50.0
    loss, grad = _loss_and_gradients(states)
    stored = encode(states.reshape(-1, 256), storage)
    got_loss, got_grad = _loss_and_gradients(decode(stored).float().reshape(states.shape))
    assert abs(got_loss - loss) <= tolerance * abs(loss)
    assert (got_grad - grad).norm() <= tolerance * grad.norm()
    size = sum(t.numel() * t.element_size() for t in stored.values())
    assert size <= (0.55 if storage == "int8" else 0.5) * states.numel() * 4


def test_training_reads_the_head_from_a_folder_without_the_transformer(assets, tmp_path):
    """A teacher folder with only its config, tokenizer, LM head and embeddings is enough: they
    are the teacher's own weights; a folder without safetensors is refused by key."""
    from safetensors.torch import load_file

    from axolotl_dskd.core.teacher import TeacherConfigError, load_teacher_head

    folder = head_only_copy(assets["teacher"], tmp_path / "head")
    head = load_teacher_head(
        str(folder), device=torch.device("cpu"), dtype=torch.float32, with_embeddings=True
    )
    weights = load_file(assets["teacher"] / "model.safetensors")
    assert torch.equal(head.get_output_embeddings().weight, weights["lm_head.weight"])
    assert torch.equal(head.get_input_embeddings().weight, weights["model.embed_tokens.weight"])
    (folder / "model.safetensors").unlink()
    with pytest.raises(TeacherConfigError, match="dskd_teacher: .* has no safetensors weights"):
        load_teacher_head(str(folder), device=torch.device("cpu"), dtype=torch.float32, with_embeddings=False)


def _adapter(assets: dict, folder: Path, **lora: Any) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(assets["teacher"])
    get_peft_model(teacher, LoraConfig(r=2, **lora)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("lora", "changed"),
    [
        ({"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, "lm_head"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, "model.embed_tokens"),
        ({"target_modules": ["q_proj", "v_proj"]}, None),
    ],
)
def test_a_teacher_adapter_that_changes_the_head_is_refused_with_a_cache(assets, tmp_path, lora, changed):
    """The cache's training reads the LM head and embeddings from the base teacher's files: an
    adapter that retrains either is refused by key (merge it first); one on attention is not."""
    cfg = cache_config(
        assets,
        tmp_path,
        tmp_path / "no-cache",
        dskd_teacher_adapter=str(_adapter(assets, tmp_path / "a", **lora)),
    )
    message = refusal(cfg, tmp_path)
    if changed is None:
        assert "holds no teacher cache" in message, message
    else:
        assert f"dskd_teacher_adapter: {tmp_path / 'a'} changes the teacher's {changed}," in message, message
