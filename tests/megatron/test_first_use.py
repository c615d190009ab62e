"""The fused router's first-use check: a kernel that agrees with Megatron's routing on the probe
serves the router, a kernel that does not is refused (kernels=True) or falls back with one
warning naming the field and the largest error (kernels='auto'), once per specialization.

On CPU the kernels run in Triton's interpreter; kernels='auto' fuses only GPU logits, so the auto
tests make `_on_gpu` say yes and replace the compile-and-load step (a GPU step) with a no-op.
"""

import warnings

import pytest
import torch

import moe_lbl
import moe_lbl.kernels
from moe_lbl.demo.tiny_gpt import build_router
from moe_lbl.kernels.topk_router import RouterOutput, RouterStats
from moe_lbl.patches.megatron import first_use, routing

ROUTERS = {
    "softmax": dict(num_experts=8, topk=2, moe_aux_loss_coeff=0.1, moe_z_loss_coeff=1e-3),
    "sigmoid-bias-groups": dict(num_experts=16, topk=4, moe_aux_loss_coeff=0.1, moe_router_score_function="sigmoid",
                                moe_router_enable_expert_bias=True, moe_router_num_groups=4,
                                moe_router_group_topk=2, moe_router_topk_scaling_factor=2.5),
    "sigmoid-bias-groups-seq": dict(num_experts=16, topk=4, moe_router_load_balancing_type="seq_aux_loss",
                                    moe_aux_loss_coeff=0.1, moe_router_score_function="sigmoid",
                                    moe_router_enable_expert_bias=True, moe_router_num_groups=4,
                                    moe_router_group_topk=2),
}


@pytest.fixture
def fresh_verdicts(monkeypatch):
    """No specialization checked yet; each check that runs is recorded (with its verdict)."""
    checks = []
    check = first_use.check

    def recorded(router, layer, call):
        verdict = check(router, layer, call)
        checks.append((tuple(call.logits.shape), call.dtype, verdict))
        return verdict

    monkeypatch.setattr(first_use, "_verdicts", {})
    monkeypatch.setattr(first_use, "check", recorded)
    return checks


@pytest.fixture
def auto_on_cpu(monkeypatch):
    monkeypatch.setattr(routing, "_on_gpu", lambda logits: True)
    monkeypatch.setattr("moe_lbl.kernels.topk_router.load_router", lambda *args, **kwargs: None)


def route(router, tokens=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 1, router.config.num_moe_experts, generator=g).to(dtype).requires_grad_()
    probs, routing_map = router.routing(x)
    (probs.float() * torch.arange(router.config.num_moe_experts, dtype=torch.float32)).sum().backward()
    return probs.detach(), routing_map, x.grad


def routed(name, kernels, **route_args):
    moe_lbl.patch_megatron(kernels=kernels)
    torch.manual_seed(1)
    router = build_router(**ROUTERS[name])
    result = route(router, **route_args)
    return router, result


def mutate_outputs(monkeypatch, change):
    """The fused router, with `change` applied to every call's outputs (a kernel bug)."""
    fused = moe_lbl.kernels.fused_topk_router

    def mutant(*args, **kwargs):
        out = fused(*args, **kwargs)
        return change(out)

    monkeypatch.setattr(moe_lbl.kernels, "fused_topk_router", mutant)


def swap_experts_in_one_row(out: RouterOutput) -> RouterOutput:
    routing_map, probs, row = out.routing_map.clone(), out.probs.clone(), 5
    chosen, other = routing_map[row].nonzero()[0, 0], (~routing_map[row]).nonzero()[0, 0]
    routing_map[row, chosen], routing_map[row, other] = False, True
    probs[row, other], probs[row, chosen] = probs[row, chosen], 0
    return RouterOutput(probs, routing_map, out.topk_indices, out.topk_probs, out.stats)


def probs_off_by_ulps(out: RouterOutput, ulps=4, dtype=torch.bfloat16) -> RouterOutput:
    """One prob `ulps` ulps of dtype (the router's logits dtype) away; the kernels may route in fp32."""
    probs, row = out.probs.clone(), 3
    expert = out.routing_map[row].nonzero()[0, 0]
    value = probs[row, expert].detach().to(dtype)
    for _ in range(ulps):
        value = torch.nextafter(value, torch.tensor(2.0, dtype=dtype))
    probs[row, expert] = probs[row, expert] + (value.to(probs.dtype) - probs[row, expert]).detach()
    return RouterOutput(probs, out.routing_map, out.topk_indices, out.topk_probs, out.stats)


def one_count_wrong(out: RouterOutput) -> RouterOutput:
    stats = out.stats
    counts = stats.aux_counts.clone()
    counts[3] += 1
    return RouterOutput(out.probs, out.routing_map, out.topk_indices, out.topk_probs,
                        RouterStats(counts, stats.dispatch_counts, stats.score_sums, stats.valid_tokens, stats.z_sum))


def one_sequence_count_wrong(out: RouterOutput) -> RouterOutput:
    stats = out.stats
    counts = stats.sequence_aux_counts.clone()
    counts[0, 3] += 1
    return RouterOutput(out.probs, out.routing_map, out.topk_indices, out.topk_probs,
                        RouterStats(stats.aux_counts, stats.dispatch_counts, stats.score_sums, stats.valid_tokens,
                                    stats.z_sum, counts, stats.sequence_score_sums))


