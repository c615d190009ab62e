"""TopKRouter.routing, patched: Megatron's routing or the fused kernels, and the recorded loads.

kernels='auto' fuses routers on CUDA logits where the kernels implement the router's options,
compile for its GPU and pass their first-use check there (first_use.py); elsewhere Megatron's
routing runs, with one warning per reason.
kernels=True raises the reason instead. Only this module knows the kernels.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from moe_lbl.patches.megatron import live
from moe_lbl.patches.megatron.configuration import balancing_types
from moe_lbl.patches.megatron.first_use import first_use_failure
from moe_lbl.patches.megatron.layer import Layer, layer_of

# Balancing types the fused path computes; any other (sinkhorn, quantile balancing, a newer
# Megatron's own) keeps Megatron's routing.
_FUSED_BALANCING_TYPES = {"aux_loss", "global_aux_loss", "seq_aux_loss", "none"}


def _routing(self, logits, padding_mask=None):
    """Replaces TopKRouter.routing: runs the fused kernels when they are on, else Megatron's
    routing; records each training micro-batch's dispatched tokens for the balance metrics.
    """
    from megatron.core.transformer.moe.router import TopKRouter

    patch = live.current()
    layer = layer_of(self).refresh(self)  # the one config resolution of this forward
    call = _fused_call(self, layer, logits, padding_mask, patch)
    if call is not None:
        return _fused_routing(self, layer, call)
    original = patch.original(TopKRouter, "routing")
    if padding_mask is None:
        probs, routing_map = original(self, logits)
    else:
        probs, routing_map = original(self, logits, padding_mask=padding_mask)
    if self.training and torch.is_grad_enabled():  # counted when back-propagated: once under recompute
        probs = layer.balancer.record_load(probs, _dispatched(routing_map, padding_mask))
    return probs, routing_map


def _fused_call(router, layer: Layer, logits, padding_mask, patch: live.LivePatch) -> Optional[KernelCall]:
    """The kernels' call for this router call, or None where Megatron's routing runs.
    kernels='auto' falls back to Megatron's routing with one warning per reason; kernels=True
    raises the reason instead."""
    mode = patch.options.kernels
    if mode is False or (mode == "auto" and not _on_gpu(logits)):
        return None
    from moe_lbl.kernels import interpreting

    if mode is True and not (_on_gpu(logits) or interpreting()):
        raise RuntimeError("patch_megatron(kernels=True) needs CUDA logits (or TRITON_INTERPRET=1 on CPU)")
    reason = _fused_unsupported(router, logits, patch)
    call = None if reason else _kernel_call(router, layer, logits, padding_mask)
    reason = reason or _load_failure(router, call) or first_use_failure(router, layer, call)
    if reason is None:
        return call
    if mode is True:
        raise ValueError(f"patch_megatron(kernels=True) cannot fuse this router: {reason}; "
                         "use kernels='auto' to fall back to Megatron's routing where needed")
    if reason not in patch.fallback_warned:
        patch.fallback_warned.add(reason)
        warnings.warn(f"moe-lbl: the fused router falls back to Megatron's routing: {reason}", stacklevel=3)
    return None


@dataclass(frozen=True)
class KernelCall:
    """fused_topk_router's arguments for one router call, and the gradients its backward gets."""

    logits: torch.Tensor  # [T, E], in the dtype the kernels route
    dtype: torch.dtype  # the router's logits dtype: the probs' dtype
    padding_mask: Optional[torch.Tensor]  # [T]
    options: dict
    gradients: tuple[str, ...]  # of moe_lbl.kernels.topk_router.DIFFERENTIABLE_OUTPUTS
    z_coeff: Optional[float]  # per tensor x context rank, as Megatron's z-loss takes it
    seq_aux_coeff: Optional[float]  # seq_aux_loss's coefficient, where the call computes it
    shape: tuple[int, ...]  # the logits' leading dimensions: [s, b] (Megatron's layout), or [T]
    specialization: tuple  # what the kernels compile for (topk_router.specialization_key), made once

    @property
    def training(self) -> bool:
        return bool(self.gradients)


