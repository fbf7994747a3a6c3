"""The plugin's YAML keys through Axolotl's own config loading (``axolotl_dskd.integration.args``,
``validation``, ``plugin``): what validates, what is refused (before any model loads) and with which
message, generated configs refused by key exactly when invalid, and the example configs."""

from __future__ import annotations

import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from axolotl_dskd.core.divergences import DIVERGENCES
from dskd_devkit.axolotl_runs import (
    OFFLINE_ENV,
    dskd_config,
    load_config,
    on_tiny_assets,
    refusal,
    write_config,
)
from tests.unit.shared import cache_config

pytestmark = pytest.mark.usefixtures("fresh_plugin_manager")

REPO = Path(__file__).resolve().parents[3]


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
    ("student", "overrides", "target", "kd_teacher_weight"),
    [
        ("student", {}, "projected", 1.0),  # one vocabulary: the paper's terms
        ("student_sp", {}, "shared_vocabulary", 1.0),  # across tokenizers; 26 % of its tokens shared
        ("student_sp", {"dskd_token_alignment": "cma"}, "projected", 1.0),  # no exact pairs
        ("student_sp", {"dskd_method": "uld"}, "projected", 1.0),  # no kd_student
        ("student_sp", {"dskd_student_space_target": "projected"}, "projected", 1.0),
        ("student_sp", {"dskd_kd_teacher_weight": 0.5}, "shared_vocabulary", 0.5),
        ("student", {"dskd_kd_teacher_weight": 0}, "projected", 0.0),
    ],
)
def test_auto_keys_take_the_winner_of_each_pairing(
    assets, tmp_path, student, overrides, target, kd_teacher_weight
):
    """By default (``auto``) a run across tokenizers whose positions pair exactly distils the
    teacher's own distribution over the shared tokens; one vocabulary keeps the paper's projected
    teacher (each won there on real models). The tiny pair shares too little of the student's
    vocabulary to leave the teacher's space out. A value set in the YAML is kept."""
    cfg = load_config(dskd_config(assets, tmp_path, student=student, **overrides), tmp_path)
    assert cfg.dskd_student_space_target == target
    assert cfg.dskd_kd_teacher_weight == kd_teacher_weight


@pytest.mark.parametrize(
    ("shared_share", "weight"),
    [(None, 1.0), (0.26, 1.0), (0.5, 0.0), (0.79, 0.0)],
)
def test_auto_leaves_the_teacher_space_out_where_the_shared_tokens_cover_most_of_the_student(
    shared_share, weight
):
    """``dskd_kd_teacher_weight: auto`` is 0 where kd_student distils over shared tokens that
    cover at least half of the student's vocabulary (79 % on the real pair, where leaving the
    teacher's space out won), 1 elsewhere (26 % on the quickstart's pair, where it lost)."""
    from types import SimpleNamespace

    from axolotl_dskd.integration.validation import resolve_kd_teacher_weight

    cfg = SimpleNamespace(dskd_kd_teacher_weight="auto")
    resolve_kd_teacher_weight(cfg, shared_share)
    assert cfg.dskd_kd_teacher_weight == weight
    kept = SimpleNamespace(dskd_kd_teacher_weight=0.3)
    resolve_kd_teacher_weight(kept, shared_share)
    assert kept.dskd_kd_teacher_weight == 0.3


def test_shared_vocabulary_target_needs_tokens_with_readable_bytes():
    """Without a fast tokenizer there are no token bytes to pair by: an explicit
    ``shared_vocabulary`` is refused naming the key, ``auto`` falls back to ``projected``."""
    from types import SimpleNamespace

    from axolotl_dskd.integration.validation import resolve_student_space_target

    def cfg(target: str) -> SimpleNamespace:
        return SimpleNamespace(
            dskd_student_space_target=target, dskd_method="dskd", dskd_cross_tokenizer=True,
            dskd_token_alignment="exact+cma",
        )  # fmt: skip

    slow = "student's tokenizer (LlamaTokenizer)"
    with pytest.raises(ValueError, match="dskd_student_space_target: shared_vocabulary .* no fast"):
        resolve_student_space_target(cfg("shared_vocabulary"), None, None, slow)
    resolved = cfg("auto")
    resolve_student_space_target(resolved, None, None, slow)
    assert resolved.dskd_student_space_target == "projected"


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
        ({"dskd_student_space_target": "teacher"}, "dskd_student_space_target"),
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
        if key.startswith("dskd_") and key != "dskd_teacher" and value != "auto":
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


