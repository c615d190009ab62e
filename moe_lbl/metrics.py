"""Balance metrics: how evenly the experts are loaded, per micro-batch and per global batch.

MaxVio = max_i load_i / mean_i load_i - 1 (Wang et al. 2024, arXiv 2408.15664). Global-batch
balance with specialized micro-batches shows as a low global MaxVio and a high micro MaxVio.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from moe_lbl.engine import LoadBalancer, group_size


def max_violation(load: torch.Tensor) -> torch.Tensor:
    """MaxVio over the last dimension of a tokens-per-expert tensor; 0 where no token was routed."""
    load = load.double()
    mean = load.mean(dim=-1)
    return torch.where(mean > 0, load.amax(dim=-1) / mean.clamp(min=1e-300) - 1, torch.zeros_like(mean))


@dataclass(frozen=True)
class LayerBalance:
    """Expert load of one MoE layer over one optimizer step.

    micro_max_vio: MaxVio of each back-propagated micro-batch (its sequence group's tokens),
        averaged over the step's micro-batches and the data-parallel ranks.
    global_max_vio: MaxVio of the whole global batch.
    tokens_per_expert: dispatched tokens per expert in the global batch.
    """

    layer: int
    micro_max_vio: float
    global_max_vio: float
    tokens_per_expert: tuple[int, ...]


def _all_reduce(tensor: torch.Tensor, group) -> torch.Tensor:
    if group_size(group) > 1:
        dist.all_reduce(tensor, group=group)
    return tensor


def layer_balance(layer: int, balancer: LoadBalancer) -> Optional[LayerBalance]:
    """Balance of the last completed step of one layer; None if it back-propagated no training
    micro-batch.

    A collective over the balancer's batch group: every rank of it must call it. The step is
    checked first (LoadBalancer.check): under a graph that closes steps itself (Megatron's
    full_iteration), this is where a mismatch between ranks surfaces.
    """
    balancer.check()
    state = balancer.state
    micro_batches = state.last[-1:].double()
    summary = _all_reduce(torch.cat([state.last_max_vio.view(1), micro_batches]), balancer.batch_group)
    total = _all_reduce(state.last[:-1].clone(), balancer.batch_group)
    if float(summary[1]) == 0:
        return None
    # Ranks of one sequence group hold the same micro values: the ratio is the data-parallel mean.
    return LayerBalance(
        layer=layer,
        micro_max_vio=float(summary[0] / summary[1]),
        global_max_vio=float(max_violation(total)),
        tokens_per_expert=tuple(int(x) for x in total.tolist()),
    )


def step_balance(balancers: Iterable[tuple[int, LoadBalancer]]) -> list[LayerBalance]:
    """layer_balance for every (layer, balancer) that recorded a load in the last step."""
    report = (layer_balance(layer, balancer) for layer, balancer in balancers)
    return [r for r in report if r is not None]
