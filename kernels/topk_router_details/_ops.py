"""The fused router's two passes as PyTorch operators: moe_lbl::topk_router_forward and
moe_lbl::topk_router_backward.

Defined with torch.library, each is one node to what traces dispatched operations (make_fx,
a TorchDispatchMode, torch.compile, which calls them as they are), and its Triton launches are
all it runs on the device: buffers are allocated here, every value is written by a kernel. A
CUDA graph that captures a call replays those launches. On meta or fake tensors an operator
allocates its outputs and launches nothing, except while moe_lbl.kernels.launcher.capture()
records launches for compiling ahead of time. (torch.library.custom_op would wrap each call in
about 30 us more of Python; a plain definition costs about 2.)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from moe_lbl.kernels import launcher
from moe_lbl.kernels.launcher import interpreting
from moe_lbl.kernels.topk_router_details._backward import router_backward
from moe_lbl.kernels.topk_router_details._forward import router_forward
from moe_lbl.kernels.topk_router_details._spec import Launch, RoutingSpec
from moe_lbl.kernels.topk_router_details._statistics import router_statistics

_VALUE_BITS = {torch.bfloat16: 16, torch.float16: 19, torch.float32: 32}  # significant bits of the fp32 pattern
_STATISTICS_BLOCK_E = 256  # experts per program of the statistics kernel


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
    @functools.lru_cache(maxsize=None)
    def of(spec: RoutingSpec, launch: Launch) -> "_Tiles":
        groups = spec.num_groups if spec.grouped else 1
        group_size = spec.num_experts // groups
        block_g, block_gs = _power_of_2(groups), _power_of_2(group_size)
        width = block_g * block_gs
        # About 8 elements of a [BLOCK_T, E] tile per thread keeps registers low enough for
        # several CTAs per SM with nothing spilled.
        num_warps = launch.num_warps or (4 if width <= 1024 else 8)
        block_t = _power_of_2(launch.block_t or max(1, 32 * num_warps * 8 // width))
        return _Tiles(groups, group_size, block_t, block_g, block_gs, _power_of_2(spec.topk), num_warps)

    def constexprs(self) -> dict:
        return dict(G=self.groups, GS=self.group_size, BLOCK_T=self.block_t, BLOCK_G=self.block_g,
                    BLOCK_GS=self.block_gs, KP=self.kp, num_warps=self.num_warps,
                    INTERPRETED=interpreting())  # its casts truncate and it has no libdevice


def _power_of_2(n: int) -> int:
    """The least power of 2 >= n (triton.next_power_of_2, without its per-call cost)."""
    return 1 << (n - 1).bit_length()


def _blocks(n: int, block: int) -> int:
    return -(-n // block)


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every output buffer comes from here (tests poison it to prove each element is written)."""
    return torch.empty(shape, dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def _spec(num_experts, topk, score_function, use_pre_softmax, num_groups, group_topk, scaling_factor) -> RoutingSpec:
    return RoutingSpec(num_experts, topk, score_function, use_pre_softmax, num_groups or None, group_topk or None,
                       scaling_factor or None)


@functools.lru_cache(maxsize=None)
def _launch(block_t, num_programs, num_warps) -> Launch:
    return Launch(block_t or None, num_programs or None, num_warps or None)


# The routing options and launch sizes travel as plain values (0 for None), as operators take them.
_ROUTING = ("int topk, str score_function, bool use_pre_softmax, int num_groups, int group_topk, "
            "float scaling_factor, int block_t, int num_programs, int num_warps")


@dataclass(frozen=True)
class _ForwardPlan:
    """What a forward call launches, fixed by its specialization (made once per specialization:
    the per-call Python is then the allocations and the launches)."""

    spec: RoutingSpec
    launch: Launch
    tiles: _Tiles
    separate_aux: bool
    use_bias: bool
    constexprs: dict  # router_forward's
    statistics: dict  # router_statistics' constexprs
    statistics_programs: int

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def of(num_experts, topk, score_function, use_pre_softmax, num_groups, group_topk, scaling_factor, block_t,
           num_programs, num_warps, dtype, has_bias, has_padding, compute_stats, compute_z, dense, sparse,
           per_sequence, register, in_forward, sequence, batch) -> "_ForwardPlan":
        spec = _spec(num_experts, topk, score_function, use_pre_softmax, num_groups, group_topk, scaling_factor)
        launch = _launch(block_t, num_programs, num_warps)
        tiles = _Tiles.of(spec, launch)
        use_bias = spec.score_function == "sigmoid" and has_bias  # as Megatron: sigmoid only
        softmax = spec.score_function == "softmax"
        # The aux-loss top-k (of fp32 softmax, or of the normalized sigmoid) is the routing top-k
        # only when both rank the same values: softmax keeps the logits' order, so post-softmax
        # routing over all experts (or pre-softmax on fp32 logits) ranks what the aux scores rank.
        separate_aux = spec.grouped or not softmax or (spec.use_pre_softmax and dtype != torch.float32)
        constexprs = dict(
            E=num_experts, K=spec.topk, GROUP_TOPK=spec.group_topk or 0, SOFTMAX=softmax,
            PRE_SOFTMAX=bool(spec.use_pre_softmax), HAS_BIAS=use_bias, HAS_PADDING=has_padding,
            HAS_SCALING=bool(spec.scaling_factor), LOGIT_BITS=_VALUE_BITS[dtype],
            SELECT_BITS=32 if use_bias else _VALUE_BITS[dtype],  # bias promotes scores to fp32
            WRITE_DENSE=dense, WRITE_SPARSE=sparse, COMPUTE_STATS=compute_stats,
            COMPUTE_Z=compute_stats and compute_z, SEPARATE_AUX_TOPK=separate_aux,
            PER_SEQUENCE=per_sequence, **tiles.constexprs())
        block_e = min(_STATISTICS_BLOCK_E, _power_of_2(num_experts))
        statistics = dict(E=num_experts, SEPARATE_AUX_TOPK=separate_aux, PER_SEQUENCE=per_sequence, BLOCK_P=8,
                          BLOCK_E=block_e,
                          REGISTER=register, IN_FORWARD=in_forward, SEQUENCE=sequence, BATCH=batch,
                          num_warps=4 if block_e <= 256 else 8)
        return _ForwardPlan(spec, launch, tiles, separate_aux, use_bias, constexprs, statistics,
                            _blocks(num_experts, block_e))


def _aligned_programs(programs: int, block_t: int, sequences: int) -> int:
    """Programs of a persistent launch whose blocks of block_t rows hold the same sequences at the
    same rows in every block a program walks (programs * block_t a multiple of `sequences`, token t
    of sequence t % sequences): at most `programs` where that allows."""
    step = sequences // math.gcd(sequences, block_t)
    return max(step, programs - programs % step)


def _forward(logits, expert_bias, padding_mask, topk, score_function, use_pre_softmax, num_groups, group_topk,
             scaling_factor, block_t, num_programs, num_warps, compute_stats, compute_z, dense, sparse, sequences,
             counters, tags, slot, sequence, batch, in_forward, launches=True):
    """(probs, routing_map, topk_indices, topk_probs, counts [2, E] (aux, dispatched), score_sums,
    valid_tokens, z_sum, sequence counts [S, E] (aux), sequence score sums [S, E]), None where not
    asked for (z_sum: with compute_stats and compute_z; the sequence statistics: with
    compute_stats and sequences S > 0, tokens laid out [s, S]); with counters, the statistics
    kernel also fills a balancing engine's registration (see router_statistics). launches:
    whether to launch (or record) the kernels, or only allocate the outputs."""
    num_tokens, num_experts = logits.shape
    per_sequence = compute_stats and sequences > 0
    plan = _ForwardPlan.of(num_experts, topk, score_function, use_pre_softmax, num_groups, group_topk,
                           scaling_factor, block_t, num_programs, num_warps, logits.dtype, expert_bias is not None,
                           padding_mask is not None, compute_stats, compute_z, dense, sparse, per_sequence,
                           counters is not None, in_forward, sequence is not None, batch is not None)
    k, device = plan.spec.topk, logits.device
    probs = _empty((num_tokens, num_experts), logits.dtype, device) if dense else None
    routing_map = _empty((num_tokens, num_experts), torch.bool, device) if dense else None
    topk_indices = _empty((num_tokens, k), torch.int32, device) if sparse else None
    topk_probs = _empty((num_tokens, k), logits.dtype, device) if sparse else None
    padding = padding_mask.view(torch.uint8) if padding_mask is not None else None
    partials = []
    block_t = plan.tiles.block_t

    def args(programs):
        # Per sequence, the counts and score sums of each row of a program's blocks.
        rows = programs * block_t if per_sequence else programs
        partials[:] = [_empty((rows, 2, num_experts), torch.int32, device),
                       _empty((rows, num_experts), torch.float32, device),
                       _empty((programs,), torch.float32, device), _empty((programs,), torch.int32, device)]
        return (logits, logits.stride(0), num_tokens, expert_bias if plan.use_bias else logits,
                padding if padding is not None else logits, float(plan.spec.scaling_factor or 1.0),
                probs if dense else logits, routing_map.view(torch.uint8) if dense else logits,
                topk_indices if sparse else logits, topk_probs if sparse else logits, *partials)

    blocks = _blocks(num_tokens, block_t)
    programs = launcher.programs(router_forward, blocks, plan.launch.num_programs, device, args,
                                 plan.constexprs) if launches else max(1, blocks)
    if per_sequence:
        programs = _aligned_programs(programs, block_t, sequences)
    launch_args = args(programs if num_tokens else 0)  # no tokens: no forward program, nothing to sum
    if launches and num_tokens:
        launcher.launch(router_forward, programs, *launch_args, **plan.constexprs)
    statistics = (None,) * 6
    if compute_stats:
        counts = _empty((2, num_experts), torch.int64, device)
        score_sums = _empty((num_experts,), torch.float32, device)
        valid_tokens, z_sum = _empty((), torch.int64, device), _empty((), torch.float32, device)
        sequence_counts = _empty((sequences, num_experts), torch.int64, device) if per_sequence else None
        sequence_scores = _empty((sequences, num_experts), torch.float32, device) if per_sequence else None
        if launches:
            registration = [counts if t is None else t for t in (counters, tags, slot, sequence, batch)]
            launcher.launch(router_statistics, plan.statistics_programs, *partials, partials[0].shape[0],
                            partials[2].shape[0], max(1, sequences), counts, score_sums, z_sum, valid_tokens,
                            sequence_counts if per_sequence else counts, sequence_scores if per_sequence else counts,
                            *registration, **plan.statistics)
        statistics = (counts, score_sums, valid_tokens, z_sum if compute_z else None, sequence_counts,
                      sequence_scores)
    return (probs, routing_map, topk_indices, topk_probs, *statistics)


def _backward(logits, routing_map, topk_indices, padding_mask, grad_probs, grad_topk_probs, grad_score_sums,
              grad_z_sum, grad_sequence_scores, topk, score_function, use_pre_softmax, num_groups, group_topk,
              scaling_factor, block_t, num_programs, num_warps, launches=True):
    """The logits gradient from the gradients that reached the outputs (None: none came)."""
    spec = _spec(logits.shape[1], topk, score_function, use_pre_softmax, num_groups, group_topk, scaling_factor)
    launch = _launch(block_t, num_programs, num_warps)
    num_tokens, num_experts = logits.shape
    grad_logits = _empty(tuple(logits.shape), logits.dtype, logits.device)
    if num_tokens == 0 or not launches:
        return grad_logits
    tiles = _Tiles.of(spec, launch)
    padding = padding_mask.view(torch.uint8) if padding_mask is not None else None
    sequences = grad_sequence_scores.shape[0] if grad_sequence_scores is not None else 1
    launch_args = (
        logits, logits.stride(0), num_tokens, routing_map.view(torch.uint8) if routing_map is not None else logits,
        topk_indices if topk_indices is not None else logits, padding if padding is not None else logits,
        float(spec.scaling_factor or 1.0),
        grad_probs if grad_probs is not None else logits,
        grad_topk_probs if grad_topk_probs is not None else logits,
        grad_score_sums if grad_score_sums is not None else logits,
        grad_z_sum if grad_z_sum is not None else logits,
        grad_sequence_scores if grad_sequence_scores is not None else logits, sequences,
        grad_logits)
    constexprs = dict(
        E=num_experts, K=spec.topk, GROUP_TOPK=spec.group_topk or 0, SOFTMAX=spec.score_function == "softmax",
        PRE_SOFTMAX=bool(spec.use_pre_softmax), HAS_PADDING=padding is not None,
        HAS_SCALING=bool(spec.scaling_factor), HAS_GRAD_PROBS=grad_probs is not None,
        HAS_GRAD_TOPK_PROBS=grad_topk_probs is not None, HAS_LBL=grad_score_sums is not None,
        HAS_Z=grad_z_sum is not None, HAS_SEQUENCE_LBL=grad_sequence_scores is not None, **tiles.constexprs())
    programs = launcher.programs(router_backward, _blocks(num_tokens, tiles.block_t), launch.num_programs,
                                 logits.device, lambda _: launch_args, constexprs)
    if grad_sequence_scores is not None:  # each program's rows then keep their sequences
        programs = _aligned_programs(programs, tiles.block_t, sequences)
    launcher.launch(router_backward, programs, *launch_args, **constexprs)
    return grad_logits


_LIBRARY = torch.library.Library("moe_lbl", "FRAGMENT")


def _define(name: str, schema: str, implementation) -> None:
    """An operator whose implementation launches; on meta and fake tensors it only allocates,
    and records its launches while launcher.capture() records them (compiling ahead of time)."""
    _LIBRARY.define(name + schema)
    _LIBRARY.impl(name, implementation, "CompositeExplicitAutograd")
    torch.library.register_fake(f"moe_lbl::{name}", lambda *args: implementation(*args, launches=launcher.capturing()),
                                lib=_LIBRARY)


_define("topk_router_forward",
        f"(Tensor logits, Tensor? expert_bias, Tensor? padding_mask, {_ROUTING}, bool compute_stats, bool compute_z, "
        "bool dense, bool sparse, int sequences, Tensor(a!)? counters, Tensor? tags, Tensor(b!)? slot, "
        "Tensor(c!)? sequence, Tensor(d!)? batch, bool in_forward) -> (" + ", ".join(["Tensor?"] * 10) + ")", _forward)
_define("topk_router_backward",
        f"(Tensor logits, Tensor? routing_map, Tensor? topk_indices, Tensor? padding_mask, Tensor? grad_probs, "
        f"Tensor? grad_topk_probs, Tensor? grad_score_sums, Tensor? grad_z_sum, Tensor? grad_sequence_scores, "
        f"{_ROUTING}) -> Tensor", _backward)


def routing_args(spec: RoutingSpec, launch: Launch) -> tuple:
    """The operators' routing and launch arguments, in their schema's order."""
    return (spec.topk, spec.score_function, bool(spec.use_pre_softmax), spec.num_groups or 0, spec.group_topk or 0,
            float(spec.scaling_factor or 0.0), launch.block_t or 0, launch.num_programs or 0, launch.num_warps or 0)
