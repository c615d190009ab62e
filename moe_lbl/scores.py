"""The balancing scores s_t, as Megatron-Core defines them (compute_routing_scores_for_aux_loss).

One place for what the engine's users, the routing analysis and the fused kernels share: the
score functions Megatron-Core has and the epsilon of its sigmoid normalization.
"""

from __future__ import annotations

import torch

from moe_lbl.validation import check_known

SCORE_FUNCTIONS = ("softmax", "sigmoid", "sqrtsoftplus")  # Megatron-Core's (sqrtsoftplus: 0.17+)
SIGMOID_EPS = 1e-20  # Megatron's epsilon when it normalizes sigmoid scores to sum 1


def balancing_scores(logits: torch.Tensor, score_function: str) -> torch.Tensor:
    """s_t of every token, [T, N_E]: softmax over all experts, or sigmoid (sqrtsoftplus) scores
    normalized to sum 1.

    What Megatron-Core's compute_routing_scores_for_aux_loss computes (0.14 and newer; older
    versions compute the same inside their routing), in the dtype of `logits`.
    """
    check_known("score function", score_function, SCORE_FUNCTIONS)
    if score_function == "softmax":
        return torch.softmax(logits, dim=-1)
    if score_function == "sigmoid":
        scores = torch.sigmoid(logits)
    else:  # sqrtsoftplus (Megatron-Core 0.17+)
        scores = torch.nn.functional.softplus(logits).sqrt()
    return scores / (scores.sum(dim=-1, keepdim=True) + SIGMOID_EPS)
