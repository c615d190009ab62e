"""MaxVio and the per-layer balance report, against direct computation."""

import pytest
import torch

from moe_lbl.engine import BalanceConfig, LoadBalancer
from moe_lbl.metrics import layer_balance, max_violation, step_balance


def test_max_violation_matches_definition():
    load = torch.tensor([[4, 0, 2, 2], [1, 1, 1, 1], [0, 0, 0, 0], [7, 1, 0, 0]])
    got = max_violation(load)
    want = torch.tensor([4 / 2 - 1, 0.0, 0.0, 7 / 2 - 1], dtype=torch.float64)
    torch.testing.assert_close(got, want)
    g = torch.Generator().manual_seed(0)
    load = torch.randint(0, 50, (5, 13), generator=g)
    torch.testing.assert_close(max_violation(load), load.double().max(1).values / load.double().mean(1) - 1)


def test_layer_balance_of_one_rank():
    import moe_lbl.engine as engine

    engine._WARNED.discard("not back-propagated")
    balancer = LoadBalancer(BalanceConfig(), num_experts=4, topk=2)
    assert layer_balance(3, balancer) is None  # nothing recorded yet
    for load in ([4, 0, 2, 2], [1, 1, 1, 1]):
        probs = torch.zeros(3, 4, requires_grad=True)
        balancer.record_load(probs, torch.tensor(load)).sum().backward()
    balancer.record_load(torch.zeros(3, 4, requires_grad=True), torch.tensor([9, 0, 0, 0]))  # never back-propagated
    with pytest.warns(UserWarning, match="registered 1 micro-batch\\(es\\) that were never back-propagated"):
        balancer.end_step()
    report = layer_balance(3, balancer)
    assert report.layer == 3
    assert report.micro_max_vio == pytest.approx((1.0 + 0.0) / 2)
    assert report.global_max_vio == pytest.approx(5 / 3 - 1)
    assert report.tokens_per_expert == (5, 1, 3, 3)
    assert step_balance([(3, balancer), (4, LoadBalancer(BalanceConfig(), 4, 2))]) == [report]
    balancer.end_step()  # a second reset with nothing recorded keeps the last step's loads
    assert layer_balance(3, balancer) == report
