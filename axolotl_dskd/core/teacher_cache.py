"""The offline teacher: its final hidden states, computed once, stored per sample (framework-free).

DSKD reads the teacher only through its final hidden states at the positions the loss uses
(:func:`axolotl_dskd.core.loss.teacher_positions_read`) plus its LM head (and, across tokenizers, its input embeddings). A cache
holds those states for every sample of a prepared dataset, so training never runs the teacher's
transformer. Layout of a cache folder:

- ``shard-00000.safetensors`` ...: per sample, ``<key>.positions`` (int32 ``[n]``, the sample's own
  positions, teacher-side across tokenizers) and ``<key>.states`` (``[n, d_t]`` in the storage
  dtype; ``int8`` adds ``<key>.scales``, float32 ``[n]``, one scale per token, and each token's
  largest channels, ``<key>.outlier_index`` / ``<key>.outlier_values`` ``[n, 4]``, see :func:`encode`);
- ``progress-<rank>.jsonl``: one line per finished shard (its samples, bytes, sha256), appended
  after the shard is in place, so an interrupted build resumes at the first unfinished shard;
- ``index.json`` (sample key -> shard) and ``manifest.json`` (what the cache was built from, the
  storage dtype, counts, the shards' checksums, ``complete``), written last, after every shard has
  been checked against its checksum.

Samples are keyed by :func:`sample_key`, a digest of what the prepared dataset holds for them, so
shuffling, packing and epochs find the same states. The work is planned up front
(:func:`plan_shards`: samples sorted by length, cut into shards, shard ``i`` built by process
``i % world``), so one process and several, interrupted or not, write the same files.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from axolotl_dskd.core.files import atomic_write, atomic_write_text

FORMAT_VERSION = 1
STORAGE_DTYPES = ("bfloat16", "float32", "int8")
MANIFEST, INDEX = "manifest.json", "index.json"


REBUILD = "Rebuild it with `axolotl dskd-cache-teacher config.yml --overwrite`"
"""The fix for a cache that cannot serve a run (the command replaces the folder's cache)."""


class TeacherCacheError(RuntimeError):
    """A cache that cannot serve this run: missing, unfinished, corrupted, or without a sample.
    The message starts with the YAML key and ends with what to do."""


def sample_key(feature: Mapping[str, Any], extra_columns: Sequence[str] = ()) -> str:
    """A digest of one prepared sample: its ``input_ids`` and ``labels`` and any ``extra_columns``
    (the teacher's own tokens where the dataset holds them), each length-prefixed."""
    digest = hashlib.blake2b(digest_size=16)
    for name in ("input_ids", "labels", *extra_columns):
        value = feature.get(name)
        array = np.asarray([] if value is None else value, dtype=np.int64).reshape(-1)
        digest.update(len(array).to_bytes(8, "little"))
        digest.update(array.tobytes())
    return digest.hexdigest()


# -- storage dtypes ---------------------------------------------------------------------------------


INT8_OUTLIERS = 4
"""Channels per token kept in bfloat16 beside the int8 ones: a model's final hidden states have a
few channels far larger than the rest, and one absmax scale over all of them would leave the
others a handful of levels."""
PARTS = {"int8": ("states", "scales", "outlier_index", "outlier_values")}
"""The tensors a stored sample has besides its positions, per storage dtype (default: states)."""


def encode(states: Tensor, storage_dtype: str, outliers: int = INT8_OUTLIERS) -> dict[str, Tensor]:
    """``states [n, d]`` as stored: cast, or int8 with one absmax scale per token over all but its
    ``outliers`` largest channels, which are kept in bfloat16."""
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype {storage_dtype!r}: choose one of {', '.join(STORAGE_DTYPES)}")
    if storage_dtype != "int8":
        return {"states": states.to(getattr(torch, storage_dtype)).contiguous()}
    states = states.float()
    k = min(outliers, states.shape[-1])
    index = states.abs().topk(k, dim=-1).indices
    rest = states.scatter(-1, index, 0.0)
    scales = rest.abs().amax(-1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
    return {
        "states": torch.round(rest / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous(),
        "scales": scales.contiguous(),
        "outlier_index": index.to(torch.int16 if states.shape[-1] <= 2**15 else torch.int32).contiguous(),
        "outlier_values": states.gather(-1, index).to(torch.bfloat16).contiguous(),
    }


def decode(stored: Mapping[str, Tensor]) -> Tensor:
    """The states of :func:`encode`; int8 comes back as float32."""
    states = stored["states"]
    if "scales" not in stored:
        return states
    values = states.float() * stored["scales"][:, None]
    return values.scatter(-1, stored["outlier_index"].long(), stored["outlier_values"].float())


def output_dtype(storage_dtype: str) -> torch.dtype:
    return torch.float32 if storage_dtype == "int8" else getattr(torch, storage_dtype)


# -- planning ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedSample:
    key: str
    length: int
    """Tokens the teacher reads (its own across tokenizers)."""
    stored: int
    """Hidden states kept for it."""


def plan_shards(samples: Iterable[PlannedSample], states_per_shard: int) -> list[list[PlannedSample]]:
    """Samples longest first (ties by key), cut into shards of about ``states_per_shard`` states."""
    shards: list[list[PlannedSample]] = [[]]
    filled = 0
    for sample in sorted(samples, key=lambda s: (-s.length, s.key)):
        if shards[-1] and filled + sample.stored > states_per_shard:
            shards.append([])
            filled = 0
        shards[-1].append(sample)
        filled += sample.stored
    return [shard for shard in shards if shard]


def batches(shard: Sequence[PlannedSample], tokens_per_batch: int) -> list[list[PlannedSample]]:
    """Consecutive (length-sorted) samples whose padded batch holds at most ``tokens_per_batch``
    tokens, at least one sample each."""
    out: list[list[PlannedSample]] = []
    for sample in shard:
        if out and (len(out[-1]) + 1) * out[-1][0].length <= tokens_per_batch:
            out[-1].append(sample)
        else:
            out.append([sample])
    return out


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


# -- writing ----------------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def finished_shards(progress: Path) -> dict[str, dict[str, Any]]:
    """The shards a ``progress-<rank>.jsonl`` records, by name; a line whose shard is gone (or
    that was cut off mid-write) does not count."""
    done = {}
    if progress.is_file():
        for line in progress.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if (progress.parent / record["name"]).is_file():
                done[record["name"]] = record
    return done


class CacheWriter:
    """One process's side of a build: its finished shards, and writing the next one."""

    def __init__(self, folder: str | os.PathLike, storage_dtype: str, rank: int = 0) -> None:
        self.folder = Path(folder)
        self.storage_dtype = storage_dtype
        self.rank = rank
        self.progress = self.folder / f"progress-{rank}.jsonl"

    def finished(self) -> dict[str, dict[str, Any]]:
        """Shards this process wrote before (an interrupted build), by name."""
        return finished_shards(self.progress)

    def write_shard(self, name: str, samples: Mapping[str, tuple[Tensor, Tensor]]) -> dict[str, Any]:
        """Write ``{key: (positions [n], states [n, d])}`` as one shard, atomically, then record it."""
        tensors: dict[str, Tensor] = {}
        for key, (positions, states) in samples.items():
            tensors[f"{key}.positions"] = positions.to(torch.int32).contiguous()
            for part, tensor in encode(states, self.storage_dtype).items():
                tensors[f"{key}.{part}"] = tensor
        path = self.folder / name
        atomic_write(
            path, lambda tmp: save_file(tensors, tmp, metadata={"format_version": str(FORMAT_VERSION)})
        )
        record = {
            "name": name,
            "keys": list(samples),
            "states": int(sum(int(p.numel()) for p, _ in samples.values())),
            "bytes": path.stat().st_size,
            "sha256": file_sha256(path),
        }
        with open(self.progress, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return record


def start(folder: str | os.PathLike, identity: Mapping[str, Any], plan: Mapping[str, Any]) -> None:
    """Prepare ``folder`` for a build of ``identity`` (rank 0, before the others start): keep a
    build of the same identity, finished or not (to verify or resume it, with the plan it started
    with), clear one of another."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(folder)
    if manifest is not None and manifest.get("identity") == dict(identity):
        return
    clear(folder)
    _write_json(
        folder / MANIFEST,
        {"format_version": FORMAT_VERSION, "identity": dict(identity), "plan": dict(plan), "complete": False},
    )


def clear(folder: str | os.PathLike) -> None:
    """Remove a cache's files from ``folder`` (nothing else in it)."""
    folder = Path(folder)
    for stale in [*folder.glob("shard-*.safetensors"), *folder.glob(".shard-*.tmp"),
                  *folder.glob("progress-*.jsonl"), folder / INDEX, folder / MANIFEST]:  # fmt: skip
        stale.unlink(missing_ok=True)


def finish(folder: str | os.PathLike, expected: Sequence[str], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Check every process's shards (present, checksum, every expected sample exactly once), then
    write the index and mark the manifest complete. Returns the manifest."""
    folder = Path(folder)
    records: dict[str, dict[str, Any]] = {}
    for progress in sorted(folder.glob("progress-*.jsonl")):
        records.update(finished_shards(progress))
    index: dict[str, str] = {}
    for name, record in sorted(records.items()):
        verify_shard(folder, name, record["sha256"])
        for key in record["keys"]:
            if index.setdefault(key, name) != name:
                raise TeacherCacheError(
                    f"dskd_teacher_cache: sample {key} is in both {index[key]} and {name} of {folder}. {REBUILD}."
                )
    missing = set(expected) - set(index)
    if missing:
        raise TeacherCacheError(
            f"dskd_teacher_cache: {len(missing)} of {len(expected)} samples have no shard in {folder}. {REBUILD}."
        )
    manifest = read_manifest(folder) or {}
    manifest.update(
        format_version=FORMAT_VERSION,
        samples=len(index),
        states=sum(r["states"] for r in records.values()),
        bytes=sum(r["bytes"] for r in records.values()),
        shards={name: {"sha256": r["sha256"], "bytes": r["bytes"]} for name, r in sorted(records.items())},
        **extra,
    )
    _write_json(folder / INDEX, index)
    manifest["complete"] = True
    _write_json(folder / MANIFEST, manifest)
    return manifest


def verify_shard(folder: Path, name: str, sha256: str) -> None:
    path = folder / name
    if not path.is_file():
        raise TeacherCacheError(f"dskd_teacher_cache: shard {name} of {folder} is missing. {REBUILD}.")
    if file_sha256(path) != sha256:
        raise TeacherCacheError(
            f"dskd_teacher_cache: shard {name} of {folder} fails its checksum: the file changed after it "
            f"was written. {REBUILD}."
        )


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def _write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=1, sort_keys=True))


# -- reading ----------------------------------------------------------------------------------------


class TeacherCache:
    """A finished cache, read per sample. Picklable for DataLoader workers: shards are opened
    (memory-mapped) lazily in each process and checked against their checksum when first opened."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        if manifest is None or not manifest.get("complete"):
            raise TeacherCacheError(
                f"dskd_teacher_cache: {self.folder} holds no finished teacher cache. Build it with "
                "`axolotl dskd-cache-teacher config.yml` (an unfinished build resumes)."
            )
        self.manifest = manifest
        self.index: dict[str, str] = json.loads((self.folder / INDEX).read_text())
        self.storage_dtype = manifest["identity"]["storage_dtype"]
        self.dtype = output_dtype(self.storage_dtype)
        self._open: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": {}}

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def sample(self, key: str) -> tuple[Tensor, Tensor]:
        """``(positions [n] int64, states [n, d])`` of one sample."""
        name = self.index[key]
        shard = self._open.get(name)
        if shard is None:
            verify_shard(self.folder, name, self.manifest["shards"][name]["sha256"])
            shard = self._open[name] = safe_open(str(self.folder / name), framework="pt")
        stored = {
            part: shard.get_tensor(f"{key}.{part}") for part in PARTS.get(self.storage_dtype, ("states",))
        }
        return shard.get_tensor(f"{key}.positions").long(), decode(stored)

    def hidden_states(self, keys: Sequence[Sequence[str]], segments: Tensor, read: Tensor) -> Tensor:
        """The teacher's hidden states of a batch, ``[B, L, d]``, zero where the loss reads none.

        Args:
            keys: Per row, the key of each sample packed into it, in order.
            segments: ``[B, L]`` the packed sample of each position (-1: padding); the ``k``-th
                segment of a row is its ``k``-th sample, and a sample's position ``p`` is the
                ``p``-th position of its segment (samples cut to a context keep a prefix).
            read: ``[B, L]`` the positions the loss reads (:func:`~axolotl_dskd.core.loss.teacher_positions_read`).

        Raises:
            TeacherCacheError: samples not in the cache, or read positions it has no state for.
        """
        missing = [key for row in keys for key in row if key not in self.index]
        if missing:
            raise TeacherCacheError(
                f"dskd_teacher_cache: {len(missing)} of {sum(map(len, keys))} samples of this batch are "
                f"not in the teacher cache {self.folder}: the prepared data changed since it was built "
                f"(edited data files keep the config the same). {REBUILD}, or remove dskd_teacher_cache "
                "to run the teacher live."
            )
        out = torch.zeros((*segments.shape, self.manifest["hidden_size"]), dtype=self.dtype)
        filled = torch.zeros_like(read)
        for b, row_keys in enumerate(keys):
            row_segments = segments[b]
            ids = [int(s) for s in torch.unique(row_segments[row_segments >= 0])]
            if len(ids) != len(row_keys):
                raise TeacherCacheError(
                    f"dskd_teacher_cache: row {b} holds {len(row_keys)} samples but its positions show "
                    f"{len(ids)}: cached states are placed per packed sample, by position ids that "
                    "restart. Remove dskd_teacher_cache to run the teacher live on such batches."
                )
            for key, seg in zip(row_keys, ids):
                at = (row_segments == seg).nonzero().squeeze(-1)
                positions, states = self.sample(key)
                kept = positions < len(at)
                where = at[positions[kept]]
                out[b, where] = states[kept].to(self.dtype)
                filled[b, where] = True
        unfilled = int((read & ~filled).sum())
        if unfilled:
            raise TeacherCacheError(
                f"dskd_teacher_cache: the teacher cache {self.folder} has no state for {unfilled} "
                "positions the loss reads in this batch (it was built with another token alignment "
                f"or other data). {REBUILD}."
            )
        return out
