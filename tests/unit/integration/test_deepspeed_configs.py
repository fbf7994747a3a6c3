"""The DeepSpeed example configs (``example_configs/deepspeed/``) through Axolotl's own config
loading with the plugin registered, on the CPU, without DeepSpeed installed.

``axolotl.cli.config.load_cfg`` validates the YAML (Axolotl's schema plus the plugin's
``dskd_*`` keys and teacher checks), loads the DeepSpeed JSON into ``cfg.deepspeed`` and then
calls ``setup_deepspeed_env``, which imports DeepSpeed and starts an NCCL process group: that one
call is replaced by a recorder here (the GPU check runs it for real). The hub models of the
examples are swapped for tiny local ones with the same tokenizer relationship (a
sentencepiece-style student, a byte-level BPE teacher: CMA).
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from dskd_devkit.axolotl_runs import on_tiny_assets, write_config

pytestmark = pytest.mark.usefixtures("fresh_plugin_manager")

REPO = Path(__file__).resolve().parents[3]
DS_DIR = REPO / "example_configs" / "deepspeed"
STAGES = {"zero2.json": 2}
EXAMPLES = {"dskd_zero2.yml": 2}


@pytest.fixture(autouse=True)
def restore_environ():
    """``load_cfg`` exports ACCELERATE_* variables for the launch that would follow."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _ds_json(name: str) -> dict:
    return json.loads((DS_DIR / name).read_text())


@pytest.mark.parametrize("name", sorted(STAGES))
def test_deepspeed_json_is_a_standard_auto_config(name):
    """Everything the HF Trainer knows is "auto", so the JSON never disagrees with the YAML."""
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    config = _ds_json(name)
    ds = HfDeepSpeedConfig(config)
    assert ds.get_value("zero_optimization.stage") == STAGES[name]
    assert ds.is_zero3() == (STAGES[name] == 3)
    for key in (
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
        "bf16.enabled",
        "fp16.enabled",
    ):
        assert ds.get_value(key) == "auto", key
    assert "optimizer" not in config and "scheduler" not in config, (
        "the HF trainer must build the optimizer: DSKD adds the projectors' parameter group"
    )


def _example(name: str, assets: dict[str, Path], tmp_path: Path, **overrides) -> dict:
    raw = yaml.safe_load((DS_DIR / name).read_text())
    assert (REPO / raw["deepspeed"]).is_file(), f"{name}: deepspeed path is relative to the repo root"
    raw.update(**on_tiny_assets(assets, tmp_path, student="student_sp"), sequence_len=256)
    raw.update(overrides)
    return raw


def _load(cfg: dict, tmp_path: Path, monkeypatch) -> tuple[object, list]:
    import axolotl.utils.trainer as axolotl_trainer
    from axolotl.cli.config import load_cfg

    calls: list = []
    monkeypatch.setattr(
        axolotl_trainer, "setup_deepspeed_env", lambda cfg, stage=None: calls.append((cfg.deepspeed, stage))
    )
    monkeypatch.chdir(REPO)  # the examples' deepspeed path is relative to the repo root
    return load_cfg(str(write_config(cfg, tmp_path / "config.yml"))), calls


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_validates_with_the_plugin(name, assets, tmp_path, monkeypatch):
    from axolotl.integrations.base import PluginManager

    from axolotl_dskd.integration.plugin import DSKDPlugin

    stage = EXAMPLES[name]
    cfg, calls = _load(_example(name, assets, tmp_path), tmp_path, monkeypatch)

    assert [s for _, s in calls] == [stage], "Axolotl did not set up DeepSpeed with this stage"
    assert isinstance(cfg.deepspeed, dict), "the JSON was not loaded into cfg.deepspeed"
    assert cfg.deepspeed["zero_optimization"]["stage"] == stage
    assert any(isinstance(p, DSKDPlugin) for p in PluginManager.get_instance().plugins.values())
    # the plugin's validation ran: teacher inspected, CMA chosen for different tokenizers
    assert cfg.dskd_teacher == str(assets["teacher"])
    assert cfg.dskd_teacher_load_in_4bit is True
    assert cfg.dskd_cross_tokenizer is True
    assert cfg.adapter == "lora"


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_with_a_bad_dskd_key_is_refused(name, assets, tmp_path, monkeypatch):
    cfg = _example(name, assets, tmp_path, dskd_kd_rate=1.5)
    with pytest.raises(Exception, match="dskd_kd_rate"):
        _load(cfg, tmp_path, monkeypatch)


@pytest.mark.parametrize("key", ["deepspeed", "fsdp_config"])
def test_sharded_student_weights_are_refused_by_key(key, assets, tmp_path, monkeypatch):
    """ZeRO-3 and FSDP shard the LM head the loss reads whole: refused before anything loads."""
    if key == "deepspeed":
        zero3 = {**_ds_json("zero2.json"), "zero_optimization": {"stage": 3}}
        value = str(tmp_path / "zero3.json")
        Path(value).write_text(json.dumps(zero3))
    else:
        value = {"fsdp_version": 2, "reshard_after_forward": True}
    cfg = _example("dskd_zero2.yml", assets, tmp_path, **{key: value})
    if key != "deepspeed":
        cfg.pop("deepspeed")
    with pytest.raises(Exception, match=rf"{key}: .*(ZeRO-3|FSDP)"):
        _load(cfg, tmp_path, monkeypatch)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_hf_trainer_fills_every_auto_value(name, tmp_path):
    """What the trainer does with the JSON at launch (needs DeepSpeed importable)."""
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    from transformers import TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path),
        deepspeed=str(DS_DIR / name),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        max_grad_norm=1.0,
        report_to=[],
    )
    config = args.hf_deepspeed_config.config
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert config["gradient_accumulation_steps"] == 4
    assert config["gradient_clipping"] == 1.0


def test_deepspeed_extra_is_axolotls_own():
    """``pip install axolotl-dskd[deepspeed]`` installs Axolotl's own ``deepspeed`` extra for the
    Axolotl versions this package supports, so it never picks a DeepSpeed that the installed Axolotl
    refuses (0.19 and 0.21 pin different ranges)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (extra,) = [Requirement(r) for r in project["optional-dependencies"]["deepspeed"]]
    (axolotl,) = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "axolotl"]
    assert (extra.name, extra.extras) == ("axolotl", {"deepspeed"})
    assert extra.specifier == axolotl.specifier
    theirs = [r for r in metadata.requires("axolotl") or [] if 'extra == "deepspeed"' in r]
    assert any(Requirement(r).name == "deepspeed" for r in theirs), "axolotl has no deepspeed extra"
