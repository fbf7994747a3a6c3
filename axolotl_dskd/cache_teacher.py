"""``axolotl dskd-cache-teacher config.yml``: run the teacher once, store its hidden states.

Also ``python -m axolotl_dskd.cache_teacher config.yml``, and under ``accelerate launch`` /
``torchrun`` each process builds its share of the shards. The dataset is prepared by Axolotl
exactly as for training (the same prepared dataset, the teacher's own chat rendering included),
the teacher is loaded as configured (4-bit, 8-bit or full precision) and run over the training
and evaluation samples in length-sorted batches; the states the loss reads are written to
``dskd_teacher_cache`` (format: :mod:`axolotl_dskd.teacher_cache`). Running the command again
resumes an interrupted build, replaces a cache built for another run, and verifies a finished one.

:func:`cache_identity` is what a cache is built from; config validation compares it with a
cache's manifest (:func:`check_cache`), so a stale cache is refused before anything loads.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import click
import torch
from pydantic import BaseModel
from torch import Tensor

from axolotl_dskd import teacher_cache
from axolotl_dskd.loss import IGNORE_INDEX, DSKDLossConfig
from axolotl_dskd.teacher import tensor_digests
from axolotl_dskd.teacher_cache import PlannedSample, TeacherCacheError

LOG = logging.getLogger(__name__)
KEY = "dskd_teacher_cache"
DATASET_SETTINGS = (
    "datasets", "test_datasets", "train_on_inputs", "chat_template", "chat_template_jinja",
    "chat_template_kwargs", "default_system_message", "eot_tokens", "special_tokens",
    "added_tokens_overrides",
)  # fmt: skip
"""Config keys that change what Axolotl's prepared samples hold (not which split they go to:
both splits are cached)."""
STALE = {
    "format_version": "an older cache format",
    "teacher_config": "another teacher (dskd_teacher, by its config.json)",
    "teacher_tensors": "other teacher weights (dskd_teacher's LM head, embeddings, first or last "
    "layer differ from those the cache was built from, or the cache predates this check)",
    "teacher_weights": "another loading of the teacher (dskd_teacher_load_in_4bit / _8bit, "
    "dskd_teacher_dtype or the bf16 / fp16 it follows, dskd_teacher_adapter)",
    "student_tokenizer": "another student tokenizer",
    "teacher_tokenizer": "another teacher tokenizer (dskd_teacher_tokenizer)",
    "teacher_chat_template": "another teacher chat template (dskd_teacher_chat_template)",
    "dataset": "other datasets or dataset settings (datasets, chat_template, train_on_inputs, ...)",
    "sequence_len": "another sequence_len",
    "pairing": "another pairing of the two models (dskd_cross_tokenizer: one vocabulary or two)",
    "storage_dtype": "another storage dtype (dskd_teacher_cache_dtype)",
}
"""Each part of a cache's identity, as a stale-cache message names it."""
_BUILDING = contextvars.ContextVar("dskd_building_teacher_cache", default=False)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _plain(value: Any) -> Any:
    """A config value as JSON data, unset entries dropped (pydantic models as Axolotl dumps them)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_none=True)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def tokenizer_digest(tokenizer: Any) -> str:
    """Of everything that decides the ids of a text: a fast tokenizer's whole definition, else
    its vocabulary and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return _sha256(backend.to_str())
    return _sha256(
        json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.special_tokens_map], default=str)
    )


