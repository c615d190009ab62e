"""Every use of Triton beyond `triton.jit`, `triton.compile` and `kernel[grid](...)`, in one place.

These are Triton's internals (underscored names, the runtime's binder, the driver's utilities,
knobs), which change between releases. Checked against TESTED_TRITON: CI compiles every kernel
with both (scripts/compile_matrix.sh), and the GPU machines run the older one. Where a call has a
public fallback, a failure takes the fallback instead of breaking the launch.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

TESTED_TRITON = ("3.6.0", "3.9.0")


def integer_specialization(value: int) -> tuple[bool, bool]:
    """What Triton compiles an integer argument for: its equality to 1 and divisibility by 16
    (the runtime's `specialize_impl`, checked against TESTED_TRITON)."""
    return value == 1, value % 16 == 0


def compile_and_load(kernel, args: tuple, kwargs: dict):
    """Compile `kernel` for the current CUDA device and load it there, without launching it;
    raises what a first launch would (a compile error, too many resources for the device)."""
    compiled = kernel.warmup(*args, grid=(1,), **kwargs)
    compiled._init_handles()  # loads the binary: checks resources, sets n_regs
    return compiled


def resources(kernel, args: tuple, kwargs: dict) -> Optional[tuple[int, int, int]]:
    """(registers per thread, warps per CTA, shared bytes per CTA) of `kernel` compiled for these
    arguments on the current device, or None where this Triton cannot tell."""
    try:
        compiled = compile_and_load(kernel, args, kwargs)
        return compiled.n_regs, compiled.metadata.num_warps, compiled.metadata.shared
    except AttributeError:
        return None


def sm_limits(device_index: int) -> tuple[int, int, int, int]:
    """(SMs, registers per SM, shared bytes per SM, threads per SM) of a CUDA device."""
    import torch

    properties = torch.cuda.get_device_properties(device_index)
    try:
        import triton

        driver = triton.runtime.driver.active.utils.get_device_properties(device_index)
        registers, shared = driver["max_num_regs"], driver["max_shared_mem"]
    except (AttributeError, KeyError):  # torch's own names for the same limits
        registers, shared = properties.regs_per_multiprocessor, properties.shared_memory_per_multiprocessor
    return properties.multi_processor_count, registers, shared, properties.max_threads_per_multi_processor


def bind(kernel, args: tuple, kwargs: dict, backend):
    """(signature, constexprs, attrs, options) of one launch, as `JITFunction.run` binds it, for
    `triton.compile(ASTSource(kernel, signature, constexprs, attrs), target, options)`."""
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


def specialization_key(kernel, args: tuple, kwargs: dict, backend) -> tuple:
    """What distinguishes one compiled specialization of `kernel` from another."""
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    _, specialization, options = binder(*args, **kwargs)
    return kernel.fn.__name__, str(specialization), str(sorted(options.items()))


@contextlib.contextmanager
def ptxas_report() -> Iterator[None]:
    """Compile even what Triton's cache holds, and have Triton print ptxas's -v report
    (registers, spills) to stdout, for the caller to capture."""
    import triton

    nvidia, compilation = triton.knobs.nvidia, triton.knobs.compilation
    previous = nvidia.dump_ptxas_log, compilation.always_compile
    nvidia.dump_ptxas_log, compilation.always_compile = True, True
    try:
        yield
    finally:
        nvidia.dump_ptxas_log, compilation.always_compile = previous
