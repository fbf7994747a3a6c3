"""The offline teacher in this process: a cache built by the plugin's command on the tiny assets
(Axolotl's own preparation, the 4-bit teacher, a sentencepiece student across tokenizers), and
what a user relies on around it (``axolotl_dskd.core.teacher_cache``): the right states, resuming,
corruption, missing samples, storage precision, a teacher folder without its transformer. Stale
caches: ``integration/test_cache_identity.py``."""

from __future__ import annotations

import json
import shutil
from typing import Any

import pytest
import torch

from axolotl_dskd.core import teacher_cache
from axolotl_dskd.core.loss import IGNORE_INDEX, DSKDLossConfig, Projectors, dskd_loss, teacher_positions_read
from axolotl_dskd.core.teacher_cache import TeacherCache, TeacherCacheError, decode, encode
from dskd_devkit.axolotl_runs import load_config, prepared_datasets
from dskd_devkit.training import head_only_copy
from tests.unit.shared import build, cache_config


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
