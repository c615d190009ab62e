"""The fused router's first-use check: before the kernels serve a specialization on a device,
they route a probe batch there, and must agree with Megatron's own routing of the same batch.

The kernels' numerical tests run in Triton's CPU interpreter; the first compiled run is often a
user's GPU. So the first call of each specialization (the kernels' compile key, plus the router's
logits dtype) on each device routes PROBE_TOKENS random tokens with the layer's experts, top-k,
options, dtype and padding, forward and backward, through the kernels and through Megatron's
topk_routing_with_score_function, compute_routing_scores_for_aux_loss and z_loss_func, and
compares: the routing map (exact), probs (in ulps of the dtype), counts (exact), valid tokens,
score sums, the z-loss sum, the registration the statistics kernel fills, and the logits gradient
of a random mix of the gradients the layer's backward receives.

Ties: torch.topk orders exactly tied scores as it likes, so rows whose k-th and (k+1)-th scores
(or group scores) lie within TIE_ULPS of each other (are equal, where softmax after top-k
chooses by the logits themselves) are drawn again until none is left; a check that cannot run
(no tie-free probe in MAX_DRAWS draws, an error) refuses the kernels as a disagreement does.

Cost: one forward and one backward of PROBE_TOKENS tokens through both routings, with a few
host reads, once per specialization and device; the probe shares the layer's compile key where
the layer's token count is a multiple of 16 (336 tokens), so it compiles nothing more there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

PROBE_SEED = 20250121  # the probe batch is the same on every run and rank
TIE_ULPS = 4
MAX_DRAWS = 64


@dataclass(frozen=True)
class Tolerance:
    """How far the kernels may be from Megatron's routing of the same batch, per logits dtype."""

    probs_ulps: float  # the chosen experts' probs, in ulps of the probs' dtype
    relative: float  # score sums, z-loss sum and the logits gradient, relative to their largest value


# About 4x the largest errors measured in Triton's interpreter against Megatron-Core 0.19.2 on
# CPU (fp32: 5 ulps, 4e-7; bf16 with fp32 routing: 0 ulps, 6e-3 (Megatron's bf16 logsumexp and
# its bf16 gradient); fp16: 1 ulp, 8e-4).
TOLERANCES = {torch.float32: Tolerance(16, 2e-5), torch.bfloat16: Tolerance(2, 2 ** -5),
              torch.float16: Tolerance(4, 2 ** -7)}


@dataclass(frozen=True)
class Mismatch:
    field: str
    error: str  # the largest error, in words

    def __str__(self) -> str:
        return f"{self.field}: {self.error}"


_verdicts: dict = {}  # specialization -> None (agrees) or the Mismatch found


def first_use_failure(router, layer, call) -> Optional[str]:
    """Why the kernels must not serve this call (its specialization disagreed with Megatron's
    routing on the probe), or None. Checks each specialization on its first call."""
    from moe_lbl.engine import capturing

    key = (call.specialization, call.dtype)
    if key not in _verdicts:
        if capturing():
            return ("its first-use check would fall inside a CUDA graph capture (it reads results on the host); "
                    "run one eager step first (cuda_graph_warmup_steps >= 1)")
        try:
            _verdicts[key] = check(router, layer, call)
        except Exception as error:  # a check that cannot run does not vouch for the kernels
            _verdicts[key] = Mismatch("the check itself", f"{type(error).__name__}: {error}")
    verdict = _verdicts[key]
    if verdict is None:
        return None
    return f"its first-use check on {call.logits.device} disagrees with Megatron's routing, {verdict}"


