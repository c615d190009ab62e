"""The router's work by each provider, timed on CUDA: what `moe-lbl selftest` and
`python -m benchmarks.kernels` measure.

The work, for logits [T, E]: top-k routing (probs and routing map), the aux-loss scores and their
top-k counts, the load-balancing loss and the z-loss; backward: the logits gradient of
sum(probs * g) + LBL + z-loss. Providers:
- moe-lbl:  the fused Triton kernels (CUDA only);
- eager:    Megatron-Core's PyTorch functions;
- compiled: torch.compile of the eager path (dynamic shapes);
- te:       TransformerEngine's fused router functions (z-loss eager), where importable.
`routing` holds topk_routing_with_score_function's options (score_function, use_pre_softmax,
num_groups, group_topk, scaling_factor, expert_bias).
"""

from __future__ import annotations

import time
from typing import Callable, Iterator, Optional

import torch

from moe_lbl.selftest import Check

SECTION = "speed"
PROVIDERS = ("moe-lbl", "eager", "compiled", "te")
COEFF, Z_COEFF = 1e-2, 1e-3
HEADLINE = dict(tokens=(16384, 65536), experts=(64, 128, 256), topk=(4, 8))


def eager(logits, k, routing):
    from megatron.core.transformer.moe.moe_utils import (
        compute_routing_scores_for_aux_loss,
        switch_load_balancing_loss_func,
        topk_routing_with_score_function,
        z_loss_func,
    )

    num_tokens, num_experts = logits.shape
    probs, routing_map = topk_routing_with_score_function(logits, k, **routing)
    aux_map, scores = compute_routing_scores_for_aux_loss(logits, k, routing["score_function"])
    counts = aux_map.sum(dim=0)
    lbl = switch_load_balancing_loss_func(scores, counts, num_tokens, k, num_experts, COEFF)
    return probs, routing_map, counts, lbl, z_loss_func(logits, Z_COEFF)


def te(logits, k, routing):
    from megatron.core.transformer.moe.moe_utils import z_loss_func
    from transformer_engine.pytorch.router import (
        fused_compute_score_for_moe_aux_loss,
        fused_moe_aux_loss,
        fused_topk_with_score_function,
    )

    num_tokens, num_experts = logits.shape
    options = {**dict(use_pre_softmax=False, num_groups=None, group_topk=None, scaling_factor=None, expert_bias=None),
               **routing}
    probs, routing_map = fused_topk_with_score_function(logits=logits, topk=k, **options)
    aux_map, scores = fused_compute_score_for_moe_aux_loss(logits=logits, topk=k,
                                                           score_function=routing["score_function"])
    counts = aux_map.sum(dim=0)
    lbl = fused_moe_aux_loss(probs=scores, tokens_per_expert=counts, total_num_tokens=num_tokens,
                             num_experts=num_experts, topk=k, coeff=COEFF)
    return probs, routing_map, counts, lbl, z_loss_func(logits, Z_COEFF)


def fused(logits, k, routing):
    from moe_lbl.kernels import fused_topk_router

    num_tokens, num_experts = logits.shape
    out = fused_topk_router(logits, k, sparse=False, **routing)
    lbl = (out.stats.score_sums * out.stats.aux_counts).sum() * (COEFF * num_experts / (k * num_tokens * num_tokens))
    z = out.stats.z_sum * (Z_COEFF / num_tokens)
    return out.probs, out.routing_map, out.stats.aux_counts, lbl, z


def availability(provider: str) -> Optional[str]:
    """None if the provider can run here, else why not."""
    if provider == "moe-lbl" and not torch.cuda.is_available():
        return "unavailable: the Triton kernels need a CUDA device (the CPU interpreter is not benchmarked)"
    if provider == "te":
        try:
            import transformer_engine.pytorch.router  # noqa: F401
        except Exception as error:  # ImportError, or a broken TE install
            return f"unavailable: TransformerEngine's router cannot be imported ({type(error).__name__})"
    if provider in ("eager", "compiled", "te"):
        try:
            import megatron.core.transformer.moe.moe_utils  # noqa: F401
        except ImportError:
            return "unavailable: megatron-core is not installed"
    return None


_COMPILED = {}


