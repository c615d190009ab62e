"""Megatron-Core on CPU: the shims that let it train an MoE model with gloo ranks, no CUDA.

`moe-lbl demo` runs this way, and so do the tests and the CPU runs of the example. Never applied
silently: only inside `cpu_shims()` (or by `apply_cpu_shims()`), which refuse to run where CUDA
is available. Each shim names the obstacle it removes; the other obstacles are avoided by
configuration instead (see moe_lbl.demo.tiny_gpt: the allgather dispatcher, no linear biases, an
explicit causal mask, and a training step that mirrors Megatron's no-pipelining schedule, which
hard-codes CUDA tensors).
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def _null_fork(self, name=None):
    yield


def _cpu_rng_states():
    return torch.get_rng_state(), None, {}


def _set_cpu_rng_states(cpu_rng_state, cuda_rng_state, cuda_rng_state_tracker):
    torch.set_rng_state(cpu_rng_state)


def _shims() -> list[tuple[object, str, object]]:
    """(owner, attribute, replacement) of each shim."""
    from megatron.core.tensor_parallel import random as mc_random
    from megatron.core.transformer.moe import moe_utils

    return [
        # Router buffers, Router.gating and the aux-loss scale place tensors on
        # torch.cuda.current_device().
        (torch.cuda, "current_device", lambda: "cpu"),
        # moe_utils references te_general_gemm without TransformerEngine (fixed upstream in 0.17).
        (moe_utils, "te_general_gemm", getattr(moe_utils, "te_general_gemm", None)),
        # DDP's start_grad_sync waits on CUDA-graph events in torch.cuda.current_stream() (0.19+).
        (torch.cuda, "current_stream", torch.cpu.current_stream),
        # The model-parallel RNG tracker forks CUDA generator states.
        (mc_random.CudaRNGStatesTracker, "fork", _null_fork),
        # Activation recomputation saves and restores CUDA RNG states.
        (mc_random, "_get_all_rng_states", _cpu_rng_states),
        (mc_random, "_set_all_rng_states", _set_cpu_rng_states),
    ]


def _refuse_cuda_machines() -> None:
    if torch.cuda.is_available():
        raise RuntimeError("the CPU shims are for CPU-only runs; on a GPU run Megatron-Core as it is")


@contextlib.contextmanager
def cpu_shims():
    """Apply the CPU shims for the duration of the block and restore everything after it."""
    _refuse_cuda_machines()
    shims = _shims()
    missing = object()
    saved = [(owner, name, owner.__dict__.get(name, missing)) for owner, name, _ in shims]
    try:
        for owner, name, value in shims:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in reversed(saved):
            if value is missing:
                delattr(owner, name)
            else:
                setattr(owner, name, value)


def apply_cpu_shims() -> None:
    """Apply the CPU shims for the rest of the process: one that only ever trains on CPU, such
    as a rank of Megatron's own training loop that a test starts."""
    _refuse_cuda_machines()
    for owner, name, value in _shims():
        setattr(owner, name, value)
