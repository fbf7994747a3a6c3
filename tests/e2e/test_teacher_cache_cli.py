"""The offline teacher through the CLI, as users run it: build the cache once with the plugin's
command, then train from it with the stock training command and no teacher transformer."""

from __future__ import annotations

import shutil

import pytest
import torch

from axolotl_dskd.core.teacher_cache import TeacherCache, read_manifest
from dskd_devkit.axolotl_runs import (
    assert_ok,
    dskd_config,
    log_history,
    run_cache_build,
    run_train,
    training_logs,
)
from dskd_devkit.training import head_only_copy

pytestmark = pytest.mark.e2e

STEPS = 4
CROSS_PACKED = {
    "dskd_token_alignment": "exact+cma", "sample_packing": True, "pad_to_sequence_len": True,
    "micro_batch_size": 1,
}  # fmt: skip
WITH_EVAL = {"val_set_size": 0.125, "eval_strategy": "steps", "eval_steps": STEPS}


def _steps(workdir) -> list[list[float]]:
    """Each training step's losses and gradient norm, then the last step's evaluation loss (if any)."""
    history = log_history(workdir / "output" / f"checkpoint-{STEPS}")
    rows = training_logs(workdir / "output" / f"checkpoint-{STEPS}")
    steps = [[r["loss"], r["dskd/kd_teacher"], r["dskd/t2s_ce"], r["grad_norm"]] for r in rows]
    return steps + [[r["eval_loss"]] * 4 for r in history if "eval_loss" in r and r["step"] == STEPS]


@pytest.mark.parametrize(
    ("student", "launcher", "extra"),
    [("student", "python", WITH_EVAL), ("student_sp", "axolotl", CROSS_PACKED)],
    ids=["same-vocabulary-with-eval", "cross-tokenizer-packed"],
)
def test_training_from_the_cache_repeats_the_live_run(assets, tmp_path, student, launcher, extra):
    """Same vocabulary with an evaluation split (`python -m axolotl_dskd.cache_teacher`), and across
    tokenizers with packed rows and exact alignment + cross-model attention (`axolotl
    dskd-cache-teacher`): the cache is built from the 4-bit teacher, and training from it in
    float32 logs the live run's losses and gradient norms step by step, and its evaluation loss,
    also when resumed from a checkpoint. Across tokenizers the teacher folder then holds only its config,
    tokenizer, LM head and embeddings."""
    common = {"max_steps": STEPS, "save_steps": STEPS, **extra}
    live, cached = tmp_path / "live", tmp_path / "cached"
    live.mkdir(), cached.mkdir()
    assert_ok(run_train(dskd_config(assets, live, student=student, **common), live))

    cfg = dskd_config(
        assets, cached, student=student, dskd_teacher_cache=str(tmp_path / "cache"),
        dskd_teacher_cache_dtype="float32", **common,
    )  # fmt: skip
    build = run_cache_build(cfg, cached, launcher=launcher)
    assert_ok(build)
    assert "teacher cache complete: 63 samples" in build.stdout + build.stderr  # 64 rows, one twice
    if student == "student_sp":
        cfg["dskd_teacher"] = str(head_only_copy(assets["teacher"], tmp_path / "teacher_head"))
    proc = run_train({**cfg, "save_steps": STEPS // 2}, cached)
    assert_ok(proc)
    assert "its transformer is not loaded" in proc.stdout + proc.stderr
    if "val_set_size" in extra:  # and resumed from its checkpoint, it ends as the uninterrupted run
        shutil.rmtree(cached / "output" / f"checkpoint-{STEPS}")
        checkpoint = cached / "output" / f"checkpoint-{STEPS // 2}"
        resumed = run_train({**cfg, "resume_from_checkpoint": str(checkpoint)}, cached)
        assert_ok(resumed)
        assert "DSKD projectors restored" in resumed.stdout + resumed.stderr
    expected = _steps(live)
    assert len(expected) == STEPS + ("val_set_size" in extra)
    torch.testing.assert_close(torch.tensor(_steps(cached)), torch.tensor(expected), rtol=1e-5, atol=1e-7)
    assert (cached / "output" / "dskd_projectors.safetensors").is_file()


@pytest.mark.skipif(
    torch.version.cuda is not None and not torch.cuda.is_available(),
    reason="under torchrun Axolotl's load_cfg probes CUDA peer access: torch's CPU build answers it, "
    "its CUDA build without a GPU driver raises (make test-compat on a CPU machine)",
)
def test_two_processes_build_the_cache_one_process_builds(assets, tmp_path):
    """`torchrun --nproc_per_node 2`: each process writes its own shards and its own progress, and
    the cache holds the same samples, positions and states (to float rounding) as a one-process
    build of the same config."""
    caches = {}
    for launcher in ("python", "torchrun"):
        workdir = tmp_path / launcher
        workdir.mkdir()
        cfg = dskd_config(
            assets, workdir, student="student_sp", dskd_teacher_cache=str(workdir / "cache"),
            dskd_teacher_cache_dtype="float32",
        )  # fmt: skip
        assert_ok(run_cache_build(cfg, workdir, "--shard-size", "0.05", launcher=launcher))  # 3 shards
        caches[launcher] = TeacherCache(workdir / "cache")
    one, two = caches["python"], caches["torchrun"]
    assert sorted(p.name for p in two.folder.glob("progress-*.jsonl")) == [
        "progress-0.jsonl",
        "progress-1.jsonl",
    ]
    assert (
        one.index == two.index and read_manifest(one.folder)["states"] == read_manifest(two.folder)["states"]
    )
    for key in one.index:
        (p1, s1), (p2, s2) = one.sample(key), two.sample(key)
        assert p1.tolist() == p2.tolist()
        torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-5)
