"""Every router kernel compiles for sm_80, sm_90 and sm_100, on this machine, without a GPU.

The interpreter runs kernels as Python and accepts code the compiler refuses, so the interpreter
tests say nothing about GPUs. Here the public entry points run on meta tensors over cases that
together take every constexpr branch of every kernel (the router's forward, statistics and
backward, and the engine's balance_backward); moe_lbl.kernels.aot captures each launch
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
    outputs: dict  # dense, sparse, stats, padding, sequences and z (optional): what the forward computes
    grads: dict  # probs, topk_probs, lbl (score_sums), z (z_sum), sequence (sequence_score_sums): what
    # reaches the backward
    registration: dict = None  # sequence, batch, in_forward: an engine's registration, filled by the statistics


CASES = [CompileCase(*case) for case in [
    # Megatron's path: dense outputs, statistics, padding; the probs gradient plus LBL and z-loss.
    # Registered with both count sums, in forward.
    (dict(experts=64, topk=4), "bfloat16", 4096, dict(dense=True, sparse=False, stats=True, padding=True),
     dict(probs=True, lbl=True, z=True), dict(sequence=True, batch=True, in_forward=True)),
    # Pre-softmax on fp32 (aux top-k shared with routing), sparse outputs only, one token.
    (dict(experts=64, topk=2, use_pre_softmax=True, scaling_factor=2.0), "float32", 1,
     dict(dense=False, sparse=True, stats=False, padding=False), dict(topk_probs=True)),
    # Pre-softmax on bf16 (separate aux top-k), group-limited, both outputs; per-sequence
    # statistics (11 sequences) and their gradient on the sparse path.
    (dict(experts=160, topk=6, use_pre_softmax=True, num_groups=8, group_topk=3), "bfloat16", 517,
     dict(dense=True, sparse=True, stats=True, padding=False, sequences=11),
     dict(probs=True, topk_probs=True, lbl=True, sequence=True)),
    # Sigmoid with expert bias and groups (fp32 selection keys), scaling, padding, per-sequence
    # statistics and their gradient alone, no z-loss (seq_aux_loss, DeepSeek-V3 style);
    # registered without count sums, by a recomputation.
    (dict(experts=256, topk=8, score_function="sigmoid", num_groups=8, group_topk=4, expert_bias=True,
          scaling_factor=2.5), "bfloat16", 65536,
     dict(dense=True, sparse=False, stats=True, padding=True, sequences=4, z=False),
     dict(probs=True, sequence=True), dict(sequence=False, batch=False, in_forward=False)),
    # Sigmoid without bias on fp16, experts not a power of two, top-1; registered with the sum
    # over the sequence group.
    (dict(experts=60, topk=1, score_function="sigmoid"), "float16", 300,
     dict(dense=True, sparse=True, stats=True, padding=False), dict(topk_probs=True, z=True),
     dict(sequence=True, batch=False, in_forward=True)),
    # Post-softmax on fp32 with groups: fp32 keys for routing and the aux top-k.
    (dict(experts=64, topk=8, num_groups=8, group_topk=4), "float32", 1000,
     dict(dense=True, sparse=False, stats=True, padding=True), dict(probs=True, lbl=True)),
    # The largest tiles: 2048 experts, top-16 (eight warps); registered with the batch sum.
    (dict(experts=2048, topk=16), "bfloat16", 8192, dict(dense=True, sparse=False, stats=True, padding=False),
     dict(probs=True, lbl=True, z=True), dict(sequence=False, batch=True, in_forward=True)),
]]


class BalanceCase(NamedTuple):
    experts: int
    dtype: str  # of the loss (the score sums and their gradient)
    sums: dict  # sequence, batch: the count sums that arrived
    terms: dict  # global, micro: coefficients (absent: no such term; empty: metrics only)
    options: dict  # the rest of balance_backward's flags


BALANCE_CASES = [BalanceCase(*case) for case in [
    # Megatron's path under DP x CP: both sums, hybrid terms with a buffer, every value reported,
    # the loss scale per token, a z-loss, valid tokens on the device, T from the counts.
    (64, "float32", dict(sequence=True, batch=True), dict(global_=1e-2, micro=1e-3),
     dict(buffer=True, valid="tensor", scale=True, per_token=True, report=True, z="reported", in_forward=True,
          tokens_from_counts=True)),
    # Global without a buffer, no sums (one rank), fp64, nothing reported, a recomputation.
    (256, "float64", dict(sequence=False, batch=False), dict(global_=1e-2),
     dict(buffer=False, valid="int", scale=False, per_token=False, report=False, z=None, in_forward=False,
          tokens_from_counts=False)),
    # Metrics only over the sequence group, the most experts, a z-loss not reported.
    (2048, "float32", dict(sequence=True, batch=False), dict(),
     dict(buffer=False, valid="int", scale=True, per_token=False, report=False, z="silent", in_forward=True,
          tokens_from_counts=False)),
    # A micro term on bf16 scores, experts not a power of two, its value reported.
    (60, "bfloat16", dict(sequence=True, batch=False), dict(micro=1e-2),
     dict(buffer=False, valid="tensor", scale=True, per_token=True, report=True, z=None, in_forward=True,
          tokens_from_counts=True)),
]]
TARGETS = (80, 90, 100)


def run_case(routing, dtype, tokens, outputs, grads, registration):
    import torch

    from moe_lbl.engine import BalanceState
    from moe_lbl.kernels import fused_topk_router
    from moe_lbl.kernels.topk_router import Registration

    meta = torch.device("meta")
    experts = routing["experts"]
    logits = torch.empty(tokens, experts, dtype=getattr(torch, dtype), device=meta, requires_grad=True)
    options = {k: v for k, v in routing.items() if k not in ("experts", "expert_bias")}
    if registration is not None:
        state = BalanceState(experts, meta)

        def vector(size, wanted):
            return torch.empty(size, dtype=torch.int64, device=meta) if wanted else None

        sums = registration["sequence"] or registration["batch"]
        registration = Registration(state.forward_counters, state.tags, registration["in_forward"],
                                    slot=vector(1, sums), sequence=vector(2 * experts + 3, registration["sequence"]),
                                    batch=vector(experts + 4, registration["batch"]))
    out = fused_topk_router(
        logits, compute_stats=outputs["stats"], dense=outputs["dense"], sparse=outputs["sparse"],
        expert_bias=torch.empty(experts, device=meta) if routing.get("expert_bias") else None,
        padding_mask=torch.empty(tokens, dtype=torch.bool, device=meta) if outputs["padding"] else None,
        sequences=outputs.get("sequences"), compute_z=outputs.get("z", True), registration=registration, **options)
    loss = [getattr(out, name).float().sum() for name in ("probs", "topk_probs") if grads.get(name)]
    if grads.get("lbl"):
        loss.append(out.stats.score_sums.sum())
    if grads.get("z"):
        loss.append(out.stats.z_sum)
    if grads.get("sequence"):
        loss.append(out.stats.sequence_score_sums.sum())
    sum(loss).backward()


def run_balance_case(experts, dtype, sums, terms, options):
    import torch

    from moe_lbl.engine import BalanceState
    from moe_lbl.kernels.balance_step import balance_backward

    meta = torch.device("meta")
    loss_dtype = getattr(torch, dtype)

    def empty(*shape, dtype=torch.int64):
        return torch.empty(*shape, dtype=dtype, device=meta)

    has_loss = bool(terms)
    reported = options["report"]
    balance_backward(
        counts=empty(experts), load=empty(experts),
        valid_tokens=empty(1) if options["valid"] == "tensor" else 1000,
        score_sums=empty(experts, dtype=loss_dtype) if has_loss else None,
        sequence=empty(2 * experts + 3) if sums["sequence"] else None,
        batch=empty(experts + 4) if sums["batch"] else None,
        slot=empty(1) if sums["sequence"] or sums["batch"] else None, state=BalanceState(experts, meta),
        scale=empty(1, dtype=torch.float32) if options["scale"] else None,
        tokens_factor=2 if options["per_token"] else None, divisor=3,
        global_coeff=terms.get("global_", 0.0), micro_coeff=terms.get("micro", 0.0), buffer=options["buffer"],
        global_target=empty(1, dtype=torch.float32) if reported and "global_" in terms else None,
        micro_target=empty(1, dtype=torch.float32) if reported and "micro" in terms else None,
        report_divisor=4, z_sum=empty((), dtype=torch.float32) if options["z"] else None, z_coeff=1e-3,
        z_target=empty(1, dtype=torch.float32) if options["z"] == "reported" else None, topk=4,
        sequence_size=2, in_forward=options["in_forward"], tokens_from_counts=options["tokens_from_counts"])


def main(argv) -> int:
    """Compile every case for the targets; print one line per compile; exit 1 on any failure."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--sm", nargs="+", type=int, default=list(TARGETS))
    args = parser.parse_args(argv)
    import triton

    from moe_lbl.kernels import aot, launcher
    from moe_lbl.kernels.balance_step_details import _backward as _balance_backward
    from moe_lbl.kernels.topk_router_details import _backward, _forward, _statistics

    modules = (_forward, _backward, _statistics, _balance_backward)
    kernels = {name for module in modules for name, obj in vars(module).items()
               if isinstance(obj, triton.runtime.jit.JITFunction) and obj.fn.__module__ == module.__name__
               and not name.startswith("_")}  # the kernels themselves, not the jit helpers they call
    runs = [(case, run_case, sorted(["router_forward", "router_backward"]
                                    + ["router_statistics"] * case.outputs["stats"])) for case in CASES]
    runs += [(case, run_balance_case, ["balance_backward"]) for case in BALANCE_CASES]
    launched, failures = set(), 0
    for case, run, want in runs:
        with launcher.capture() as launches:
            run(*case)
        names = sorted(launch.name for launch in launches)
        if names != want:
            print(f"FAIL {case}: launched {names}, want {want}")
            failures += 1
        launched.update(names)
        label = f"{case.routing} {case.dtype}" if run is run_case else f"E={case.experts} {case.dtype} {case.terms}"
        for launch in launches:
            for capability in args.sm:
                try:
                    compiled = aot.compile_launch(launch, capability)
                except Exception as error:  # report every failing compile, not just the first
                    print(f"FAIL sm_{capability} {launch.name} {label}: {type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''}")
                    failures += 1
                    continue
                print(f"ok   sm_{capability} {launch.name} {label}: {compiled.registers} "
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
    launches = sum(2 + case.outputs["stats"] for case in CASES) + len(BALANCE_CASES)
    assert result.stdout.count("ok   sm_") == launches * len(TARGETS), result.stdout


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
