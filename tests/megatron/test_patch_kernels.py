"""The patched router on the fused kernels reproduces the patched router on Megatron's routing.

On CPU the kernels run in Triton's interpreter (kernels=True forces them there).
"""

from typing import NamedTuple, Optional

import pytest
import torch

import moe_lbl
from moe_lbl.demo.tiny_gpt import TinyGPT, build_gpt, build_router, forward_loss, synthetic_batches
from moe_lbl.patches.megatron.layer import balancer_of
from tests.helpers.megatron import MicroBatch, take_tracker

ROUTERS = {
    "softmax-top2-global-z": dict(num_experts=8, topk=2, moe_z_loss_coeff=1e-3),
    "sigmoid-bias-groups-micro-z": dict(num_experts=16, topk=4, moe_router_score_function="sigmoid",
                                        moe_router_enable_expert_bias=True, moe_router_num_groups=4,
                                        moe_router_group_topk=2, moe_router_topk_scaling_factor=2.5,
                                        moe_z_loss_coeff=1e-2),
    "softmax-pre-hybrid-per-token": dict(num_experts=12, topk=3, moe_router_pre_softmax=True,
                                         calculate_per_token_loss=True, moe_z_loss_coeff=1e-3),
    "softmax-capacity": dict(num_experts=8, topk=2, moe_expert_capacity_factor=1.0),
}
SCOPES = {"softmax-top2-global-z": dict(scope="global"), "sigmoid-bias-groups-micro-z": dict(scope="micro"),
          "softmax-pre-hybrid-per-token": dict(scope="global", micro_coeff=1e-3),
          "softmax-capacity": dict(scope="global")}


class Run(NamedTuple):
    micro_batches: list  # [MicroBatch]
    buffered_counts: torch.Tensor  # the engine's counts and tokens after the step's micro-batches
    loads: torch.Tensor  # the dispatched tokens of the step's back-propagated micro-batches
    expert_bias_counts: Optional[torch.Tensor]  # the router's local_tokens_per_expert, with expert bias


def run(name, kernels, logits, padding, weight) -> Run:
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    moe_lbl.patch_megatron(kernels=kernels, **SCOPES[name])
    router = build_router(moe_aux_loss_coeff=0.1, **ROUTERS[name])
    if router.expert_bias is not None:
        router.expert_bias.copy_(torch.linspace(-0.05, 0.05, router.expert_bias.numel()))
    micro_batches = []
    for j in range(2):
        x = logits[j].clone().requires_grad_()
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor([0.5]))
        probs, routing_map = router.routing(x, padding_mask=padding[j])
        (probs * weight[j]).sum().backward()
        micro_batches.append(MicroBatch(probs.detach(), routing_map, x.grad, take_tracker()))
    balancer = balancer_of(router)
    result = Run(micro_batches, balancer.buffered_counts.clone(), balancer.state.loads.clone(),
                 None if router.local_tokens_per_expert is None else router.local_tokens_per_expert.clone())
    moe_lbl.unpatch_megatron()
    return result


@pytest.mark.parametrize("name", list(ROUTERS))
def test_fused_patched_router_matches_unfused(megatron_world, name):
    E = ROUTERS[name]["num_experts"]
    g = torch.Generator().manual_seed(len(name))
    logits = [torch.randn(9, 3, E, generator=g) for _ in range(2)]
    padding = [torch.rand(9, 3, generator=g) < 0.2, None]
    if ROUTERS[name].get("moe_router_enable_expert_bias"):
        padding = [None, None]  # Megatron 0.16's _apply_expert_bias fails with a padding mask
    weight = [torch.randn(27, E, generator=g) for _ in range(2)]
    unfused = run(name, False, logits, padding, weight)
    fused = run(name, True, logits, padding, weight)
    for want, got in zip(unfused.micro_batches, fused.micro_batches):
        assert torch.equal(got.routing_map, want.routing_map)
        torch.testing.assert_close(got.probs, want.probs, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-6 * float(want.grad.abs().max()))
        assert got.tracker.keys() == want.tracker.keys() and want.tracker
        for key in want.tracker:
            torch.testing.assert_close(got.tracker[key], want.tracker[key], rtol=1e-5, atol=0)
    assert torch.equal(fused.buffered_counts, unfused.buffered_counts)  # zero in micro scope
    assert torch.equal(fused.loads, unfused.loads) and int(fused.loads.sum()) > 0
    a, b = fused.expert_bias_counts, unfused.expert_bias_counts  # None without expert bias
    assert (a is None and b is None) or torch.equal(a, b)


def test_gpt_step_with_kernels_matches_without(megatron_world):
    spec = TinyGPT(overrides=dict(moe_z_loss_coeff=1e-3))
    batch = synthetic_batches(3, 0, 1, 2, spec.seq_length, spec.vocab_size)[0]
    grads = []
    for kernels in (False, True):
        moe_lbl.patch_megatron(scope="global", kernels=kernels)
        model, _ = build_gpt(spec)
        loss = forward_loss(model, batch)
        loss.backward()
        grads.append((float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        moe_lbl.unpatch_megatron()
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    assert grads[0][1].keys() == grads[1][1].keys()
    for name, g0 in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], g0, rtol=1e-4, atol=1e-6 * float(g0.abs().max()) + 1e-9)


