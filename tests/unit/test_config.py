"""The plugin's YAML keys through Axolotl's own config loading: what validates, what is refused
(before any model loads) and with which message, and the example configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dskd_devkit.axolotl_runs import (
    OFFLINE_ENV,
    dskd_config,
    load_config,
    on_tiny_assets,
    refusal,
    write_config,
)

pytestmark = pytest.mark.usefixtures("fresh_plugin_manager")

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("spelling", ["axolotl_dskd.DSKDPlugin", "axolotl_dskd"])
def test_both_plugin_spellings_keep_the_dskd_keys(assets, tmp_path, spelling):
    cfg = load_config(dskd_config(assets, tmp_path, plugins=[spelling], dskd_kd_rate=0.3), tmp_path)
    assert cfg.dskd_teacher == str(assets["teacher"])
    assert cfg.dskd_kd_rate == 0.3
    assert cfg.dskd_cross_tokenizer is False  # auto, same tokenizer


def test_auto_picks_cross_model_attention_for_different_vocabularies(assets, tmp_path):
    cfg = load_config(dskd_config(assets, tmp_path, student="student_sp"), tmp_path)
    assert cfg.dskd_cross_tokenizer is True


def test_equal_sized_vocabularies_with_different_tokens_are_different(assets, tmp_path):
    """Same size, different token-to-id map (two ids swapped): a different vocabulary, so CMA."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from axolotl_dskd.core.teacher import same_vocabulary

    student = tmp_path / "swapped_student"
    shutil.copytree(assets["student"], student)
    spec = json.loads((student / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = list(vocab)[100], list(vocab)[200]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (student / "tokenizer.json").write_text(json.dumps(spec))
    swapped, teacher = (
        AutoTokenizer.from_pretrained(student),
        AutoTokenizer.from_pretrained(assets["teacher"]),
    )
    assert len(swapped) == len(teacher) and not same_vocabulary(swapped, teacher)
    cfg = load_config({**dskd_config(assets, tmp_path), "base_model": str(student)}, tmp_path)
    assert cfg.dskd_cross_tokenizer is True


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"dskd_teacher": "/nonexistent/teacher"}, "dskd_teacher"),
        ({"dskd_teacher_load_in_8bit": True}, "dskd_teacher_load_in_8bit"),
        ({"dskd_divergence": "kl"}, "dskd_divergence"),
        ({"dskd_teacher_space_divergence": "tvd"}, "dskd_teacher_space_divergence"),
        ({"dskd_kd_rate": 1.5}, "dskd_kd_rate"),
        ({"dskd_temperature": 0}, "dskd_temperature"),
        ({"dskd_skew_lambda": 1.0}, "dskd_skew_lambda"),
        ({"dskd_chunk_size": 0}, "dskd_chunk_size"),
        ({"dskd_teacher_tokenizer": "/nonexistent/tok"}, "dskd_teacher_tokenizer"),
        ({"sequence_len": 1024}, "sequence_len"),  # the tiny teacher's context is 512
        ({"dskd_method": "vanilla_kd", "student": "student_sp"}, "dskd_method"),
        ({"dskd_cross_tokenizer": False, "student": "student_sp"}, "dskd_cross_tokenizer"),
        ({"dskd_teacher_cache_dtype": "int8"}, "dskd_teacher_cache_dtype is set without dskd_teacher_cache"),
        (
            {
                "dskd_teacher_cache": "cache",
                "pretraining_dataset": [{"path": "c4", "type": "pretrain"}],
                "max_steps": 10,
            },
            "dskd_teacher_cache: pretraining_dataset",
        ),
    ],
)
def test_bad_settings_are_refused_naming_the_key(assets, tmp_path, overrides, expected):
    overrides = dict(overrides)
    student = overrides.pop("student", "student")
    message = refusal(dskd_config(assets, tmp_path, student=student, **overrides), tmp_path)
    assert expected in message, message


