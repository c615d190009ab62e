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
so a round is one max reduction and ties break toward the lower expert index (torch.topk promises
no order among ties; on CPU it may pick the higher). Roundings follow Megatron: scores that
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
import triton

from moe_lbl.kernels import launcher, triton_compat
from moe_lbl.kernels.launcher import interpreting
from moe_lbl.kernels.topk_router_details._backward import router_backward
from moe_lbl.kernels.topk_router_details._forward import router_forward

MAX_EXPERTS = 2048
MAX_TOPK = 16
FUSED_SCORE_FUNCTIONS = ("softmax", "sigmoid")  # of moe_lbl.scores.SCORE_FUNCTIONS, those the kernels route
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_VALUE_BITS = {torch.bfloat16: 16, torch.float16: 19, torch.float32: 32}  # significant bits of the fp32 pattern


@dataclass(frozen=True)
class RoutingSpec:
    """The routing options of Megatron-Core's topk_routing_with_score_function."""

    num_experts: int
    topk: int
    score_function: str = "softmax"
    use_pre_softmax: bool = False
    num_groups: Optional[int] = None
    group_topk: Optional[int] = None
    scaling_factor: Optional[float] = None

    def __post_init__(self):
        e, k = self.num_experts, self.topk
        if self.score_function not in FUSED_SCORE_FUNCTIONS:
            raise ValueError(f"score_function must be one of {FUSED_SCORE_FUNCTIONS}, got {self.score_function!r}")
        if not 1 <= e <= MAX_EXPERTS:
            raise ValueError(f"the fused router supports 1 to {MAX_EXPERTS} experts, got {e}")
        if not 1 <= k <= min(e, MAX_TOPK):
            raise ValueError(f"topk must be in [1, min(num_experts, {MAX_TOPK})] = [1, {min(e, MAX_TOPK)}], got {k}")
        if self.group_topk:
            g = self.num_groups
            if not g or e % g:
                raise ValueError(f"num_experts ({e}) must be divisible by num_groups ({g}) for group-limited top-k")
            if not 1 <= self.group_topk <= g:
                raise ValueError(f"group_topk must be in [1, num_groups={g}], got {self.group_topk}")
            per_group = k // self.group_topk
            if per_group < 1 or per_group > e // g or k > self.group_topk * (e // g):
                raise ValueError(
                    f"topk ({k}) must allow topk // group_topk >= 1 experts per chosen group and fit in "
                    f"group_topk ({self.group_topk}) groups of {e // g} experts")

    @property
    def grouped(self) -> bool:
        return bool(self.group_topk)


@dataclass
class RouterStats:
    """Statistics of one forward, for the balancing losses (padding tokens excluded).

    aux_counts: tokens per expert under the top-k of the aux scores (int64 [E]);
    dispatch_counts: tokens per expert of the routing map (int64 [E]);
    score_sums: per-expert sums of the aux scores (fp32 [E]; differentiable);
    valid_tokens: non-padding tokens (int64 scalar tensor);
    z_sum: sum of logsumexp(logits)^2 over valid tokens (fp32 scalar tensor; differentiable).
    """

    aux_counts: torch.Tensor
    dispatch_counts: torch.Tensor
    score_sums: torch.Tensor
    valid_tokens: torch.Tensor
    z_sum: torch.Tensor


@dataclass
class RouterOutput:
    probs: Optional[torch.Tensor]  # [T, E], logits dtype, zero outside the chosen experts (dense=True)
    routing_map: Optional[torch.Tensor]  # [T, E] bool (dense=True)
    topk_indices: Optional[torch.Tensor]  # [T, k] int32, in selection order, highest score first (sparse=True)
    topk_probs: Optional[torch.Tensor]  # [T, k] logits dtype: probs at topk_indices (sparse=True)
    stats: Optional[RouterStats]


@dataclass(frozen=True)
class Launch:
    """Block and grid sizes; None picks the default (interpreter tests pass larger blocks)."""

    block_t: Optional[int] = None
    num_programs: Optional[int] = None
    num_warps: Optional[int] = None


