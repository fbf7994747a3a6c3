"""``axolotl_dskd.integration.cache_identity``: a teacher cache built for another run (teacher,
tokenizer, template, data, sequence length, storage), for an older format, or missing, is refused
at validation, naming ``dskd_teacher_cache`` and how to rebuild."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dskd_devkit.axolotl_runs import refusal
from dskd_devkit.training import save_pair, tiny_model


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
