"""What one router call costs besides its kernels' work: the kernels it launches and its host time.

One training micro-batch through a Megatron-Core TopKRouter's routing, forward and backward
(T tokens, one MoE layer), per path: Megatron's routing unpatched with no balancing loss (the
router's own kernels), with aux_loss and with global_aux_loss; moe-lbl's micro and global scope
on Megatron's routing (in torch operations with kernels=False, or with the engine's backward
step as its kernel, as kernels='auto' runs a router on CUDA that the fused kernels cannot take)
and on the fused kernels. Columns:

- kernels: device kernels the call launches: every dispatched aten operation that runs one
  (views and bare allocations excluded), plus each Triton launch; the fused path's operators
  count by their launches. Counted on CPU on rank 0 of two gloo data-parallel ranks (so that
  the global scope's count collective shows), the second call (the first builds the state),
  the probe loss's own operations subtracted. loss_kernels: the same minus the router's own
  (the path without a balancing loss).
- triton: the Triton launches among them (the interpreter runs them on CPU).
- collectives: the all-reduces it issues (not kernels here; one NCCL kernel each on GPUs).
- host_us: median wall time of the call on CPU at T=8, one rank (no collective): eight tokens'
  arithmetic is negligible, so what remains is Python and dispatch. The fused path's Triton
  launches are recorded, not run (the interpreter's run time is no host time); Triton's own
  launcher, which binds arguments and launches on a GPU, is therefore not in its figure.

The budgets it checks (printed as met or missed): the fused path launches at most 4 kernels
beyond the router's own options (capacity dropping, the expert-bias count update), plus the
collective; on Megatron's routing, moe-lbl's loss launches no more kernels than Megatron's aux
loss; host time of the fused path at most 0.5x, of moe-lbl on Megatron's routing at most 1.05x,
Megatron's routing with its aux loss.

    python -m benchmarks.launches --out benchmarks/results/launches-<date>
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

os.environ.setdefault("TRITON_INTERPRET", "1")  # the fused path's kernels run on CPU, counted as launched

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from benchmarks.common import card, format_table, timestamp, versions, write_csv  # noqa: E402

# Operations that launch no device kernel: views, and allocations without a fill.
NO_KERNEL = {"view", "_unsafe_view", "select", "slice", "expand", "detach", "t", "unsqueeze", "squeeze", "lift_fresh",
             "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "as_strided", "alias",
             "permute", "transpose", "reshape", "_reshape_alias", "split", "unbind", "split_with_sizes", "unflatten",
             "wait_tensor", "_has_compatible_shallow_copy_type", "is_same_size"}
COLLECTIVES = {"allreduce_", "all_reduce", "all_reduce_"}


@dataclass(frozen=True)
class Config:
    name: str
    experts: int
    topk: int
    router: dict = field(default_factory=dict)  # TransformerConfig fields of the router
    options_kernels: int = 0  # kernels the router's own options add (the expert-bias count update)


CONFIGS = [
    Config("E64-k8-softmax", 64, 8),
    Config("E256-k8-sigmoid-bias-groups8x4", 256, 8,
           dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_num_groups=8,
                moe_router_group_topk=4), options_kernels=1),
]


@dataclass(frozen=True)
class Path:
    balancing_type: str  # Megatron's moe_router_load_balancing_type
    options: Optional[dict] = None  # patch_megatron's options; None: unpatched
    # The engine's backward step as its kernel on Megatron's routing: what kernels='auto' runs on
    # CUDA where the fused router cannot take a router (kernels=False: torch operations).
    step_kernel: bool = False


PATHS = {
    "megatron, no balancing loss": Path("none"),
    "megatron aux_loss": Path("aux_loss"),
    "megatron global_aux_loss": Path("global_aux_loss"),
    "moe-lbl micro, megatron routing, kernels=False": Path("aux_loss", dict(scope="micro", kernels=False)),
    "moe-lbl global, megatron routing, kernels=False": Path("aux_loss", dict(scope="global", kernels=False)),
    "moe-lbl micro, megatron routing, step kernel": Path("aux_loss", dict(scope="micro", kernels=False), True),
    "moe-lbl global, megatron routing, step kernel": Path("aux_loss", dict(scope="global", kernels=False), True),
    "moe-lbl micro, fused": Path("aux_loss", dict(scope="micro", kernels=True)),
    "moe-lbl global, fused": Path("aux_loss", dict(scope="global", kernels=True)),
}
COLUMNS = ["config", "path", "kernels", "loss_kernels", "triton", "collectives", "host_us", "tokens", "card",
           "versions", "timestamp", "command"]


class _Count(TorchDispatchMode):
    """Counts the device kernels and collectives of the dispatched operations."""

    def __init__(self):
        super().__init__()
        self.kernels = collections.Counter()
        self.collectives = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, name = func.namespace, func.overloadpacket.__name__
        if name in COLLECTIVES:
            self.collectives += 1
        elif namespace == "aten" and name not in NO_KERNEL:
            self.kernels[name] += 1
        return func(*args, **(kwargs or {}))


def _router(config: Config, path: Path, logits, weight):
    """The path's router, after a first call (which builds a patched layer's state)."""
    from moe_lbl.demo.tiny_gpt import build_router

    router = build_router(config.experts, config.topk, moe_router_load_balancing_type=path.balancing_type,
                          moe_aux_loss_coeff=0.0 if path.balancing_type == "none" else 1e-2, **config.router)
    _call(router, logits.clone().requires_grad_(), weight)
    if path.step_kernel:
        from moe_lbl.patches.megatron.layer import layer_of

        layer_of(router).balancer.kernels = True
    return router


def _call(router, logits, weight):
    """One micro-batch: forward through routing, backward from the probe loss sum(probs * weight)."""
    probs, _ = router.routing(logits)
    (probs * weight).sum().backward()


def _inputs(config: Config, tokens: int):
    g = torch.Generator().manual_seed(tokens)
    return torch.randn(tokens, 1, config.experts, generator=g), torch.randn(tokens, config.experts, generator=g)


def _count(config: Config, path: Path, tokens: int):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from moe_lbl.kernels import launcher

    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    logits, weight = _inputs(config, tokens)
    router = _router(config, path, logits, weight)
    launches, launch = [], launcher.launch
    launcher.launch = lambda kernel, *args, **kwargs: launches.append(kernel) or launch(kernel, *args, **kwargs)
    logits.requires_grad_()
    try:
        with _Count() as counted:
            _call(router, logits, weight)
        probe = torch.randn(tokens, config.experts, requires_grad=True)
        with _Count() as probed:  # the probe loss alone: the same operations on a leaf tensor
            (probe * weight).sum().backward()
    finally:
        launcher.launch = launch
    kernels = sum(counted.kernels.values()) - sum(probed.kernels.values()) + len(launches)
    return kernels, len(launches), counted.collectives


def _host_us(config: Config, path: Path, repeats: int) -> float:
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from moe_lbl.kernels import launcher

    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    logits, weight = _inputs(config, 8)
    times = []
    router = _router(config, path, logits, weight)  # run: the fused router's first-use check reads results
    with launcher.capture():  # Triton launches recorded, not run
        for repeat in range(repeats + 3):
            x = logits.clone().requires_grad_()
            start = time.perf_counter()
            _call(router, x, weight)
            times.append((time.perf_counter() - start) * 1e6)
            if repeat % 16 == 15:
                moe_lbl_end_step(router)
    return statistics.median(times[3:])


def moe_lbl_end_step(router) -> None:
    """Close the step now and then, outside the timing, as a training loop's reset would."""
    import moe_lbl

    moe_lbl.end_step(router)


