"""Test helpers on a real Megatron-Core: a bare TopKRouter and the aux-loss tracker."""

from __future__ import annotations

import inspect


def build_router(num_experts: int = 8, topk: int = 2, is_mtp_layer: bool = False, **overrides):
    """A training-mode TopKRouter (layer 1 of 1; an MTP layer's router with is_mtp_layer, 0.17+)
    on Megatron's default process groups."""
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(num_layers=1, hidden_size=16, num_attention_heads=1, num_moe_experts=num_experts,
                  moe_router_topk=topk, moe_router_load_balancing_type="aux_loss",
                  moe_aux_loss_coeff=1e-2, use_cpu_initialization=True, add_bias_linear=False)
    kwargs.update(overrides)
    config = TransformerConfig(**kwargs)
    parameters = inspect.signature(TopKRouter.__init__).parameters
    if "pg_collection" in parameters:  # 0.15+
        from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

        mtp = {"is_mtp_layer": True} if is_mtp_layer else {}
        router = TopKRouter(config, pg_collection=get_default_pg_collection(), **mtp)
    elif "model_comm_pgs" in parameters:  # 0.13, 0.14
        from megatron.core.process_groups_config import ModelCommProcessGroups

        router = TopKRouter(config, model_comm_pgs=ModelCommProcessGroups.use_mpu_process_groups())
    else:
        router = TopKRouter(config)
    router.set_layer_number(1)
    return router.train()


def _legacy_tracker() -> dict:
    """The tracker dict of Megatron-Core before 0.18 (in parallel_state before 0.13)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe import moe_utils

    getter = getattr(moe_utils, "get_moe_layer_wise_logging_tracker", None) or \
        parallel_state.get_moe_layer_wise_logging_tracker
    return getter()


def aux_loss_tracker() -> dict:
    """Megatron's per-layer aux-loss tracker as {name: per-layer values}, the live tensors.

    0.18+ keep it in moe_logging's metrics tracker (the legacy getter returns a copy there, so
    clearing that would clear nothing); moe_utils before, parallel_state before 0.13.
    """
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:
        return {name: entry["values"] for name, entry in _legacy_tracker().items()}
    return {name: entry.values for name, entry in get_moe_metrics_tracker().metrics.items()}


def clear_tracker() -> None:
    """Drop every entry of Megatron's aux-loss tracker (names too, not only their values)."""
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:
        _legacy_tracker().clear()
    else:
        get_moe_metrics_tracker().metrics.clear()


def take_tracker() -> dict:
    """Megatron's per-layer aux-loss tracker values so far (per name), then cleared."""
    tracker = aux_loss_tracker()
    values = {name: entry.clone() for name, entry in tracker.items()}
    for entry in tracker.values():
        entry.zero_()
    return values