def probe_tokens(num_tokens: int, sequences: int = 1) -> int:
    """336 (21 x 16: the compile key of a multiple of 16, and no multiple of the 32-, 64- or
    128-row blocks) where the layer routes a multiple of 16 tokens, else 333; with per-sequence
    statistics, the least multiple of the sequences at or above that keeping its divisibility by
    16 (an odd number of sequence lengths where 16 does not divide the layer's tokens)."""
    if num_tokens % 16 == 0:
        step = sequences * 16 // math.gcd(sequences, 16)
        return -(-336 // step) * step
    length = -(-333 // sequences)
    return sequences * (length + 1 - length % 2)


def check(router, layer, call) -> Optional[Mismatch]:
    """Route the probe through the kernels and through Megatron; the first disagreement, or None."""
    from megatron.core.transformer.moe.moe_utils import (
        compute_routing_scores_for_aux_loss,
        topk_routing_with_score_function,
        z_loss_func,
    )

    from moe_lbl.kernels import fused_topk_router
    from moe_lbl.patches.megatron.routing import kernel_logits

    options, k, device = dict(call.options), router.topk, call.logits.device
    sequences = options.get("sequences") or 1
    num_tokens = probe_tokens(call.logits.shape[0], sequences)
    generator = torch.Generator().manual_seed(PROBE_SEED)
    bias = None
    if options["expert_bias"] is not None:
        bias = (torch.randn(options["expert_bias"].shape, generator=generator) * 0.1).to(options["expert_bias"])
        bias = bias.to(device)
    logits = _tie_free_logits(router, layer, call, num_tokens, bias, generator)
    padding = None
    if options["padding_mask"] is not None:
        padding = (torch.rand(num_tokens, generator=generator) < 0.1).to(device)
    valid = torch.ones(num_tokens, dtype=torch.bool, device=device) if padding is None else ~padding
    registration = _scratch(options["registration"])
    options.update(expert_bias=bias, padding_mask=padding, registration=registration)
    routing = dict(use_pre_softmax=router.config.moe_router_pre_softmax, num_groups=options["num_groups"],
                   group_topk=options["group_topk"], scaling_factor=options["scaling_factor"],
                   score_function=options["score_function"])

    with torch.set_grad_enabled(call.training):
        x_kernels = logits.clone().requires_grad_(call.training)
        out = fused_topk_router(kernel_logits(router, layer, x_kernels), k, **options)
        probs = out.probs.to(call.dtype)
        x_megatron = logits.clone().requires_grad_(call.training)
        want_probs, want_map = topk_routing_with_score_function(x_megatron, k, expert_bias=bias, **routing)
        aux_map, aux_scores = compute_routing_scores_for_aux_loss(x_megatron, k, options["score_function"])
        valid_scores = aux_scores.float() * valid[:, None]
        want_score_sums = valid_scores.sum(0)
        # Megatron's seq_aux_loss sums: tokens [s, sequences]
        want_sequence_sums = valid_scores.reshape(num_tokens // sequences, sequences, -1).sum(0)
        want_z_sum = z_loss_func(x_megatron[valid], 1.0) * valid.sum()

    mismatch = _compare_routing(out.routing_map, want_map, probs, want_probs, call.dtype)
    if mismatch is None and out.stats is not None:
        stats = out.stats
        tolerance = TOLERANCES[call.dtype].relative
        mismatch = (_compare_counts("aux_counts", stats.aux_counts, (aux_map & valid[:, None]).sum(0))
                    or _compare_counts("dispatch_counts", stats.dispatch_counts, (want_map & valid[:, None]).sum(0))
                    or _compare_counts("valid_tokens", stats.valid_tokens.reshape(1), valid.sum().reshape(1))
                    or _compare_close("score_sums", stats.score_sums, want_score_sums, tolerance)
                    or (stats.z_sum is not None and _compare_close("z_sum", stats.z_sum, want_z_sum, tolerance))
                    or _compare_registration(registration, stats))
        if mismatch is None and stats.sequence_aux_counts is not None:
            want_counts = (aux_map & valid[:, None]).reshape(num_tokens // sequences, sequences, -1).sum(0)
            mismatch = (_compare_counts("sequence_aux_counts", stats.sequence_aux_counts.reshape(-1),
                                        want_counts.reshape(-1))
                        or _compare_close("sequence_score_sums", stats.sequence_score_sums, want_sequence_sums,
                                          tolerance))
    if mismatch is None and call.training:
        mismatch = _compare_gradients(call, out, x_kernels, probs, x_megatron, want_probs, want_score_sums,
                                      want_z_sum, want_sequence_sums, generator)
    return mismatch


def _tie_free_logits(router, layer, call, num_tokens, bias, generator) -> torch.Tensor:
    """Random logits [num_tokens, E] in the router's dtype whose rows have no near ties at the
    k-th score, the k-th aux score or the group_topk-th group score (those are drawn again)."""
    from moe_lbl.kernels.topk_router_reference import reference_routing

    options = call.options
    routed_dtype = call.logits.dtype
    logits = torch.randn(num_tokens, router.config.num_moe_experts, generator=generator).to(call.dtype)
    rows = torch.arange(num_tokens)
    for _ in range(MAX_DRAWS):
        reference = reference_routing(
            logits[rows].to(routed_dtype), router.topk, score_function=options["score_function"],
            use_pre_softmax=options["use_pre_softmax"], num_groups=options["num_groups"],
            group_topk=options["group_topk"], scaling_factor=options["scaling_factor"],
            expert_bias=None if bias is None else bias.cpu())
        select_dtype = torch.float32 if bias is not None else routed_dtype
        aux_dtype = torch.float32 if options["score_function"] == "softmax" else routed_dtype
        # Softmax after top-k chooses by the logits themselves: both sides compare the same
        # values, so only exact ties can order differently (16-bit logits of many experts have
        # near ties in almost every row).
        by_logits = options["score_function"] == "softmax" and not options["use_pre_softmax"]
        tied = (_near_ties(reference.select, router.topk, select_dtype, 0 if by_logits else TIE_ULPS)
                | _near_ties(reference.aux_scores, router.topk, aux_dtype))
        if reference.group_scores is not None:
            tied |= _near_ties(reference.group_scores, options["group_topk"], select_dtype)
        rows = rows[tied]
        if not len(rows):
            return logits.to(call.logits.device)
        logits[rows] = torch.randn(len(rows), logits.shape[1], generator=generator).to(call.dtype)
    raise RuntimeError(f"the first-use check drew no probe free of ties in {MAX_DRAWS} draws")


def _near_ties(values: torch.Tensor, k: int, dtype: torch.dtype, ulps: float = TIE_ULPS) -> torch.Tensor:
    """Rows whose k-th and (k+1)-th largest values are within `ulps` ulps of dtype (0: equal)."""
    if k >= values.shape[-1]:
        return torch.zeros(values.shape[0], dtype=torch.bool)
    top = torch.sort(values.double(), dim=-1, descending=True).values
    kth, next_ = top[:, k - 1], top[:, k]
    finite = torch.isfinite(kth) & torch.isfinite(next_)
    gap = torch.where(finite, kth - next_, torch.full_like(kth, float("inf")))
    return gap <= ulps * _ulp(kth.abs(), dtype)


def _ulp(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    return info.eps * torch.exp2(torch.floor(torch.log2(magnitude.double().clamp(min=info.tiny))))


def _scratch(registration):
    """A registration like the layer's, on fresh tensors (the probe leaves the engine untouched);
    tags distinct, to see the right one copied."""
    if registration is None:
        return None
    from moe_lbl.kernels.topk_router import Registration

    tags = torch.arange(registration.tags.numel(), dtype=registration.tags.dtype,
                        device=registration.tags.device).reshape(registration.tags.shape) + 7

    def fresh(tensor):
        return None if tensor is None else torch.full_like(tensor, -1)

    return Registration(torch.zeros_like(registration.counters), tags, registration.in_forward,
                        fresh(registration.slot), fresh(registration.sequence), fresh(registration.batch))


def _compare_routing(routing_map, want_map, probs, want_probs, dtype) -> Optional[Mismatch]:
    differ = (routing_map != want_map).any(dim=1)
    if differ.any():
        rows = differ.nonzero().flatten().tolist()
        return Mismatch("routing_map", f"{len(rows)} of {len(differ)} rows choose other experts (first: row {rows[0]})")
    outside = probs[~want_map]
    if outside.ne(0).any():
        return Mismatch("probs", f"{int(outside.ne(0).sum())} probs of experts not chosen are not zero")
    chosen, want = probs[want_map].detach().double(), want_probs[want_map].detach().double()
    ulps = ((chosen - want).abs() / _ulp(want.abs(), dtype)).nan_to_num(nan=float("inf"))
    tolerance = TOLERANCES[dtype].probs_ulps
    if ulps.numel() and ulps.max() > tolerance:
        return Mismatch("probs", f"largest error {float(ulps.max()):.1f} ulps of {dtype} (tolerance {tolerance:g})")
    return None


def _compare_counts(field, got, want) -> Optional[Mismatch]:
    if torch.equal(got.long(), want.long()):
        return None
    index = int((got.long() != want.long()).nonzero()[0])
    return Mismatch(field, f"{int(got[index])} at index {index} against Megatron's {int(want[index])}")


def _compare_close(field, got, want, tolerance) -> Optional[Mismatch]:
    got, want = got.double().reshape(-1), want.detach().double().reshape(-1)
    scale = float(want.abs().max().clamp(min=1e-30))
    error = float((got - want).abs().max().nan_to_num(nan=float("inf"))) / scale
    if error <= tolerance:
        return None
    return Mismatch(field, f"largest error {error:.2e} of its largest value (tolerance {tolerance:.1e})")


def _compare_registration(registration, stats) -> Optional[Mismatch]:
    if registration is None:
        return None
    counters = registration.counters.tolist()
    if counters != [1, int(registration.in_forward)]:
        return Mismatch("registration", f"counters {counters} after one registration")
    tag = registration.tags[0]
    expected = {
        "slot": (registration.slot, torch.zeros(1, dtype=torch.long)),
        "sequence": (registration.sequence, torch.cat([stats.aux_counts, stats.dispatch_counts, tag])),
        "batch": (registration.batch, torch.cat([stats.aux_counts, stats.valid_tokens.reshape(1), tag])),
    }
    for name, (got, want) in expected.items():
        if got is not None and not torch.equal(got.cpu(), want.cpu()):
            return Mismatch("registration", f"the {name} vector {got.tolist()} against {want.tolist()}")
    return None


def _compare_gradients(call, out, x_kernels, probs, x_megatron, want_probs, want_score_sums, want_z_sum,
                       want_sequence_sums, generator) -> Optional[Mismatch]:
    """The logits gradient of sum(probs * g) + sum(score_sums * h) + w z_sum + sum(sequence
    score sums * q), for the outputs whose gradients the layer's backward receives, random g, h,
    w and q."""
    device = x_kernels.device
    grad_probs = torch.randn(probs.shape, generator=generator).to(device, call.dtype)
    grad_scores = torch.randn(probs.shape[1], generator=generator).to(device)
    z_weight = float(torch.rand((), generator=generator)) * 1e-2
    grad_sequences = torch.randn(want_sequence_sums.shape, generator=generator).to(device)

    def loss(probs, score_sums, z_sum, sequence_sums):
        total = (probs.float() * grad_probs.float()).sum()
        if "score_sums" in call.gradients:
            total = total + (score_sums.float() * grad_scores).sum()
        if "z_sum" in call.gradients:
            total = total + z_weight * z_sum.float()
        if "sequence_score_sums" in call.gradients:
            total = total + (sequence_sums.float() * grad_sequences).sum()
        return total

    stats = out.stats
    with torch.enable_grad():
        (got,) = torch.autograd.grad(loss(probs, stats.score_sums, stats.z_sum, stats.sequence_score_sums), x_kernels)
        (want,) = torch.autograd.grad(loss(want_probs, want_score_sums, want_z_sum, want_sequence_sums), x_megatron)
    return _compare_close("logits gradient", got, want, TOLERANCES[call.dtype].relative)