@pytest.mark.parametrize(
    ("value", "says"),
    [("no_such_template", "neither auto, student"), ("{% if %}", "does not compile")],
)
def test_bad_teacher_template_is_refused_by_key(assets, tmp_path, value, says):
    message = refusal(
        dskd_config(assets, tmp_path, student="student_sp", dskd_teacher_chat_template=value), tmp_path
    )
    assert "dskd_teacher_chat_template" in message and says in message


def _adapter(assets: dict, folder: Path, **lora: Any) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(assets["teacher"])
    get_peft_model(teacher, LoraConfig(r=2, **lora)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("lora", "changed"),
    [
        ({"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, "lm_head"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, "model.embed_tokens"),
        ({"target_modules": ["q_proj", "v_proj"]}, None),
    ],
)
def test_a_teacher_adapter_that_changes_the_head_is_refused_with_a_cache(assets, tmp_path, lora, changed):
    """The cache's training reads the LM head and embeddings from the base teacher's files: an
    adapter that retrains either is refused by key (merge it first); one on attention is not."""
    cfg = cache_config(
        assets,
        tmp_path,
        tmp_path / "no-cache",
        dskd_teacher_adapter=str(_adapter(assets, tmp_path / "a", **lora)),
    )
    message = refusal(cfg, tmp_path)
    if changed is None:
        assert "holds no teacher cache" in message, message
    else:
        assert f"dskd_teacher_adapter: {tmp_path / 'a'} changes the teacher's {changed}," in message, message


# ============================================================================================
# Generated configs: refused by key exactly when invalid
# ============================================================================================


def _values(valid, invalid: list) -> tuple[st.SearchStrategy, st.SearchStrategy]:
    return (valid if isinstance(valid, st.SearchStrategy) else st.sampled_from(valid)), st.sampled_from(
        invalid
    )


NONFINITE = [math.nan, math.inf, -math.inf]


unit = st.floats(0.0, 1.0)


KEY_VALUES: dict[str, tuple[st.SearchStrategy, st.SearchStrategy]] = {
    "dskd_kd_rate": _values(unit, [-0.1, 1.5, 100.0, "half", *NONFINITE]),
    "dskd_temperature": _values(st.floats(0.05, 50.0), [0.0, -1.0, "warm", *NONFINITE]),
    "dskd_kd_teacher_weight": _values(
        st.one_of(st.floats(0.0, 4.0), st.just("auto")), [-0.5, "none", *NONFINITE]
    ),
    "dskd_divergence": _values(list(DIVERGENCES), ["kl", "tvd", "Forward_KL", "", "js "]),
    "dskd_teacher_space_divergence": _values(list(DIVERGENCES), ["kl", "jsd", "cross_entropy"]),
    "dskd_skew_lambda": _values(st.floats(0.01, 0.99), [0.0, 1.0, -0.5, 1.5, *NONFINITE]),
    "dskd_akl_alpha": _values(unit, [-0.1, 1.1, 3.0, *NONFINITE]),
    "dskd_cross_tokenizer": _values([True, False, "auto"], ["sometimes", 2, "off-ish"]),
    "dskd_projector_lr": _values(st.floats(1e-6, 1.0), [0.0, -1e-3, *NONFINITE]),
    "dskd_chunk_size": _values(st.integers(1, 4096), [0, -8, 2.5, "big"]),
    "dskd_on_nonfinite": _values(["stop", "skip"], ["ignore", "STOP", "warn"]),
    "dskd_method": _values(["dskd", "vanilla_kd", "uld"], ["kd", "DSKD", "distill"]),
    "dskd_student_space_target": _values(
        ["auto", "projected", "shared_vocabulary"], ["teacher", "Auto", "shared"]
    ),
}


@st.composite
def plugin_configs(draw) -> tuple[dict, set[str]]:
    """Plugin keys over a valid base config, and the ``dskd_`` keys that make it invalid
    (empty: it must validate). Each value is invalid one time in five."""
    student = draw(st.sampled_from(["student", "student_sp"]))  # same vocabulary / not
    teacher = draw(st.sampled_from(["fixture"] * 4 + ["missing folder", "absent"]))
    overrides = {}
    bad: set[str] = set()
    for key in draw(st.lists(st.sampled_from(sorted(KEY_VALUES)), unique=True, max_size=4)):
        valid, invalid = KEY_VALUES[key]
        if draw(st.integers(0, 4)) == 0:
            overrides[key] = draw(invalid)
            bad.add(key)
        else:
            overrides[key] = draw(valid)
    quantization = draw(st.sampled_from([(False, False), (True, False), (False, True)] * 2 + [(True, True)]))
    overrides["dskd_teacher_load_in_4bit"], overrides["dskd_teacher_load_in_8bit"] = quantization
    if all(quantization):
        bad.add("dskd_teacher_load_in_4bit")
    different_vocab = student == "student_sp"
    if different_vocab and overrides.get("dskd_cross_tokenizer") is False:
        bad.add("dskd_cross_tokenizer")
    if different_vocab and overrides.get("dskd_method") == "vanilla_kd":
        bad.add("dskd_method")
    if teacher == "missing folder":
        overrides["dskd_teacher"] = "/nonexistent/teacher"
        bad.add("dskd_teacher")
    elif teacher == "absent":
        overrides["dskd_teacher"] = None  # left out of the YAML; the other dskd_ keys stay
        bad.add("dskd_teacher")  # dskd_ keys without a teacher would silently do nothing
    event("invalid" if bad else "valid")
    return {"student": student, **overrides}, bad


def _fixed(bad: set[str], **overrides) -> tuple[dict, set[str]]:
    return {"student": "student", "dskd_teacher_load_in_4bit": False, **overrides}, bad


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=plugin_configs())
@example(case=_fixed({"dskd_temperature"}, dskd_temperature=math.inf))  # a schema without an upper
@example(case=_fixed({"dskd_projector_lr"}, dskd_projector_lr=math.inf))  # bound lets inf through
@example(case=_fixed({"dskd_teacher"}, dskd_teacher=None, dskd_kd_rate=0.3))  # would be plain SFT
@example(
    case=_fixed({"dskd_teacher_load_in_4bit"}, dskd_teacher_load_in_4bit=True, dskd_teacher_load_in_8bit=True)
)
@example(case=_fixed(set(), student="student_sp", dskd_cross_tokenizer=True, dskd_on_nonfinite="skip"))
def test_generated_configs_are_refused_by_key_exactly_when_invalid(assets, case):
    overrides, bad = case
    overrides = dict(overrides)
    student = overrides.pop("student")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = dskd_config(assets, Path(tmp), student=student, **overrides)
        if bad:
            message = refusal(cfg, Path(tmp))
            assert any(key in message for key in bad), (bad, message)
        else:
            loaded = load_config(cfg, Path(tmp))
            for key, value in overrides.items():
                if value not in ("auto", None):
                    assert loaded[key] == value, key
            assert loaded.dskd_student_space_target in ("projected", "shared_vocabulary")
            assert isinstance(loaded.dskd_kd_teacher_weight, float)
            cross = overrides.get("dskd_cross_tokenizer", "auto")
            assert loaded.dskd_cross_tokenizer is (student == "student_sp" if cross == "auto" else cross)
