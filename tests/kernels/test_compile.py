"""Every router kernel compiles for sm_80, sm_90 and sm_100, on this machine, without a GPU.

The interpreter runs kernels as Python and accepts code the compiler refuses, so the interpreter
tests say nothing about GPUs. Here the public entry points run on meta tensors over cases that
together take every constexpr branch of both kernels; moe_lbl.kernels.aot captures each launch
and compiles it with Triton's own compiler and ptxas. It runs in a subprocess: the compiled
kernels must be defined without TRITON_INTERPRET, which the rest of the suite sets.

    python tests/kernels/test_compile.py [--sm 90]   # the same check by hand
"""

import os
import subprocess
import sys
import tempfile
from typing import NamedTuple


class CompileCase(NamedTuple):
    routing: dict  # experts, topk and fused_topk_router's routing options (expert_bias: whether one)
    dtype: str  # of the logits
    tokens: int
    outputs: dict  # dense, sparse, stats, padding: what the forward computes
    grads: dict  # probs, topk_probs, lbl (score_sums), z (z_sum): what reaches the backward


CASES = [CompileCase(*case) for case in [
    # Megatron's path: dense outputs, statistics, padding; the probs gradient plus LBL and z-loss.
    (dict(experts=64, topk=4), "bfloat16", 4096, dict(dense=True, sparse=False, stats=True, padding=True),
     dict(probs=True, lbl=True, z=True)),
    # Pre-softmax on fp32 (aux top-k shared with routing), sparse outputs only, one token.
    (dict(experts=64, topk=2, use_pre_softmax=True, scaling_factor=2.0), "float32", 1,
     dict(dense=False, sparse=True, stats=False, padding=False), dict(topk_probs=True)),
    # Pre-softmax on bf16 (separate aux top-k), group-limited, both outputs.
    (dict(experts=160, topk=6, use_pre_softmax=True, num_groups=8, group_topk=3), "bfloat16", 517,
     dict(dense=True, sparse=True, stats=True, padding=False), dict(probs=True, topk_probs=True, lbl=True)),
    # Sigmoid with expert bias and groups (fp32 selection keys), scaling, padding.
    (dict(experts=256, topk=8, score_function="sigmoid", num_groups=8, group_topk=4, expert_bias=True,
          scaling_factor=2.5), "bfloat16", 65536, dict(dense=True, sparse=False, stats=True, padding=True),
     dict(probs=True, lbl=True, z=True)),
    # Sigmoid without bias on fp16, experts not a power of two, top-1.
    (dict(experts=60, topk=1, score_function="sigmoid"), "float16", 300,
     dict(dense=True, sparse=True, stats=True, padding=False), dict(topk_probs=True, z=True)),
    # Post-softmax on fp32 with groups: fp32 keys for routing and the aux top-k.
    (dict(experts=64, topk=8, num_groups=8, group_topk=4), "float32", 1000,
     dict(dense=True, sparse=False, stats=True, padding=True), dict(probs=True, lbl=True)),
    # The largest tiles: 2048 experts, top-16 (eight warps).
    (dict(experts=2048, topk=16), "bfloat16", 8192, dict(dense=True, sparse=False, stats=True, padding=False),
     dict(probs=True, lbl=True, z=True)),
]]
TARGETS = (80, 90, 100)


def run_case(routing, dtype, tokens, outputs, grads):
    import torch

    from moe_lbl.kernels import fused_topk_router

    meta = torch.device("meta")
    experts = routing["experts"]
    logits = torch.empty(tokens, experts, dtype=getattr(torch, dtype), device=meta, requires_grad=True)
    options = {k: v for k, v in routing.items() if k not in ("experts", "expert_bias")}
    out = fused_topk_router(
        logits, compute_stats=outputs["stats"], dense=outputs["dense"], sparse=outputs["sparse"],
        expert_bias=torch.empty(experts, device=meta) if routing.get("expert_bias") else None,
        padding_mask=torch.empty(tokens, dtype=torch.bool, device=meta) if outputs["padding"] else None, **options)
    loss = [getattr(out, name).float().sum() for name in ("probs", "topk_probs") if grads.get(name)]
    if grads.get("lbl"):
        loss.append(out.stats.score_sums.sum())
    if grads.get("z"):
        loss.append(out.stats.z_sum)
    sum(loss).backward()


def main(argv) -> int:
    """Compile every case for the targets; print one line per compile; exit 1 on any failure."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--sm", nargs="+", type=int, default=list(TARGETS))
    args = parser.parse_args(argv)
    import triton

    from moe_lbl.kernels import aot, launcher
    from moe_lbl.kernels.topk_router_details import _backward, _forward, _statistics

    kernels = {name for module in (_forward, _backward, _statistics) for name, obj in vars(module).items()
               if isinstance(obj, triton.runtime.jit.JITFunction) and obj.fn.__module__ == module.__name__
               and not name.startswith("_")}  # the kernels themselves, not the jit helpers they call
    launched, failures = set(), 0
    for case in CASES:
        with launcher.capture() as launches:
            run_case(*case)
        names = sorted(launch.name for launch in launches)
        want = sorted(["router_forward", "router_backward"] + ["router_statistics"] * case.outputs["stats"])
        if names != want:
            print(f"FAIL {case}: launched {names}, want {want}")
            failures += 1
        launched.update(names)
        for launch in launches:
            for capability in args.sm:
                try:
                    compiled = aot.compile_launch(launch, capability)
                except Exception as error:  # report every failing compile, not just the first
                    print(f"FAIL sm_{capability} {launch.name} {case.routing} {case.dtype}: {type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''}")
                    failures += 1
                    continue
                print(f"ok   sm_{capability} {launch.name} {case.routing} {case.dtype}: {compiled.registers} "
                      f"registers, {compiled.spill_stores} B spilled, {compiled.seconds:.1f} s")
    if kernels - launched:
        print(f"FAIL kernels never launched by the cases: {sorted(kernels - launched)}")
        failures += 1
    print(f"{failures} failures")
    return 1 if failures else 0


def test_every_kernel_compiles_for_sm80_sm90_sm100():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache  # compile for real, not from an earlier run's cache
        result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    launches = sum(2 + case.outputs["stats"] for case in CASES)
    assert result.stdout.count("ok   sm_") == launches * len(TARGETS), result.stdout


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