def _kernel_call(router, layer: Layer, logits, padding_mask) -> KernelCall:
    config = router.config
    training = router.training and torch.is_grad_enabled()
    z_coeff = config.moe_z_loss_coeff / layer.sequence_group.size() if (
        training and config.moe_z_loss_coeff is not None) else None
    seq_aux_coeff = router.get_aux_loss_coeff("seq_aux_loss") if training else 0.0
    seq_aux_coeff = seq_aux_coeff if seq_aux_coeff > 0 else None
    gradients = ("probs",) * training + ("score_sums",) * (training and layer.balancer.enabled) + (
        ("z_sum",) if z_coeff is not None else ()) + (("sequence_score_sums",) if seq_aux_coeff else ())
    if padding_mask is not None:
        padding_mask = padding_mask.reshape(-1)
    # Without capacity dropping the statistics kernel registers the micro-batch with the engine
    # (with it, the dispatched load is known only after the dropping).
    registration = layer.balancer.prepare() if training and config.moe_expert_capacity_factor is None else None
    options = dict(
        score_function=router.score_function, use_pre_softmax=config.moe_router_pre_softmax,
        num_groups=config.moe_router_num_groups, group_topk=config.moe_router_group_topk,
        scaling_factor=config.moe_router_topk_scaling_factor, expert_bias=router.expert_bias,
        padding_mask=padding_mask, compute_stats=training, compute_z=z_coeff is not None, dense=True, sparse=False,
        registration=registration)
    shape = tuple(logits.shape[:-1])
    if seq_aux_coeff:  # Megatron's seq_aux_loss takes the logits as [s, b, E]: b sequences
        options["sequences"] = shape[1]
    from moe_lbl.kernels.topk_router import specialization_key

    routed = kernel_logits(router, layer, logits.view(-1, config.num_moe_experts))
    return KernelCall(routed, logits.dtype, padding_mask, options, gradients, z_coeff, seq_aux_coeff, shape,
                      specialization_key(routed, router.topk, gradients=gradients, **options))


def kernel_logits(router, layer: Layer, logits):
    """The logits the kernels route: fp32 where Megatron routes 16-bit logits in fp32 (0.18+),
    else as they are (the kernels round scores to the logits dtype, as Megatron did before).

    Softmax after top-k over all experts chooses by the logits themselves and rounds only the
    final probs, so 16-bit logits stay 16-bit there: half the bytes, 32-bit sort keys.
    """
    config = router.config
    chosen_by_logits = (router.score_function == "softmax" and not config.moe_router_pre_softmax
                        and not config.moe_router_group_topk)
    return logits.float() if layer.features.fp32_routing and not chosen_by_logits else logits


def _on_gpu(logits) -> bool:
    """Logits the compiled kernels run on (kernels='auto' fuses only these)."""
    return logits.is_cuda


def _fused_unsupported(router, logits, patch: live.LivePatch) -> Optional[str]:
    """Why the fused router cannot serve this router's options, or None."""
    from moe_lbl.kernels.topk_router import FUSED_SCORE_FUNCTIONS, MAX_EXPERTS, MAX_TOPK, SUPPORTED_DTYPES

    config = router.config
    if not patch.features.fused_routing:
        return f"megatron-core {patch.features.version} (the fused path needs 0.14 or newer)"
    types = balancing_types(config)
    other_types = sorted(t for t in types if t not in _FUSED_BALANCING_TYPES)
    if other_types:
        return f"{', '.join(other_types)} balancing"
    if router.score_function not in FUSED_SCORE_FUNCTIONS:
        return f"score function {router.score_function!r} (the kernels have {', '.join(FUSED_SCORE_FUNCTIONS)})"
    if getattr(router, "router_replay", None) is not None:
        return "router replay"
    if getattr(config, "moe_router_fusion", False):
        return "moe_router_fusion (TransformerEngine's fused router) is on"
    if config.num_moe_experts > MAX_EXPERTS or router.topk > MAX_TOPK:
        return f"more than {MAX_EXPERTS} experts or top-k above {MAX_TOPK}"
    if types.get("seq_aux_loss", 0.0) > 0 and logits.dim() != 3:
        return f"seq_aux_loss on logits of shape {tuple(logits.shape)} (it needs Megatron's [s, b, E])"
    if logits.dtype not in SUPPORTED_DTYPES:
        return f"router logits in {logits.dtype}"
    return None


