"""Router microbenchmarks: the same work by each provider, side by side.

The work and the providers (moe-lbl, Megatron eager, torch.compile of it, TransformerEngine)
are moe_lbl.selftest.speed's, which `moe-lbl selftest` times at the headline shapes; here over
any shapes and ops (forward, backward, both), with a CSV and a plot.

    python -m benchmarks.kernels --preset headline --out benchmarks/results/run
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from benchmarks.common import (
    DTYPES,
    card,
    copy_bandwidth_gbps,
    format_table,
    measure_ms,
    timestamp,
    versions,
    write_csv,
)
from moe_lbl.selftest.speed import PROVIDERS, availability, backward_of, bytes_moved, first_call_s, provider_fn

OPS = ("fwd", "bwd", "both")
COLUMNS = ["provider", "op", "score_function", "tokens", "experts", "topk", "dtype", "median_ms", "p20_ms",
           "p80_ms", "gbps", "floor_ms", "of_floor", "speedup_vs_eager", "first_call_s", "status", "card", "versions",
           "timestamp", "command"]
PRESETS = {
    "tiny": dict(tokens=[256], experts=[8], topk=[2], dtypes=["fp32"]),
    "headline": dict(tokens=[16384, 65536, 262144], experts=[64, 128, 256], topk=[4, 8], dtypes=["bf16"]),
    "sweep": dict(tokens=[1024, 4096, 16384, 65536, 262144], experts=[8, 64, 128, 160, 256],
                  topk=[1, 2, 4, 8], dtypes=["fp32", "bf16"]),
}


def _routing(k: int, score_function: str) -> dict:
    return dict(score_function=score_function, use_pre_softmax=k == 1)


def _timed(fn, op, logits, grad, k, score_function):
    def forward():
        return fn(logits, k, _routing(k, score_function))

    if op == "fwd":
        return measure_ms(forward)  # with autograd recording, as in training
    if op == "bwd":
        outputs = forward()
        return measure_ms(lambda: backward_of(outputs, grad, retain_graph=True))
    return measure_ms(lambda: backward_of(forward(), grad, retain_graph=True))


def run(providers, ops, tokens, experts, topk, dtypes, score_function, command) -> tuple[list[dict], float]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bandwidth = copy_bandwidth_gbps()
    common = dict(card=card(), versions=versions(), timestamp=timestamp(), command=command,
                  score_function=score_function)
    rows = []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for num_experts in experts:
            for k in topk:
                if k > num_experts:
                    continue
                for num_tokens in tokens:
                    g = torch.Generator(device=device).manual_seed(num_tokens + num_experts + k)
                    logits = torch.randn(num_tokens, num_experts, generator=g, device=device).to(dtype)
                    logits.requires_grad_()
                    grad = torch.randn(num_tokens, num_experts, generator=g, device=device).to(dtype)
                    eager_ms = {}
                    for provider in providers:
                        reason = availability(provider)
                        first_call = ""
                        if not reason:
                            try:
                                routing = _routing(k, score_function)
                                seconds = first_call_s(provider_fn(provider), logits, grad, k, routing)
                                first_call = f"{seconds:.3f}"
                            except Exception as error:  # the timed runs below report it
                                first_call = f"failed: {type(error).__name__}"
                        for op in ops:
                            row = dict(common, provider=provider, op=op, tokens=num_tokens, experts=num_experts,
                                       topk=k, dtype=dtype_name, first_call_s=first_call)
                            if reason:
                                rows.append(dict(row, status=reason))
                                continue
                            try:
                                median, p20, p80 = _timed(provider_fn(provider), op, logits, grad, k, score_function)
                            except Exception as error:  # report, keep measuring the others
                                rows.append(dict(row, status=f"failed: {type(error).__name__}: {error}"[:300]))
                                continue
                            moved = bytes_moved(op, num_tokens, num_experts, dtype)
                            floor_ms = moved / (bandwidth * 1e9) * 1e3
                            if provider == "eager":
                                eager_ms[op] = median
                            rows.append(dict(
                                row, status="ok", median_ms=f"{median:.4f}", p20_ms=f"{p20:.4f}", p80_ms=f"{p80:.4f}",
                                gbps=f"{moved / (median * 1e-3) / 1e9:.4g}", floor_ms=f"{floor_ms:.4f}",
                                of_floor=f"{floor_ms / median:.4g}",
                                speedup_vs_eager=f"{eager_ms[op] / median:.3g}" if op in eager_ms else ""))
    return rows, bandwidth


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r["status"] == "ok" and r["op"] == "both" and r.get("speedup_vs_eager")]
    dtypes = sorted({r["dtype"] for r in measured}) or ["none"]
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        series = {}
        for r in measured:
            if r["dtype"] == dtype:
                series.setdefault((r["provider"], r["experts"], r["topk"]), []).append(
                    (int(r["tokens"]), float(r["speedup_vs_eager"])))
        for (provider, experts, k), points in sorted(series.items()):
            points.sort()
            ax.plot(*zip(*points), marker="o", label=f"{provider} E={experts} k={k}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.set_ylabel("speedup over Megatron eager (fwd+bwd)")
        ax.set_title(f"{dtype} on {rows[0]['card'] if rows else '?'}")
        ax.grid(True, alpha=0.3)
        if series:
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="headline")
    parser.add_argument("--tokens", type=int, nargs="+")
    parser.add_argument("--experts", type=int, nargs="+")
    parser.add_argument("--topk", type=int, nargs="+")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES))
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--score-function", choices=["softmax", "sigmoid"], default="softmax")
    parser.add_argument("--out", default="benchmarks/results/kernels")
    args = parser.parse_args(argv)
    if "eager" not in args.providers:
        args.providers.insert(0, "eager")  # the speedup column needs it
    config = {key: getattr(args, key) or value for key, value in PRESETS[args.preset].items()}
    bad = [n for name in ("tokens", "experts", "topk") for n in config[name] if n < 1]
    if bad:
        parser.error(f"tokens, experts and topk must be >= 1, got {bad}")
    command = "python -m benchmarks.kernels " + " ".join(argv if argv is not None else sys.argv[1:])
    rows, bandwidth = run(args.providers, args.ops, config["tokens"], config["experts"], config["topk"],
                          config["dtypes"], args.score_function, command)
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "kernels.csv"), rows, COLUMNS)
    plot(rows, os.path.join(args.out, "kernels.png"))
    shown = ["provider", "op", "tokens", "experts", "topk", "dtype", "median_ms", "p20_ms", "p80_ms", "gbps",
             "of_floor", "speedup_vs_eager", "first_call_s"]
    print(f"{rows[0]['card'] if rows else card()}; copy bandwidth {bandwidth:.1f} GB/s (read + write); {versions()}")
    print(format_table([r for r in rows if r["status"] == "ok"], shown))
    for reason in sorted({(r["provider"], r["status"]) for r in rows if r["status"] != "ok"}):
        print(f"{reason[0]}: {reason[1]}")
    print(f"wrote {os.path.join(args.out, 'kernels.csv')} and kernels.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
