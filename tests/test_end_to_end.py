"""The tiny Megatron-Core GPT-MoE trains under the patch with 2 data-parallel gloo ranks."""

import math
import subprocess
import sys

import pytest

from moe_lbl.demo import DemoOptions, _train_rank
from moe_lbl.testing.harness import spawn

pytestmark = pytest.mark.cpu_harness


@pytest.mark.parametrize("scope", ["global"])
def test_training_with_dp2_reduces_loss_and_reports_balance(scope):
    options = DemoOptions(steps=8, micro_batches=2)
    ranks = spawn(_train_rank, 2, options, scope)
    for records in ranks:
        assert len(records) == options.steps
        assert records[-1].loss < records[0].loss - 0.1
        for r in records:
            assert 0.9 < r.balancing_loss < 2.0  # N_E sum f P is 1 when perfectly balanced
            assert math.isfinite(r.micro_max_vio) and math.isfinite(r.global_max_vio)
            assert r.micro_max_vio >= 0 and r.global_max_vio >= 0
    # Reduced values are identical on every rank.
    assert [r.balancing_loss for r in ranks[0]] == pytest.approx([r.balancing_loss for r in ranks[1]])
    assert [r.global_max_vio for r in ranks[0]] == [r.global_max_vio for r in ranks[1]]


def moe_lbl(*args):
    return subprocess.run([sys.executable, "-m", "moe_lbl.cli", *args], capture_output=True, text=True, timeout=300)


def test_info_names_versions_and_support():
    result = moe_lbl("info")
    assert result.returncode == 0, result.stderr
    for expected in ("torch", "triton", "megatron-core      0.16.1", "patch supported    yes",
                     "TopKRouter._apply_aux_loss", "moe-lbl demo"):
        assert expected in result.stdout


@pytest.mark.parametrize("args,error", [
    (["--steps", "0"], "steps must be >= 1"),
    (["--ranks", "100000"], "must not exceed this machine's"),
    (["--topk", "9"], "topk (9) must not exceed num_experts (8)"),
])
def test_demo_rejects_bad_arguments(args, error):
    result = moe_lbl("demo", *args)
    assert result.returncode == 2 and error in result.stderr
