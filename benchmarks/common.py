"""What every benchmark shares: timing, the bandwidth floor, the environment, CSV rows.

Versions and tables are the package's own (moe_lbl.environment, moe_lbl.tables), named here too.
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import time
from typing import Callable

import torch

from moe_lbl.environment import versions
from moe_lbl.tables import format_table

__all__ = ["DTYPES", "card", "copy_bandwidth_gbps", "format_table", "measure_ms", "timestamp", "versions",
           "write_csv"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # the names benchmarks take


def card() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def measure_ms(fn: Callable[[], object], *, min_runs: int = 5, budget_s: float = 1.0) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of fn(): triton.testing.do_bench on CUDA, wall clock on CPU."""
    if torch.cuda.is_available():
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return median, p20, p80
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < budget_s and len(times) < 1000):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    quantiles = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), quantiles[1], quantiles[7]


def copy_bandwidth_gbps(num_bytes: int = 1 << 28) -> float:
    """Device-to-device copy bandwidth, read plus write counted: the floor for memory-bound work."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        num_bytes = min(num_bytes, 1 << 26)
    src = torch.empty(num_bytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    median_ms, _, _ = measure_ms(lambda: dst.copy_(src))
    return 2 * num_bytes / (median_ms * 1e-3) / 1e9


def write_csv(path: str, rows: list[dict], columns: list[str]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})
