"""The engine alone (one process, no Megatron): gradients and values against a float64 reference."""

import pytest
import torch

from moe_lbl.engine import BalanceConfig, GradScale, LoadBalancer
from tests.helpers.reference import ValueRecorder, random_micro_batch, reference_losses, topk_mask


def run_engine(config, micro_batches, num_experts, topk, scale, kernels=False):
    """Attach every micro-batch, back-propagate each; return logits grads and reported values.
    kernels: each backward step as the fused kernel (Triton's interpreter on CPU)."""
    balancer = LoadBalancer(config, num_experts, topk, kernels=kernels)
    grads, reports = [], []
    for logits, padding in micro_batches:
        logits = logits.clone().requires_grad_()
        valid = ~padding
        scores = torch.softmax(logits, dim=-1) * valid.unsqueeze(1)
        mask = topk_mask(logits.detach(), topk, padding)
        probs = torch.zeros_like(logits, requires_grad=True)
        recorder = ValueRecorder(config)
        out = balancer.attach(probs, scores, mask.sum(0), int(valid.sum()), GradScale(lambda: torch.tensor([scale])),
                              recorder.report)
        out.sum().backward()
        assert torch.equal(probs.grad, torch.ones_like(probs))  # probs gradient passes through
        grads.append(logits.grad)
        reports.append(recorder.values())
    return balancer, grads, reports


CONFIGS = [
    BalanceConfig("micro", coeff=0.5),
    BalanceConfig("global", coeff=0.5, buffer=True),
    BalanceConfig("global", coeff=0.5, buffer=False),
    BalanceConfig("global", coeff=0.5, micro_coeff=0.005, async_sync=False),
]