def test_kernel_mode_is_validated(megatron_world):
    with pytest.raises(ValueError, match="kernels must be 'auto', True or False"):
        moe_lbl.patch_megatron(kernels="yes")
    assert not moe_lbl.is_patched()
    moe_lbl.patch_megatron(kernels=True)
    router = build_router(num_experts=8, topk=2, moe_router_load_balancing_type=["seq_aux_loss"],
                          moe_aux_loss_coeff=[0.1])
    with pytest.raises(ValueError, match=r"cannot fuse this router: seq_aux_loss on logits of shape \(4, 8\)"):
        router.routing(torch.randn(4, 8))


def test_fused_expert_bias_counts_exclude_padding(megatron_world):
    moe_lbl.patch_megatron(kernels=True)
    router = build_router(moe_aux_loss_coeff=0.1, **ROUTERS["sigmoid-bias-groups-micro-z"])
    padding = torch.zeros(9, 3, dtype=torch.bool)
    padding[:4] = True
    probs, routing_map = router.routing(torch.randn(9, 3, 16), padding_mask=padding)
    assert torch.equal(router.local_tokens_per_expert, (routing_map & ~padding.reshape(-1, 1)).sum(0).float())
    assert int(router.local_tokens_per_expert.sum()) == 15 * 4


def test_fused_router_routes_bf16_logits_as_megatron(megatron_world):
    """bf16 logits: Megatron-Core 0.18+ keeps their scores in fp32 until the final probs (older
    versions round them to bf16, as the kernels do on bf16 input). Kernels that rounded where
    Megatron does not would choose other experts here (expert bias added to rounded scores) and
    give other probs. Sigmoid with expert bias has no exact ties, where the two top-k differ."""
    name = "sigmoid-bias-groups-micro-z"
    g = torch.Generator().manual_seed(7)
    logits = [torch.randn(64, 3, 16, generator=g).bfloat16() for _ in range(2)]
    weight = [torch.randn(192, 16, generator=g).bfloat16() for _ in range(2)]
    unfused = run(name, False, logits, [None, None], weight)
    fused = run(name, True, logits, [None, None], weight)
    for want, got in zip(unfused.micro_batches, fused.micro_batches):
        assert got.probs.dtype == want.probs.dtype == torch.bfloat16
        assert torch.equal(got.routing_map, want.routing_map)
        assert torch.equal(got.probs, want.probs)
        torch.testing.assert_close(got.grad.float(), want.grad.float(), rtol=0,
                                   atol=2e-2 * float(want.grad.float().abs().max()))


def test_fused_router_routes_bf16_logits_after_softmax_as_megatron(megatron_world, monkeypatch):
    """Softmax after top-k chooses by the logits, so on Megatron-Core 0.18+ the kernels take the
    16-bit logits as they are (no fp32 copy, 32-bit sort keys): the same experts and probs as
    Megatron's fp32 routing, where no exact tie lets torch.topk choose otherwise."""
    name = "softmax-top2-global-z"
    g = torch.Generator().manual_seed(9)
    logits = [torch.randn(64, 3, 8, generator=g).bfloat16() for _ in range(2)]
    weight = [torch.randn(192, 8, generator=g).bfloat16() for _ in range(2)]
    import moe_lbl.kernels

    routed_dtypes = []
    route = moe_lbl.kernels.fused_topk_router
    monkeypatch.setattr(moe_lbl.kernels, "fused_topk_router",
                        lambda logits, *a, **k: routed_dtypes.append(logits.dtype) or route(logits, *a, **k))
    unfused = run(name, False, logits, [None, None], weight)
    fused = run(name, True, logits, [None, None], weight)
    # No fp32 copy of the logits (two micro-batches, and the first-use check's probe where it ran).
    assert len(routed_dtypes) >= 2 and set(routed_dtypes) == {torch.bfloat16}
    for x, want, got in zip(logits, unfused.micro_batches, fused.micro_batches):
        top = torch.sort(x.reshape(-1, 8).float(), dim=-1, descending=True).values
        untied = top[:, 1] != top[:, 2]
        assert int(untied.sum()) > 150
        assert got.probs.dtype == want.probs.dtype == torch.bfloat16
        assert torch.equal(got.routing_map[untied], want.routing_map[untied])
        # Within one bf16 rounding: fp32 exp differs in its last bits between torch and the kernels.
        torch.testing.assert_close(got.probs[untied].float(), want.probs[untied].float(), rtol=2 ** -7, atol=0)
        g0, g1 = want.grad.reshape(-1, 8)[untied].float(), got.grad.reshape(-1, 8)[untied].float()
        torch.testing.assert_close(g1, g0, rtol=0, atol=2e-2 * float(g0.abs().max()))