def _measure(rank: int, world_size: int, tokens: int, repeats: int, what: str) -> dict:
    """{(config, path): measurement} on this rank: counts (what="counts") or host times."""
    import moe_lbl

    results = {}
    for config in CONFIGS:
        for name, path in PATHS.items():
            moe_lbl.unpatch_megatron()
            if path.options is not None:
                moe_lbl.patch_megatron(**path.options)
            if what == "counts":
                results[config.name, name] = _count(config, path, tokens)
            else:
                results[config.name, name] = _host_us(config, path, repeats)
            moe_lbl.unpatch_megatron()
    return results


def budgets(rows: list[dict]) -> list[str]:
    """One line per budget: what it asks, what was measured, met or missed."""
    by = {(r["config"], r["path"]): r for r in rows}
    lines = []
    for config in CONFIGS:
        def get(path, column, config=config):
            return float(by[config.name, path][column])

        routing = get("megatron, no balancing loss", "kernels")
        for scope in ("micro", "global"):
            fused = get(f"moe-lbl {scope}, fused", "kernels") - config.options_kernels
            lines.append(f"{config.name}: fused {scope}: {fused:g} kernels beyond the router's options "
                         f"(budget 4): {'met' if fused <= 4 else 'missed'}")
            megatron = get("megatron aux_loss", "kernels") - routing
            reference = get("megatron aux_loss", "host_us")
            paths = [(f"moe-lbl {scope}, fused", 0.5)]
            for variant in ("step kernel", "kernels=False"):
                path = f"moe-lbl {scope}, megatron routing, {variant}"
                paths.append((path, 1.05))
                ours = get(path, "kernels") - routing
                lines.append(f"{config.name}: {path}: its loss {ours:g} kernels against Megatron's aux loss "
                             f"{megatron:g}: {'met' if ours <= megatron else 'missed'}")
            for path, limit in paths:
                ratio = get(path, "host_us") / reference
                lines.append(f"{config.name}: {path}: host time {ratio:.2f}x Megatron's routing with aux loss "
                             f"(budget {limit}x): {'met' if ratio <= limit else 'missed'}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.launches", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per path for host_us")
    parser.add_argument("--out", default="benchmarks/results/launches")
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.repeats < 1:
        parser.error(f"tokens and repeats must be >= 1, got {args.tokens} and {args.repeats}")
    from moe_lbl.demo.tiny_gpt import spawn

    command = "python -m benchmarks.launches " + " ".join(argv if argv is not None else sys.argv[1:])
    counts = spawn(_measure, 2, args.tokens, args.repeats, "counts")[0]
    host = spawn(_measure, 1, args.tokens, args.repeats, "host")[0]
    common = dict(tokens=args.tokens, card=card(), versions=versions(), timestamp=timestamp(), command=command)
    rows = []
    for config in CONFIGS:
        routing = counts[config.name, "megatron, no balancing loss"][0]
        for path in PATHS:
            kernels, triton, collectives = counts[config.name, path]
            rows.append(dict(common, config=config.name, path=path, kernels=kernels, loss_kernels=kernels - routing,
                             triton=triton, collectives=collectives, host_us=f"{host[config.name, path]:.0f}"))
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "launches.csv"), rows, COLUMNS)
    lines = budgets(rows)
    text = "\n".join([format_table(rows, COLUMNS[:7]), "", *lines, "",
                      f"{card()}; {versions()}; T={args.tokens}; {timestamp()}", f"command: {command}"])
    with open(os.path.join(args.out, "launches.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
