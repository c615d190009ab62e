"""Megatron-Core's TopKRouter, patched, with the fused kernels on against Megatron's routing.

On CUDA with kernels="auto" (what GPU users run: a fallback warning fails the check), in Triton's
interpreter with kernels=True otherwise. One rank (NCCL on CUDA, gloo on CPU), two micro-batches
of a global-scope step with padding (except with an expert bias), fp32 logits: probs, routing
map and logits gradient must equal those of the unfused router. Also the first-use check's cost.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from typing import Iterator

import torch

from moe_lbl.selftest import Check, timed

SECTION = "router"
ROUTERS = {
    "softmax E64 k8, z-loss": dict(num_experts=64, topk=8, moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3),
    "sigmoid E64 k8, bias, groups 8x4, scale 2.5": dict(
        num_experts=64, topk=8, moe_aux_loss_coeff=1e-2, moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True, moe_router_num_groups=8, moe_router_group_topk=4,
        moe_router_topk_scaling_factor=2.5),
}
INTERPRETER_ROUTERS = {
    "softmax E8 k2, z-loss": dict(num_experts=8, topk=2, moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3),
    "sigmoid E16 k4, bias, groups 4x2, scale 2.5": dict(
        num_experts=16, topk=4, moe_aux_loss_coeff=1e-2, moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True, moe_router_num_groups=4, moe_router_group_topk=2,
        moe_router_topk_scaling_factor=2.5),
}
TOKENS = 64


def _run(config: dict, kernels, device: torch.device) -> list:
    """[(probs, routing_map, logits gradient)] of two micro-batches of one step."""
    import moe_lbl
    from moe_lbl.demo.tiny_gpt import build_router

    moe_lbl.patch_megatron(kernels=kernels, scope="global")
    try:
        torch.manual_seed(3)
        router = build_router(**config).to(device)  # Megatron moves the weight only in gating()
        if router.expert_bias is not None:
            router.expert_bias.copy_(torch.linspace(-0.05, 0.05, router.expert_bias.numel()))
        g = torch.Generator().manual_seed(5)
        results = []
        for _ in range(2):
            x = torch.randn(TOKENS, 1, config["num_experts"], generator=g).to(device).requires_grad_()
            padding = (torch.rand(TOKENS, 1, generator=g) < 0.1).to(device)
            if router.expert_bias is not None:
                padding = None  # Megatron's own _apply_expert_bias fails with a padding mask (0.16 to 0.19)
            weight = torch.randn(TOKENS, config["num_experts"], generator=g).to(device)
            probs, routing_map = router.routing(x, padding_mask=padding)
            (probs * weight).sum().backward()
            results.append((probs.detach(), routing_map, x.grad))
        moe_lbl.end_step(router)
        return results
    finally:
        moe_lbl.unpatch_megatron()


def check_router(config: dict, cuda: bool) -> str:
    from moe_lbl.patches.megatron import features

    if not features().padding_mask:
        raise AssertionError(f"megatron-core {features().version} routes without padding masks (0.16+ needed)")
    device = torch.device("cuda" if cuda else "cpu")
    want = _run(config, False, device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _run(config, "auto" if cuda else True, device)
    fallbacks = [str(w.message) for w in caught if "falls back" in str(w.message)]
    if fallbacks:
        raise AssertionError(fallbacks[0])
    worst = 0.0
    for j, ((probs, routing_map, grad), (want_probs, want_map, want_grad)) in enumerate(zip(got, want)):
        if not torch.equal(routing_map, want_map):
            raise AssertionError(f"micro-batch {j}: routing map differs from Megatron's routing")
        torch.testing.assert_close(probs, want_probs, rtol=1e-5, atol=1e-6)
        scale = float(want_grad.abs().max())
        torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-5 * scale)
        worst = max(worst, float((grad - want_grad).abs().max()) / scale)
    return f"{'kernels=auto on CUDA' if cuda else 'kernels=True, interpreted'}; gradient {worst:.2g} off at most"


def check_first_use_cost(config: dict, cuda: bool) -> str:
    """The first-use check of one specialization: seconds and, on CUDA, peak memory above the start."""
    import moe_lbl
    from moe_lbl.demo.tiny_gpt import build_router
    from moe_lbl.patches.megatron import first_use, routing
    from moe_lbl.patches.megatron.layer import layer_of

    moe_lbl.patch_megatron(kernels="auto" if cuda else True, scope="global")
    try:
        device = torch.device("cuda" if cuda else "cpu")
        router = build_router(**config).to(device)
        layer = layer_of(router).refresh(router)
        call = routing._kernel_call(router, layer, torch.randn(4096, config["num_experts"], device=device), None)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        verdict = first_use.check(router, layer, call)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if verdict is not None:
            raise AssertionError(f"the check disagreed: {verdict}")
        memory = (f", peak {(torch.cuda.max_memory_allocated() - base) / 2**20:.1f} MiB above the start" if cuda
                  else " in the interpreter (memory measured on CUDA only)")
        return f"{seconds * 1e3:.1f} ms{memory} (its kernels compiled by the check above)"
    finally:
        moe_lbl.unpatch_megatron()


def checks(cuda: bool) -> Iterator[Check]:
    try:
        import megatron.core  # noqa: F401
    except ImportError:
        yield Check(SECTION, "patched router", "skipped", "megatron-core is not installed")
        return
    from moe_lbl.demo.tiny_gpt import distributed

    routers = ROUTERS if cuda else INTERPRETER_ROUTERS
    with tempfile.TemporaryDirectory() as tmp, distributed(0, 1, os.path.join(tmp, "init")):
        for name, config in routers.items():
            yield timed(SECTION, f"patched router, {name}", lambda config=config: check_router(config, cuda))
        name, config = next(iter(routers.items()))
        yield timed(SECTION, f"first-use check cost, {name}", lambda: check_first_use_cost(config, cuda))
    if not cuda:
        yield Check(SECTION, "patched router on CUDA (kernels='auto')", "skipped", "no CUDA device")
