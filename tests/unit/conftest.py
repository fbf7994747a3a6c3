"""Session fixtures of the unit tests: chat data prepared by Axolotl for two real tokenizers,
and a teacher cache built by the plugin's command (helpers in ``shared.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dskd_devkit.chat_pairs import CONVERSATIONS
from tests.unit.shared import PAIRS, Prepared, build, cache_config, prepare


@pytest.fixture(scope="session")
def prepared(real_tokenizer, tmp_path_factory) -> dict[tuple[str, str], Prepared]:
    for name in ("llama3", "qwen3"):
        real_tokenizer(name)  # fetched, or the test skips (fails in CI)
    root = tmp_path_factory.mktemp("chat")
    return {pair: prepare(root / "-".join(pair), *pair, CONVERSATIONS) for pair in PAIRS}


@pytest.fixture(scope="session")
def built(assets, tmp_path_factory) -> tuple[dict, Path]:
    """A finished float32 cache across tokenizers, and its config."""
    workdir = tmp_path_factory.mktemp("built")
    cfg = cache_config(assets, workdir, workdir / "cache")
    build(cfg, workdir)
    return cfg, workdir / "cache"
