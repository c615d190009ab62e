"""The aux-loss replacements: Megatron's micro-batch aux loss becomes the engine's loss.

Megatron's routing (and the fused routing, moe_lbl.patches.megatron.routing) calls these inside
a router forward, after the routing replacement resolved the layer's config for that forward.
"""

from __future__ import annotations

from moe_lbl.patches.megatron import live
from moe_lbl.patches.megatron.configuration import resolve_balance_config
from moe_lbl.patches.megatron.layer import find, layer_of


def _apply_aux_loss(self, probs, scores_for_aux_loss, routing_map, with_padding_mask=False):
    """Replaces TopKRouter._apply_aux_loss (0.14+): the micro-batch aux loss becomes the engine's
    micro, global or hybrid loss, its gradient attached to the aux-loss scores.
    """
    layer = layer_of(self)
    if not layer.balancer.enabled:
        return probs
    valid_tokens = routing_map.sum() // self.topk if with_padding_mask else routing_map.shape[0]
    return layer.attach(probs, scores_for_aux_loss, routing_map.sum(dim=0), valid_tokens)


def _apply_load_balancing_loss(self, activation, load_balancing_loss_func):
    """Replaces TopKRouter.apply_load_balancing_loss (0.12, 0.13): as _apply_aux_loss, for the
    versions whose aux loss arrives as a partial of switch_load_balancing_loss_func. Other loss
    functions (seq_aux_loss) go to Megatron's original.
    """
    from megatron.core.transformer.moe.moe_utils import switch_load_balancing_loss_func
    from megatron.core.transformer.moe.router import TopKRouter

    if getattr(load_balancing_loss_func, "func", None) is not switch_load_balancing_loss_func:
        original = live.current().original(TopKRouter, "apply_load_balancing_loss")
        return original(self, activation, load_balancing_loss_func)
    layer = layer_of(self)
    if not layer.balancer.enabled:
        return activation
    scores = load_balancing_loss_func.keywords["probs"]
    counts = load_balancing_loss_func.keywords["tokens_per_expert"]
    return layer.attach(activation, scores, counts, scores.shape[0])


def _apply_global_aux_loss(self, probs, *args, **kwargs):
    """Replaces TopKRouter._apply_global_aux_loss (0.15+) with nothing: the engine's global term
    takes its place (Megatron's has the gradient and normalization bugs #3672 and #7213).
    """
    return probs


def _is_aux_loss_enabled(self) -> bool:
    """Replaces TopKRouter.is_aux_loss_enabled (0.14+): true when the engine has a term or
    seq_aux_loss is set, so that Megatron computes the aux-loss scores the engine needs.
    """
    layer = find(self)  # none yet when Megatron asks from TopKRouter.__init__ (0.19)
    config = layer.balancer.config if layer is not None else resolve_balance_config(self.config, live.current().options)
    return bool(config.terms()) or self.get_aux_loss_coeff("seq_aux_loss") > 0
