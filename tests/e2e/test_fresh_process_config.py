"""Configs validated in a fresh Python process, as ``axolotl train`` validates them: the import
hook behind the bare plugin name, and a teacher's own Python code that must never run unless
trusted (a fresh process keeps that dynamic module out of the test process)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dskd_devkit.axolotl_runs import OFFLINE_ENV, dskd_config, load_config, refusal, write_config

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("fresh_plugin_manager")]


def test_bare_name_alias_can_be_turned_off(assets, tmp_path):
    """With AXOLOTL_DSKD_NO_ALIAS=1 Axolotl's own loader sees the bare name (and fails)."""
    config = write_config(dskd_config(assets, tmp_path, plugins=["axolotl_dskd"]), tmp_path / "c.yml")
    code = "from axolotl.cli.config import load_cfg; import sys; load_cfg(sys.argv[1])"
    env = {**OFFLINE_ENV, "AXOLOTL_DSKD_NO_ALIAS": "1", "PATH": "/usr/bin:/bin"}
    off = subprocess.run(
        [sys.executable, "-c", code, str(config)], env=env, capture_output=True, text=True, check=False
    )
    assert off.returncode != 0
    env.pop("AXOLOTL_DSKD_NO_ALIAS")
    on = subprocess.run(
        [sys.executable, "-c", code, str(config)], env=env, capture_output=True, text=True, check=False
    )
    assert on.returncode == 0, on.stderr[-3000:]


def teacher_with_own_code(assets, root: Path, model_type: str) -> tuple[Path, Path]:
    """A copy of the fixture teacher whose config points (``auto_map``) at a Python module in
    its folder; importing that module creates ``marker``. Returns (folder, marker)."""
    folder, marker = root / f"teacher_{model_type}", root / f"imported_{model_type}"
    shutil.copytree(assets["teacher"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {
        "AutoConfig": "remote_code.CustomConfig",
        "AutoModelForCausalLM": "remote_code.CustomForCausalLM",
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "remote_code.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('this code ran')\n"
        "from transformers import Qwen2Config, Qwen2ForCausalLM\n\n"
        "class CustomConfig(Qwen2Config):\n"
        f"    model_type = {model_type!r}\n\n"
        "class CustomForCausalLM(Qwen2ForCausalLM):\n"
        "    config_class = CustomConfig\n"
    )
    return folder, marker


def test_teacher_code_never_runs_unless_trusted(assets, tmp_path):
    """A teacher that needs its own Python code is refused at validation by the key that would
    allow it, without running that code; with the key set, the code does run (so the marker
    would show it)."""
    folder, marker = teacher_with_own_code(assets, tmp_path, "custom_qwen2")
    message = refusal(dskd_config(assets, tmp_path, dskd_teacher=str(folder)), tmp_path)
    assert "dskd_teacher_trust_remote_code" in message, message
    assert not marker.exists()

    # trusted: validation (in a fresh process, so the dynamic module stays out of this one) runs it
    cfg = dskd_config(assets, tmp_path, dskd_teacher=str(folder), dskd_teacher_trust_remote_code=True)
    config = write_config(cfg, tmp_path / "trusted.yml")
    code = "import sys; from axolotl.cli.config import load_cfg; load_cfg(sys.argv[1])"
    env = {**OFFLINE_ENV, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(config)], env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.read_text() == "this code ran"


def test_teacher_of_a_known_architecture_loads_without_its_own_code(assets, tmp_path):
    """A repository that ships code for an architecture transformers already has: validation
    passes and the teacher loads with transformers' class; the shipped code never runs."""
    from axolotl_dskd.core.teacher import load_teacher

    folder, marker = teacher_with_own_code(assets, tmp_path, "qwen2")
    load_config(dskd_config(assets, tmp_path, dskd_teacher=str(folder)), tmp_path)
    teacher = load_teacher(str(folder), device=torch.device("cpu"), dtype=torch.float32)
    assert type(teacher).__module__.startswith("transformers.models.qwen2")
    assert not marker.exists()
