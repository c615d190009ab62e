"""What the compiled router kernels will cost on a GPU, read off the compiled code without one.

For each kernel launch of the fused router at the report's configurations, compiled for sm_80,
sm_90 and sm_100 (moe_lbl.kernels.aot): registers, spill bytes, shared memory, warps per CTA,
resident warps per SM, the SASS instructions of the main loop per token, and two times at
T=65536 on an H100:

- issue-bound: warp-instructions per token x T / (132 SMs x 4 schedulers x 1.98 GHz), the time
  if every scheduler issued one instruction every clock;
- floor: the essential bytes (forward: read logits, write probs and the bool map, T*E*(2s+1);
  backward: read logits and the probs gradient, write the logits gradient, 3*T*E*s; s bytes per
  element) at 3.35 TB/s;

and their ratio (issue / floor; at or below 1 the kernel can be memory-bound). The statistics
kernel, which sums the forward's per-program partials (no per-token work), is left out. It is a model: it
is blind to stalls (memory latency, dependent arithmetic, shuffles waiting on each other), to
occupancy too low to hide them, and to instructions outside the main loop; a runtime branch
inside the loop is counted as if always taken. The H100 constants are used for every target, so
the other targets' times compare code, not cards. Only a GPU run measures time.

    python -m benchmarks.compiled --out benchmarks/results/compiled-<date>
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Optional

# The compiler, not the interpreter, must define the kernels; and compile times are first-call
# times only with an empty cache.
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("benchmarks.compiled compiles for GPUs: run it without TRITON_INTERPRET=1")
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="moe-lbl-triton-cache-"))

import torch  # noqa: E402
import triton  # noqa: E402

from benchmarks.common import DTYPES, format_table, timestamp, versions, write_csv  # noqa: E402
from moe_lbl.kernels import aot, fused_topk_router, launcher  # noqa: E402

TOKENS = 65536
H100_ISSUE_PER_S = 132 * 4 * 1.98e9  # warp-instructions per second, one per scheduler per clock
H100_BYTES_PER_S = 3.35e12
# Per SM, for residency: registers, warps, CTAs, shared bytes (sm_80: 164 KB; sm_90/100: 228 KB).
SM_LIMITS = {80: (65536, 64, 32, 164 * 1024), 90: (65536, 64, 32, 228 * 1024), 100: (65536, 64, 32, 228 * 1024)}
COLUMNS = ["kernel", "config", "sm", "registers", "spill_stores", "spill_loads", "shared", "warps_per_cta",
           "resident_warps", "loop_instructions", "tokens_per_loop", "instructions_per_token", "issue_us",
           "floor_us", "issue_over_floor", "compile_s"]


@dataclass(frozen=True)
class Config:
    """One router configuration, run forward and backward as Megatron's patched router does."""

    name: str
    experts: int
    topk: int
    dtype: str = "bf16"
    score_function: str = "softmax"
    use_pre_softmax: bool = False
    num_groups: Optional[int] = None
    group_topk: Optional[int] = None
    expert_bias: bool = False
    sequences: Optional[int] = None  # per-sequence statistics (seq_aux_loss) of this many sequences
    z_loss: bool = True

    def run(self, tokens: int = TOKENS) -> None:
        """Forward with statistics, backward from the probs with balancing and z-loss gradients
        (the z-loss's only with z_loss; and the per-sequence balancing gradient, with sequences)."""
        meta = torch.device("meta")
        logits = torch.empty(tokens, self.experts, dtype=DTYPES[self.dtype], device=meta, requires_grad=True)
        bias = torch.empty(self.experts, device=meta) if self.expert_bias else None
        out = fused_topk_router(
            logits, self.topk, score_function=self.score_function, use_pre_softmax=self.use_pre_softmax,
            num_groups=self.num_groups, group_topk=self.group_topk, expert_bias=bias,
            dense=True, sparse=False, sequences=self.sequences, compute_z=self.z_loss)
        outputs = [out.probs, out.stats.score_sums]
        if self.z_loss:
            outputs.append(out.stats.z_sum)
        if self.sequences:
            outputs.append(out.stats.sequence_score_sums)
        torch.autograd.backward(outputs, [torch.empty_like(t) for t in outputs])

    def essential_bytes(self, kernel: str, tokens: int = TOKENS) -> int:
        size = torch.tensor([], dtype=DTYPES[self.dtype]).element_size()
        if kernel == "router_forward":
            return tokens * self.experts * (2 * size + 1)
        return 3 * tokens * self.experts * size


