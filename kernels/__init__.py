"""Fused Triton router kernels (installed as moe_lbl.kernels); they know nothing of Megatron.

Import after setting TRITON_INTERPRET=1 to run them on CPU tensors (Triton reads it when the
kernels are defined).
"""

from moe_lbl.kernels.launcher import interpreting
from moe_lbl.kernels.topk_router import (
    Launch,
    RouterOutput,
    RouterStats,
    RoutingSpec,
    fused_topk_router,
    topk_routing_with_score_function,
)

__all__ = ["Launch", "RouterOutput", "RouterStats", "RoutingSpec", "fused_topk_router", "interpreting",
           "topk_routing_with_score_function"]
