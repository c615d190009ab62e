"""Fused top-k router after the gating GEMM: one pass over the logits forward, one backward.

Naming, as in Megatron-Core's TopKRouter: `logits` [T, E] come from the gating GEMM; `scores`
choose the experts (softmax before or after top-k, or sigmoid plus an optional expert bias);
`probs` [T, E] are the routing probabilities, zero outside the chosen experts, and `topk_probs`
[T, k] the same values at `topk_indices` [T, k]; `routing_map` [T, E] marks the chosen experts.
`aux scores` are the scores of Megatron's compute_routing_scores_for_aux_loss (softmax over all
experts, or sigmoid normalized to sum 1) and `aux counts` the tokens of their own top-k per
expert; `score_sums` [E] are the aux scores summed over valid tokens and `z_sum` the sum of
logsumexp(logits)^2, both differentiable: a loss made of them (the load-balancing loss is
linear in score_sums, the z-loss in z_sum) back-propagates through the same backward kernel.

Forward, per token, in one kernel (`topk_router_details/_forward.py`): the routing of Megatron-Core's
`topk_routing_with_score_function` (softmax or sigmoid scores, expert bias for selection only,
group-limited top-k, renormalization, scaling factor), its dense outputs (probs and routing map)
or sparse ones (topk_probs), topk_indices, the logsumexp, and the balancing statistics (aux
counts, aux-score sums, dispatched tokens, sum of lse^2). Backward, in one kernel
(`_backward.py`): the logits gradient of the routing (from the chosen experts only) plus those
of score_sums and z_sum: their gradients arrive through autograd when backward runs, so a
balancing loss whose weights depend on counts summed over ranks (an all-reduce launched in
forward, waited for in backward) needs no other channel.

Top-k: each score becomes a unique integer key, its order-preserving bits above the expert index,
and ties break toward the lower expert index (torch.topk promises no order among ties; on CPU it
may pick the higher). Each thread sorts the keys it holds; k rounds then merge those runs, one
reduction of their heads a round. fp32 scores that only choose a set (dense outputs, counts) use
32-bit keys without the index, with the same tie order (_common.merge_values). Roundings follow
Megatron: scores that
Megatron holds in the logits dtype are rounded to it before they are compared or normalized, so
bf16 routing matches Megatron's bf16 routing up to the experts chosen among exactly tied scores.

Grid: persistent, as many programs as fit on the GPU at once; each walks blocks of BLOCK_T rows.
A row's experts sit in a [BLOCK_G, BLOCK_GS] tile (groups x experts per group; one group without
group-limited routing), padded to powers of two. Statistics accumulate per program and are
reduced in a fixed order: counts are exact integers, float sums deterministic for a given GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from moe_lbl.kernels import launcher, triton_compat
from moe_lbl.kernels.launcher import interpreting
from moe_lbl.kernels.topk_router_details._ops import routing_args
from moe_lbl.kernels.topk_router_details._spec import (
    FUSED_SCORE_FUNCTIONS,
    MAX_EXPERTS,
    MAX_TOPK,
    SUPPORTED_DTYPES,
    Launch,
    RoutingSpec,
)

__all__ = ["FUSED_SCORE_FUNCTIONS", "MAX_EXPERTS", "MAX_TOPK", "SUPPORTED_DTYPES", "Launch", "Registration",
           "RouterOutput", "RouterStats", "RoutingSpec", "fused_topk_router", "load_router",
           "specialization_key", "topk_routing_with_score_function"]


@dataclass
class RouterStats:
    """Statistics of one forward, for the balancing losses (padding tokens excluded).

    aux_counts: tokens per expert under the top-k of the aux scores (int64 [E]);
    dispatch_counts: tokens per expert of the routing map (int64 [E]);
    score_sums: per-expert sums of the aux scores (fp32 [E]; differentiable);
    valid_tokens: non-padding tokens (int64 scalar tensor);
    z_sum: sum of logsumexp(logits)^2 over valid tokens (fp32 scalar tensor; differentiable), or
        None where the call did not compute it (compute_z=False);
    sequence_aux_counts, sequence_score_sums: aux_counts and score_sums per sequence (int64 and
        fp32 [S, E]; the second differentiable), where the call named S sequences, else None.
    """

    aux_counts: torch.Tensor
    dispatch_counts: torch.Tensor
    score_sums: torch.Tensor
    valid_tokens: torch.Tensor
    z_sum: Optional[torch.Tensor]
    sequence_aux_counts: Optional[torch.Tensor] = None
    sequence_score_sums: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class Registration:
    """A balancing engine's registration of the micro-batch, which the statistics kernel fills
    from the statistics it has just summed (moe_lbl.engine.LoadBalancer.prepare makes one).

    counters: int64 [2], registrations in the step and those in forward: the first is this
        registration's tag slot, and both are incremented (the second where in_forward).
    tags: int64 [slots, 3], the tag each slot's count sums carry.
    slot: int64 [1] to fill with the slot; sequence: int64 [2E + 3] to fill with [aux counts,
    dispatched counts, tag], and batch: int64 [E + 4] with [aux counts, valid tokens, tag], the
    vectors the engine sums over its groups (None: no such sum, and slot None when neither).
    """

    counters: torch.Tensor
    tags: torch.Tensor
    in_forward: bool
    slot: Optional[torch.Tensor] = None
    sequence: Optional[torch.Tensor] = None
    batch: Optional[torch.Tensor] = None


@dataclass
class RouterOutput:
    probs: Optional[torch.Tensor]  # [T, E], logits dtype, zero outside the chosen experts (dense=True)
    routing_map: Optional[torch.Tensor]  # [T, E] bool (dense=True)
    topk_indices: Optional[torch.Tensor]  # [T, k] int32, in selection order, highest score first (sparse=True)
    topk_probs: Optional[torch.Tensor]  # [T, k] logits dtype: probs at topk_indices (sparse=True)
    stats: Optional[RouterStats]


def _check_logits(logits):
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a 2-D tensor [tokens, experts], got {getattr(logits, 'shape', type(logits))}")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"logits dtype must be one of {SUPPORTED_DTYPES}, got {logits.dtype}")
    if logits.stride(1) != 1:
        raise ValueError("logits must be contiguous along the expert dimension: pass logits.contiguous()")
    if not (logits.is_cuda or logits.is_meta or interpreting()):
        raise RuntimeError("the fused router runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1)")


def _check_side_inputs(logits, expert_bias, padding_mask, spec: RoutingSpec):
    if expert_bias is not None and expert_bias.shape != (spec.num_experts,):
        raise ValueError(f"expert_bias must have shape ({spec.num_experts},), got {tuple(expert_bias.shape)}")
    if padding_mask is not None and (padding_mask.dtype != torch.bool or padding_mask.numel() != logits.shape[0]):
        raise ValueError(f"padding_mask must be a bool tensor with {logits.shape[0]} elements (True = padding)")


class _FusedTopKRouter(torch.autograd.Function):
    """Outputs: probs, routing_map, topk_indices, topk_probs, counts [2, E] (aux, dispatched),
    score_sums, valid_tokens, z_sum, sequence aux counts, sequence score sums (None where not
    asked for); probs, topk_probs, score_sums, z_sum and sequence score sums are differentiable."""

    @staticmethod
    def forward(ctx, logits, expert_bias, padding_mask, spec, compute_stats, compute_z, dense, sparse, sequences,
                launch, registration):
        routing = routing_args(spec, launch)
        r = registration
        outputs = torch.ops.moe_lbl.topk_router_forward(
            logits, expert_bias, padding_mask, *routing, compute_stats, compute_z, dense, sparse, sequences,
            *((r.counters, r.tags, r.slot, r.sequence, r.batch, r.in_forward) if r is not None
              else (None, None, None, None, None, False)))
        _, routing_map, topk_indices, _, counts, _, valid_tokens, _, sequence_counts, _ = outputs
        # The backward finds the chosen experts in the routing map (dense) or topk_indices (sparse).
        ctx.save_for_backward(logits, routing_map, topk_indices, padding_mask)
        ctx.routing = routing
        ctx.mark_non_differentiable(*(t for t in (routing_map, topk_indices, counts, valid_tokens, sequence_counts)
                                      if t is not None))
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: nothing to read
        return outputs

    @staticmethod
    def backward(ctx, grad_probs, _grad_map, _grad_indices, grad_topk_probs, _grad_counts, grad_score_sums,
                 _grad_valid, grad_z_sum, _grad_sequence_counts, grad_sequence_scores):
        logits, routing_map, topk_indices, padding_mask = ctx.saved_tensors
        grad = torch.ops.moe_lbl.topk_router_backward(
            logits, routing_map, topk_indices, padding_mask, _contiguous(grad_probs), _contiguous(grad_topk_probs),
            _contiguous(grad_score_sums, torch.float32), _contiguous(grad_z_sum, torch.float32),
            _contiguous(grad_sequence_scores, torch.float32), *ctx.routing)
        return grad, None, None, None, None, None, None, None, None, None, None


def _contiguous(tensor: Optional[torch.Tensor], dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
    """What the kernels read: contiguous, in `dtype` (kernels only ever to copy where it is not)."""
    if tensor is None:
        return None
    return tensor.to(dtype or tensor.dtype).contiguous()


def fused_topk_router(
    logits: torch.Tensor,
    topk: int,
    *,
    score_function: str = "softmax",
    use_pre_softmax: bool = False,
    num_groups: Optional[int] = None,
    group_topk: Optional[int] = None,
    scaling_factor: Optional[float] = None,
    expert_bias: Optional[torch.Tensor] = None,
    padding_mask: Optional[torch.Tensor] = None,
    compute_stats: bool = True,
    compute_z: bool = True,
    dense: bool = True,
    sparse: bool = True,
    sequences: Optional[int] = None,
    launch: Optional[Launch] = None,
    registration: Optional[Registration] = None,
) -> RouterOutput:
    """Routing plus balancing statistics in one pass over the logits; gradients in one more.

    dense: return probs and routing_map [T, E]; sparse: return topk_probs [T, k] (topk_indices
    always). padding_mask: [T] bool, True for padding tokens (excluded from the statistics).
    probs, topk_probs and the statistics score_sums and z_sum are differentiable: whatever
    gradients reach them when backward runs, one kernel turns into the logits gradient.
    expert_bias is used with sigmoid only. compute_z=False (with compute_stats): no z_sum, and no
    logsumexp per token (a run without z-loss). sequences (with compute_stats): the tokens are
    laid out [s, sequences], as Megatron's [s, b] (token t of sequence t % sequences); the
    statistics then also hold the aux counts and score sums of each sequence (seq_aux_loss).
    registration (with compute_stats): where the statistics also register the micro-batch with a
    balancing engine.
    """
    _check_logits(logits)
    spec = RoutingSpec(logits.shape[1], topk, score_function, use_pre_softmax, num_groups, group_topk, scaling_factor)
    _check_side_inputs(logits, expert_bias, padding_mask, spec)
    if not (dense or sparse):
        raise ValueError("fused_topk_router needs dense=True (probs, routing_map) or sparse=True (topk_probs)")
    if sequences is not None and (not isinstance(sequences, int) or sequences < 1
                                  or logits.shape[0] % sequences):
        raise ValueError(f"sequences must be a positive int dividing the {logits.shape[0]} tokens (laid out "
                         f"[s, sequences]), got {sequences!r}")
    if sequences is not None and not compute_stats:
        raise ValueError("sequences names the per-sequence statistics: it needs compute_stats=True")
    if padding_mask is not None:
        padding_mask = padding_mask.reshape(-1).contiguous()
    # As Megatron: the expert bias only adds to sigmoid scores, in fp32.
    expert_bias = _contiguous(expert_bias, torch.float32) if score_function == "sigmoid" else None
    (probs, routing_map, topk_indices, topk_probs, counts, score_sums, valid_tokens, z_sum, sequence_counts,
     sequence_scores) = _FusedTopKRouter.apply(logits, expert_bias, padding_mask, spec, compute_stats, compute_z, dense,
                                               sparse, sequences or 0, launch or Launch(), registration)
    stats = RouterStats(counts[0], counts[1], score_sums, valid_tokens, z_sum, sequence_counts,
                        sequence_scores) if compute_stats else None
    return RouterOutput(probs, routing_map, topk_indices, topk_probs, stats)


# The outputs whose gradients a backward may receive (load_router's `gradients`).
DIFFERENTIABLE_OUTPUTS = ("probs", "topk_probs", "score_sums", "z_sum", "sequence_score_sums")
_loads: dict = {}  # specialization -> None (loaded) or the exception its first launch would raise


def load_router(logits: torch.Tensor, topk: int, *, gradients: tuple[str, ...] = (),
                specialization: Optional[tuple] = None, **options) -> None:
    """Compile and load, on the CUDA device of `logits`, the kernels that fused_topk_router(logits,
    topk, **options) launches, and the backward that receives the gradients of `gradients` (names
    from DIFFERENTIABLE_OUTPUTS); nothing runs. Once per specialization of the kernels: later
    calls return at once, or raise again what the first one raised (a compile error, too many
    resources for the device).

    Tensor options (expert_bias, padding_mask, a registration's) only need the right shape and
    dtype: everything is traced on meta tensors. specialization: this call's specialization_key,
    where the caller has it already.
    """
    key = specialization or specialization_key(logits, topk, gradients=gradients, **options)
    if key not in _loads:
        try:
            _compile_and_load(logits, topk, gradients, options)
            _loads[key] = None
        except Exception as error:  # whatever the first launch would raise
            _loads[key] = error
    if _loads[key] is not None:
        raise _loads[key]


def specialization_key(logits: torch.Tensor, topk: int, *, gradients: tuple[str, ...] = (), **options) -> tuple:
    """What fused_topk_router(logits, topk, **options) and the backward receiving `gradients`
    compile for, on the device of `logits`: calls with equal keys run the same compiled kernels.
    A tensor option counts by its dtype (or absence): Triton specializes pointers on their dtype,
    not on the shape of what they point to, so a padding mask of another length is the same key."""
    unknown = set(gradients) - set(DIFFERENTIABLE_OUTPUTS)
    if unknown:
        raise ValueError(f"unknown gradients {sorted(unknown)}: choose from {', '.join(DIFFERENTIABLE_OUTPUTS)}")
    num_tokens, num_experts = logits.shape
    described = tuple(sorted((name, _describe(value)) for name, value in options.items()))
    return (logits.device, logits.dtype, num_experts, topk, triton_compat.integer_specialization(num_tokens),
            triton_compat.integer_specialization(logits.stride(0)), tuple(sorted(gradients)), described)


def _describe(value):
    """What of an option the kernels specialize on: a tensor's dtype, a registration's tensors'."""
    if isinstance(value, torch.Tensor):
        return value.dtype
    if isinstance(value, Registration):
        return tuple(_describe(getattr(value, name)) for name in Registration.__dataclass_fields__)
    return value


def _compile_and_load(logits, topk, gradients, options) -> None:
    meta = torch.device("meta")

    def like(t):
        return None if t is None else torch.empty(t.shape, dtype=t.dtype, device=meta)

    options = dict(options, **{name: like(options.get(name)) for name in ("expert_bias", "padding_mask")})
    registration = options.get("registration")
    if registration is not None:
        options["registration"] = Registration(*(like(v) if isinstance(v, torch.Tensor) else v for v in (
            getattr(registration, name) for name in Registration.__dataclass_fields__)))
    traced = torch.empty(logits.shape, dtype=logits.dtype, device=meta, requires_grad=bool(gradients))
    with launcher.capture() as launches, torch.enable_grad():
        out = fused_topk_router(traced, topk, **options)
        stats = out.stats
        outputs = {"probs": out.probs, "topk_probs": out.topk_probs, **(
            {"score_sums": stats.score_sums, "z_sum": stats.z_sum, "sequence_score_sums": stats.sequence_score_sums}
            if stats is not None else {})}
        if gradients:
            torch.autograd.backward([outputs[name] for name in gradients],
                                    [torch.empty_like(outputs[name]) for name in gradients])
    with torch.cuda.device(logits.device):
        launcher.load(launches)


def topk_routing_with_score_function(
    logits: torch.Tensor,
    topk: int,
    use_pre_softmax: bool = False,
    num_groups: Optional[int] = None,
    group_topk: Optional[int] = None,
    scaling_factor: Optional[float] = None,
    score_function: str = "softmax",
    expert_bias: Optional[torch.Tensor] = None,
    fused: bool = False,
    router_replay=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Megatron-Core 0.16's function of this name, fused: returns (routing_probs, routing_map).

    `fused` is accepted for signature compatibility (this path is always fused);
    router replay is not supported.
    """
    if router_replay is not None:
        raise ValueError("router_replay is not supported by the fused router; use Megatron's PyTorch path")
    out = fused_topk_router(logits, topk, score_function=score_function, use_pre_softmax=use_pre_softmax,
                            num_groups=num_groups, group_topk=group_topk, scaling_factor=scaling_factor,
                            expert_bias=expert_bias, compute_stats=False, sparse=False)
    return out.probs, out.routing_map
