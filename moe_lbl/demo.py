"""A short CPU run of a Megatron-Core GPT-MoE under the patch, once per balancing scope.

Data-parallel gloo ranks with gradient accumulation; prints the step loss, the balancing loss
as Megatron's own tracker reports it, and the MaxVio of micro-batches and of the global batch.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from moe_lbl.testing.harness import TinyGPT, build_gpt, spawn, synthetic_batches, train_step, wrap_ddp


@dataclass(frozen=True)
class DemoOptions:
    steps: int = 20
    ranks: int = 2
    micro_batches: int = 4
    micro_batch_size: int = 2
    num_experts: int = 8
    topk: int = 2
    coeff: float = 1e-2
    lr: float = 3e-3
    seed: int = 0
    scopes: tuple = ("micro", "global")

    def __post_init__(self):
        for name in ("steps", "ranks", "micro_batches", "micro_batch_size", "num_experts", "topk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.topk > self.num_experts:
            raise ValueError(f"topk ({self.topk}) must not exceed num_experts ({self.num_experts})")
        cores = os.cpu_count() or 1
        if self.ranks > cores:
            raise ValueError(f"ranks ({self.ranks}) must not exceed this machine's {cores} cores")
        for scope in self.scopes:
            if scope not in ("micro", "global"):
                raise ValueError(f"unknown scope {scope!r}: use 'micro' and/or 'global'")


@dataclass(frozen=True)
class StepRecord:
    step: int
    loss: float
    balancing_loss: float  # as Megatron's track_moe_metrics reports it (mean over layers)
    micro_max_vio: float  # mean over layers
    global_max_vio: float  # mean over layers
    seconds: float


def _train_rank(rank: int, world_size: int, options: DemoOptions, scope: str) -> list[StepRecord]:
    from megatron.core.transformer.moe.moe_utils import track_moe_metrics

    import moe_lbl

    moe_lbl.patch_megatron(scope=scope, coeff=options.coeff)
    spec = TinyGPT(num_experts=options.num_experts, topk=options.topk)
    model, config = build_gpt(spec, seed=options.seed)
    ddp = wrap_ddp(model, config)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=options.lr)
    records = []
    for step in range(options.steps):
        batches = synthetic_batches(options.seed * 100_000 + step, rank, options.micro_batches,
                                    options.micro_batch_size, spec.seq_length, spec.vocab_size)
        start = time.perf_counter()
        loss = train_step(ddp, optimizer, batches)
        seconds = time.perf_counter() - start
        logged = {}
        track_moe_metrics(loss_scale=1.0 / options.micro_batches, iteration=step,
                          total_loss_dict=logged, num_layers=spec.num_layers)
        balance = moe_lbl.balance_metrics(ddp)
        records.append(StepRecord(
            step=step,
            loss=loss,
            # Under moe_router_load_balancing_type="aux_loss" the main term of either scope is
            # logged as Megatron's load_balancing_loss (see patches.megatron.tracker_names).
            balancing_loss=float(logged["load_balancing_loss"]),
            micro_max_vio=sum(b.micro_max_vio for b in balance) / len(balance),
            global_max_vio=sum(b.global_max_vio for b in balance) / len(balance),
            seconds=seconds,
        ))
        if rank == 0 and (step + 1) % max(1, options.steps // 5) == 0:
            print(f"  [{scope}] step {step + 1}/{options.steps}  loss {loss:.3f}  "
                  f"lbl {records[-1].balancing_loss:.4f}", flush=True)
    moe_lbl.unpatch_megatron()
    return records


def run(options: DemoOptions) -> dict[str, list[StepRecord]]:
    """Train once per scope (same seed and data) and return rank 0's records per scope."""
    results = {}
    for scope in options.scopes:
        print(f"training scope={scope}: {options.ranks} ranks x {options.micro_batches} micro-batches "
              f"x {options.micro_batch_size} sequences, {options.steps} steps", flush=True)
        results[scope] = spawn(_train_rank, options.ranks, options, scope)[0]
    return results


def summary_table(results: dict[str, list[StepRecord]]) -> str:
    """Side-by-side table: first and last-quarter means per scope."""
    rows = [("scope", "first loss", "final loss", "balancing loss", "MaxVio micro", "MaxVio global", "s/step")]
    for scope, records in results.items():
        tail = records[-max(1, len(records) // 4):]
        mean = lambda attr: sum(getattr(r, attr) for r in tail) / len(tail)  # noqa: E731
        rows.append((scope, f"{records[0].loss:.4f}", f"{mean('loss'):.4f}", f"{mean('balancing_loss'):.4f}",
                     f"{mean('micro_max_vio'):.3f}", f"{mean('global_max_vio'):.3f}", f"{mean('seconds'):.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n(final = mean of the last quarter of the steps)"
