"""Every kernel launch of moe_lbl.kernels goes through `launch`, so that it can be captured.

`capture()` records launches instead of running them; moe_lbl.kernels.aot compiles what it
records for GPU targets on machines without one.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

from moe_lbl.kernels import triton_compat

_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"  # Triton reads it when the kernels are defined


def interpreting() -> bool:
    """True when the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 at definition)."""
    return _INTERPRETING


@dataclass(frozen=True)
class KernelLaunch:
    """One kernel launch as an entry point made it."""

    kernel: object  # a triton JITFunction (or InterpretedFunction under the interpreter)
    programs: int
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


_captured: list[KernelLaunch] | None = None


def launch(kernel, programs: int, *args, **kwargs) -> None:
    """kernel[(programs,)](*args, **kwargs), or recorded while capturing."""
    if _captured is not None:
        _captured.append(KernelLaunch(kernel, programs, args, kwargs))
    else:
        kernel[(programs,)](*args, **kwargs)


def capturing() -> bool:
    """Whether launches are being recorded (by capture())."""
    return _captured is not None


@contextlib.contextmanager
def capture() -> Iterator[list[KernelLaunch]]:
    """Record the launches of the entry points called in the block instead of running them.

    Call the entry points with tensors on the `meta` device: shapes and dtypes are real, data is
    not, and outputs are left unwritten.
    """
    global _captured
    if _captured is not None:
        raise RuntimeError("launches are already being captured")
    _captured = []
    try:
        yield _captured
    finally:
        _captured = None


def resident_ctas(registers: int, num_warps: int, shared: int, *, registers_per_sm: int, shared_per_sm: int,
                  threads_per_sm: int, max_ctas: int = 32) -> int:
    """CTAs of one kernel that an SM holds at once (registers are allocated 256 per warp)."""
    registers_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    ctas = min(registers_per_sm // (registers_per_warp * num_warps), threads_per_sm // (32 * num_warps), max_ctas)
    if shared:
        ctas = min(ctas, shared_per_sm // shared)
    return max(1, ctas)


# CTAs per SM where this Triton cannot tell a compiled kernel's resources: the router kernels fit
# about 8 CTAs of 4 warps on an SM; 4 keeps a wave of them resident on every supported GPU.
FALLBACK_CTAS_PER_SM = 4
_ctas_per_sm: dict = {}


def programs(kernel, num_blocks: int, requested: int | None, device, make_args, constexprs: dict) -> int:
    """Programs of a persistent launch, never more than there are blocks: the requested number;
    else on CUDA every SM times the CTAs of this kernel that fit on it (one wave: a program that
    waited for a slot would add its whole share of blocks to the run time); else 4.

    make_args(programs) gives the launch's arguments; on CUDA the kernel is compiled with them
    to read its registers and shared memory, once per specialization.
    """
    if requested:
        count = requested
    elif device.type == "cuda" and _captured is None:
        key = (kernel, device.index, tuple(sorted(constexprs.items())))
        if key not in _ctas_per_sm:
            sms, registers_per_sm, shared_per_sm, threads_per_sm = triton_compat.sm_limits(device.index)
            found = triton_compat.resources(kernel, make_args(1), constexprs)
            ctas = FALLBACK_CTAS_PER_SM if found is None else resident_ctas(
                *found, registers_per_sm=registers_per_sm, shared_per_sm=shared_per_sm, threads_per_sm=threads_per_sm)
            _ctas_per_sm[key] = sms, ctas
        sms, ctas = _ctas_per_sm[key]
        count = sms * ctas
    else:
        count = 4
    return max(1, min(count, num_blocks))


def load(launches: list[KernelLaunch]) -> None:
    """Compile captured launches for the current CUDA device and load them there, without running
    them: what a first launch would raise (a compile error, too many resources), raised now."""
    for captured in launches:
        triton_compat.compile_and_load(captured.kernel, captured.args, captured.kwargs)
