"""Several processes, one model: DSKDTrainer under ``torchrun`` with two CPU processes (gloo).

Every scenario of :mod:`dskd_devkit.data_parallel` runs in one ``torchrun`` launch; the references
run here, in one process that accumulates two micro-batches per step over the same rows in the
same order. The projectors live beside the model DDP wraps, so these are the checks that the
trainer synchronizes them itself: identical on both ranks, equal to one large batch, resumed,
and skipped together when one rank meets a non-finite loss.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dskd_devkit.axolotl_runs import train_env
from dskd_devkit.data_parallel import run_scenario

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def ranks(assets, tmp_path_factory) -> Path:
    """The two-process runs: ``<scenario>/rank{0,1}.{json,safetensors}``."""
    out = tmp_path_factory.mktemp("ddp")
    config = out / "assets.json"
    config.write_text(json.dumps({k: str(v) for k, v in assets.items()}))
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "dskd_devkit.data_parallel", str(config), str(out)],
        env={**train_env(threads=1), "TORCHELASTIC_ERROR_FILE": str(out / "error.json")},
        capture_output=True, text=True, timeout=420, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return out


def _rank(out: Path, scenario: str, rank: int) -> tuple[dict, dict[str, torch.Tensor]]:
    folder = out / scenario
    return json.loads((folder / f"rank{rank}.json").read_text()), load_file(
        folder / f"rank{rank}.safetensors"
    )


@pytest.mark.parametrize("scenario", ["same_vocab", "cma", "skip"])
def test_both_ranks_hold_the_same_projectors_and_adapter(ranks, scenario):
    """Bitwise: the projectors' gradients are averaged over the ranks before every step."""
    (log0, w0), (log1, w1) = _rank(ranks, scenario, 0), _rank(ranks, scenario, 1)
    assert w0.keys() == w1.keys() and any(k.startswith("projectors.") for k in w0)
    for name in w0:
        assert torch.equal(w0[name], w1[name]), name
    assert log0 == log1


@pytest.mark.parametrize("scenario", ["same_vocab", "cma"])
def test_two_processes_train_as_one_accumulating_two_micro_batches(ranks, assets, tmp_path, scenario):
    """Micro-batch 1 on two ranks == micro-batch 1 with gradient accumulation 2 on one process:
    the same losses, adapter and projectors, to float tolerance (CMA normalizes per micro-batch,
    so micro-batch 1 on both sides is the same computation)."""
    log, weights = _rank(ranks, scenario, 0)
    reference = run_scenario(scenario, {k: str(v) for k, v in assets.items()}, tmp_path, world_size=1)
    assert list(log["losses"].values()) == pytest.approx(list(reference["losses"].values()), rel=1e-5)
    expected = {f"projectors.{k}": v for k, v in reference["projectors"].items()}
    expected.update({f"lora.{k}": v for k, v in reference["lora"].items()})
    assert weights.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-6, msg=f"{name} differs")


def test_a_non_finite_loss_on_one_rank_is_skipped_on_both(ranks):
    """Rank 1's second row breaks the teacher; rank 0's is fine. Both skip the step (no rank
    waits in an all-reduce the other never joins), count it, and go on in lockstep."""
    for rank in (0, 1):
        log, weights = _rank(ranks, "skip", rank)
        assert log["nonfinite_skipped"] == 1
        assert log["losses"]["2"] == 0.0 and log["losses"]["3"] > 0
        assert all(torch.isfinite(t).all() for t in weights.values())


def test_a_resumed_two_process_run_continues_with_the_same_losses(ranks):
    """Resumed from its step-2 checkpoint, the run's steps 3 and 4 are those of the run that was
    never interrupted, and it ends with the same projectors and adapter."""
    (uninterrupted, final), (resumed, restored) = _rank(ranks, "same_vocab", 0), _rank(ranks, "resume", 0)
    assert resumed["losses"] == uninterrupted["losses"]
    for name, value in final.items():
        torch.testing.assert_close(restored[name], value, rtol=0, atol=0, msg=f"{name} differs")
