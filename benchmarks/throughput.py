"""Training throughput of a Megatron-Core GPT-MoE under each balancing mode.

Data-parallel ranks (gloo on CPU, NCCL on GPUs) with gradient accumulation, the same model, seed
and data in every mode. Modes run interleaved within each repeat, so that drift of the machine
affects all alike; the spread of the step-time ratio to micro over repeats is reported.

    python -m benchmarks.throughput --ranks 2 --out benchmarks/results/run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from benchmarks.common import card, format_table, timestamp, versions, write_csv

MODES = {
    "micro": dict(scope="micro"),
    "global-sync": dict(scope="global", async_sync=False),
    "global-async": dict(scope="global", async_sync=True),
    "hybrid": dict(scope="global", micro_coeff_ratio=0.01),  # the paper's hybrid: micro at 1%
    "megatron-global": None,  # unpatched Megatron-Core, moe_router_load_balancing_type="global_aux_loss"
}
COLUMNS = ["mode", "status", "ranks", "micro_batches", "micro_batch_size", "seq_length", "tokens_per_step",
           "median_step_ms", "p20_step_ms", "p80_step_ms", "tokens_per_s", "ratio_to_micro", "ratio_min",
           "ratio_max", "micro_max_vio", "global_max_vio", "repeats", "steps", "card", "versions",
           "timestamp", "command"]


@dataclass(frozen=True)
class Options:
    ranks: int = 2
    micro_batches: int = 4
    micro_batch_size: int = 2
    seq_length: int = 64
    hidden_size: int = 64
    layers: int = 2
    num_experts: int = 8
    topk: int = 2
    coeff: float = 1e-2
    steps: int = 8
    warmup: int = 2
    repeats: int = 3
    modes: tuple = tuple(MODES)

    def __post_init__(self):
        from moe_lbl.validation import check_known, check_options, check_topk

        check_options(self, ("ranks", "micro_batches", "micro_batch_size", "seq_length", "hidden_size", "layers",
                             "num_experts", "topk", "steps", "repeats"), self.ranks)
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        check_topk(self.topk, self.num_experts)
        check_known("modes", self.modes, tuple(MODES))


def _run_mode(rank: int, options: Options, mode: str):
    import moe_lbl
    from moe_lbl.demo.tiny_gpt import TinyGPT, build_gpt, synthetic_batches, train_step, wrap_ddp

    moe_lbl.unpatch_megatron()
    settings = MODES[mode]
    balancing_type = "aux_loss"
    if settings is None:
        balancing_type = "global_aux_loss"
    else:
        settings = dict(settings)
        ratio = settings.pop("micro_coeff_ratio", 0.0)
        moe_lbl.patch_megatron(coeff=options.coeff, micro_coeff=ratio * options.coeff, **settings)
    spec = TinyGPT(num_layers=options.layers, hidden_size=options.hidden_size, num_attention_heads=4,
                   num_experts=options.num_experts, topk=options.topk, moe_ffn_hidden_size=options.hidden_size,
                   vocab_size=256, seq_length=options.seq_length, load_balancing_type=balancing_type,
                   aux_loss_coeff=options.coeff)
    model, config = build_gpt(spec, seed=0)
    ddp = wrap_ddp(model, config)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    times, micro_vio, global_vio = [], [], []
    for step in range(options.warmup + options.steps):
        batches = synthetic_batches(step, rank, options.micro_batches, options.micro_batch_size,
                                    options.seq_length, spec.vocab_size)
        start = time.perf_counter()
        train_step(ddp, optimizer, batches)
        elapsed = time.perf_counter() - start
        if step >= options.warmup:
            times.append(elapsed * 1e3)
            layers = moe_lbl.balance_metrics(ddp)  # outside the timed region: it is a collective
            if layers:
                micro_vio.append(statistics.mean(b.micro_max_vio for b in layers))
                global_vio.append(statistics.mean(b.global_max_vio for b in layers))
    moe_lbl.unpatch_megatron()
    return times, micro_vio, global_vio


def _worker(rank: int, world_size: int, options: Options):
    results = {mode: [] for mode in options.modes}
    for _ in range(options.repeats):
        for mode in options.modes:
            results[mode].append(_run_mode(rank, options, mode))
    return results


def summarize(results: dict, options: Options, command: str) -> list[dict]:
    tokens_per_step = options.ranks * options.micro_batches * options.micro_batch_size * options.seq_length
    common = dict(ranks=options.ranks, micro_batches=options.micro_batches,
                  micro_batch_size=options.micro_batch_size, seq_length=options.seq_length,
                  tokens_per_step=tokens_per_step, repeats=options.repeats, steps=options.steps,
                  card=card(), versions=versions(), timestamp=timestamp(), command=command)
    rows = []
    for mode, repeats in results.items():
        times = [t for run in repeats for t in run[0]]
        quantiles = statistics.quantiles(times, n=10, method="inclusive")
        median = statistics.median(times)
        row = dict(common, mode=mode, status="ok", median_step_ms=f"{median:.2f}",
                   p20_step_ms=f"{quantiles[1]:.2f}", p80_step_ms=f"{quantiles[7]:.2f}",
                   tokens_per_s=f"{tokens_per_step / (median * 1e-3):.0f}")
        if "micro" in results:
            ratios = [statistics.median(run[0]) / statistics.median(base[0])
                      for run, base in zip(repeats, results["micro"])]
            row.update(ratio_to_micro=f"{statistics.median(ratios):.4f}", ratio_min=f"{min(ratios):.4f}",
                       ratio_max=f"{max(ratios):.4f}")
        micro_vio = [v for run in repeats for v in run[1]]
        global_vio = [v for run in repeats for v in run[2]]
        if micro_vio:
            row.update(micro_max_vio=f"{statistics.mean(micro_vio):.3f}",
                       global_max_vio=f"{statistics.mean(global_vio):.3f}")
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Options()
    for name in ("ranks", "micro_batches", "micro_batch_size", "seq_length", "hidden_size", "layers",
                 "num_experts", "topk", "steps", "warmup", "repeats"):
        flag = "--experts" if name == "num_experts" else f"--{name.replace('_', '-')}"
        parser.add_argument(flag, dest=name, type=int, default=getattr(defaults, name))
    parser.add_argument("--coeff", type=float, default=defaults.coeff)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--out", default="benchmarks/results/throughput")
    args = parser.parse_args(argv)
    fields = {k: v for k, v in vars(args).items() if k not in ("out", "modes")}
    try:
        options = Options(**fields, modes=tuple(args.modes))
    except ValueError as error:
        parser.error(str(error))
    from moe_lbl.demo.tiny_gpt import spawn

    command = "python -m benchmarks.throughput " + " ".join(argv if argv is not None else sys.argv[1:])
    results = spawn(_worker, options.ranks, options)[0]
    rows = summarize(results, options, command)
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "throughput.csv"), rows, COLUMNS)
    print(f"{card()}; {versions()}; {options.ranks} ranks x {options.micro_batches} micro-batches x "
          f"{options.micro_batch_size} x {options.seq_length} tokens, "
          f"{options.repeats} repeats x {options.steps} steps")
    print(format_table(rows, ["mode", "median_step_ms", "p20_step_ms", "p80_step_ms", "tokens_per_s",
                              "ratio_to_micro", "ratio_min", "ratio_max", "micro_max_vio", "global_max_vio"]))
    print(f"wrote {os.path.join(args.out, 'throughput.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