@dataclass(frozen=True)
class _Tiles:
    """Block shape of one launch: BLOCK_T rows x [BLOCK_G, BLOCK_GS] experts, KP >= k."""

    groups: int
    group_size: int
    block_t: int
    block_g: int
    block_gs: int
    kp: int
    num_warps: int

    @staticmethod
    def of(spec: RoutingSpec, launch: Launch) -> "_Tiles":
        groups = spec.num_groups if spec.grouped else 1
        group_size = spec.num_experts // groups
        block_g, block_gs = triton.next_power_of_2(groups), triton.next_power_of_2(group_size)
        width = block_g * block_gs
        # About 8 elements of a [BLOCK_T, E] tile per thread keeps registers low enough for
        # several CTAs per SM with nothing spilled.
        num_warps = launch.num_warps or (4 if width <= 1024 else 8)
        block_t = triton.next_power_of_2(launch.block_t or max(1, 32 * num_warps * 8 // width))
        return _Tiles(groups, group_size, block_t, block_g, block_gs, triton.next_power_of_2(spec.topk), num_warps)

    def constexprs(self) -> dict:
        return dict(G=self.groups, GS=self.group_size, BLOCK_T=self.block_t, BLOCK_G=self.block_g,
                    BLOCK_GS=self.block_gs, KP=self.kp, num_warps=self.num_warps,
                    INTERPRETED=interpreting())  # its casts truncate and it has no libdevice


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every output buffer comes from here (tests poison it to prove each element is written)."""
    return torch.empty(shape, dtype=dtype, device=device)


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


def _forward(logits, expert_bias, padding_mask, spec: RoutingSpec, compute_stats: bool, dense: bool, sparse: bool,
             launch: Launch) -> RouterOutput:
    num_tokens, num_experts = logits.shape
    k, device = spec.topk, logits.device
    tiles = _Tiles.of(spec, launch)
    probs = _empty((num_tokens, num_experts), logits.dtype, device) if dense else None
    routing_map = _empty((num_tokens, num_experts), torch.bool, device) if dense else None
    topk_indices = _empty((num_tokens, k), torch.int32, device) if sparse else None
    topk_probs = _empty((num_tokens, k), logits.dtype, device) if sparse else None
    use_bias = spec.score_function == "sigmoid" and expert_bias is not None  # as Megatron: sigmoid only
    softmax = spec.score_function == "softmax"
    # The aux-loss top-k (of fp32 softmax, or of the normalized sigmoid) is the routing top-k
    # only when both rank the same values: softmax keeps the logits' order, so post-softmax
    # routing over all experts (or pre-softmax on fp32 logits) ranks what the aux scores rank.
    separate_aux = spec.grouped or not softmax or (spec.use_pre_softmax and logits.dtype != torch.float32)
    padding = padding_mask.view(torch.uint8) if padding_mask is not None else None
    partials = []

    def args(programs):
        partials[:] = [_empty((programs, 2, num_experts), torch.int32, device),
                       _empty((programs, num_experts), torch.float32, device),
                       _empty((programs,), torch.float32, device)]
        return (logits, logits.stride(0), num_tokens,
                expert_bias.float().contiguous() if use_bias else logits,
                padding if padding is not None else logits, float(spec.scaling_factor or 1.0),
                probs if dense else logits, routing_map.view(torch.uint8) if dense else logits,
                topk_indices if sparse else logits, topk_probs if sparse else logits, *partials)

    constexprs = dict(
        E=num_experts, K=k, GROUP_TOPK=spec.group_topk or 0, SOFTMAX=softmax,
        PRE_SOFTMAX=bool(spec.use_pre_softmax), HAS_BIAS=use_bias, HAS_PADDING=padding is not None,
        HAS_SCALING=bool(spec.scaling_factor), LOGIT_BITS=_VALUE_BITS[logits.dtype],
        SELECT_BITS=32 if use_bias else _VALUE_BITS[logits.dtype],  # bias promotes scores to fp32
        WRITE_DENSE=dense, WRITE_SPARSE=sparse, COMPUTE_STATS=compute_stats, SEPARATE_AUX_TOPK=separate_aux,
        **tiles.constexprs())
    programs = launcher.programs(router_forward, triton.cdiv(num_tokens, tiles.block_t), launch.num_programs,
                                 device, args, constexprs)
    launch_args = args(programs)
    if num_tokens > 0:
        launcher.launch(router_forward, programs, *launch_args, **constexprs)
    stats = None
    if compute_stats:
        counts_partial, scores_partial, z_partial = partials
        if num_tokens == 0:  # nothing was launched
            for partial in partials:
                partial.zero_()
        counts = counts_partial.sum(dim=0, dtype=torch.int64)
        valid = (torch.full((), num_tokens, device=device) if padding_mask is None  # a fill: no host copy
                 else num_tokens - padding_mask.sum())
        stats = RouterStats(aux_counts=counts[0], dispatch_counts=counts[1] if separate_aux else counts[0],
                            score_sums=scores_partial.sum(dim=0), valid_tokens=valid.to(torch.int64),
                            z_sum=z_partial.sum())
    return RouterOutput(probs, routing_map, topk_indices, topk_probs, stats)


def _backward(logits, grad_probs, grad_topk_probs, routing_map, topk_indices, padding_mask, grad_score_sums,
              grad_z_sum, spec: RoutingSpec, launch: Launch) -> torch.Tensor:
    num_tokens, num_experts = logits.shape
    grad_logits = _empty(tuple(logits.shape), logits.dtype, logits.device)
    if num_tokens == 0:
        return grad_logits
    tiles = _Tiles.of(spec, launch)
    padding = padding_mask.view(torch.uint8) if padding_mask is not None else None
    launch_args = (
        logits, logits.stride(0), num_tokens, routing_map.view(torch.uint8) if routing_map is not None else logits,
        topk_indices if topk_indices is not None else logits, padding if padding is not None else logits,
        float(spec.scaling_factor or 1.0),
        grad_probs.contiguous() if grad_probs is not None else logits,
        grad_topk_probs.contiguous() if grad_topk_probs is not None else logits,
        grad_score_sums if grad_score_sums is not None else logits,
        grad_z_sum if grad_z_sum is not None else logits,
        grad_logits)
    constexprs = dict(
        E=num_experts, K=spec.topk, GROUP_TOPK=spec.group_topk or 0, SOFTMAX=spec.score_function == "softmax",
        PRE_SOFTMAX=bool(spec.use_pre_softmax), HAS_PADDING=padding is not None,
        HAS_SCALING=bool(spec.scaling_factor), HAS_GRAD_PROBS=grad_probs is not None,
        HAS_GRAD_TOPK_PROBS=grad_topk_probs is not None, HAS_LBL=grad_score_sums is not None,
        HAS_Z=grad_z_sum is not None, **tiles.constexprs())
    programs = launcher.programs(router_backward, triton.cdiv(num_tokens, tiles.block_t), launch.num_programs,
                                 logits.device, lambda _: launch_args, constexprs)
    launcher.launch(router_backward, programs, *launch_args, **constexprs)
    return grad_logits


_STATS = tuple(RouterStats.__dataclass_fields__)  # the statistics, in the Function's outputs after the routing's


class _FusedTopKRouter(torch.autograd.Function):
    """Outputs: probs, routing_map, topk_indices, topk_probs, then the RouterStats fields (None
    where not asked for); probs, topk_probs, score_sums and z_sum are differentiable."""

    @staticmethod
    def forward(ctx, logits, expert_bias, padding_mask, spec, compute_stats, dense, sparse, launch):
        out = _forward(logits, expert_bias, padding_mask, spec, compute_stats, dense, sparse, launch)
        stats = out.stats
        # The backward finds the chosen experts in the routing map (dense) or topk_indices (sparse).
        ctx.save_for_backward(logits, out.routing_map, out.topk_indices, padding_mask)
        ctx.spec, ctx.launch = spec, launch
        integers = (out.routing_map, out.topk_indices) + (
            (stats.aux_counts, stats.dispatch_counts, stats.valid_tokens) if stats is not None else ())
        ctx.mark_non_differentiable(*(t for t in integers if t is not None))
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: nothing to read
        statistics = tuple(getattr(stats, name) for name in _STATS) if stats is not None else (None,) * len(_STATS)
        return (out.probs, out.routing_map, out.topk_indices, out.topk_probs, *statistics)

    @staticmethod
    def backward(ctx, grad_probs, _grad_map, _grad_indices, grad_topk_probs, *grad_stats):
        logits, routing_map, topk_indices, padding_mask = ctx.saved_tensors
        grads = dict(zip(_STATS, grad_stats))
        grad_score_sums, grad_z_sum = grads["score_sums"], grads["z_sum"]
        if grad_score_sums is not None:
            grad_score_sums = grad_score_sums.to(torch.float32).contiguous()
        if grad_z_sum is not None:
            grad_z_sum = grad_z_sum.to(torch.float32).reshape(1)
        grad = _backward(logits, grad_probs, grad_topk_probs, routing_map, topk_indices, padding_mask,
                         grad_score_sums, grad_z_sum, ctx.spec, ctx.launch)
        return grad, None, None, None, None, None, None, None


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
    dense: bool = True,
    sparse: bool = True,
    launch: Launch = Launch(),
) -> RouterOutput:
    """Routing plus balancing statistics in one pass over the logits; gradients in one more.

    dense: return probs and routing_map [T, E]; sparse: return topk_probs [T, k] (topk_indices
    always). padding_mask: [T] bool, True for padding tokens (excluded from the statistics).
    probs, topk_probs and the statistics score_sums and z_sum are differentiable: whatever
    gradients reach them when backward runs, one kernel turns into the logits gradient.
    expert_bias is used with sigmoid only.
    """
    _check_logits(logits)
    spec = RoutingSpec(logits.shape[1], topk, score_function, use_pre_softmax, num_groups, group_topk, scaling_factor)
    _check_side_inputs(logits, expert_bias, padding_mask, spec)
    if not (dense or sparse):
        raise ValueError("fused_topk_router needs dense=True (probs, routing_map) or sparse=True (topk_probs)")
    if padding_mask is not None:
        padding_mask = padding_mask.reshape(-1).contiguous()
    probs, routing_map, topk_indices, topk_probs, *statistics = _FusedTopKRouter.apply(
        logits, expert_bias, padding_mask, spec, compute_stats, dense, sparse, launch)
    stats = RouterStats(*statistics) if compute_stats else None
    return RouterOutput(probs, routing_map, topk_indices, topk_probs, stats)


# The outputs whose gradients a backward may receive (load_router's `gradients`).
DIFFERENTIABLE_OUTPUTS = ("probs", "topk_probs", "score_sums", "z_sum")
_loads: dict = {}  # specialization -> None (loaded) or the exception its first launch would raise


def load_router(logits: torch.Tensor, topk: int, *, gradients: tuple[str, ...] = (), **options) -> None:
    """Compile and load, on the CUDA device of `logits`, the kernels that fused_topk_router(logits,
    topk, **options) launches, and the backward that receives the gradients of `gradients` (names
    from DIFFERENTIABLE_OUTPUTS); nothing runs. Once per specialization of the kernels: later
    calls return at once, or raise again what the first one raised (a compile error, too many
    resources for the device).

    Tensor options (expert_bias, padding_mask) only need the right shape and dtype: everything is
    traced on meta tensors.
    """
    unknown = set(gradients) - set(DIFFERENTIABLE_OUTPUTS)
    if unknown:
        raise ValueError(f"unknown gradients {sorted(unknown)}: choose from {', '.join(DIFFERENTIABLE_OUTPUTS)}")
    num_tokens, num_experts = logits.shape
    described = tuple(sorted((name, (value.dtype, tuple(value.shape)) if isinstance(value, torch.Tensor) else value)
                             for name, value in options.items()))
    key = (logits.device, logits.dtype, num_experts, topk, triton_compat.integer_specialization(num_tokens),
           triton_compat.integer_specialization(logits.stride(0)), tuple(sorted(gradients)), described)
    if key not in _loads:
        try:
            _compile_and_load(logits, topk, gradients, options)
            _loads[key] = None
        except Exception as error:  # whatever the first launch would raise
            _loads[key] = error
    if _loads[key] is not None:
        raise _loads[key]


def _compile_and_load(logits, topk, gradients, options) -> None:
    meta = torch.device("meta")

    def like(t):
        return None if t is None else torch.empty(t.shape, dtype=t.dtype, device=meta)

    options = dict(options, **{name: like(options.get(name)) for name in ("expert_bias", "padding_mask")})
    traced = torch.empty(logits.shape, dtype=logits.dtype, device=meta, requires_grad=bool(gradients))
    with launcher.capture() as launches, torch.enable_grad():
        out = fused_topk_router(traced, topk, **options)
        outputs = {"probs": out.probs, "topk_probs": out.topk_probs, **(
            {"score_sums": out.stats.score_sums, "z_sum": out.stats.z_sum} if out.stats is not None else {})}
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