CONFIGS = [
    Config("E64-k4", 64, 4),
    Config("E128-k8", 128, 8),
    Config("E256-k8", 256, 8),
    Config("E256-k8-sigmoid-bias-groups8x4", 256, 8, score_function="sigmoid", num_groups=8, group_topk=4,
           expert_bias=True),
    Config("E256-k8-sigmoid-bias-groups8x4-seq4", 256, 8, score_function="sigmoid", num_groups=8, group_topk=4,
           expert_bias=True, sequences=4),
    # DeepSeek-V3's recipe: seq_aux_loss and no z-loss.
    Config("E256-k8-sigmoid-bias-groups8x4-seq4-noz", 256, 8, score_function="sigmoid", num_groups=8,
           group_topk=4, expert_bias=True, sequences=4, z_loss=False),
    Config("E64-k2-pre-fp32", 64, 2, dtype="fp32", use_pre_softmax=True),
    Config("E512-k8", 512, 8),
    Config("E2048-k16", 2048, 16),
]


def resident_warps(sm: int, registers: int, warps: int, shared: int) -> int:
    """Warps of this kernel resident on one SM of the target."""
    registers_per_sm, max_warps, max_ctas, shared_per_sm = SM_LIMITS[sm]
    return warps * launcher.resident_ctas(registers, warps, shared, registers_per_sm=registers_per_sm,
                                          shared_per_sm=shared_per_sm, threads_per_sm=32 * max_warps,
                                          max_ctas=max_ctas)


_INSTRUCTION = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", re.MULTILINE)
_LABEL = re.compile(r"^(\.L_x_\d+):", re.MULTILINE)
_BRANCH = re.compile(r"\bBRA\b.*?(\.L_x_\d+)")


def main_loop_instructions(cubin: bytes) -> int:
    """Instructions of the longest loop in the SASS (the persistent loop over token blocks)."""
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
    labels, instructions = {}, []
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        instruction = _INSTRUCTION.match(line)
        if instruction:
            instructions.append(instruction.group(2))
    longest = 0
    for position, text in enumerate(instructions):
        branch = _BRANCH.search(text)
        if branch and labels.get(branch.group(1), position + 1) <= position:
            longest = max(longest, position - labels[branch.group(1)] + 1)
    return longest


def report(configs, capabilities) -> list[dict]:
    rows = []
    for config in configs:
        for compiled in aot.compile_all(config.run, capabilities):
            launch = compiled.launch
            kernel = launch.name
            if "BLOCK_T" not in launch.kwargs:  # router_statistics: a pass over the partials, not the tokens
                continue
            block_t = launch.kwargs["BLOCK_T"]
            loop = main_loop_instructions(compiled.kernel.asm["cubin"])
            per_token = loop * compiled.num_warps / block_t
            issue_us = per_token * TOKENS / H100_ISSUE_PER_S * 1e6
            floor_us = config.essential_bytes(kernel) / H100_BYTES_PER_S * 1e6
            rows.append(dict(
                kernel=kernel, config=config.name, sm=compiled.capability, registers=compiled.registers,
                spill_stores=compiled.spill_stores, spill_loads=compiled.spill_loads, shared=compiled.shared,
                warps_per_cta=compiled.num_warps,
                resident_warps=resident_warps(compiled.capability, compiled.registers, compiled.num_warps,
                                              compiled.shared),
                loop_instructions=loop, tokens_per_loop=block_t, instructions_per_token=f"{per_token:.1f}",
                issue_us=f"{issue_us:.1f}", floor_us=f"{floor_us:.1f}", issue_over_floor=f"{issue_us / floor_us:.2f}",
                compile_s=f"{compiled.seconds:.1f}"))
            print(format_table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compiled", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", choices=[c.name for c in CONFIGS], default=[c.name for c in CONFIGS])
    parser.add_argument("--sm", nargs="+", type=int, choices=aot.TARGETS, default=list(aot.TARGETS))
    parser.add_argument("--out", help="folder for compiled.csv and compiled.txt")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.compiled " + " ".join(argv if argv is not None else sys.argv[1:])
    print(format_table([], COLUMNS).splitlines()[0], flush=True)
    rows = report([c for c in CONFIGS if c.name in args.configs], args.sm)
    text = "\n".join([format_table(rows, COLUMNS), "",
                      f"model: H100 {H100_ISSUE_PER_S / 1e12:.3f}e12 warp-instructions/s, "
                      f"{H100_BYTES_PER_S / 1e12} TB/s, T={TOKENS}; compiled on this machine, no GPU",
                      f"versions: {versions()}", f"timestamp: {timestamp()}", f"command: {command}"])
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        write_csv(os.path.join(args.out, "compiled.csv"), rows, COLUMNS)
        with open(os.path.join(args.out, "compiled.txt"), "w") as f:
            f.write(text + "\n")
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
