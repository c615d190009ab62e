"""Every kernel launch of moe_lbl.kernels goes through `launch`, so that it can be captured.

`capture()` records launches instead of running them; moe_lbl.kernels.aot compiles what it
records for GPU targets on machines without one.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator


def interpreting() -> bool:
    """True when the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 at definition)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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


_ctas_per_sm: dict = {}


def programs(kernel, num_blocks: int, requested: int | None, device, make_args, constexprs: dict) -> int:
    """Programs of a persistent launch, never more than there are blocks: the requested number;
    else on CUDA every SM times the CTAs of this kernel that fit on it (one wave: a program that
    waited for a slot would add its whole share of blocks to the run time); else 4.

    make_args(programs) gives the launch's arguments; on CUDA the kernel is compiled with them
    (Triton's warmup) to read its registers and shared memory, once per specialization.
    """
    if requested:
        count = requested
    elif device.type == "cuda" and _captured is None:
        key = (kernel, device.index, tuple(sorted(constexprs.items())))
        if key not in _ctas_per_sm:
            import torch
            import triton

            compiled = kernel.warmup(*make_args(1), grid=(1,), **constexprs)
            compiled._init_handles()  # loads the binary: sets n_regs
            props = triton.runtime.driver.active.utils.get_device_properties(device.index)
            _ctas_per_sm[key] = (props["multiprocessor_count"], resident_ctas(
                compiled.n_regs, compiled.metadata.num_warps, compiled.metadata.shared,
                registers_per_sm=props["max_num_regs"], shared_per_sm=props["max_shared_mem"],
                threads_per_sm=torch.cuda.get_device_properties(device).max_threads_per_multi_processor))
        sms, ctas = _ctas_per_sm[key]
        count = sms * ctas
    else:
        count = 4
    return max(1, min(count, num_blocks))


def load(launches: list[KernelLaunch]) -> None:
    """Compile captured launches for the current CUDA device and load them there, without running
    them: what a first launch would raise (a compile error, too many resources), raised now."""
    for captured in launches:
        compiled = captured.kernel.warmup(*captured.args, grid=(1,), **captured.kwargs)
        compiled._init_handles()  # loading checks shared memory and registers against the device