def test_missing_bitsandbytes_is_refused_before_loading(assets, tmp_path):
    """A 4-bit teacher without an importable bitsandbytes stops at validation."""
    shadow = tmp_path / "shadow" / "bitsandbytes"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('bitsandbytes is not installed')\n")
    config = write_config(dskd_config(assets, tmp_path), tmp_path / "c.yml")
    code = (
        "import sys; sys.path.insert(0, sys.argv[2]);"
        "from axolotl_dskd.core.teacher import require_bitsandbytes;"
        "require_bitsandbytes('dskd_teacher_load_in_4bit')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(config), str(tmp_path / "shadow")],
        env=OFFLINE_ENV | {"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "dskd_teacher_load_in_4bit" in proc.stderr and "pip install bitsandbytes" in proc.stderr


def test_without_dskd_teacher_the_plugin_does_nothing(assets, tmp_path):
    cfg = dskd_config(assets, tmp_path)
    for key in [k for k in cfg if k.startswith("dskd_")]:
        cfg.pop(key)
    loaded = load_config(cfg, tmp_path)
    from axolotl.integrations.base import PluginManager

    plugin = PluginManager.get_instance().plugins["axolotl_dskd.DSKDPlugin"]
    assert plugin.get_trainer_cls(loaded) is None
    assert plugin.get_collator_cls_and_kwargs(loaded) is None


EXAMPLES = sorted(p for p in (REPO / "example_configs").glob("*.yml") if p.name != "quickstart.yml")


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_configs_validate(assets, tmp_path, example):
    """Every example validates with its own keys; only the hub ids (not downloadable here)
    and the GPU-only switches are pointed at tiny local stand-ins."""
    cfg = yaml.safe_load(example.read_text())
    assert cfg["plugins"][0].startswith("axolotl_dskd")
    cfg.update(
        **on_tiny_assets(assets, tmp_path, student="student_sp"),
        bf16=False,
        optimizer="adamw_torch",
        sequence_len=min(cfg["sequence_len"], 512),
    )
    cfg.pop("test_datasets", None)
    loaded = load_config(cfg, tmp_path)
    assert loaded.dskd_cross_tokenizer is True
    for key, value in yaml.safe_load(example.read_text()).items():
        if key.startswith("dskd_") and key not in ("dskd_teacher", "dskd_cross_tokenizer"):
            assert loaded[key] == value, key


def _teacher_copy(assets, folder: Path, *, drop: tuple[str, ...]) -> Path:
    """The tiny teacher's folder without the files matching ``drop``."""
    import shutil

    shutil.copytree(assets["teacher"], folder)
    for pattern in drop:
        for path in folder.glob(pattern):
            path.unlink()
    return folder


def test_a_teacher_folder_without_tokenizer_files_is_refused(assets, tmp_path):
    """Transformers builds an empty tokenizer for such a folder (every text: no tokens), which
    would train without any distillation: refused, naming the key that gives the tokenizer."""
    teacher = _teacher_copy(assets, tmp_path / "teacher", drop=("tokenizer*", "special_tokens_map.json"))
    message = refusal(dskd_config(assets, tmp_path, dskd_teacher=str(teacher)), tmp_path)
    assert f"dskd_teacher: cannot load a tokenizer from {str(teacher)!r}" in message, message
    assert "into no tokens" in message and "Set dskd_teacher_tokenizer" in message
    load_config(
        dskd_config(
            assets, tmp_path, dskd_teacher=str(teacher), dskd_teacher_tokenizer=str(assets["teacher"])
        ),
        tmp_path,
    )


def test_a_teacher_folder_without_weights_is_refused_before_any_model_loads(assets, tmp_path):
    teacher = _teacher_copy(assets, tmp_path / "teacher", drop=("*.safetensors",))
    message = refusal(dskd_config(assets, tmp_path, dskd_teacher=str(teacher)), tmp_path)
    assert f"dskd_teacher: {teacher} holds a config but no model weights" in message, message


@pytest.mark.parametrize(
    ("key", "says"),
    [
        ("dskd_temprature", "did you mean dskd_temperature?"),
        ("dskd_kd_ratio", "did you mean dskd_kd_rate?"),
        ("dskd_load_in_4bit", "did you mean dskd_teacher_load_in_4bit?"),
        ("dskd_frobnicate", "docs/configuration.md lists its keys"),
    ],
)
def test_an_unknown_dskd_key_is_refused_with_the_closest_known_one(assets, tmp_path, key, says):
    """Axolotl drops keys no schema declares, so a misspelled optional key would train with the
    default (``dskd_temprature: 4.0`` at 2.0) without a word."""
    message = refusal({**dskd_config(assets, tmp_path), key: 4.0}, tmp_path)
    assert message.startswith(f"{key}: not a key of the axolotl_dskd plugin ({says})"), message


@pytest.mark.parametrize(
    "name",
    [
        "axolotl_dskd.DSKDPlgin",
        "axolotl_dskd.integration.plugin",
        "axolotl_dsdk",
        "axolotl_dsdk.DSKDPlugin",
        "axolotl-dskd",
    ],
)
def test_a_misspelled_plugin_name_says_which_name_to_write(assets, tmp_path, name):
    """Axolotl itself would fail with a bare AttributeError or ValueError, or skip a module it
    cannot import and drop every dskd_ key; a name that resembles this plugin's stops instead."""
    message = refusal(dskd_config(assets, tmp_path, plugins=[name]), tmp_path)
    assert f"plugins: {name!r} cannot be loaded" in message, message
    assert "Write axolotl_dskd.DSKDPlugin (or axolotl_dskd)." in message


def test_the_configuration_page_lists_every_key_as_the_schema_declares_it():
    """docs/configuration.md is generated from DSKDArgs; regenerate it with
    ``python scripts/config_reference.py`` after changing a key."""
    import runpy

    reference = runpy.run_path(str(REPO / "scripts" / "config_reference.py"))["reference"]
    assert (REPO / "docs" / "configuration.md").read_text() == reference()


def test_uld_needs_no_shared_vocabulary_and_trains_no_projectors(assets, tmp_path):
    cfg = load_config(dskd_config(assets, tmp_path, student="student_sp", dskd_method="uld"), tmp_path)
    assert cfg.dskd_method == "uld" and cfg.dskd_cross_tokenizer is True
    message = refusal(
        dskd_config(assets, tmp_path, dskd_method="uld", dskd_projectors=str(tmp_path / "p.safetensors")),
        tmp_path,
    )
    assert "dskd_projectors is set, but dskd_method: uld trains no projectors" in message, message
