"""`moe-lbl selftest`: the kernels and the patch checked on this machine, in one report.

Sections (each a list of Check rows):
- kernels: the fused router's forward and backward against the float64 reference the package
  ships (kernels/topk_router_reference.py), over every option, on fresh random inputs, with
  poisoned outputs, shapes no block divides, exact ties and NaN rows (kernels.py);
- router: Megatron-Core's router patched with kernels on (kernels="auto" on CUDA, True in the
  interpreter) against the same router on Megatron's routing, and the first-use check's cost
  (router.py);
- graphs (CUDA only): the fused router and the engine captured with torch.cuda.graph and
  replayed over steps, against eager mode (graphs.py);
- speed (CUDA only): do_bench medians of the fused router, Megatron's eager routing,
  torch.compile of it and TransformerEngine's fused router at the headline shapes, with the
  first call's seconds (compiling included) per specialization (speed.py).

Without CUDA the kernels run in Triton's CPU interpreter on a small subset, and the GPU parts
are reported as skipped. The exit code is 0 only if every check that ran passed.
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, fields
from typing import Callable, Iterator

import torch

STATUSES = ("pass", "FAIL", "skipped")


@dataclass
class Check:
    section: str
    name: str
    status: str  # one of STATUSES
    detail: str = ""  # the largest error, a timing, or why it was skipped
    seconds: float = 0.0


def timed(section: str, name: str, body: Callable[[], str]) -> Check:
    """Run body (it returns the detail, and raises AssertionError on a failed check)."""
    start = time.perf_counter()
    try:
        detail, status = body(), "pass"
    except AssertionError as error:
        detail, status = str(error) or "assertion failed", "FAIL"
    except Exception as error:  # a crash is a failed check, named
        detail, status = f"{type(error).__name__}: {error}", "FAIL"
    return Check(section, name, status, " ".join(detail.split())[:300], time.perf_counter() - start)


def environment() -> dict:
    from moe_lbl.environment import versions

    if torch.cuda.is_available():
        card = torch.cuda.get_device_name()
        capability = ".".join(map(str, torch.cuda.get_device_capability()))
        driver = _driver()
        card = f"{card} (sm_{capability.replace('.', '')}), driver {driver}, CUDA {torch.version.cuda}"
    else:
        card = f"no CUDA: CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"
    return dict(card=card, versions=f"python={platform.python_version()} {versions()}",
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                command=" ".join(["moe-lbl", *sys.argv[1:]]) if sys.argv else "moe-lbl selftest")


def _driver() -> str:
    import subprocess

    try:
        found = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown (no nvidia-smi)"
    return found.stdout.strip().splitlines()[0] if found.returncode == 0 and found.stdout.strip() else "unknown"


def sections(cuda: bool) -> Iterator[Check]:
    from moe_lbl.selftest import graphs, kernels, router, speed

    yield from kernels.checks(cuda)
    yield from router.checks(cuda)
    yield from graphs.checks(cuda)
    yield from speed.checks(cuda)


def table(checks: list[Check]) -> str:
    from moe_lbl.tables import format_table

    rows = [dict(section=c.section, check=c.name, status=c.status, s=f"{c.seconds:.2f}", detail=c.detail)
            for c in checks]
    return format_table(rows, ["section", "check", "status", "s", "detail"])


def write_reports(out: str, checks: list[Check], env: dict, cuda: bool) -> tuple[str, str]:
    os.makedirs(out, exist_ok=True)
    csv_path, md_path = os.path.join(out, "selftest.csv"), os.path.join(out, "selftest.md")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[field.name for field in fields(Check)] + list(env))
        writer.writeheader()
        for check in checks:
            writer.writerow({**asdict(check), "seconds": f"{check.seconds:.3f}", **env})
    counts = {status: sum(c.status == status for c in checks) for status in STATUSES}
    lines = ["# moe-lbl selftest", "", *(f"- {key}: {value}" for key, value in env.items()),
             f"- result: {counts['pass']} passed, {counts['FAIL']} failed, {counts['skipped']} skipped", ""]
    if not cuda:
        lines += ["No CUDA device: the kernels ran in Triton's CPU interpreter on a small subset; the GPU parts "
                  "(compiled kernels, the patched router on CUDA, the CUDA-graph replay, speed) were skipped.", ""]
    lines += ["| section | check | status | s | detail |", "|---|---|---|---|---|"]
    lines += [f"| {c.section} | {c.name} | {c.status} | {c.seconds:.2f} | {c.detail.replace('|', '/')} |"
              for c in checks]
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return md_path, csv_path


def main(out: str) -> int:
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are defined
        from moe_lbl.kernels import interpreting

        if not interpreting():
            print("moe-lbl selftest: no CUDA, and the kernels were defined without TRITON_INTERPRET=1 (set it "
                  "before moe_lbl.kernels is imported): they cannot run here", file=sys.stderr)
            return 2
    env = environment()
    print(f"moe-lbl selftest: {env['card']}; {env['versions']}", flush=True)
    checks = []
    for check in sections(cuda):
        checks.append(check)
        print(f"  {check.status:7s} {check.section}: {check.name} ({check.seconds:.1f} s) {check.detail}", flush=True)
    print(table(checks))
    md_path, csv_path = write_reports(out, checks, env, cuda)
    failed = [c for c in checks if c.status == "FAIL"]
    if not cuda:
        print("No CUDA device: the kernels ran in Triton's CPU interpreter on a small subset; "
              "the GPU parts were skipped.")
    print(f"{len(checks) - len(failed)} of {len(checks)} checks passed or were skipped; "
          f"reports: {md_path}, {csv_path}")
    return 1 if failed else 0