@pytest.mark.parametrize("kernels", [False, True], ids=["torch", "kernel"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.scope}-buf{c.buffer}-mc{c.micro_coeff}")
@pytest.mark.parametrize("num_experts,topk", [(8, 2), (60, 4), (7, 1)])
def test_engine_matches_float64_reference(config, num_experts, topk, kernels):
    shapes = [(37, 5), (64, 0), (23, 22)]  # (tokens, padding): uneven, some nearly all padding
    micro_batches = [random_micro_batch(t, num_experts, p, seed=100 * num_experts + i)
                     for i, (t, p) in enumerate(shapes)]
    scale = 1.0 / len(micro_batches)
    balancer, grads, reports = run_engine(config, micro_batches, num_experts, topk, scale, kernels)
    want = reference_losses({(0, j): mb for j, mb in enumerate(micro_batches)}, config, num_experts, topk, scale)
    for j, (got_grad, got) in enumerate(zip(grads, reports)):
        expected = want[0, j]
        torch.testing.assert_close(got_grad.double(), expected.grad, rtol=1e-5, atol=1e-8)
        assert got.keys() == expected.values.keys()
        for scope in got:
            assert got[scope] == pytest.approx(expected.values[scope], rel=1e-6)


def test_buffer_accumulates_then_resets():
    micro_batches = [random_micro_batch(20, 8, 3, seed=i) for i in range(3)]
    balancer, _, _ = run_engine(BalanceConfig("global"), micro_batches, 8, 2, 1.0)
    expected = sum(topk_mask(logits, 2, p).sum(0) for logits, p in micro_batches)
    assert torch.equal(balancer.buffered_counts[:-1], expected)
    assert int(balancer.buffered_counts[-1]) == 3 * 17
    balancer.end_step()
    assert not balancer.buffered_counts.any()


def test_all_padding_micro_batch_has_zero_gradient():
    micro_batches = [random_micro_batch(10, 8, 10, seed=1)]
    _, grads, reports = run_engine(BalanceConfig("global"), micro_batches, 8, 2, 1.0)
    assert torch.count_nonzero(grads[0]) == 0
    assert reports[0]["global"] == 0.0


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
        balancer.attach(torch.zeros(3, 5), torch.zeros(3, 5), torch.zeros(5, dtype=torch.long), 3)


def test_a_handle_of_a_closed_step_keeps_its_own_counts():
    """A graph back-propagated after the step closed (or after unpatch) must not read the next step."""
    balancer = LoadBalancer(BalanceConfig("global"), num_experts=4, topk=1)
    scores = [torch.softmax(torch.randn(5, 4), -1).requires_grad_() for _ in range(3)]
    counts = [torch.tensor([5, 0, 0, 0]), torch.tensor([0, 0, 5, 0]), torch.tensor([0, 5, 0, 0])]
    outs = [balancer.attach(torch.zeros(5, 4, requires_grad=True), s, c, 5)
            for s, c in zip(scores[:2], counts[:2])]
    outs[0].sum().backward()
    balancer.end_step()
    balancer.attach(torch.zeros(5, 4, requires_grad=True), scores[2], counts[2], 5)
    outs[1].sum().backward()  # f from micro-batches 0 and 1 of the closed step
    f = (counts[0] + counts[1]).double() / (1 * 10)  # k = 1, 10 tokens
    want = 0.01 * 4 / 5 * f  # d loss / d score = coeff * N_E / T * f for every token
    torch.testing.assert_close(scores[1].grad, want.float().expand(5, 4))


def attach_one(balancer, counts, tokens=5, num_experts=4):
    scores = torch.softmax(torch.randn(tokens, num_experts), -1).requires_grad_()
    out = balancer.attach(torch.zeros(tokens, num_experts, requires_grad=True), scores, counts, tokens)
    return scores, out


def test_only_back_propagated_micro_batches_make_up_the_global_batch():
    """A forward in training mode that is never back-propagated (an evaluation, a probe) must not
    join the next micro-batches' global batch: before, it was counted (16-22% off), silently."""
    import moe_lbl.engine as engine

    engine._WARNED.discard("not back-propagated")
    balancer = LoadBalancer(BalanceConfig("global", coeff=0.01), num_experts=4, topk=1)
    counts = [torch.tensor([5, 0, 0, 0]), torch.tensor([0, 0, 5, 0]), torch.tensor([0, 5, 0, 0])]
    attach_one(balancer, counts[0])  # an evaluation pass: forward only
    grads = []
    for c in counts[1:]:
        scores, out = attach_one(balancer, c)
        out.sum().backward()
        grads.append(scores.grad[0])
    f1 = counts[1].double() / 5
    f2 = (counts[1] + counts[2]).double() / 10
    torch.testing.assert_close(grads[0], (0.01 * 4 / 5 * f1).float())
    torch.testing.assert_close(grads[1], (0.01 * 4 / 5 * f2).float())
    assert torch.equal(balancer.buffered_counts, torch.cat([counts[1] + counts[2], torch.tensor([10])]))
    with pytest.warns(UserWarning, match="registered 1 micro-batch\\(es\\) that were never back-propagated .* "
                                         "torch.no_grad"):
        balancer.end_step()


def test_a_step_that_never_resets_is_closed_with_a_warning(monkeypatch):
    """A loop that never calls finalize_model_grads (or end_step): the global batch must not
    silently become the whole run."""
    import moe_lbl.engine as engine

    engine._WARNED.discard("growing step")
    monkeypatch.setattr(engine, "MAX_STEP_MICRO_BATCHES", 3)
    balancer = LoadBalancer(BalanceConfig("global", coeff=0.01), num_experts=4, topk=1)
    for _ in range(3):
        attach_one(balancer, torch.tensor([5, 0, 0, 0]))[1].sum().backward()
    assert int(balancer.buffered_counts[-1]) == 15
    with pytest.warns(UserWarning, match="registered 3 micro-batches without a step reset.*moe_lbl.end_step"):
        attach_one(balancer, torch.tensor([0, 5, 0, 0]))[1].sum().backward()
    assert torch.equal(balancer.buffered_counts, torch.tensor([0, 5, 0, 0, 5]))  # a new step began
    sent, forward = balancer.state.forward_counters.tolist()
    assert int(balancer.state.last[-1]) == 3 and (sent, forward) == (1, 1)  # the closed step's 3, the new one's 1


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.scope}-buf{c.buffer}-mc{c.micro_coeff}")
def test_the_fused_step_leaves_the_state_torch_operations_leave(config):
    """The backward step as one kernel updates the layer's state (buffer, loads, MaxVio,
    counters) as the torch operations do, and closes the step alike."""
    micro_batches = [random_micro_batch(t, 8, p, seed=7 + i) for i, (t, p) in enumerate([(30, 4), (25, 0), (9, 9)])]
    states = []
    for kernels in (False, True):
        balancer, _, _ = run_engine(config, micro_batches, 8, 2, 0.5, kernels)
        before = balancer.state.ints.clone(), balancer.state.floats.clone()
        balancer.end_step()
        states.append((*before, balancer.state.ints.clone(), balancer.state.floats.clone()))
    for torch_ops, kernel in zip(*states):
        torch.testing.assert_close(kernel, torch_ops, rtol=1e-12, atol=0)
