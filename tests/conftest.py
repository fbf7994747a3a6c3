"""Shared fixtures: tiny local models (no download) and a runner for Axolotl's real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from axolotl_dskd.tiny import OFFLINE_ENV

os.environ.update(OFFLINE_ENV)

# Everything Axolotl needs to train a LoRA student on a CPU; tests override what they test.
CPU_LORA_BASE: dict[str, Any] = {
    "datasets": None,  # set per test
    "val_set_size": 0,
    "sequence_len": 256,  # the sentencepiece student spends ~130 tokens on an alpaca row
    "adapter": "lora",
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "lora_target_linear": True,
    "lora_mlp_kernel": False,
    "lora_qkv_kernel": False,
    "lora_o_kernel": False,
    "lora_embedding_kernel": False,
    "micro_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "max_steps": 4,
    "learning_rate": 1e-3,
    "optimizer": "adamw_torch",
    "lr_scheduler": "cosine",
    "bf16": False,
    "fp16": False,
    "tf32": False,
    "logging_steps": 1,
    "save_steps": 2,
    "seed": 42,
    "dataloader_num_workers": 0,
}


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Teacher (Qwen2, BPE), same-vocab student (Llama, BPE), cross student (Llama,
    sentencepiece-style) and an alpaca dataset, made once per session."""
    from axolotl_dskd.tiny import (
        arithmetic_rows,
        bpe_tokenizer,
        save_pair,
        sentencepiece_tokenizer,
        task_corpus,
        tiny_model,
        write_jsonl,
    )

    root = tmp_path_factory.mktemp("tiny")
    corpus = task_corpus()
    bpe, sp = bpe_tokenizer(corpus), sentencepiece_tokenizer(corpus)
    return {
        # bitsandbytes' CPU 4-bit kernels need in_features divisible by 64
        "teacher": save_pair(tiny_model("qwen2", bpe, hidden_size=128), bpe, root / "teacher"),
        "student": save_pair(tiny_model("llama", bpe, seed=1), bpe, root / "student"),
        "student_sp": save_pair(tiny_model("llama", sp, seed=2), sp, root / "student_sp"),
        "data": write_jsonl(arithmetic_rows(64, seed=0), root / "data" / "arithmetic.jsonl"),
    }


def on_tiny_assets(assets: dict[str, Path], out: Path, *, student: str = "student") -> dict[str, Any]:
    """The keys that point a config at the tiny local models and data (hub ids cannot be
    downloaded here) and put its outputs under ``out``."""
    return {
        "base_model": str(assets[student]),
        "dskd_teacher": str(assets["teacher"]),
        "datasets": [{"path": str(assets["data"]), "ds_type": "json", "type": "alpaca"}],
        "output_dir": str(out / "output"),
        "dataset_prepared_path": str(out / "prepared"),
    }


def dskd_config(assets: dict[str, Path], out: Path, *, student: str = "student", **overrides: Any) -> dict:
    cfg = {
        **CPU_LORA_BASE,
        "plugins": ["axolotl_dskd.DSKDPlugin"],
        "dskd_teacher_load_in_4bit": True,
        **on_tiny_assets(assets, out, student=student),
    }
    cfg.update(overrides)
    return {k: v for k, v in cfg.items() if v is not None}


def write_config(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture
def fresh_plugin_manager():
    """Axolotl's plugin manager is a process-wide singleton; each test registers its own."""
    from axolotl.integrations.base import PluginManager

    PluginManager.get_instance().plugins.clear()
    yield
    PluginManager.get_instance().plugins.clear()


def load_config(cfg: dict, workdir: Path):
    """Axolotl's ``load_cfg``: registers the plugins afresh and validates the whole config,
    loading no weights."""
    from axolotl.cli.config import load_cfg
    from axolotl.integrations.base import PluginManager

    PluginManager.get_instance().plugins.clear()
    return load_cfg(str(write_config(cfg, workdir / "config.yml")))


def refusal(cfg: dict, workdir: Path) -> str:
    """The message of the error that validating ``cfg`` raises."""
    with pytest.raises(Exception) as info:
        load_config(cfg, workdir)
    return str(info.value)


def _train_env() -> dict[str, str]:
    """Offline, with the venv's scripts on PATH as in an activated venv (`axolotl train` runs
    `accelerate` from PATH)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, **OFFLINE_ENV, "PATH": path}


def _train_command(cfg: dict, workdir: Path, launcher: str) -> list[str]:
    config = write_config(cfg, workdir / "config.yml")
    if launcher == "accelerate":
        accelerate = str(Path(sys.executable).with_name("accelerate"))
        return [accelerate, "launch", "--num_processes", "1", "-m", "axolotl.cli.train", str(config)]
    if launcher == "axolotl":  # `axolotl train`, which itself runs `accelerate launch`
        return [str(Path(sys.executable).with_name("axolotl")), "train", str(config)]
    return [sys.executable, "-m", "axolotl.cli.train", str(config)]


def run_train(
    cfg: dict, workdir: Path, *, launcher: str = "python", timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run ``python -m axolotl.cli.train`` on ``cfg`` (or ``accelerate launch``, ``axolotl train``)."""
    proc = subprocess.run(
        _train_command(cfg, workdir, launcher), cwd=workdir, env=_train_env(),
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    (workdir / "train.log").write_text(proc.stdout + proc.stderr)
    return proc


def start_train(cfg: dict, workdir: Path) -> subprocess.Popen:
    """Start a training run in the background (its output goes to train.log)."""
    log = open(workdir / "train.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        _train_command(cfg, workdir, "python"), cwd=workdir, env=_train_env(),
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]


def log_history(checkpoint: Path) -> list[dict]:
    """The metrics the trainer logged, as saved in a checkpoint's trainer_state.json."""
    return json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]


def training_logs(checkpoint: Path) -> list[dict]:
    return [row for row in log_history(checkpoint) if "loss" in row]
