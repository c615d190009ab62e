"""The launcher's grid sizing and capture, which the compiled kernels rely on (no GPU needed)."""

import pytest
import torch

from moe_lbl.kernels import fused_topk_router, launcher

H100 = dict(registers_per_sm=65536, shared_per_sm=228 * 1024, threads_per_sm=2048)


@pytest.mark.parametrize("registers,warps,shared,ctas", [
    (72, 4, 0, 7),  # 72 x 32 = 2304 registers a warp: 9216 a CTA, 7 in 65536
    (61, 4, 512, 8),  # 61 rounds up to 64 per thread: 8 CTAs
    (255, 4, 0, 2),  # the kernels before the rewrite: 2 CTAs = 8 warps
    (16, 4, 0, 16),  # threads bound: 2048 / 128
    (16, 1, 0, 32),  # the CTA limit
    (32, 4, 100 * 1024, 2),  # shared memory bound
])
def test_resident_ctas(registers, warps, shared, ctas):
    assert launcher.resident_ctas(registers, warps, shared, **H100) == ctas


def test_a_persistent_grid_never_exceeds_its_blocks():
    cpu = torch.device("cpu")
    assert launcher.programs(None, 3, None, cpu, None, {}) == 3
    assert launcher.programs(None, 100, None, cpu, None, {}) == 4
    assert launcher.programs(None, 100, 7, cpu, None, {}) == 7
    assert launcher.programs(None, 0, None, cpu, None, {}) == 1


def test_capture_records_launches_instead_of_running_them():
    logits = torch.empty(1000, 64, dtype=torch.bfloat16, device="meta", requires_grad=True)
    with launcher.capture() as launches:
        out = fused_topk_router(logits, 4, sparse=False)
        (out.probs.float().sum() + out.stats.score_sums.sum()).backward()
    assert [launch.name for launch in launches] == ["router_forward", "router_statistics", "router_backward"]
    assert launches[0].kwargs["WRITE_DENSE"] and not launches[0].kwargs["WRITE_SPARSE"]
    assert launches[2].kwargs["HAS_LBL"] and not launches[2].kwargs["HAS_Z"]
    with pytest.raises(RuntimeError, match="already being captured"):
        with launcher.capture(), launcher.capture():
            pass
