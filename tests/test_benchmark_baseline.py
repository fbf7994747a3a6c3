"""The benchmark's unchunked baseline (benchmarks/unchunked_dskd.py) computes the same loss as
``dskd_loss``: value, every metric and every trainable gradient, in float32, on tiny inputs.

``benchmarks/loss_memory.py`` compares memory and time against it, so if the two ever
computed different things that comparison would be meaningless.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from axolotl_dskd.loss import dskd_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from unchunked_dskd import unchunked_dskd_loss  # noqa: E402

try:
    from test_loss import METRICS, assert_rel, grads, make_case
except ImportError:  # tests/ imported as a package
    from tests.test_loss import METRICS, assert_rel, grads, make_case

RTOL = 1e-4


@pytest.mark.parametrize(
    "divergence,teacher_space_divergence",
    [("forward_kl", "forward_kl"), ("adaptive_kl", "js"), ("skew_reverse_kl", "reverse_kl")],
)
@pytest.mark.parametrize("full_ft", [False, True], ids=["frozen_head", "full_ft"])
@pytest.mark.parametrize("variant", ["same", "cma"])
def test_unchunked_baseline_matches_dskd_loss(variant, full_ft, divergence, teacher_space_divergence):
    case = make_case(variant, seed=5, full_ft=full_ft, pad=2)
    cfg = case.config(
        divergence=divergence, teacher_space_divergence=teacher_space_divergence, chunk_size=3
    )
    targets = case.trainable()
    out = dskd_loss(case.proj, **case.inputs, config=cfg)
    base_loss, base_metrics = unchunked_dskd_loss(case.proj, **case.inputs, config=cfg)
    assert base_loss.dtype == torch.float32
    assert_rel(base_loss, out.loss, "loss", rtol=RTOL)
    for name in METRICS:
        assert_rel(base_metrics[name], out.metrics[name], f"metric {name}", rtol=RTOL)
    if variant == "cma":  # the accuracy mask of kd_student is exercised
        assert 0.0 < float(out.metrics["t2s_acc"]) < 1.0
    g_base = grads(base_loss, targets)
    g_out = grads(out.loss, targets)
    for name in targets:
        assert_rel(g_base[name], g_out[name], f"d loss / d {name}", rtol=RTOL)


def test_unchunked_baseline_matches_with_packing_and_num_items():
    case = make_case("cma", seed=2)
    cfg = case.config(chunk_size=4)
    s_ids, t_ids = case.inputs["student_input_ids"], case.inputs["teacher_input_ids"]
    # two packed samples per row: split each row in the middle
    seg = dict(
        student_segment_ids=(torch.arange(s_ids.shape[1]) >= s_ids.shape[1] // 2).long().expand_as(s_ids),
        teacher_segment_ids=(torch.arange(t_ids.shape[1]) >= t_ids.shape[1] // 2).long().expand_as(t_ids),
    )
    extra = dict(num_items=3 * case.n_trained() + 1, **seg)
    out = dskd_loss(case.proj, **case.inputs, config=cfg, **extra)
    base_loss, _ = unchunked_dskd_loss(case.proj, **case.inputs, config=cfg, **extra)
    assert_rel(base_loss, out.loss, "loss", rtol=RTOL)
    targets = case.trainable()
    g_base, g_out = grads(base_loss, targets), grads(out.loss, targets)
    for name in targets:
        assert_rel(g_base[name], g_out[name], f"d loss / d {name}", rtol=RTOL)


def test_benchmark_inputs_agree_at_small_realistic_shape():
    """The benchmark's own input generator, at a small size: both implementations agree."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from loss_memory import Point, make_inputs

    for variant in ("same", "cma"):
        point = Point(tokens=64, v_t=1024, variant=variant)
        proj, inputs, cfg = make_inputs(point, d_s=16, d_t=24, v_s=512, device="cpu",
                                        dtype=torch.float32, seed=0)
        out = dskd_loss(proj, **inputs, config=cfg)
        base_loss, _ = unchunked_dskd_loss(proj, **inputs, config=cfg)
        assert_rel(base_loss, out.loss, f"{variant} loss", rtol=RTOL)
        g_out = torch.autograd.grad(out.loss, inputs["student_hidden"])[0]
        g_base = torch.autograd.grad(base_loss, inputs["student_hidden"])[0]
        assert_rel(g_base, g_out, f"{variant} d loss / d student_hidden", rtol=RTOL)
