"""``axolotl dskd-cache-teacher config.yml``: run the teacher once, store its hidden states.

Also ``python -m axolotl_dskd.cache_teacher config.yml``, and under ``accelerate launch`` /
``torchrun`` each process builds its share of the shards. The dataset is prepared by Axolotl
exactly as for training (the same prepared dataset, the teacher's own chat rendering included),
the teacher is loaded as configured (4-bit, 8-bit or full precision) and run over the training
and evaluation samples in length-sorted batches; the states the loss reads are written to
``dskd_teacher_cache`` (format: :mod:`axolotl_dskd.core.teacher_cache`). Running the command again
resumes an interrupted build, replaces a cache built for another run, and verifies a finished one.

What a cache is built from, and the refusal of a stale one at config validation, live in
:mod:`axolotl_dskd.integration.cache_identity`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import torch
from accelerate import PartialState
from axolotl.cli.config import load_cfg
from axolotl.common.datasets import load_datasets
from axolotl.integrations.base import PluginManager
from axolotl.loaders import load_tokenizer
from torch import Tensor
from tqdm import tqdm

from axolotl_dskd.core import teacher_cache
from axolotl_dskd.core.loss import IGNORE_INDEX, DSKDLossConfig, teacher_positions_read
from axolotl_dskd.core.models import teacher_forward_inputs, teacher_hidden_states
from axolotl_dskd.core.teacher_cache import PlannedSample, TeacherCacheError
from axolotl_dskd.integration.args import loss_config
from axolotl_dskd.integration.cache_identity import KEY, building_cache, run_identity
from axolotl_dskd.integration.chat_data import TEACHER_COLUMNS, columns_of
from axolotl_dskd.integration.configured import configured_teacher, teacher_token_builder

LOG = logging.getLogger("axolotl_dskd.cache_teacher")  # the same name under python -m


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
        # what any token alignment reads: a cache serves exact, cma and exact+cma alike
        self.config = dataclasses.replace(loss_config, token_alignment="exact+cma")
        self.device = device
        pad = load_tokenizer(cfg).pad_token_id
        self.pad_id = pad if pad is not None else 0
        self.builder = teacher_token_builder(cfg) if loss_config.cross_tokenizer else None
        self.teacher = configured_teacher(cfg, device)

    def __call__(self, rows: Sequence[dict[str, Any]]) -> list[tuple[Tensor, Tensor]]:
        """Per sample: its positions (the ones the loss reads, and its last) and states there."""
        batch = _padded(rows, self.pad_id)
        if self.builder is not None:
            batch.update(self.builder(batch, [[columns_of(r)] for r in rows]))
        forward = teacher_forward_inputs(batch, cross_tokenizer=self.builder is not None, packed=False)
        read = teacher_positions_read(
            batch["labels"], self.config, batch.get("teacher_labels"), batch.get("token_alignment")
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
    started = time.time()
    state = PartialState(cpu=not torch.cuda.is_available())  # CPU processes meet over gloo
    with building_cache():
        cfg = load_cfg(str(config))
    if not cfg.dskd_teacher_cache:
        raise ValueError(f"{KEY} is not set in {config}: set it to the folder the teacher cache goes to.")
    folder = Path(cfg.dskd_teacher_cache)
    identity = run_identity(cfg)
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

    meta = PluginManager.get_instance().load_datasets(cfg) or load_datasets(cfg=cfg)  # as `axolotl train`
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
    cli()
