"""CUDA-graph semantics without a GPU, for the tests.

A CUDA graph records the kernels that one call launches and replays them on later calls: the
Python that launched them runs once, at capture, and never again; tensors that live outside
the graph (module buffers, trackers) are the same memory at every replay, updated in place by
the replayed kernels; a capture executes nothing. Here:

- `capture(fn, *args)` traces fn with make_fx (every dispatched op recorded once, as a capture
  records kernels), with moe_lbl.engine.capturing() answering True as
  torch.cuda.is_current_stream_capturing() does during a capture, and with the given state
  tensors restored afterwards (what the trace ran does not count, as a capture runs nothing).
  Calling the result replays the record on new inputs without running fn's Python.
- `SyncGuard()`: a dispatch mode that fails on any op that waits for the host (a value read
  back, a data-dependent shape, host data copied to the device), which a capture refuses; the
  fused router's first-use check, which runs once per specialization outside captures, may.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterable

import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode

import moe_lbl.engine as engine
from moe_lbl.patches.megatron import first_use

# Ops that need the host: a value read back (item, int, bool, tolist go through
# _local_scalar_dense on a device), data-dependent shapes, comparisons returning a Python bool,
# and tensors made from host data (a host-to-device copy on a GPU).
HOST_SYNCS = {"_local_scalar_dense", "equal", "nonzero", "is_nonzero", "masked_select", "unique", "_unique2",
              "allclose", "lift_fresh", "item"}


class HostSync(AssertionError):
    pass


def _in_first_use_check() -> bool:
    """Whether the fused router's first-use check is running: it reads its verdict on the host
    by design, once per specialization, before the kernels serve it (and never inside a capture)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename == first_use.__file__ and frame.f_code.co_name == "first_use_failure":
            return True
        frame = frame.f_back
    return False


class SyncGuard(TorchDispatchMode):
    """Fails on any op that waits for the host, except in the fused router's first-use check.
    On CPU, Tensor.tolist and Tensor.numpy read memory without dispatching, so they are refused
    too while the guard is on."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in HOST_SYNCS and not _in_first_use_check():
            raise HostSync(f"{func} needs the host")
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._saved = torch.Tensor.tolist, torch.Tensor.numpy

        def refuse(name):
            original = getattr(torch.Tensor, name)

            def method(*args, **kwargs):
                if _in_first_use_check():
                    return original(*args, **kwargs)
                raise HostSync(f"Tensor.{name} needs the host")
            return method

        torch.Tensor.tolist, torch.Tensor.numpy = refuse("tolist"), refuse("numpy")
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist, torch.Tensor.numpy = self._saved
        return super().__exit__(*exc)


@contextlib.contextmanager
def capturing():
    """moe_lbl's engine believes the stream is being captured (it completes collectives inside
    the captured region and skips its host-side bookkeeping), and the helpers Megatron compiles
    with torch.compile are traced as plain functions."""
    config = torch._dynamo.config
    saved = engine.capturing, config.error_on_nested_fx_trace
    engine.capturing, config.error_on_nested_fx_trace = (lambda: True), False
    try:
        yield
    finally:
        engine.capturing, config.error_on_nested_fx_trace = saved


def capture(fn: Callable, *args, state: Iterable[torch.Tensor] = ()) -> torch.fx.GraphModule:
    """Record fn(*args) as a graph; call the result to replay it on new inputs of the same
    shapes. The tensors of `state` are restored after the trace ran (as Megatron's local CUDA
    graphs restore a layer's buffers and tracker after their warmup and capture)."""
    state = list(state)
    saved = [t.clone() for t in state]
    with capturing():
        graph = make_fx(fn, tracing_mode="real")(*args)
    for tensor, value in zip(state, saved):
        tensor.copy_(value)
    return graph
