"""Fused Triton router kernels (installed as moe_lbl.kernels); they know nothing of Megatron.

The fused top-k gating, counting and LBL/z-loss kernels land here; until then the engine runs
on PyTorch operations.
"""
