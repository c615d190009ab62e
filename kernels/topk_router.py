"""Fused top-k router after the gating GEMM: one pass over the logits forward, one backward.

Forward, per token (a row of logits [T, E]), in one kernel:
- the routing of Megatron-Core 0.16's `topk_routing_with_score_function`: softmax (pre- or
  post-top-k) or sigmoid scores, expert bias for selection only (sigmoid), group-limited top-k,
  renormalization and scaling factor; dense probs and routing map, sparse indices and weights;
- the statistics of the balancing losses: per-expert counts of the aux-loss top-k (the
  scores of `compute_routing_scores_for_aux_loss`), per-expert sums of those scores, dispatched
  tokens per expert, and the logsumexp for the z-loss.
Backward, in one kernel: the logits gradient from the probs (and sparse weights) gradient, plus
the load-balancing loss gradient (a per-expert constant d loss / d score from the engine) plus
the z-loss gradient (a scalar times logsumexp times softmax).

Layout: a persistent grid; each program walks blocks of BLOCK_T rows. A row's experts sit in a
[BLOCK_G, BLOCK_GS] tile (groups x experts per group; one group without group-limited routing),
padded to powers of two. Top-k is k rounds of max then lowest-index argmax, so ties break toward
the lower expert index (torch.topk promises no order among ties; on CPU it may pick the higher).
Statistics accumulate per program in registers and are written as per-program partials, reduced
in a fixed order on the host side: counts are exact integers, float sums are deterministic for a
given grid.

Roundings follow Megatron: scores that Megatron holds in the logits dtype are rounded to it
before they are compared or normalized, so bf16 routing matches Megatron's bf16 routing up to
the experts chosen among exactly tied scores.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import triton
import triton.language as tl

NEG_INF: tl.constexpr = float("-inf")
NO_INDEX: tl.constexpr = 1 << 30
SIGMOID_EPS: tl.constexpr = 1e-20  # Megatron's renormalization epsilon
MAX_EXPERTS = 2048
MAX_TOPK = 16
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _row_max(v):
    return tl.max(tl.max(v, 2), 1)


@triton.jit
def _row_sum(v):
    return tl.sum(tl.sum(v, 2), 1)


@triton.jit
def _round(v, DTYPE: tl.constexpr):
    """Round fp32 values to DTYPE (to nearest, ties to even) and back: Megatron's value there."""
    if DTYPE == tl.bfloat16:
        # By hand: Triton's interpreter truncates fp32 -> bf16 casts; the GPU rounds to nearest.
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    elif DTYPE == tl.float16:
        return v.to(tl.float16).to(tl.float32)
    else:
        return v


@triton.jit
def _expert_tile(G, GS, BLOCK_G: tl.constexpr, BLOCK_GS: tl.constexpr):
    """Expert index and validity of a [1, BLOCK_G, BLOCK_GS] tile (groups x experts per group)."""
    g3 = tl.arange(0, BLOCK_G)[None, :, None]
    j3 = tl.arange(0, BLOCK_GS)[None, None, :]
    return g3 * GS + j3, (g3 < G) & (j3 < GS), j3


@triton.jit
def _load_block(logits_ptr, block, num_tokens, stride_t, expert, col_ok, BLOCK_T: tl.constexpr):
    """Rows of one block and their logits in fp32 (-inf outside the experts)."""
    rows = block * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)  # int64: T * E may pass 2**31
    row_ok = rows < num_tokens
    ok = row_ok[:, None, None] & col_ok
    x = tl.load(logits_ptr + rows[:, None, None] * stride_t + expert, mask=ok, other=0.0).to(tl.float32)
    return rows, row_ok, ok, tl.where(col_ok, x, NEG_INF)


@triton.jit
def _take_max(values, taken, expert, col_ok):
    """One top-k round: the lowest expert index among the row maxima of untaken entries."""
    candidates = tl.where(taken, NEG_INF, values)
    best = _row_max(candidates)
    hit = (candidates == best[:, None, None]) & (taken == 0) & col_ok
    return tl.min(tl.min(tl.where(hit, expert, NO_INDEX), 2), 1)


