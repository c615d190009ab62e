"""kernels='auto' never breaks a run: what the kernels cannot serve falls back to Megatron's
routing with one warning naming why; kernels=True raises that reason instead.

kernels='auto' fuses only GPU logits: here `_on_gpu` is made to say yes for CPU logits, so that
the auto path runs the kernels in Triton's interpreter, and the compile-and-load probe (a GPU
step) is replaced to succeed or fail on demand.
"""

import warnings

import pytest
import torch

import moe_lbl
from moe_lbl.demo.tiny_gpt import build_router
from moe_lbl.patches.megatron import live, routing
from moe_lbl.patches.megatron.layer import balancer_of, layer_of

ROUTER = dict(num_experts=8, topk=2, moe_aux_loss_coeff=0.1, moe_z_loss_coeff=1e-3)


@pytest.fixture
def auto_on_cpu(monkeypatch):
    """kernels='auto' fuses CPU logits; each compile-and-load probe is recorded, and raises
    whatever `failure` holds."""
    probes, failure = [], []

    def load_router(logits, topk, gradients=(), **options):
        probes.append((tuple(logits.shape), topk, gradients, options["padding_mask"] is not None))
        if failure:
            raise failure[0]

    monkeypatch.setattr(routing, "_on_gpu", lambda logits: True)
    monkeypatch.setattr("moe_lbl.kernels.topk_router.load_router", load_router)
    return probes, failure


def route(router, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 1, 8, generator=g).requires_grad_()
    probs, routing_map = router.routing(x)
    (probs * torch.arange(8.0)).sum().backward()
    return probs.detach(), routing_map, x.grad


def unfused(seed=0):
    moe_lbl.patch_megatron(kernels=False)
    torch.manual_seed(1)
    result = route(build_router(**ROUTER), seed)
    moe_lbl.unpatch_megatron()
    return result


def test_a_kernel_that_fails_to_load_falls_back_with_one_warning(megatron_world, auto_on_cpu):
    probes, failure = auto_on_cpu
    want = unfused()
    failure.append(RuntimeError("PTXASError: ptxas fatal: out of registers\nmore detail"))
    moe_lbl.patch_megatron(kernels="auto")
    torch.manual_seed(1)
    router = build_router(**ROUTER)
    with pytest.warns(UserWarning, match="falls back to Megatron's routing: the kernels failed to compile or load: "
                                         "RuntimeError: PTXASError: ptxas fatal: out of registers$"):
        got = route(router)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same reason warns once
        route(router, seed=1)
    assert len(probes) == 2  # one probe per router call (the kernels keep each specialization's verdict)
    for a, b in zip(got, want):
        assert torch.equal(a, b)  # exactly Megatron's routing


def test_kernels_true_raises_the_load_failure(megatron_world, auto_on_cpu):
    _, failure = auto_on_cpu
    failure.append(RuntimeError("out of resource: shared memory"))
    moe_lbl.patch_megatron(kernels=True)
    with pytest.raises(ValueError, match="kernels=True\\) cannot fuse this router: the kernels failed to compile or "
                                         "load: RuntimeError: out of resource: shared memory"):
        route(build_router(**ROUTER))


def test_kernels_that_load_run_fused_with_the_gradients_their_backward_gets(megatron_world, auto_on_cpu):
    probes, _ = auto_on_cpu
    moe_lbl.patch_megatron(kernels="auto")
    torch.manual_seed(1)
    router = build_router(**ROUTER)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        route(router)
        route(router, seed=1)
        with torch.no_grad():  # another specialization: no statistics, no backward
            router.routing(torch.randn(12, 1, 8))
    training = ((12, 8), 2, ("probs", "score_sums", "z_sum"), False)
    assert probes == [training, training, ((12, 8), 2, (), False)]
    assert balancer_of(router).enabled  # the fused path registered its counts


@pytest.mark.parametrize("change,reason", [
    (dict(score_function="sqrtsoftplus"), "score function 'sqrtsoftplus'"),
    (dict(routing_type=["aux_loss", "quantile_balancing"]), "quantile_balancing balancing"),
])
def test_options_the_kernels_lack_fall_back(megatron_world, auto_on_cpu, change, reason):
    """Router options of newer Megatron-Core releases that the kernels do not implement."""
    probes, _ = auto_on_cpu
    moe_lbl.patch_megatron(kernels="auto")
    router = build_router(**ROUTER)
    layer = layer_of(router)  # (the engine of a quantile-balancing router would refuse the patch's scope)
    for name, value in change.items():
        setattr(router, name, value)
    if "routing_type" in change:
        router.config.moe_router_load_balancing_type = change["routing_type"]
        router.config.moe_aux_loss_coeff = [0.1, 0.0]
    assert reason in routing._fused_unsupported(router, torch.zeros(4, 8), live.current())
    with pytest.warns(UserWarning, match=f"falls back to Megatron's routing: {reason}"):
        assert routing._fused_call(router, layer, torch.zeros(4, 8), None, live.current()) is None
    assert probes == []  # refused before any compile
    moe_lbl.patch_megatron(kernels=True)
    with pytest.raises(ValueError, match=f"cannot fuse this router: {reason}"):
        routing._fused_call(router, layer, torch.zeros(4, 8), None, live.current())
