"""Axolotl runs on the tiny local assets, as users launch them: configs, commands, logs.

One place for what the quickstart, the benchmarks and the tests share: the offline
environment, the three launchers users have (``python -m axolotl.cli.train``, ``accelerate
launch``, ``axolotl train``), the CPU settings Axolotl needs, validating a config with Axolotl's
own ``load_cfg``, building a ``DSKDTrainer`` in-process, and reading a run's logged metrics.
Axolotl is imported only inside the functions that need it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import yaml

PathLike = str | os.PathLike
Launcher = Literal["python", "accelerate", "axolotl"]

OFFLINE_ENV = {
    "AXOLOTL_DO_NOT_TRACK": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}
"""The environment of an Axolotl run on local assets: no hub look-ups, no telemetry, no W&B."""

CPU_LORA_BASE: dict[str, Any] = {
    "val_set_size": 0,
    "sequence_len": 256,  # the sentencepiece student spends ~130 tokens on an alpaca row
    "adapter": "lora",
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "lora_target_linear": True,
    "lora_mlp_kernel": False,  # the LoRA kernels default on and need CUDA
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
"""Everything Axolotl needs to train a LoRA student on a CPU; tests override what they test."""


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
    """A complete DSKD config on the tiny assets (4-bit teacher, LoRA student); an override of
    ``None`` removes the key."""
    cfg = {
        **CPU_LORA_BASE,
        "plugins": ["axolotl_dskd.DSKDPlugin"],
        "dskd_teacher_load_in_4bit": True,
        **on_tiny_assets(assets, out, student=student),
        **overrides,
    }
    return {k: v for k, v in cfg.items() if v is not None}


def without_distillation(config: dict[str, Any]) -> dict[str, Any]:
    """The same Axolotl config as plain SFT: every ``dskd_*`` key removed. The plugin stays
    listed: without a teacher it only seeds before the model is built, so that the SFT run starts
    from the same LoRA weights as the distilled one with the same ``seed``."""
    return {k: v for k, v in config.items() if not k.startswith("dskd_")}


def write_config(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def load_config(cfg: dict, workdir: Path) -> Any:
    """Axolotl's own ``load_cfg`` on ``cfg`` (written to ``workdir/config.yml``), in this process:
    the plugins registered afresh and the whole config validated, no weights loaded."""
    from axolotl.cli.config import load_cfg
    from axolotl.integrations.base import PluginManager

    PluginManager.get_instance().plugins.clear()
    return load_cfg(str(write_config(cfg, workdir / "config.yml")))


def prepared_datasets(cfg: Any) -> Any:
    """The prepared datasets of a validated config, in this process, as ``axolotl train`` prepares
    them: a plugin's ``load_datasets`` hook first, else Axolotl's own ``load_datasets``."""
    from axolotl.common.datasets import load_datasets
    from axolotl.integrations.base import PluginManager

    return PluginManager.get_instance().load_datasets(cfg) or load_datasets(cfg=cfg)


def refusal(cfg: dict, workdir: Path) -> str:
    """The message of the error that validating ``cfg`` raises (fails if it validates)."""
    try:
        load_config(cfg, workdir)
    except ValueError as exc:  # pydantic's ValidationError, the plugin's own refusals
        return str(exc)
    raise AssertionError("the config validated, but it should have been refused")


def train_command(config: PathLike, launcher: Launcher = "accelerate") -> list[str]:
    """The command that trains on ``config`` with this interpreter's tools.

    ``accelerate``: ``accelerate launch -m axolotl.cli.train``, one process and no mixed
    precision (the CPU defaults, spelled out so accelerate does not warn about a missing
    ``accelerate config``); ``axolotl``: ``axolotl train``, which runs ``accelerate launch``
    itself; ``python``: ``python -m axolotl.cli.train``.
    """
    scripts = Path(sys.executable).parent
    if launcher == "accelerate":
        return [str(scripts / "accelerate"), "launch", "--num_processes", "1", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no",
                "-m", "axolotl.cli.train", str(config)]  # fmt: skip
    if launcher == "axolotl":
        return [str(scripts / "axolotl"), "train", str(config)]
    return [sys.executable, "-m", "axolotl.cli.train", str(config)]


def train_env(threads: int | None = None) -> dict[str, str]:
    """The current environment, offline, with this interpreter's scripts first on PATH (as in an
    activated venv: ``axolotl train`` runs ``accelerate`` from PATH) and, if given, ``threads``
    CPU threads per process (a few single-threaded runs side by side use two cores better than
    one run on both)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, **OFFLINE_ENV, "PATH": path}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def run_train(
    cfg: dict, workdir: Path, *, launcher: Launcher = "python", timeout: int = 600
) -> subprocess.CompletedProcess:
    """Train on ``cfg`` (written to ``workdir/config.yml``) and wait; the output is also kept in
    ``workdir/train.log``."""
    proc = subprocess.run(
        train_command(write_config(cfg, workdir / "config.yml"), launcher), cwd=workdir,
        env=train_env(), capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    (workdir / "train.log").write_text(proc.stdout + proc.stderr)
    return proc


def cache_command(
    config: PathLike, launcher: Launcher | Literal["torchrun"] = "python", *options: str
) -> list[str]:
    """The command that builds the teacher cache of ``config`` (with the command's ``options``):
    ``python -m axolotl_dskd.cache_teacher``, ``axolotl dskd-cache-teacher`` (the plugin's
    subcommand) or ``torchrun`` with two CPU processes."""
    scripts = Path(sys.executable).parent
    if launcher == "axolotl":
        return [str(scripts / "axolotl"), "dskd-cache-teacher", str(config), *options]
    module = ["-m", "axolotl_dskd.cache_teacher", str(config), *options]
    if launcher == "torchrun":
        return [str(scripts / "torchrun"), "--standalone", "--nproc_per_node", "2", *module]
    return [sys.executable, *module]


def run_cache_build(
    cfg: dict,
    workdir: Path,
    *options: str,
    launcher: Launcher | Literal["torchrun"] = "python",
    timeout: int = 600,
) -> subprocess.CompletedProcess:
    """Build the teacher cache of ``cfg`` (written to ``workdir/config.yml``); the output is also
    kept in ``workdir/cache.log``."""
    proc = subprocess.run(
        cache_command(write_config(cfg, workdir / "config.yml"), launcher, *options), cwd=workdir,
        env=train_env(), capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    (workdir / "cache.log").write_text(proc.stdout + proc.stderr)
    return proc


def start_train(cfg: dict, workdir: Path, *, launcher: Launcher = "python") -> subprocess.Popen:
    """Start training on ``cfg`` in the background (its output goes to ``workdir/train.log``)."""
    log = open(workdir / "train.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        train_command(write_config(cfg, workdir / "config.yml"), launcher), cwd=workdir,
        env=train_env(), stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]


def log_history(checkpoint: Path) -> list[dict]:
    """The metrics the trainer logged, as saved in a checkpoint's trainer_state.json."""
    return json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]


def training_logs(checkpoint: Path) -> list[dict]:
    """The training steps' rows of :func:`log_history`."""
    return [row for row in log_history(checkpoint) if "loss" in row]


def quiet_library_logs() -> None:
    """Silence the import-time notes of optional kernels a CPU run does not use (torchao's CUDA
    extensions, bitsandbytes' hub kernels, torch's pytree deprecations): they read like errors."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", module="bitsandbytes")
    for name in ("torchao", "bitsandbytes", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def bind_plugin_training_args() -> None:
    """Axolotl adds a plugin's training-args fields (``dskd_*``) to its training arguments once,
    when ``axolotl.core.training_args`` is first imported, as ``axolotl.cli.train`` does after
    loading the config. A process that builds trainers directly registers the plugin and imports
    that module first (call this before anything else imports it); once it is imported, the
    fields are bound for good and there is nothing left to do."""
    if "axolotl.core.training_args" in sys.modules:
        return
    from axolotl.integrations.base import PluginManager

    manager = PluginManager.get_instance()
    registered = dict(manager.plugins)
    manager.register("axolotl_dskd.DSKDPlugin")
    import axolotl.core.training_args  # noqa: F401

    manager.plugins.clear()
    manager.plugins.update(registered)


def dskd_trainer(
    model: Any,
    teacher: Any,
    projectors: Any,
    *,
    train_dataset: Any = None,
    data_collator: Any = None,
    shared_vocabulary: Any = None,
    **training_args: Any,
) -> Any:
    """A ``DSKDTrainer`` built in this process, as Axolotl's builder builds it: Axolotl's training
    arguments with the plugin's ``dskd_*`` fields (``training_args`` override any of them, on top
    of CPU-friendly defaults, which resolve the ``auto`` keys as one vocabulary), then the teacher,
    projectors and ``shared_vocabulary`` ids attached as the plugin does."""
    bind_plugin_training_args()
    from axolotl.core.training_args import AxolotlTrainingArguments

    from axolotl_dskd.integration.trainer import DSKDTrainer

    defaults = {
        "per_device_train_batch_size": 2, "max_steps": 1, "report_to": [], "save_strategy": "no",
        "logging_steps": 1, "remove_unused_columns": False, "dataloader_num_workers": 0, "use_cpu": True,
        "seed": 0, "dskd_cross_tokenizer": False, "dskd_student_space_target": "projected",
        "dskd_kd_teacher_weight": 1.0,
    }  # fmt: skip
    args = AxolotlTrainingArguments(**{**defaults, **training_args})
    trainer = DSKDTrainer(model=model, args=args, train_dataset=train_dataset, data_collator=data_collator)
    trainer.attach_teacher(teacher, projectors, shared_vocabulary=shared_vocabulary)
    return trainer