def _load_failure(router, call: KernelCall) -> Optional[str]:
    """Why the kernels of this call fail to compile or load on its GPU, or None (the kernels
    compile on meta tensors once per specialization, before anything runs: a backward that could
    not compile would otherwise fail after the forward had been fused)."""
    if not _on_gpu(call.logits):
        return None  # the interpreter compiles nothing
    from moe_lbl.kernels.topk_router import load_router

    try:
        load_router(call.logits, router.topk, gradients=call.gradients, specialization=call.specialization,
                    **call.options)
    except Exception as error:  # whatever the first launch would raise, it raises here
        return f"the kernels failed to compile or load: {type(error).__name__}: " + (
            str(error).strip().splitlines() or [""])[0]
    return None


def _fused_routing(router, layer: Layer, call: KernelCall):
    """TopKRouter.routing on the fused kernels: the same outputs, losses and logged values."""
    from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping

    from moe_lbl.kernels import fused_topk_router

    config = router.config
    registration = call.options["registration"]
    out = fused_topk_router(call.logits, router.topk, **call.options)
    stats, probs = out.stats, out.probs.to(call.dtype)
    routing_map = out.routing_map
    if config.moe_expert_capacity_factor is not None:
        probs, routing_map = apply_router_token_dropping(
            probs, routing_map, router_topk=router.topk, capacity_factor=config.moe_expert_capacity_factor,
            drop_policy=config.moe_token_drop_policy, pad_to_capacity=config.moe_pad_expert_input_to_capacity)
    if torch.is_grad_enabled() and (call.training or router.enable_expert_bias):
        if stats is not None and config.moe_expert_capacity_factor is None:
            load = stats.dispatch_counts
        else:
            load = _dispatched(routing_map, call.padding_mask)
        if call.training:  # the balancing loss (where it has a term) and Megatron's z-loss
            probs = layer.attach(probs, stats.score_sums, stats.aux_counts, stats.valid_tokens, load=load,
                                 z_sum=stats.z_sum, z_coeff=call.z_coeff,  # z_sum only with a z-loss
                                 registration=registration)
            if call.seq_aux_coeff:
                probs = _apply_seq_aux_loss(router, layer, call, probs, stats)
        if router.enable_expert_bias:
            # What TopKRouter._apply_expert_bias does, which in 0.16 fails with a padding mask
            # (it combines the [T, E] map with the [T] mask without broadcasting).
            with torch.no_grad():
                router.local_tokens_per_expert += load
    return probs, routing_map


def _apply_seq_aux_loss(router, layer: Layer, call: KernelCall, probs, stats):
    """TopKRouter._apply_seq_aux_loss on the kernels' per-sequence sums: the same loss, gradient
    and logged value. Megatron reshapes the aux scores and aux top-k map [s * b, E] to [s, b * E]
    and sums them over s; the kernels' [b, E] sums are those sums, handed on as one row."""
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region
    from megatron.core.transformer.moe.moe_utils import switch_load_balancing_loss_func

    seq_length, bsz = call.shape
    counts = stats.sequence_aux_counts.reshape(1, -1)
    group = router.tp_cp_group
    if call.padding_mask is not None:  # padding masks reach the router from 0.16 on
        from megatron.core.transformer.moe.moe_utils import get_tokens_per_expert_and_token_count

        tokens_per_expert, local_tokens, total_tokens = get_tokens_per_expert_and_token_count(
            counts, group, topk=router.topk * bsz, with_padding_mask=True)
    else:
        tokens_per_expert = reduce_from_tensor_model_parallel_region(counts.sum(dim=0), group)
        local_tokens, total_tokens = seq_length, seq_length * group.size()
    aux_loss = switch_load_balancing_loss_func(
        probs=stats.sequence_score_sums.reshape(1, -1), tokens_per_expert=tokens_per_expert,
        total_num_tokens=total_tokens, topk=router.topk, num_experts=router.config.num_moe_experts,
        moe_aux_loss_coeff=call.seq_aux_coeff) / bsz
    tokens = {}
    if layer.features.valid_token_count:
        tokens["valid_token_count"] = local_tokens * bsz if layer.features.tp_cp_token_scale else local_tokens
    return router.attach_and_log_load_balancing_loss(probs, call.seq_aux_coeff, aux_loss, "seq_load_balancing_loss",
                                                     group, **tokens)


def _dispatched(routing_map, padding_mask):
    if padding_mask is not None:
        routing_map = routing_map & ~padding_mask.reshape(-1, 1)
    return routing_map.sum(dim=0)