def cache_identity(
    cfg: Any, teacher_config: Any, student_tokenizer: Any, teacher_tokenizer: Any
) -> dict[str, Any]:
    """What the states of a cache depend on; two runs with equal identities read the same states."""
    from axolotl_dskd.chat_data import resolve_template
    from axolotl_dskd.plugin import teacher_dtype

    cross = bool(cfg.dskd_cross_tokenizer)
    template = resolve_template(cfg.dskd_teacher_chat_template, teacher_tokenizer) if cross else None
    config = {
        k: v
        for k, v in teacher_config.to_dict().items()
        if not k.startswith("_") and k != "transformers_version"
    }
    return {
        "format_version": teacher_cache.FORMAT_VERSION,
        "teacher_config": _sha256(json.dumps(config, sort_keys=True, default=str)),
        "teacher_tensors": tensor_digests(cfg.dskd_teacher),
        "teacher_weights": {
            "load_in_4bit": bool(cfg.dskd_teacher_load_in_4bit),
            "load_in_8bit": bool(cfg.dskd_teacher_load_in_8bit),
            "dtype": str(teacher_dtype(cfg)),  # "auto" resolved: it follows bf16 / fp16
            "adapter": cfg.dskd_teacher_adapter,
        },
        "student_tokenizer": tokenizer_digest(student_tokenizer),
        "teacher_tokenizer": tokenizer_digest(teacher_tokenizer),
        "teacher_chat_template": _sha256(template) if template else None,
        "dataset": _sha256(
            json.dumps({k: _plain(getattr(cfg, k, None)) for k in DATASET_SETTINGS}, sort_keys=True)
        ),
        "sequence_len": cfg.sequence_len,
        "pairing": "two tokenizers" if cross else "one vocabulary",
        "storage_dtype": cfg.dskd_teacher_cache_dtype,
    }


@contextlib.contextmanager
def building_cache() -> Iterator[None]:
    """Validate a config for building its cache: the cache it names need not exist yet."""
    token = _BUILDING.set(True)
    try:
        yield
    finally:
        _BUILDING.reset(token)


def check_cache(folder: str, identity: dict[str, Any]) -> None:
    """Refuse, naming ``dskd_teacher_cache``, a cache that is missing, unfinished or built for
    another run (config validation, before anything loads)."""
    if _BUILDING.get():
        return
    rebuild = (
        f"Build it with `axolotl dskd-cache-teacher config.yml` (or `python -m "
        f"axolotl_dskd.cache_teacher config.yml`) on this config, or remove {KEY} to run the teacher live."
    )
    manifest = teacher_cache.read_manifest(folder)
    if manifest is None:
        raise ValueError(f"{KEY}: {folder} holds no teacher cache. {rebuild}")
    built = manifest.get("identity", {})
    stale = [name for name in STALE if _differs(name, built.get(name), identity[name])]
    if stale:
        readable = ("sequence_len", "pairing", "storage_dtype", "format_version")
        details = [
            STALE[name]
            + (f" (cache: {built.get(name)!r}, this run: {identity[name]!r})" if name in readable else "")
            for name in stale
        ]
        raise ValueError(
            f"{KEY}: the cache in {folder} was built for {'; '.join(details)}. Rebuild it with "
            f"`axolotl dskd-cache-teacher config.yml` on this config (it replaces the old one), or set "
            f"{KEY} to another folder."
        )
    if not manifest.get("complete"):
        raise ValueError(f"{KEY}: the cache in {folder} is unfinished (its build stopped). {rebuild} "
                         "The build resumes where it stopped.")  # fmt: skip


def _differs(name: str, built: Any, now: Any) -> bool:
    """Whether one part of a cache's identity differs from this run's. The teacher's tensors are
    compared where both have them: training may read a folder holding only the LM head and
    embeddings of the teacher the cache was built from."""
    if name != "teacher_tensors":
        return built != now
    shared = set(built or {}) & set(now)
    return not shared or any(built[k] != now[k] for k in shared)


# -- building ---------------------------------------------------------------------------------------


def _run_identity(cfg: Any) -> dict[str, Any]:
    from transformers import AutoConfig

    from axolotl_dskd.chat_data import teacher_tokenizer
    from axolotl_dskd.validation import student_tokenizer_of

    teacher_config = AutoConfig.from_pretrained(
        cfg.dskd_teacher, trust_remote_code=cfg.dskd_teacher_trust_remote_code
    )
    return cache_identity(cfg, teacher_config, student_tokenizer_of(cfg), teacher_tokenizer(cfg))


