"""moe-lbl: global-batch load balancing for Mixture-of-Experts training (arXiv 2501.11873)."""

from moe_lbl.analysis import RoutingRecorder, record_routing
from moe_lbl.engine import BalanceConfig, LoadBalancer
from moe_lbl.metrics import LayerBalance, max_violation, step_balance
from moe_lbl.patches.megatron import is_patched, iter_balancers, patch_megatron, unpatch_megatron

__version__ = "0.1.0"


def end_step(model) -> None:
    """Close the optimizer step of every patched router of a model (or a list of model chunks).

    Megatron's finalize_model_grads does this; a training loop without it calls end_step after
    each optimizer step, on every rank (a collective: counts still in flight are waited for).
    """
    for _, balancer in iter_balancers(model):
        balancer.end_step()


def balance_metrics(model) -> list[LayerBalance]:
    """Per-layer MaxVio (micro-batch and global batch) of the last step of a patched model.

    A collective: call it on every rank, after the step's finalize_model_grads.
    """
    return step_balance(iter_balancers(model))


__all__ = [
    "BalanceConfig", "LoadBalancer", "LayerBalance", "RoutingRecorder", "balance_metrics", "end_step", "is_patched",
    "max_violation", "patch_megatron", "record_routing", "unpatch_megatron",
]