def provider_fn(provider: str) -> Callable:
    if provider == "compiled":
        if "fn" not in _COMPILED:
            # The bwd timing back-propagates one graph repeatedly (retain_graph), which compiled
            # graphs refuse while they donate their buffers.
            torch._functorch.config.donated_buffer = False
            _COMPILED["fn"] = torch.compile(eager, dynamic=True)
        return _COMPILED["fn"]
    return {"moe-lbl": fused, "eager": eager, "te": te}[provider]


def bytes_moved(op: str, tokens: int, experts: int, dtype: torch.dtype) -> int:
    """Essential traffic: forward reads logits, writes probs and the bool map; backward reads
    logits and the probs gradient, writes the logits gradient."""
    size = torch.finfo(dtype).bits // 8
    forward = tokens * experts * (2 * size + 1)
    backward = tokens * experts * 3 * size
    return {"fwd": forward, "bwd": backward, "both": forward + backward}[op]


def backward_of(outputs, grad, retain_graph=False) -> None:
    probs, _, _, lbl, z = outputs
    torch.autograd.backward([probs, lbl, z], [grad, torch.ones_like(lbl), torch.ones_like(z)],
                            retain_graph=retain_graph)


def first_call_s(fn, logits, grad, k, routing) -> float:
    """Seconds of the first forward and backward at this shape: compiling included (Triton's
    kernels, torch.compile's graph; from an empty cache only if Triton's cache is empty)."""
    sync = torch.cuda.synchronize if logits.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    backward_of(fn(logits, k, routing), grad)
    sync()
    return time.perf_counter() - start


def headline_routings(num_experts: int) -> dict:
    """The two headline routings: softmax, and sigmoid with an expert bias and 8 groups (4 chosen)."""
    g = torch.Generator().manual_seed(num_experts)
    bias = (torch.randn(num_experts, generator=g) * 0.05).cuda()
    return {"softmax": dict(score_function="softmax"),
            "sigmoid-bias-groups8x4": dict(score_function="sigmoid", expert_bias=bias, num_groups=8, group_topk=4)}


def checks(cuda: bool) -> Iterator[Check]:
    """Timings are reported, never judged: a provider's failure to run is the only FAIL."""
    if not cuda:
        yield Check(SECTION, "kernel microbenchmark and first-call compile times", "skipped", "no CUDA device")
        return
    import triton.testing

    for num_tokens in HEADLINE["tokens"]:
        for num_experts in HEADLINE["experts"]:
            for k in HEADLINE["topk"]:
                g = torch.Generator(device="cuda").manual_seed(num_tokens + num_experts + k)
                logits = torch.randn(num_tokens, num_experts, generator=g, device="cuda").bfloat16().requires_grad_()
                grad = torch.randn(num_tokens, num_experts, generator=g, device="cuda").bfloat16()
                for name, routing in headline_routings(num_experts).items():
                    config = f"T{num_tokens} E{num_experts} k{k} bf16 {name}"
                    times = {}
                    for provider in ("eager", *(p for p in PROVIDERS if p != "eager")):  # eager first: the ratio
                        reason = availability(provider)
                        if reason:
                            yield Check(SECTION, f"{provider}, {config}", "skipped", reason)
                            continue
                        start = time.perf_counter()
                        try:
                            fn = provider_fn(provider)
                            first = first_call_s(fn, logits, grad, k, routing)
                            median = triton.testing.do_bench(
                                lambda fn=fn, logits=logits, grad=grad, k=k, routing=routing:
                                backward_of(fn(logits, k, routing), grad))
                        except Exception as error:  # reported, the others still measured
                            detail = " ".join(f"{type(error).__name__}: {error}".split())[:300]
                            yield Check(SECTION, f"{provider}, {config}", "FAIL", detail, time.perf_counter() - start)
                            continue
                        times[provider] = median
                        moved = bytes_moved("both", num_tokens, num_experts, torch.bfloat16)
                        versus = f", {times['eager'] / median:.2f}x eager" if "eager" in times else ""
                        yield Check(SECTION, f"{provider}, {config}", "pass",
                                    f"fwd+bwd median {median * 1e3:.1f} us ({moved / (median * 1e-3) / 1e9:.0f} GB/s)"
                                    f"{versus}; first call {first:.2f} s", time.perf_counter() - start)