MUTANTS = {
    # name: (router, logits dtype, change, what the check reports)
    "swapped experts in one row": ("softmax", torch.float32, swap_experts_in_one_row,
                                   r"routing_map: 1 of 336 rows choose other experts \(first: row 5\)"),
    "probs 4 ulps off": ("sigmoid-bias-groups", torch.bfloat16, probs_off_by_ulps,
                         r"probs: largest error 4\.0 ulps of torch\.bfloat16 \(tolerance 2\)"),
    "a wrong count": ("softmax", torch.float32, one_count_wrong,
                      r"aux_counts: \d+ at index 3 against Megatron's \d+"),
    "a wrong sequence count": ("sigmoid-bias-groups-seq", torch.float32, one_sequence_count_wrong,
                               r"sequence_aux_counts: \d+ at index 3 against Megatron's \d+"),
}


@pytest.mark.parametrize("name", ROUTERS)
def test_a_correct_kernel_passes_once_per_specialization(megatron_world, fresh_verdicts, name):
    checks = fresh_verdicts
    router, _ = routed(name, True)
    route(router, seed=1)  # the same specialization: no second check
    assert [(shape, verdict) for shape, _, verdict in checks] == [((32, ROUTERS[name]["num_experts"]), None)]
    route(router, tokens=23)  # 23 tokens: no multiple of 16, another specialization (probed with 333 tokens)
    route(router, dtype=torch.bfloat16)  # bf16 router logits: another
    route(router, dtype=torch.bfloat16, seed=2)
    assert len(checks) == 3 and all(verdict is None for *_, verdict in checks)


@pytest.mark.parametrize("mutant", MUTANTS)
def test_a_mutant_kernel_is_refused_with_kernels_true(megatron_world, fresh_verdicts, monkeypatch, mutant):
    name, dtype, change, reported = MUTANTS[mutant]
    mutate_outputs(monkeypatch, change)
    with pytest.raises(ValueError, match=r"kernels=True\) cannot fuse this router: its first-use check on cpu "
                                         r"disagrees with Megatron's routing, " + reported):
        routed(name, True, dtype=dtype)


@pytest.mark.parametrize("mutant", MUTANTS)
def test_a_mutant_kernel_falls_back_with_one_warning(megatron_world, fresh_verdicts, auto_on_cpu, monkeypatch,
                                                     mutant):
    name, dtype, change, reported = MUTANTS[mutant]
    _, want = routed(name, False, dtype=dtype)
    moe_lbl.unpatch_megatron()
    mutate_outputs(monkeypatch, change)
    with pytest.warns(UserWarning, match=r"falls back to Megatron's routing: its first-use check on cpu disagrees "
                                         r"with Megatron's routing, " + reported):
        router, got = routed(name, "auto", dtype=dtype)
    for a, b in zip(got, want):
        assert torch.equal(a, b)  # exactly Megatron's routing
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once; the verdict is kept
        route(router, dtype=dtype, seed=1)
    assert len(fresh_verdicts) == 1


def test_a_wrong_gradient_is_refused(megatron_world, fresh_verdicts, monkeypatch):
    from moe_lbl.kernels.topk_router import _FusedTopKRouter

    backward = _FusedTopKRouter.backward

    def off_by_a_percent(ctx, *grads):
        grad, *rest = backward(ctx, *grads)
        return (grad * 1.01, *rest)

    monkeypatch.setattr(_FusedTopKRouter, "backward", staticmethod(off_by_a_percent))
    with pytest.raises(ValueError, match=r"disagrees with Megatron's routing, logits gradient: largest error "
                                         r"1\.00e-02 of its largest value \(tolerance 2\.0e-05\)"):
        routed("softmax", True)


def test_an_unchecked_specialization_inside_a_capture_is_not_checked_there(megatron_world, fresh_verdicts):
    from tests.helpers.graphs import capturing

    router, _ = routed("softmax", True)  # the first call, eager: checked
    with capturing(), pytest.raises(ValueError, match=r"its first-use check would fall inside a CUDA graph capture "
                                                      r"\(it reads results on the host\); run one eager step first"):
        route(router, tokens=23)
    assert len(fresh_verdicts) == 1


def test_a_check_that_cannot_run_refuses_the_kernels(megatron_world, fresh_verdicts, auto_on_cpu, monkeypatch):
    def no_probe(*args):
        raise RuntimeError("the first-use check drew no probe free of ties in 64 draws")

    monkeypatch.setattr(first_use, "_tie_free_logits", no_probe)
    _, want = routed("softmax", False)
    moe_lbl.unpatch_megatron()
    with pytest.warns(UserWarning, match=r"disagrees with Megatron's routing, the check itself: RuntimeError: the "
                                         r"first-use check drew no probe free of ties"):
        _, got = routed("softmax", "auto")
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_many_experts_in_bf16_still_give_a_tie_free_probe(megatron_world):
    """Softmax after top-k compares the bf16 logits themselves: near ties there are no ties (with
    1024 experts almost every row has one), only equal logits are."""
    from moe_lbl.patches.megatron.layer import layer_of

    moe_lbl.patch_megatron(kernels=True)
    for experts, topk in ((1024, 16), (2048, 16)):
        router = build_router(num_experts=experts, topk=topk, moe_aux_loss_coeff=0.1)
        layer = layer_of(router).refresh(router)
        call = routing._kernel_call(router, layer, torch.randn(32, experts).bfloat16(), None)
        logits = first_use._tie_free_logits(router, layer, call, 336, None, torch.Generator().manual_seed(0))
        top = torch.sort(logits.double(), dim=1, descending=True).values
        assert bool((top[:, topk - 1] > top[:, topk]).all())
