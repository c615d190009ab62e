"""Private Triton kernels of moe_lbl.kernels.topk_router (forward, backward, shared pieces)."""
