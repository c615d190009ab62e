"""`moe-lbl selftest`: end to end on CPU (its interpreter subset), and its kernel checks fail for
broken kernels."""

import csv
import os
import subprocess
import sys
import time

import pytest
import torch

import moe_lbl.kernels
from moe_lbl.kernels.topk_router import RouterOutput, _FusedTopKRouter
from moe_lbl.selftest import kernels as kernel_checks

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU subset; a GPU machine runs the whole selftest")
def test_selftest_runs_on_cpu_and_says_what_it_skipped(tmp_path):
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "moe_lbl.cli", "selftest", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the GPU parts were skipped" in done.stdout
    with open(tmp_path / "selftest.csv") as f:
        rows = list(csv.DictReader(f))
    by_section = {}
    for row in rows:
        by_section.setdefault(row["section"], []).append(row)
        assert row["card"].startswith("no CUDA") and "megatron-core=" in row["versions"] and row["date"]
        assert row["command"] == f"moe-lbl selftest --out {tmp_path}"
    assert {row["status"] for row in by_section["kernels"]} == {"pass"} and len(by_section["kernels"]) >= 7
    assert [row["status"] for row in by_section["router"]] == ["pass", "pass", "pass", "skipped"]
    assert [row["status"] for row in by_section["graphs"] + by_section["speed"]] == ["skipped", "skipped"]
    report = (tmp_path / "selftest.md").read_text()
    assert "No CUDA device: the kernels ran in Triton's CPU interpreter" in report
    assert f"- result: {len(rows) - 3} passed, 0 failed, 3 skipped" in report
    assert seconds < 60, f"the CPU selftest took {seconds:.0f} s"


def swap_experts_in_one_row(out: RouterOutput) -> RouterOutput:
    routing_map, probs, indices, row = out.routing_map.clone(), out.probs.clone(), out.topk_indices.clone(), 5
    first, other = int(indices[row, 0]), int((~routing_map[row]).nonzero()[0, 0])
    routing_map[row, first], routing_map[row, other] = False, True
    probs[row, other], probs[row, first] = probs[row, first], 0
    indices[row, 0] = other
    return RouterOutput(probs, routing_map, indices, out.topk_probs, out.stats)


def last_row_unwritten(out: RouterOutput) -> RouterOutput:
    probs = out.probs.clone()
    probs[-1] = float("nan")  # what a poisoned buffer holds where the kernel wrote nothing
    return RouterOutput(probs, out.routing_map, out.topk_indices, out.topk_probs, out.stats)


@pytest.mark.parametrize("change,reported", [
    (swap_experts_in_one_row, "selection: 1 of 77 rows differ from the reference (first: row 5)"),
    (last_row_unwritten, "probs: nan off at"),
])
def test_a_broken_forward_fails_its_checks(monkeypatch, change, reported):
    fused = moe_lbl.kernels.fused_topk_router
    monkeypatch.setattr(moe_lbl.kernels, "fused_topk_router", lambda *a, **k: change(fused(*a, **k)))
    results = [check for check in kernel_checks.checks(cuda=False) if check.name.endswith("T77-float32-padding")]
    assert [check.status for check in results] == ["FAIL"]
    assert reported in results[0].detail


def test_a_broken_backward_fails_its_checks(monkeypatch):
    backward = _FusedTopKRouter.backward

    def off_by_five_percent(ctx, *grads):
        grad, *rest = backward(ctx, *grads)
        return (grad * 1.05, *rest)

    monkeypatch.setattr(_FusedTopKRouter, "backward", staticmethod(off_by_five_percent))
    results = list(kernel_checks.checks(cuda=False))
    failed = {check.name for check in results if check.status == "FAIL"}
    assert failed == {case.name for case in kernel_checks.INTERPRETER_CASES} | {"per-sequence statistics"}
    assert all("logits gradient" in check.detail for check in results if check.status == "FAIL")