class _Samples:
    """The unique samples of the prepared splits: key -> where to read it."""

    def __init__(self, datasets: Sequence[Any], extra_columns: Sequence[str]) -> None:
        self.datasets = list(datasets)
        self.where: dict[str, tuple[int, int]] = {}
        self.planned: list[PlannedSample] = []
        self.trained_tokens = 0
        for d, dataset in enumerate(self.datasets):
            columns = ["input_ids", "labels", *(c for c in extra_columns if c in dataset.column_names)]
            offset = 0
            for chunk in dataset.select_columns(columns).iter(batch_size=1024):
                for i, row in enumerate(dict(zip(chunk, values)) for values in zip(*chunk.values())):
                    key = teacher_cache.sample_key(row, extra_columns)
                    if key in self.where:
                        continue
                    self.where[key] = (d, offset + i)
                    trained = sum(label != IGNORE_INDEX for label in row["labels"][1:])
                    self.trained_tokens += trained
                    self.planned.append(PlannedSample(key, len(row["input_ids"]), trained + 1))
                offset += len(chunk["input_ids"])

    def rows(self, keys: Sequence[str]) -> list[dict[str, Any]]:
        return [self.datasets[d][i] for d, i in (self.where[k] for k in keys)]


def _padded(rows: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Tensor]:
    """Student rows right-padded into a batch."""
    width = max(len(r["input_ids"]) for r in rows)

    def pad(name: str, value: int) -> Tensor:
        return torch.tensor(
            [list(r[name]) + [value] * (width - len(r[name])) for r in rows], dtype=torch.long
        )

    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
    return {
        "input_ids": pad("input_ids", pad_id),
        "labels": pad("labels", IGNORE_INDEX),
        "attention_mask": mask,
    }


class _TeacherStates:
    """The teacher's states of a batch of samples at the positions a cache keeps."""

    def __init__(self, cfg: Any, loss_config: DSKDLossConfig, device: torch.device) -> None:
        from axolotl.loaders import load_tokenizer

        from axolotl_dskd.plugin import configured_teacher, teacher_token_builder

        # what any token alignment reads: a cache serves exact, cma and exact+cma alike
        self.config = dataclasses.replace(loss_config, token_alignment="exact+cma")
        self.device = device
        pad = load_tokenizer(cfg).pad_token_id
        self.pad_id = pad if pad is not None else 0
        self.builder = teacher_token_builder(cfg) if loss_config.cross_tokenizer else None
        self.teacher = configured_teacher(cfg, device)

    def __call__(self, rows: Sequence[dict[str, Any]]) -> list[tuple[Tensor, Tensor]]:
        """Per sample: its positions (the ones the loss reads, and its last) and states there."""
        from axolotl_dskd.chat_data import columns_of
        from axolotl_dskd.models import teacher_hidden_states

        batch = _padded(rows, self.pad_id)
        if self.builder is None:
            forward = {k: batch[k] for k in ("input_ids", "attention_mask")}
            read = teacher_cache.positions_read(batch["labels"], self.config)
        else:
            teacher = self.builder(batch, [[columns_of(r)] for r in rows])
            forward = {k.removeprefix("teacher_"): teacher[k] for k in
                       ("teacher_input_ids", "teacher_attention_mask", "teacher_position_ids")}  # fmt: skip
            read = teacher_cache.positions_read(
                batch["labels"], self.config, teacher["teacher_labels"], teacher["token_alignment"]
            )
        hidden = teacher_hidden_states(self.teacher, **{k: v.to(self.device) for k, v in forward.items()})
        lengths = forward["attention_mask"].sum(-1)
        read[torch.arange(len(rows)), (lengths - 1).clamp_min(0)] = True  # a packed row's next sample
        read &= forward["attention_mask"].bool()
        out = []
        for b in range(len(rows)):
            positions = read[b].nonzero().squeeze(-1)
            out.append((positions, hidden[b, positions.to(self.device)].float().cpu()))
        return out


