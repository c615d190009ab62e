"""The engine alone (one process, no Megatron): gradients and values against a float64 reference."""

import pytest
import torch

from moe_lbl.engine import GLOBAL_LOSS_NAME, MICRO_LOSS_NAME, BalanceConfig, LoadBalancer


def make_micro_batch(num_tokens, num_experts, topk, num_padding, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=g)
    padding = torch.zeros(num_tokens, dtype=torch.bool)
    padding[torch.randperm(num_tokens, generator=g)[:num_padding]] = True
    return logits, padding


def topk_mask(logits, topk, padding):
    scores = torch.softmax(logits.float(), dim=-1)
    index = torch.topk(scores, topk, dim=-1).indices
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter(1, index, True)
    return mask & ~padding.unsqueeze(1)


def run_engine(config, micro_batches, num_experts, topk, scale):
    """Attach every micro-batch, back-propagate each; return logits grads and reported values."""
    balancer = LoadBalancer(config, num_experts, topk)
    grads, reports = [], []
    for logits, padding in micro_batches:
        logits = logits.clone().requires_grad_()
        valid = ~padding
        scores = torch.softmax(logits, dim=-1) * valid.unsqueeze(1)
        mask = topk_mask(logits.detach(), topk, padding)
        probs = torch.zeros_like(logits, requires_grad=True)
        values = {}
        out = balancer.attach(probs, scores, mask, int(valid.sum()), lambda: scale,
                              lambda name, value: values.__setitem__(name, float(value)))
        out.sum().backward()
        assert torch.equal(probs.grad, torch.ones_like(probs))  # probs gradient passes through
        grads.append(logits.grad)
        reports.append(values)
    return balancer, grads, reports


def reference(config, micro_batches, num_experts, topk, scale):
    """Float64 autograd of the per-micro-batch loss, f from the formulas of the method."""
    masks = [topk_mask(logits, topk, padding) for logits, padding in micro_batches]
    counts = [m.sum(0).double() for m in masks]
    tokens = [float((~p).sum()) for _, p in micro_batches]
    grads, reports = [], []
    for j, (logits, padding) in enumerate(micro_batches):
        logits = logits.double().requires_grad_()
        s = torch.softmax(logits, dim=-1)[~padding]
        P = s.sum(0) / tokens[j]
        f_micro = counts[j] / (topk * tokens[j])
        first = 0 if config.buffer else j
        f_global = sum(counts[first:j + 1]) / (topk * sum(tokens[first:j + 1]))
        terms = {MICRO_LOSS_NAME: (f_micro, config.coeff if config.scope == "micro" else config.micro_coeff)}
        if config.scope == "global":
            terms[GLOBAL_LOSS_NAME] = (f_global, config.coeff)
        loss = 0
        values = {}
        for name, (f, coeff) in terms.items():
            if coeff > 0:
                value = num_experts * (f * P).sum()
                values[name] = float(value)
                loss = loss + coeff * value
        (loss * scale).backward()
        grads.append(logits.grad)
        reports.append(values)
    return grads, reports


CONFIGS = [
    BalanceConfig("micro", coeff=0.5),
    BalanceConfig("global", coeff=0.5, buffer=True),
    BalanceConfig("global", coeff=0.5, buffer=False),
    BalanceConfig("global", coeff=0.5, micro_coeff=0.005, async_sync=False),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.scope}-buf{c.buffer}-mc{c.micro_coeff}")
@pytest.mark.parametrize("num_experts,topk", [(8, 2), (60, 4), (7, 1)])
def test_engine_matches_float64_reference(config, num_experts, topk):
    shapes = [(37, 5), (64, 0), (23, 22)]  # (tokens, padding): uneven, some nearly all padding
    micro_batches = [make_micro_batch(t, num_experts, topk, p, seed=100 * num_experts + i)
                     for i, (t, p) in enumerate(shapes)]
    scale = 1.0 / len(micro_batches)
    _, grads, reports = run_engine(config, micro_batches, num_experts, topk, scale)
    ref_grads, ref_reports = reference(config, micro_batches, num_experts, topk, scale)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-9)
    for got, want in zip(reports, ref_reports):
        assert got.keys() == want.keys()
        for name in got:
            assert got[name] == pytest.approx(want[name], rel=1e-6)


def test_buffer_accumulates_then_resets():
    micro_batches = [make_micro_batch(20, 8, 2, 3, seed=i) for i in range(3)]
    balancer, _, _ = run_engine(BalanceConfig("global"), micro_batches, 8, 2, 1.0)
    expected = sum(topk_mask(l, 2, p).sum(0) for l, p in micro_batches)
    assert torch.equal(balancer.buffered_counts[:-1], expected)
    assert int(balancer.buffered_counts[-1]) == 3 * 17
    balancer.end_step()
    assert balancer.buffered_counts is None


def test_all_padding_micro_batch_has_zero_gradient():
    micro_batches = [make_micro_batch(10, 8, 2, 10, seed=1)]
    _, grads, reports = run_engine(BalanceConfig("global"), micro_batches, 8, 2, 1.0)
    assert torch.count_nonzero(grads[0]) == 0
    assert reports[0][GLOBAL_LOSS_NAME] == 0.0


@pytest.mark.parametrize("kwargs,error", [
    (dict(scope="batch"), "unknown scope 'batch'"),
    (dict(coeff=-1.0), "coeff must be a finite number >= 0"),
    (dict(coeff=float("nan")), "coeff must be a finite number >= 0"),
    (dict(micro_coeff=-0.1), "micro_coeff must be a finite number >= 0"),
    (dict(scope="micro", micro_coeff=0.1), "with scope='micro' set coeff instead"),
    (dict(coeff="0.1"), "coeff must be a number"),
    (dict(buffer=1), "buffer must be a bool"),
])
def test_config_rejects_bad_input(kwargs, error):
    with pytest.raises((ValueError, TypeError), match=error.replace("(", r"\(").replace(")", r"\)")):
        BalanceConfig(**kwargs)


def test_balancer_rejects_bad_shapes():
    with pytest.raises(ValueError, match="topk must be in"):
        LoadBalancer(BalanceConfig(), num_experts=4, topk=5)
    balancer = LoadBalancer(BalanceConfig(), num_experts=4, topk=2)
    with pytest.raises(ValueError, match=r"scores must be \[tokens, 4\]"):
        balancer.attach(torch.zeros(3, 5), torch.zeros(3, 5), torch.zeros(3, 5, dtype=torch.bool), 3, lambda: 1.0)