@triton.jit
def _router_fwd_kernel(
    logits_ptr, bias_ptr, padding_ptr,
    probs_ptr, map_ptr, indices_ptr, weights_ptr, lse_ptr,
    counts_partial_ptr, scores_partial_ptr, z_partial_ptr,
    num_tokens, stride_t, scaling_factor,
    E: tl.constexpr, K: tl.constexpr, G: tl.constexpr, GS: tl.constexpr,
    GROUP_TOPK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_GS: tl.constexpr,
    SOFTMAX: tl.constexpr, PRE_SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_PADDING: tl.constexpr, HAS_SCALING: tl.constexpr,
    COMPUTE_STATS: tl.constexpr, SEPARATE_AUX_TOPK: tl.constexpr, ROUND_SELECT: tl.constexpr,
):
    DTYPE: tl.constexpr = logits_ptr.dtype.element_ty
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    expert, col_ok, j3 = _expert_tile(G, GS, BLOCK_G, BLOCK_GS)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert, mask=col_ok, other=0.0).to(tl.float32)
    count_aux = tl.zeros([BLOCK_G, BLOCK_GS], tl.int32)
    count_dispatch = tl.zeros([BLOCK_G, BLOCK_GS], tl.int32)
    score_sum = tl.zeros([BLOCK_G, BLOCK_GS], tl.float32)
    z_sum = tl.zeros([BLOCK_T], tl.float32)

    for block in range(pid, tl.cdiv(num_tokens, BLOCK_T), num_programs):
        rows, row_ok, ok, x = _load_block(logits_ptr, block, num_tokens, stride_t, expert, col_ok, BLOCK_T)
        r3 = rows[:, None, None]
        row_max = _row_max(x)
        shifted = tl.exp(x - row_max[:, None, None])
        denominator = _row_sum(shifted)
        softmax = shifted / denominator[:, None, None]
        lse = row_max + tl.log(denominator)
        tl.store(lse_ptr + rows, lse, mask=row_ok)

        # Scores that choose the experts, as Megatron compares them.
        if SOFTMAX:
            if PRE_SOFTMAX:
                select = _round(softmax, DTYPE)
            else:
                select = x
        else:
            sigmoid = _round(tl.sigmoid(x), DTYPE)
            if HAS_BIAS:
                select = sigmoid + bias  # promoted to fp32, as in Megatron
            else:
                select = sigmoid
        select = tl.where(col_ok, select, NEG_INF)

        if GROUP_TOPK > 0:
            # A group's score is the sum of its top (K // GROUP_TOPK) scores.
            group_score = tl.zeros([BLOCK_T, BLOCK_G], tl.float32)
            remaining = select
            for _ in tl.static_range(K // GROUP_TOPK):
                best = tl.max(remaining, 2)
                group_score += best
                first = tl.min(tl.where(remaining == best[:, :, None], j3, BLOCK_GS), 2)
                remaining = tl.where(j3 == first[:, :, None], NEG_INF, remaining)
            if ROUND_SELECT:
                group_score = _round(group_score, DTYPE)
            g2 = tl.arange(0, BLOCK_G)[None, :]
            group_score = tl.where(g2 < G, group_score, NEG_INF)
            chosen = g2 < 0
            for _ in tl.static_range(GROUP_TOPK):
                candidates = tl.where(chosen, NEG_INF, group_score)
                best = tl.max(candidates, 1)
                first = tl.min(tl.where((candidates == best[:, None]) & (chosen == 0) & (g2 < G), g2, NO_INDEX), 1)
                chosen = chosen | (g2 == first[:, None])
            select = tl.where(chosen[:, :, None], select, NEG_INF)

        taken = expert < 0
        rank = tl.zeros([BLOCK_T, BLOCK_G, BLOCK_GS], tl.int32) + K  # selection order, for weights
        for r in tl.static_range(K):
            index = _take_max(select, taken, expert, col_ok)
            tl.store(indices_ptr + rows * K + r, index, mask=row_ok)
            pick = expert == index[:, None, None]
            taken = taken | pick
            rank = tl.where(pick, r, rank)

        # Probabilities of the chosen experts.
        if SOFTMAX:
            if PRE_SOFTMAX:
                probs = _round(softmax, DTYPE)
            else:
                chosen_max = _row_max(tl.where(taken, x, NEG_INF))
                chosen_exp = tl.where(taken, tl.exp(x - chosen_max[:, None, None]), 0.0)
                probs = _round(chosen_exp / _row_sum(chosen_exp)[:, None, None], DTYPE)
        else:
            if K > 1:
                total = _round(_row_sum(tl.where(taken, sigmoid, 0.0)), DTYPE)
                total = _round(total + SIGMOID_EPS, DTYPE)
                probs = _round(sigmoid / total[:, None, None], DTYPE)
            else:
                probs = sigmoid
        if HAS_SCALING:
            probs = _round(probs * scaling_factor, DTYPE)
        probs = tl.where(taken, probs, 0.0)
        tl.store(probs_ptr + r3 * E + expert, probs.to(DTYPE), mask=ok)
        tl.store(map_ptr + r3 * E + expert, taken.to(tl.uint8), mask=ok)
        for r in tl.static_range(K):
            weight = _row_sum(tl.where(rank == r, probs, 0.0))
            tl.store(weights_ptr + rows * K + r, weight.to(DTYPE), mask=row_ok)

        if COMPUTE_STATS:
            valid = row_ok
            if HAS_PADDING:
                valid = valid & (tl.load(padding_ptr + rows, mask=row_ok, other=1) == 0)
            valid3 = valid[:, None, None]
            # The aux-loss scores of compute_routing_scores_for_aux_loss and their own top-k.
            if SOFTMAX:
                aux = softmax
            else:
                total = _round(_round(_row_sum(tl.where(col_ok, sigmoid, 0.0)), DTYPE) + SIGMOID_EPS, DTYPE)
                aux = _round(sigmoid / total[:, None, None], DTYPE)
            aux = tl.where(col_ok, aux, NEG_INF)
            if SEPARATE_AUX_TOPK:
                aux_taken = expert < 0
                for _ in tl.static_range(K):
                    index = _take_max(aux, aux_taken, expert, col_ok)
                    aux_taken = aux_taken | (expert == index[:, None, None])
            else:
                aux_taken = taken
            count_aux += tl.sum((aux_taken & valid3).to(tl.int32), 0)
            count_dispatch += tl.sum((taken & valid3).to(tl.int32), 0)
            score_sum += tl.sum(tl.where(valid3 & col_ok, aux, 0.0), 0)
            z_sum += tl.where(valid, lse * lse, 0.0)

    if COMPUTE_STATS:
        g2 = tl.arange(0, BLOCK_G)[:, None]
        j2 = tl.arange(0, BLOCK_GS)[None, :]
        e2 = g2 * GS + j2
        ok2 = (g2 < G) & (j2 < GS)
        tl.store(counts_partial_ptr + pid * 2 * E + e2, count_aux, mask=ok2)
        tl.store(counts_partial_ptr + pid * 2 * E + E + e2, count_dispatch, mask=ok2)
        tl.store(scores_partial_ptr + pid * E + e2, score_sum, mask=ok2)
        tl.store(z_partial_ptr + pid, tl.sum(z_sum, 0))


@triton.jit
def _router_bwd_kernel(
    logits_ptr, grad_probs_ptr, grad_weights_ptr, indices_ptr, lse_ptr, padding_ptr,
    lbl_weight_ptr, z_weight_ptr, grad_logits_ptr,
    num_tokens, stride_t, scaling_factor,
    E: tl.constexpr, K: tl.constexpr, G: tl.constexpr, GS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_GS: tl.constexpr,
    SOFTMAX: tl.constexpr, PRE_SOFTMAX: tl.constexpr, HAS_PADDING: tl.constexpr,
    HAS_SCALING: tl.constexpr, HAS_GRAD_PROBS: tl.constexpr, HAS_GRAD_WEIGHTS: tl.constexpr,
    HAS_LBL: tl.constexpr, HAS_Z: tl.constexpr,
):
    DTYPE: tl.constexpr = logits_ptr.dtype.element_ty
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    expert, col_ok, _ = _expert_tile(G, GS, BLOCK_G, BLOCK_GS)
    if HAS_LBL:
        lbl_weight = tl.load(lbl_weight_ptr + expert, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_Z:
        z_weight = tl.load(z_weight_ptr).to(tl.float32)

    for block in range(pid, tl.cdiv(num_tokens, BLOCK_T), num_programs):
        rows, row_ok, ok, x = _load_block(logits_ptr, block, num_tokens, stride_t, expert, col_ok, BLOCK_T)
        r3 = rows[:, None, None]
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        softmax = tl.exp(x - lse[:, None, None])

        # Gradient reaching the chosen probabilities (dense and sparse outputs together).
        taken = expert < 0
        grad = tl.zeros([BLOCK_T, BLOCK_G, BLOCK_GS], tl.float32)
        if HAS_GRAD_PROBS:
            grad = tl.load(grad_probs_ptr + r3 * E + expert, mask=ok, other=0.0).to(tl.float32)
        for r in tl.static_range(K):
            index = tl.load(indices_ptr + rows * K + r, mask=row_ok, other=0)  # rows past T: finite math
            pick = expert == index[:, None, None]
            taken = taken | pick
            if HAS_GRAD_WEIGHTS:
                grad_weight = tl.load(grad_weights_ptr + rows * K + r, mask=row_ok, other=0.0).to(tl.float32)
                grad += tl.where(pick, grad_weight[:, None, None], 0.0)
        grad = tl.where(taken, grad, 0.0)
        if HAS_SCALING:
            grad = grad * scaling_factor

        if SOFTMAX:
            if PRE_SOFTMAX:
                grad_x = softmax * (grad - _row_sum(softmax * grad)[:, None, None])
            else:
                chosen_max = _row_max(tl.where(taken, x, NEG_INF))
                chosen_exp = tl.where(taken, tl.exp(x - chosen_max[:, None, None]), 0.0)
                probs = chosen_exp / _row_sum(chosen_exp)[:, None, None]
                grad_x = probs * (grad - _row_sum(probs * grad)[:, None, None])
        else:
            sigmoid = tl.where(col_ok, tl.sigmoid(x), 0.0)
            if K > 1:
                total = _row_sum(tl.where(taken, sigmoid, 0.0)) + SIGMOID_EPS
                probs = tl.where(taken, sigmoid, 0.0) / total[:, None, None]
                grad_sigmoid = (grad - _row_sum(grad * probs)[:, None, None]) / total[:, None, None]
                grad_sigmoid = tl.where(taken, grad_sigmoid, 0.0)
            else:
                grad_sigmoid = grad
            grad_x = grad_sigmoid * sigmoid * (1.0 - sigmoid)

        if HAS_LBL or HAS_Z:
            valid = row_ok
            if HAS_PADDING:
                valid = valid & (tl.load(padding_ptr + rows, mask=row_ok, other=1) == 0)
            valid3 = valid[:, None, None]
            if HAS_LBL:
                if SOFTMAX:
                    lbl = softmax * (lbl_weight - _row_sum(softmax * lbl_weight)[:, None, None])
                else:
                    total = _row_sum(sigmoid) + SIGMOID_EPS
                    aux = sigmoid / total[:, None, None]
                    grad_sigmoid = (lbl_weight - _row_sum(lbl_weight * aux)[:, None, None]) / total[:, None, None]
                    lbl = grad_sigmoid * sigmoid * (1.0 - sigmoid)
                grad_x += tl.where(valid3, lbl, 0.0)
            if HAS_Z:
                grad_x += tl.where(valid3, (z_weight * lse)[:, None, None] * softmax, 0.0)
        tl.store(grad_logits_ptr + r3 * E + expert, _round(grad_x, DTYPE).to(DTYPE), mask=ok)


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
        if self.score_function not in ("softmax", "sigmoid"):
            raise ValueError(f"score_function must be 'softmax' or 'sigmoid', got {self.score_function!r}")
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

    aux_counts: tokens per expert under the top-k of the aux-loss scores (int64 [E]);
    dispatch_counts: tokens per expert of the routing map (int64 [E]);
    score_sums: per-expert sums of the aux-loss scores (fp32 [E]);
    valid_tokens: non-padding tokens (int64 scalar tensor);
    z_sum: sum of logsumexp(logits)^2 over valid tokens (fp32 scalar tensor).
    """

    aux_counts: torch.Tensor
    dispatch_counts: torch.Tensor
    score_sums: torch.Tensor
    valid_tokens: torch.Tensor
    z_sum: torch.Tensor


@dataclass
class RouterOutput:
    probs: torch.Tensor  # [T, E], logits dtype, zero outside the chosen experts
    routing_map: torch.Tensor  # [T, E] bool
    indices: torch.Tensor  # [T, k] int32, in selection order (highest selection score first)
    weights: torch.Tensor  # [T, k] logits dtype: probs at indices
    stats: Optional[RouterStats]


@dataclass(frozen=True)
class Launch:
    """Grid and block sizes. Defaults fit GPUs; interpreter tests pass larger blocks."""

    block_t: Optional[int] = None
    num_programs: Optional[int] = None
    num_warps: Optional[int] = None


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every output buffer comes from here (tests poison it to prove each element is written)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _tile(spec: RoutingSpec) -> tuple[int, int, int]:
    groups = spec.num_groups if spec.grouped else 1
    group_size = spec.num_experts // groups
    return groups, group_size, triton.next_power_of_2(groups) * triton.next_power_of_2(group_size)


def _grid(num_tokens: int, spec: RoutingSpec, launch: Launch, device) -> tuple[int, int, int]:
    _, _, width = _tile(spec)
    block_t = launch.block_t or max(1, min(64, 4096 // width))
    num_blocks = max(1, triton.cdiv(num_tokens, block_t))
    if launch.num_programs:
        programs = launch.num_programs
    elif device.type == "cuda":
        programs = torch.cuda.get_device_properties(device).multi_processor_count * 4
    else:
        programs = 4
    num_warps = launch.num_warps or (4 if block_t * width <= 4096 else 8)
    return triton.next_power_of_2(block_t), max(1, min(programs, num_blocks)), num_warps


def _check_logits(logits):
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a 2-D tensor [tokens, experts], got {getattr(logits, 'shape', type(logits))}")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"logits dtype must be one of {SUPPORTED_DTYPES}, got {logits.dtype}")
    if logits.stride(1) != 1:
        raise ValueError("logits must be contiguous along the expert dimension: pass logits.contiguous()")
    if not (logits.is_cuda or _interpreting()):
        raise RuntimeError("the fused router runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1)")


def _check_side_inputs(logits, expert_bias, padding_mask, spec: RoutingSpec):
    if expert_bias is not None and expert_bias.shape != (spec.num_experts,):
        raise ValueError(f"expert_bias must have shape ({spec.num_experts},), got {tuple(expert_bias.shape)}")
    if padding_mask is not None and (padding_mask.dtype != torch.bool or padding_mask.numel() != logits.shape[0]):
        raise ValueError(f"padding_mask must be a bool tensor with {logits.shape[0]} elements (True = padding)")


def _forward(logits, expert_bias, padding_mask, spec: RoutingSpec, compute_stats: bool, launch: Launch) -> tuple[RouterOutput, torch.Tensor, tuple]:
    num_tokens, num_experts = logits.shape
    groups, group_size, _ = _tile(spec)
    block_t, programs, num_warps = _grid(num_tokens, spec, launch, logits.device)
    device = logits.device
    probs = _empty((num_tokens, num_experts), logits.dtype, device)
    routing_map = _empty((num_tokens, num_experts), torch.bool, device)
    indices = _empty((num_tokens, spec.topk), torch.int32, device)
    weights = _empty((num_tokens, spec.topk), logits.dtype, device)
    lse = _empty((num_tokens,), torch.float32, device)
    counts_partial = _empty((programs, 2, num_experts), torch.int32, device)
    scores_partial = _empty((programs, num_experts), torch.float32, device)
    z_partial = _empty((programs,), torch.float32, device)
    use_bias = spec.score_function == "sigmoid" and expert_bias is not None  # as Megatron: sigmoid only
    # The aux-loss top-k equals the routing top-k only when both compare the same fp32 softmax.
    separate_aux = not (spec.score_function == "softmax" and spec.use_pre_softmax
                        and logits.dtype == torch.float32 and not spec.grouped)
    padding = padding_mask.reshape(-1).view(torch.uint8) if padding_mask is not None else None
    if num_tokens > 0:
        _router_fwd_kernel[(programs,)](
            logits, expert_bias.float().contiguous() if use_bias else logits, padding if padding is not None else logits,
            probs, routing_map.view(torch.uint8), indices, weights, lse,
            counts_partial, scores_partial, z_partial,
            num_tokens, logits.stride(0), float(spec.scaling_factor or 1.0),
            E=num_experts, K=spec.topk, G=groups, GS=group_size,
            GROUP_TOPK=spec.group_topk or 0, BLOCK_T=block_t,
            BLOCK_G=triton.next_power_of_2(groups), BLOCK_GS=triton.next_power_of_2(group_size),
            SOFTMAX=spec.score_function == "softmax", PRE_SOFTMAX=bool(spec.use_pre_softmax),
            HAS_BIAS=use_bias, HAS_PADDING=padding is not None, HAS_SCALING=bool(spec.scaling_factor),
            COMPUTE_STATS=compute_stats, SEPARATE_AUX_TOPK=separate_aux,
            ROUND_SELECT=not use_bias,  # selection scores live in the logits dtype unless biased
            num_warps=num_warps,
        )
    stats = None
    if compute_stats:
        if num_tokens == 0:  # nothing was launched
            for partial in (counts_partial, scores_partial, z_partial):
                partial.zero_()
        counts = counts_partial.sum(dim=0, dtype=torch.int64)
        valid = (torch.tensor(num_tokens, device=device) if padding_mask is None
                 else num_tokens - padding_mask.sum())
        stats = RouterStats(aux_counts=counts[0], dispatch_counts=counts[1], score_sums=scores_partial.sum(dim=0),
                            valid_tokens=valid.to(torch.int64), z_sum=z_partial.sum())
    return RouterOutput(probs, routing_map, indices, weights, stats), lse, (block_t, programs, num_warps)


def _backward(logits, grad_probs, grad_weights, indices, lse, padding_mask, lbl_weights, z_weight,
              spec: RoutingSpec, grid) -> torch.Tensor:
    num_tokens, num_experts = logits.shape
    groups, group_size, _ = _tile(spec)
    block_t, programs, num_warps = grid
    grad_logits = _empty(tuple(logits.shape), logits.dtype, logits.device)
    if num_tokens == 0:
        return grad_logits
    padding = padding_mask.reshape(-1).view(torch.uint8) if padding_mask is not None else None
    _router_bwd_kernel[(programs,)](
        logits, grad_probs.contiguous() if grad_probs is not None else logits,
        grad_weights.contiguous() if grad_weights is not None else logits,
        indices, lse, padding if padding is not None else logits,
        lbl_weights if lbl_weights is not None else lse, z_weight if z_weight is not None else lse,
        grad_logits,
        num_tokens, logits.stride(0), float(spec.scaling_factor or 1.0),
        E=num_experts, K=spec.topk, G=groups, GS=group_size, BLOCK_T=block_t,
        BLOCK_G=triton.next_power_of_2(groups), BLOCK_GS=triton.next_power_of_2(group_size),
        SOFTMAX=spec.score_function == "softmax", PRE_SOFTMAX=bool(spec.use_pre_softmax),
        HAS_PADDING=padding is not None, HAS_SCALING=bool(spec.scaling_factor),
        HAS_GRAD_PROBS=grad_probs is not None, HAS_GRAD_WEIGHTS=grad_weights is not None,
        HAS_LBL=lbl_weights is not None, HAS_Z=z_weight is not None,
        num_warps=num_warps,
    )
    return grad_logits


WeightSource = Optional[Callable[[], Optional[Union[torch.Tensor, float]]]]


class _FusedTopKRouter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, expert_bias, padding_mask, spec, compute_stats, lbl_weights, z_weight, launch, stats_box):
        out, lse, grid = _forward(logits, expert_bias, padding_mask, spec, compute_stats, launch)
        ctx.save_for_backward(logits, out.indices, lse, padding_mask)
        ctx.spec, ctx.grid = spec, grid
        ctx.lbl_weights, ctx.z_weight = lbl_weights, z_weight
        ctx.mark_non_differentiable(out.routing_map, out.indices)
        stats_box.append(out.stats)  # autograd outputs must be tensors: the stats travel beside
        return out.probs, out.routing_map, out.indices, out.weights

    @staticmethod
    def backward(ctx, grad_probs, _grad_map, _grad_indices, grad_weights):
        logits, indices, lse, padding_mask = ctx.saved_tensors
        # Read at backward time: the engine's weights may wait for an all-reduce launched in forward.
        lbl = ctx.lbl_weights() if ctx.lbl_weights is not None else None
        z = ctx.z_weight() if ctx.z_weight is not None else None
        if lbl is not None:
            lbl = lbl.to(device=logits.device, dtype=torch.float32).contiguous()
        if z is not None:
            z = torch.as_tensor(z, dtype=torch.float32, device=logits.device).reshape(1)
        grad = _backward(logits, grad_probs, grad_weights, indices, lse, padding_mask, lbl, z, ctx.spec, ctx.grid)
        return grad, None, None, None, None, None, None, None, None


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
    lbl_weights: WeightSource = None,
    z_weight: WeightSource = None,
    launch: Launch = Launch(),
) -> RouterOutput:
    """Routing plus balancing statistics in one pass over the logits; gradients in one more.

    padding_mask: [T] bool, True for padding tokens (excluded from the statistics and the
    balancing gradients). lbl_weights(): fp32 [E], d(balancing loss)/d(aux score) of every valid
    token, loss scale included, read in backward (None: no balancing gradient). z_weight(): a
    scalar w such that the z-loss gradient is w * lse_t * softmax_t for every valid token.
    The probs and sparse weights are differentiable; expert_bias is used with sigmoid only.
    """
    _check_logits(logits)
    spec = RoutingSpec(logits.shape[1], topk, score_function, use_pre_softmax, num_groups, group_topk, scaling_factor)
    _check_side_inputs(logits, expert_bias, padding_mask, spec)
    if padding_mask is not None:
        padding_mask = padding_mask.reshape(-1).contiguous()
    stats_box = []
    probs, routing_map, indices, weights = _FusedTopKRouter.apply(
        logits, expert_bias, padding_mask, spec, compute_stats, lbl_weights, z_weight, launch, stats_box)
    return RouterOutput(probs, routing_map, indices, weights, stats_box[0])


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
                            expert_bias=expert_bias, compute_stats=False)
    return out.probs, out.routing_map
