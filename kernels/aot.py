"""Compile the router kernels for CUDA targets ahead of time, on a machine without a GPU.

Triton's wheel ships ptxas, so a kernel can be compiled for sm_80/90/100 anywhere. The launches
to compile are captured from the public entry points run on `meta` tensors (nothing executes),
so every kernel and specialization those entry points would launch is compiled, and a refactor
cannot skip one. Each captured launch is bound with Triton's own binder, as `JITFunction.run`
does (moe_lbl.kernels.triton_compat), and compiled with `triton.compile` for the requested target.

Needs the kernels defined for the compiler: import this module in a process without
TRITON_INTERPRET=1 (the interpreter replaces the kernels when they are defined).
"""

from __future__ import annotations

import contextlib
import io
import re
import time
from dataclasses import dataclass
from typing import Callable

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction

from moe_lbl.kernels import triton_compat
from moe_lbl.kernels.launcher import KernelLaunch, capture

TARGETS = (80, 90, 100)


@dataclass
class Compiled:
    """A launch compiled for one target, with what ptxas reported."""

    launch: KernelLaunch
    capability: int
    kernel: object  # triton.compiler.CompiledKernel
    seconds: float
    registers: int
    spill_stores: int  # bytes per thread
    spill_loads: int

    @property
    def num_warps(self) -> int:
        return self.kernel.metadata.num_warps

    @property
    def shared(self) -> int:
        return self.kernel.metadata.shared


_PTXAS_LINE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")


def compile_launch(launch: KernelLaunch, capability: int) -> Compiled:
    """Compile one captured launch for sm_<capability>; raises what Triton or ptxas raise."""
    if not isinstance(launch.kernel, JITFunction):
        raise RuntimeError("moe_lbl.kernels.aot needs the compiled kernels: unset TRITON_INTERPRET "
                           "before moe_lbl.kernels is first imported")
    target = GPUTarget("cuda", capability, 32)
    signature, constexprs, attrs, options = triton_compat.bind(launch.kernel, launch.args, launch.kwargs,
                                                               make_backend(target))
    log = io.StringIO()
    start = time.perf_counter()
    with triton_compat.ptxas_report(), contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    seconds = time.perf_counter() - start
    text = log.getvalue()
    registers = _REGISTERS.search(text)
    spills = _PTXAS_LINE.search(text)
    return Compiled(launch, capability, compiled, seconds,
                    registers=int(registers.group(1)) if registers else -1,
                    spill_stores=int(spills.group(1)) if spills else -1,
                    spill_loads=int(spills.group(2)) if spills else -1)


def unique(launches: list[KernelLaunch]) -> list[KernelLaunch]:
    """One launch per compiled specialization (kernel, signature types, constexprs, options)."""
    backend = make_backend(GPUTarget("cuda", 90, 32))
    seen, kept = set(), []
    for launch in launches:
        key = triton_compat.specialization_key(launch.kernel, launch.args, launch.kwargs, backend)
        if key not in seen:
            seen.add(key)
            kept.append(launch)
    return kept


def compile_all(run: Callable[[], None], capabilities=TARGETS) -> list[Compiled]:
    """Compile every distinct launch that `run()` makes (on meta tensors) for each capability."""
    with capture() as launches:
        run()
    return [compile_launch(launch, capability) for launch in unique(launches) for capability in capabilities]
