"""Private Triton kernel of moe_lbl.kernels.balance_step."""
