"""A float64 reference of Megatron-Core 0.16's top-k routing, for the kernel tests.

It follows Megatron's operations and its roundings to the logits dtype, in float64 elsewhere,
and breaks ties toward the lower expert index (a stable descending sort). Given `indices`, it
computes the probabilities of that selection instead, so that gradients can be compared for the
selection the kernel made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from moe_lbl.scores import SIGMOID_EPS


def _round(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return v.to(dtype).double()  # differentiable: the cast passes the gradient through


def _top(values: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]


@dataclass
class Routing:
    select: torch.Tensor  # [T, E] scores compared to choose experts (-inf outside chosen groups)
    group_scores: Optional[torch.Tensor]  # [T, G] for group-limited routing
    indices: torch.Tensor  # [T, k]
    probs: torch.Tensor  # [T, E] float64 (dtype-rounded values), zero outside the selection
    topk_probs: torch.Tensor  # [T, k]: probs at indices
    aux_scores: torch.Tensor  # [T, E] scores of compute_routing_scores_for_aux_loss
    aux_indices: torch.Tensor  # [T, k]
    lse: torch.Tensor  # [T]


def reference_routing(logits: torch.Tensor, topk: int, *, score_function="softmax", use_pre_softmax=False,
                      num_groups=None, group_topk=None, scaling_factor=None, expert_bias=None,
                      indices: Optional[torch.Tensor] = None, x: Optional[torch.Tensor] = None) -> Routing:
    """x: the float64 leaf to differentiate (defaults to logits in float64)."""
    dtype = logits.dtype
    x = logits.double() if x is None else x
    num_tokens, num_experts = x.shape
    softmax = torch.softmax(x, dim=-1)
    sigmoid = _round(torch.sigmoid(x), dtype)
    if score_function == "softmax":
        select = _round(softmax, dtype) if use_pre_softmax else x
    else:
        select = sigmoid + expert_bias.double() if expert_bias is not None else sigmoid
    select = select.detach()
    group_scores = None
    if group_topk:
        grouped = select.view(num_tokens, num_groups, -1)
        group_scores = torch.sort(grouped, dim=-1, descending=True).values[..., : topk // group_topk].sum(-1)
        if not (score_function == "sigmoid" and expert_bias is not None):
            group_scores = _round(group_scores, dtype)
        chosen = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, _top(group_scores, group_topk), True)
        select = select.masked_fill(~chosen.repeat_interleave(num_experts // num_groups, dim=1), float("-inf"))
    if indices is None:
        indices = _top(select, topk)
    indices = indices.long()
    if score_function == "softmax":
        if use_pre_softmax:
            top = torch.gather(_round(softmax, dtype), 1, indices)
        else:
            top = _round(torch.softmax(torch.gather(x, 1, indices), dim=-1), dtype)
    else:
        top = torch.gather(sigmoid, 1, indices)
        if topk > 1:
            total = _round(_round(top.sum(-1, keepdim=True), dtype) + SIGMOID_EPS, dtype)
            top = _round(top / total, dtype)
    if scaling_factor:
        top = _round(top * scaling_factor, dtype)
    probs = torch.zeros_like(x).scatter(1, indices, top)
    if score_function == "softmax":
        aux = _round(softmax, torch.float32)
    else:
        total = _round(_round(sigmoid.sum(-1, keepdim=True), dtype) + SIGMOID_EPS, dtype)
        aux = _round(sigmoid / total, dtype)
    return Routing(select, group_scores, indices, probs, top, aux, _top(aux.detach(), topk), torch.logsumexp(x, dim=-1))


def near_tie_rows(values: torch.Tensor, k: int, tol: float) -> torch.Tensor:
    """Rows whose k-th and (k+1)-th largest values are within tol (relative to the row's scale)."""
    if k >= values.shape[-1]:
        return torch.zeros(values.shape[0], dtype=torch.bool)
    top = torch.sort(values.double(), dim=-1, descending=True).values
    finite = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    scale = finite.abs().amax(-1).clamp(min=1.0)
    gap = top[:, k - 1] - top[:, k]
    return torch.nan_to_num(gap, nan=0.0) <= tol * scale
