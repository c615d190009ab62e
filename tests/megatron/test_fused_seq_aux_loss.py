"""seq_aux_loss on the fused kernels equals Megatron's own, alone and beside the engine's terms.

The patched router with kernels=True (in Triton's interpreter on CPU; it raises where it cannot
fuse) against kernels=False (Megatron's routing and its _apply_seq_aux_loss): probs, the logits
gradient (the per-sequence loss's included) and Megatron's logged seq_load_balancing_loss, for two
micro-batches of [s, b] tokens with b > 1, so that a sequence's tokens interleave with the others'.
"""

import contextlib

import pytest
import torch

import moe_lbl
from moe_lbl.demo.tiny_gpt import build_router
from tests.helpers.megatron import MicroBatch, take_tracker

DEEPSEEK = dict(num_experts=16, topk=4, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                moe_router_num_groups=4, moe_router_group_topk=2, moe_router_topk_scaling_factor=2.5,
                moe_z_loss_coeff=1e-3)
ROUTERS = {
    # DeepSeek-V3 style: sigmoid with expert bias and groups, seq_aux_loss alone (the engine idle).
    "sigmoid-bias-groups-seq": (dict(moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=0.05,
                                     **DEEPSEEK), dict(scope="global")),
    # Beside the engine's micro term, under per-token loss (Megatron's valid-token scaling).
    "softmax-aux-seq-per-token": (dict(num_experts=12, topk=3,
                                       moe_router_load_balancing_type=["aux_loss", "seq_aux_loss"],
                                       moe_aux_loss_coeff=[0.01, 0.1], calculate_per_token_loss=True),
                                  dict(scope="micro")),
    # Beside the engine's global term, with padding.
    "softmax-seq-global-padding": (dict(num_experts=8, topk=2,
                                        moe_router_load_balancing_type=["seq_aux_loss", "global_aux_loss"],
                                        moe_aux_loss_coeff=[0.1, 0.05]), dict(scope="global")),
}


def run(name, kernels, logits, padding, weight) -> list:
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    config, options = ROUTERS[name]
    moe_lbl.patch_megatron(kernels=kernels, **options)
    try:
        router = build_router(**config)
        if router.expert_bias is not None:
            router.expert_bias.copy_(torch.linspace(-0.05, 0.05, router.expert_bias.numel()))
        micro_batches = []
        for x, mask, w in zip(logits, padding, weight):
            x = x.clone().requires_grad_()
            MoEAuxLossAutoScaler.set_loss_scale(torch.tensor([0.5]))
            probs, routing_map = router.routing(x, **({} if mask is None else {"padding_mask": mask}))
            (probs * w).sum().backward()
            micro_batches.append(MicroBatch(probs.detach(), routing_map, x.grad, take_tracker()))
        return micro_batches
    finally:
        moe_lbl.unpatch_megatron()


def requirements(name, features):
    if not features.fused_routing:
        pytest.skip(f"megatron-core {features.version} has no fused path")
    if "global" in name and not features.global_aux_loss:
        pytest.skip(f"megatron-core {features.version} has no global_aux_loss type")
    if "padding" in name and not features.padding_mask:
        pytest.skip(f"megatron-core {features.version} passes no padding mask to the router")


@pytest.mark.parametrize("name", list(ROUTERS))
def test_fused_seq_aux_loss_matches_megatron(megatron_world, megatron_features, name):
    requirements(name, megatron_features)
    E = ROUTERS[name][0]["num_experts"]
    g = torch.Generator().manual_seed(len(name))
    logits = [torch.randn(7, 3, E, generator=g) for _ in range(2)]  # [s, b, E]: 3 sequences of 7 tokens
    padding = [None, None]
    if "padding" in name:
        padding = [torch.rand(7, 3, generator=g) < 0.25, None]
    weight = [torch.randn(21, E, generator=g) for _ in range(2)]
    unfused = run(name, False, logits, padding, weight)
    fused = run(name, True, logits, padding, weight)
    for want, got in zip(unfused, fused):
        assert torch.equal(got.routing_map, want.routing_map)
        torch.testing.assert_close(got.probs, want.probs, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-6 * float(want.grad.abs().max()))
        assert got.tracker.keys() == want.tracker.keys()
        assert float(want.tracker["seq_load_balancing_loss"].sum()) > 0
        for key in want.tracker:
            torch.testing.assert_close(got.tracker[key], want.tracker[key], rtol=1e-5, atol=0)


def test_the_seq_aux_loss_part_of_the_gradient_is_megatrons(megatron_world, megatron_features):
    """The routing's gradient dwarfs the loss's: the difference with and without seq_aux_loss
    isolates the loss's part, which must be Megatron's to 1% of its largest value (the fp32
    rounding of the routing's gradient, a few 1e-8, is the floor)."""
    name = "sigmoid-bias-groups-seq"
    requirements(name, megatron_features)
    g = torch.Generator().manual_seed(3)
    logits, weight = [torch.randn(7, 3, 16, generator=g)], [torch.randn(21, 16, generator=g)]
    config, options = ROUTERS[name]
    parts = {}
    for kernels in (False, True):
        with_loss = run(name, kernels, logits, [None], weight)[0].grad
        ROUTERS[name] = (dict(config, moe_aux_loss_coeff=0.0), options)
        try:
            parts[kernels] = with_loss - run(name, kernels, logits, [None], weight)[0].grad
        finally:
            ROUTERS[name] = (config, options)
    assert float(parts[False].abs().max()) > 1e-5
    torch.testing.assert_close(parts[True], parts[False], rtol=0, atol=1e-2 * float(parts[False].abs().max()))


@pytest.mark.parametrize("name", ["sigmoid-bias-groups-seq", "softmax-seq-global-padding"])
def test_the_fused_seq_aux_loss_reads_nothing_on_the_host(megatron_world, megatron_features, name):
    """What a CUDA graph needs: after a first eager call (the first-use check reads the host),
    forward and backward with seq_aux_loss wait for no result on the host. (A loss that took
    its token count with .item() would fail here.)"""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from tests.helpers.graphs import SyncGuard

    requirements(name, megatron_features)
    config, options = ROUTERS[name]
    E = config["num_experts"]
    g = torch.Generator().manual_seed(11)
    moe_lbl.patch_megatron(kernels=True, **options)
    try:
        router = build_router(**config)
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor([0.5]))
        for guarded in (False, True):
            x = torch.randn(7, 3, E, generator=g).requires_grad_()
            padding = {"padding_mask": torch.rand(7, 3, generator=g) < 0.25} if "padding" in name else {}
            with SyncGuard() if guarded else contextlib.nullcontext():
                probs, _ = router.routing(x, **padding)
                probs.sum().backward()
            assert x.grad is not None
    finally:
        moe_lbl.unpatch_megatron()