def build(config: str | Path, *, shard_size_mb: float = 1024.0, overwrite: bool = False) -> dict[str, Any]:
    """Build (or resume, or verify) the teacher cache of an Axolotl config; returns its manifest.
    ``overwrite``: discard what the folder holds first (a corrupted cache)."""
    from accelerate import PartialState
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets
    from tqdm import tqdm

    from axolotl_dskd.args import loss_config
    from axolotl_dskd.chat_data import TEACHER_COLUMNS

    started = time.time()
    state = PartialState(cpu=not torch.cuda.is_available())  # CPU processes meet over gloo
    with building_cache():
        cfg = load_cfg(str(config))
    if not cfg.dskd_teacher_cache:
        raise ValueError(f"{KEY} is not set in {config}: set it to the folder the teacher cache goes to.")
    folder = Path(cfg.dskd_teacher_cache)
    identity = _run_identity(cfg)
    if state.is_main_process:
        if overwrite:
            teacher_cache.clear(folder)
        teacher_cache.start(folder, identity, {"shard_size_mb": shard_size_mb})
    state.wait_for_everyone()
    manifest = teacher_cache.read_manifest(folder)
    if manifest["complete"]:
        if state.is_main_process:
            for name, shard in manifest["shards"].items():
                teacher_cache.verify_shard(folder, name, shard["sha256"])
            LOG.info("DSKD: the teacher cache in %s is complete and verified; nothing to build", folder)
        return manifest

    meta = load_datasets(cfg=cfg)
    samples = _Samples([d for d in (meta.train_dataset, meta.eval_dataset) if d is not None], TEACHER_COLUMNS)
    states = _TeacherStates(cfg, loss_config(cfg), state.device)
    hidden_size = states.teacher.config.get_text_config().hidden_size
    element = (
        1
        if cfg.dskd_teacher_cache_dtype == "int8"
        else torch.finfo(getattr(torch, cfg.dskd_teacher_cache_dtype)).bits // 8
    )
    per_shard = max(1, int(manifest["plan"]["shard_size_mb"] * 2**20 / (hidden_size * element)))
    shards = teacher_cache.plan_shards(samples.planned, per_shard)
    writer = teacher_cache.CacheWriter(folder, cfg.dskd_teacher_cache_dtype, state.process_index)
    done = writer.finished()
    mine = [(i, shard) for i, shard in enumerate(shards) if i % state.num_processes == state.process_index]
    todo = [(i, shard) for i, shard in mine if teacher_cache.shard_name(i) not in done]
    LOG.info(
        "DSKD: caching the teacher's states of %d samples in %d shards (%d here, %d already written) to %s",
        len(samples.planned), len(shards), len(mine), len(mine) - len(todo), folder,
    )  # fmt: skip
    tokens_per_batch = (cfg.micro_batch_size or 1) * cfg.sequence_len
    progress = tqdm(
        total=sum(len(s) for _, s in todo), desc="teacher states", disable=not state.is_local_main_process
    )
    teacher_started = time.time()
    for i, shard in todo:
        kept = {}
        for group in teacher_cache.batches(shard, tokens_per_batch):
            keys = [s.key for s in group]
            kept.update(zip(keys, states(samples.rows(keys))))
            progress.update(len(group))
        writer.write_shard(teacher_cache.shard_name(i), kept)
    progress.close()
    teacher_seconds = time.time() - teacher_started
    state.wait_for_everyone()
    if state.is_main_process:
        manifest = teacher_cache.finish(
            folder,
            list(samples.where),
            {
                "hidden_size": hidden_size,
                "trained_tokens": samples.trained_tokens,
                "teacher": str(cfg.dskd_teacher),
            },
        )
        LOG.info(
            "DSKD: teacher cache complete: %d samples, %d states, %.1f MB (%.0f bytes per trained token, %s) "
            "in %.1f s, %.1f s of them running the teacher and writing shards",
            manifest["samples"], manifest["states"], manifest["bytes"] / 1e6,
            manifest["bytes"] / max(1, manifest["trained_tokens"]), cfg.dskd_teacher_cache_dtype,
            time.time() - started, teacher_seconds,
        )  # fmt: skip
    state.wait_for_everyone()
    return teacher_cache.read_manifest(folder)


@click.command(name="dskd-cache-teacher")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--shard-size", default=1024.0, show_default=True, help="Target size of a shard, in MB.")
@click.option("--overwrite", is_flag=True, help="Build anew: discard what the folder's cache holds.")
def cli(config: str, shard_size: float, overwrite: bool) -> None:
    """Compute the DSKD teacher's hidden states once and store them in dskd_teacher_cache."""
    try:
        build(config, shard_size_mb=shard_size, overwrite=overwrite)
    except TeacherCacheError as exc:
        raise click.ClickException(str(exc)) from exc


if __name__ == "__main__":
    # through the package module, not this __main__ copy: validation reads the building flag there
    from axolotl_dskd.cache_teacher import cli as main

    main()
