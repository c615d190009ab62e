"""Test helpers on a real Megatron-Core: the aux-loss tracker, and what a patched router's
micro-batch gives."""

from __future__ import annotations

from typing import NamedTuple

import torch


class MicroBatch(NamedTuple):
    """One micro-batch through a router: its outputs, logits gradient and logged values."""

    probs: torch.Tensor
    routing_map: torch.Tensor
    grad: torch.Tensor  # of the logits
    tracker: dict  # Megatron's tracker values by name


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
