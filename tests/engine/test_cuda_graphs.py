"""The engine and the fused kernels under real CUDA graphs, on a GPU: moe_lbl.selftest.graphs
(`moe-lbl selftest` runs the same check)."""

import pytest
import torch

from moe_lbl.selftest.graphs import replays_match_eager

pytestmark = pytest.mark.gpu


def test_replayed_cuda_graphs_match_eager():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    replays_match_eager()
