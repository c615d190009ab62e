"""The main job: the balance batch size from micro-batch to global batch, on a mixed-domain
corpus, on CPU.

A small Megatron-Core GPT-MoE is trained with data-parallel gloo ranks and gradient accumulation,
once per balance (BALANCES: the micro-batch; the micro-batches of all data-parallel ranks at once;
the whole global batch, through the buffer over gradient accumulation), with the same seed, data
order and hyper-parameters. Each micro-batch holds sequences of one domain (drawn at random per
micro-batch), so balancing each micro-batch pushes every domain to use all experts, while
balancing more tokens at once, of more domains, lets domains specialize.
After training, rank 0 evaluates validation loss per domain and records which experts each
domain selects (moe_lbl.record_routing), then the side-by-side table, the trend figure against
balance batch size, per-domain heatmaps (PNG) and wandb runs (offline unless wandb is configured)
are written.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch

from moe_lbl.demo.corpus import DOMAINS, VOCAB_SIZE, build_corpus
from moe_lbl.demo.tiny_gpt import MicroBatch, TinyGPT, build_gpt, causal_mask, device, spawn, train_step, wrap_ddp
from moe_lbl.tables import format_table
from moe_lbl.validation import check_known, check_options, check_topk


@dataclass(frozen=True)
class Balance:
    """Over which tokens f_i is counted: patch_megatron's scope and buffer."""

    scope: str
    buffer: bool
    label: str

    def tokens(self, options: "DemoOptions") -> int:
        """The balance batch size: tokens whose counts one micro-batch's loss uses (with the
        buffer, at the step's last micro-batch; it grows from the first)."""
        tokens = options.micro_batch_size * options.seq_length
        if self.scope == "global":
            tokens *= options.ranks * (options.micro_batches if self.buffer else 1)
        return tokens


BALANCES = {
    "micro": Balance("micro", False, "the micro-batch"),
    "global-no-buffer": Balance("global", False, "the micro-batches of all data-parallel ranks"),
    "global": Balance("global", True, "the global batch (the buffer over gradient accumulation)"),
}


@dataclass(frozen=True)
class DemoOptions:
    steps: int = 300
    ranks: int = 2
    micro_batches: int = 4
    micro_batch_size: int = 2
    seq_length: int = 64
    layers: int = 2
    hidden_size: int = 64
    num_experts: int = 16
    topk: int = 2
    coeff: float = 0.1  # strong enough for balance to bind at this size (see the README)
    lr: float = 3e-3
    seeds: tuple = (0, 1, 2)
    scopes: tuple = tuple(BALANCES)  # of BALANCES
    domains: tuple = DOMAINS
    eval_batches: int = 4
    out: str = "moe-lbl-demo"
    wandb: bool = True

    def __post_init__(self):
        check_options(self, ("steps", "ranks", "micro_batches", "micro_batch_size", "seq_length", "layers",
                              "hidden_size", "num_experts", "topk", "eval_batches"), self.ranks)
        check_topk(self.topk, self.num_experts)
        check_known("scopes", self.scopes, tuple(BALANCES))
        check_known("domains", self.domains, DOMAINS)
        if not self.seeds:
            raise ValueError("at least one seed is needed")
        if not (isinstance(self.coeff, (int, float)) and math.isfinite(self.coeff) and self.coeff >= 0):
            raise ValueError(f"coeff must be a finite number >= 0, got {self.coeff}")


@dataclass
class RunResult:
    scope: str
    seed: int
    losses: list  # training loss per step
    balancing_losses: list
    micro_max_vio: list  # per step, mean over layers
    global_max_vio: list
    step_seconds: list
    val_loss: dict = field(default_factory=dict)  # domain -> mean token loss
    max_frequency: dict = field(default_factory=dict)  # domain -> highest expert frequency
    mean_topk_score: dict = field(default_factory=dict)
    divergence: float = 0.0
    frequency: dict = field(default_factory=dict)  # domain -> layer -> list[float]


# What Megatron-Core says about this machine and the demo's own configuration, on every rank and
# run: CPU training without Apex or TransformerEngine is how the demo runs, and TransformerConfig's
# default CUDA-graph scope is unused here. Other warnings are shown.
KNOWN_WARNINGS = (
    "Apex is not installed",
    "Transformer Engine and Apex are not installed",
    "full scope is deprecated",
)
# What Megatron-Core logs (logger: message start) for the demo's model: 0.19 deprecates GPTModel
# for HybridModel, whose layer specs need TransformerEngine, which the CPU demo cannot use.
KNOWN_LOG_RECORDS = {"megatron.core.models.gpt.gpt_model": "GPTModel IS DEPRECATED"}


class _DropKnownRecord(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def silence_known_notices() -> None:
    """Hide KNOWN_WARNINGS and KNOWN_LOG_RECORDS in this process (each rank calls it first)."""
    for message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=UserWarning)
    for name, start in KNOWN_LOG_RECORDS.items():
        logging.getLogger(name).addFilter(_DropKnownRecord(start))


def missing_extras(options: DemoOptions) -> list[str]:
    """The packages of the demo extra (heatmaps, wandb runs) that these options need and lack."""
    needed = ["matplotlib"] + (["wandb"] if options.wandb else [])
    return [name for name in needed if importlib.util.find_spec(name) is None]


def _spec(options: DemoOptions) -> TinyGPT:
    return TinyGPT(num_layers=options.layers, hidden_size=options.hidden_size, num_attention_heads=4,
                   num_experts=options.num_experts, topk=options.topk, moe_ffn_hidden_size=options.hidden_size,
                   vocab_size=VOCAB_SIZE, seq_length=options.seq_length, aux_loss_coeff=options.coeff)


def _micro_batches(corpus, options: DemoOptions, step: int, rank: int, seed: int) -> list:
    """This rank's micro-batches of a step: each of one domain, drawn by the (seed, step, rank) RNG."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank)
    batches = []
    for _ in range(options.micro_batches):
        domain = options.domains[int(torch.randint(len(options.domains), (1,), generator=g))]
        tokens, labels = corpus.batches("train", domain, options.micro_batch_size, g)
        batches.append(MicroBatch(tokens, labels, torch.ones(tokens.shape, dtype=torch.float32)))
    return batches


def _evaluate(model, corpus, options: DemoOptions, seed: int, result: RunResult) -> None:
    import moe_lbl

    model.eval()
    g = torch.Generator().manual_seed(seed + 77)
    s = options.seq_length
    with torch.no_grad(), moe_lbl.record_routing(model) as recorder:
        for domain in options.domains:
            recorder.domain = domain
            losses = []
            for _ in range(options.eval_batches):
                tokens, labels = corpus.batches("val", domain, options.micro_batch_size, g)
                out = model(tokens.to(device()), torch.arange(s, device=device()).expand(tokens.shape[0], s),
                            causal_mask(s).to(device()), labels=labels.to(device()))
                losses.append(float(out.float().mean()))
            result.val_loss[domain] = statistics.mean(losses)
    model.train()
    result.max_frequency = recorder.max_frequency()
    result.mean_topk_score = recorder.mean_topk_score()
    result.divergence = recorder.domain_divergence()
    result.frequency = {d: {layer: f.tolist() for layer, f in layers.items()}
                        for d, layers in recorder.selection_frequency().items()}
    os.makedirs(options.out, exist_ok=True)
    recorder.save(os.path.join(options.out, f"routing_{result.scope}_seed{seed}.json"))


def _train_rank(rank: int, world_size: int, options: DemoOptions, scope: str, seed: int) -> RunResult:
    from megatron.core.transformer.moe.moe_utils import track_moe_metrics

    import moe_lbl

    balance = BALANCES[scope]
    moe_lbl.patch_megatron(scope=balance.scope, buffer=balance.buffer, coeff=options.coeff)
    corpus = build_corpus(seq_length=options.seq_length, seed=seed, domains=options.domains)
    spec = _spec(options)
    model, config = build_gpt(spec, seed=seed)
    ddp = wrap_ddp(model, config)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=options.lr)
    result = RunResult(scope, seed, [], [], [], [], [])
    for step in range(options.steps):
        start = time.perf_counter()
        loss = train_step(ddp, optimizer, _micro_batches(corpus, options, step, rank, seed))
        result.step_seconds.append(time.perf_counter() - start)
        logged = {}
        track_moe_metrics(loss_scale=1.0 / options.micro_batches, iteration=step, total_loss_dict=logged,
                          num_layers=spec.num_layers)
        layers = moe_lbl.balance_metrics(ddp)
        result.losses.append(loss)
        # Under moe_router_load_balancing_type="aux_loss" the main term of either scope is
        # logged as Megatron's load_balancing_loss (moe_lbl.patches.megatron.configuration.tracker_names).
        result.balancing_losses.append(float(logged["load_balancing_loss"]))
        result.micro_max_vio.append(statistics.mean(b.micro_max_vio for b in layers))
        result.global_max_vio.append(statistics.mean(b.global_max_vio for b in layers))
        if rank == 0:
            done = (step + 1) / options.steps
            print(f"\r  [{scope} seed {seed}] [{'#' * int(30 * done):<30}] {step + 1}/{options.steps} "
                  f"loss {loss:.3f}", end="" if step + 1 < options.steps else "\n", flush=True)
    if rank == 0:
        _evaluate(model, corpus, options, seed, result)
    moe_lbl.unpatch_megatron()
    return result


def run(options: DemoOptions) -> list[RunResult]:
    """Train and evaluate every (seed, scope); rank 0's results."""
    results = []
    for seed in options.seeds:
        for scope in options.scopes:
            print(f"training scope={scope} seed={seed}: {options.ranks} ranks x {options.micro_batches} "
                  f"micro-batches x {options.micro_batch_size} sequences of {options.seq_length} bytes, "
                  f"{options.steps} steps", flush=True)
            results.append(spawn(_train_rank, options.ranks, options, scope, seed,
                                 initializer=silence_known_notices)[0])
    return results


def _tail_mean(values: list) -> float:
    tail = values[-max(1, len(values) // 4):]
    return sum(tail) / len(tail)


# The trend's metrics: label, value of a run.
TREND = {
    "val loss": lambda r: statistics.mean(r.val_loss.values()),
    "max freq": lambda r: statistics.mean(r.max_frequency.values()),
    "divergence": lambda r: r.divergence,
}


def summary_rows(results: list[RunResult], options: DemoOptions) -> list[dict]:
    """One row per balance, averaged over seeds (the ± is the spread over seeds)."""
    rows = []
    for scope in dict.fromkeys(r.scope for r in results):
        runs = [r for r in results if r.scope == scope]

        def stat(values):
            mean = statistics.mean(values)
            return f"{mean:.4f}" + (f" ±{statistics.stdev(values):.4f}" if len(values) > 1 else "")

        val = [TREND["val loss"](r) for r in runs]
        row = {"scope": scope, "balance tokens": BALANCES[scope].tokens(options), "seeds": len(runs),
               "val loss": stat(val), "val ppl": f"{math.exp(statistics.mean(val)):.3f}"}
        for domain in options.domains:
            row[f"loss {domain}"] = stat([r.val_loss[domain] for r in runs])
        row.update({
            "MaxVio micro": stat([_tail_mean(r.micro_max_vio) for r in runs]),
            "MaxVio global": stat([_tail_mean(r.global_max_vio) for r in runs]),
            "max freq": stat([TREND["max freq"](r) for r in runs]),
            "top-k score": stat([statistics.mean(r.mean_topk_score.values()) for r in runs]),
            "divergence": stat([TREND["divergence"](r) for r in runs]),
            "s/step (CPU)": f"{statistics.mean(_tail_mean(r.step_seconds) for r in runs):.3f}",
        })
        rows.append(row)
    return rows


def paired_differences(results: list[RunResult]) -> str:
    """Each balance minus micro, seed by seed: the comparison the shared seeds make fair."""
    by_key = {(r.scope, r.seed): r for r in results}
    lines = []
    for scope in [s for s in dict.fromkeys(r.scope for r in results) if s != "micro"]:
        seeds = [s for s in dict.fromkeys(r.seed for r in results) if ("micro", s) in by_key and (scope, s) in by_key]
        for label, value in TREND.items():
            if seeds:
                diffs = [value(by_key[scope, s]) - value(by_key["micro", s]) for s in seeds]
                lines.append(f"{scope} - micro, {label}, per seed: " + ", ".join(f"{d:+.4f}" for d in diffs))
    return "\n".join(lines)


STEP_TIME_NOTE = (
    "s/step (CPU): wall time of a step here, 2 gloo ranks sharing the CPU cores of one machine, where the global "
    "balances meet every micro-batch of a tiny model and a fixed few ms per step shows. It is not the method's "
    "cost: the throughput benchmark measured global (async) / micro = 1.056 (1.03 to 1.15) at this shape "
    "(benchmarks/results/cpu-2026-12-01); on GPUs the global balance adds one all-reduce of E + 1 counts per "
    "micro-batch on NCCL, started in the forward and waited for in the backward.")


def format_rows(rows: list[dict]) -> str:
    """Metrics down, scopes across: the table stays readable with many domains."""
    scopes = [r["scope"] for r in rows]
    by_metric = [{"": key, **{r["scope"]: r[key] for r in rows}} for key in rows[0] if key != "scope"]
    return format_table(by_metric, ["", *scopes], rule=False)


def write_trend(results: list[RunResult], options: DemoOptions) -> str:
    """Validation loss, highest expert frequency and domain divergence against balance batch
    size (log axis): each seed's point, and the mean over seeds with its spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scopes = list(dict.fromkeys(r.scope for r in results))
    seeds = list(dict.fromkeys(r.seed for r in results))
    by_key = {(r.scope, r.seed): r for r in results}
    sizes = [BALANCES[scope].tokens(options) for scope in scopes]
    fig, axes = plt.subplots(1, len(TREND), figsize=(4.2 * len(TREND), 3.4))
    for ax, (label, value) in zip(axes, TREND.items()):
        for seed in seeds:
            points = [(size, value(by_key[scope, seed])) for scope, size in zip(scopes, sizes)
                      if (scope, seed) in by_key]
            ax.plot(*zip(*points), marker="o", linewidth=0.8, alpha=0.45, label=f"seed {seed}")
        values = [[value(by_key[scope, seed]) for seed in seeds if (scope, seed) in by_key] for scope in scopes]
        means = [statistics.mean(v) for v in values]
        spread = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        ax.errorbar(sizes, means, yerr=spread, color="black", marker="s", capsize=4, linewidth=1.6,
                    label="mean ± std")
        for scope, size, mean in zip(scopes, sizes, means):
            ax.annotate(scope, (size, mean), textcoords="offset points", xytext=(4, 6), fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("balance batch size (tokens)")
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(options.out, exist_ok=True)
    path = os.path.join(options.out, "balance_trend.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_heatmaps(results: list[RunResult], options: DemoOptions) -> list[str]:
    """Per scope (first seed): per-domain expert selection frequency, one panel per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    os.makedirs(options.out, exist_ok=True)
    for result in [r for r in results if r.seed == options.seeds[0]]:
        layers = sorted({layer for d in result.frequency.values() for layer in d})
        fig, axes = plt.subplots(1, len(layers), figsize=(4 + 0.35 * options.num_experts * len(layers), 3),
                                 squeeze=False)
        for ax, layer in zip(axes[0], layers):
            matrix = [result.frequency[d][layer] for d in options.domains]
            image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_yticks(range(len(options.domains)), options.domains)
            ax.set_xlabel("expert")
            ax.set_title(f"{result.scope} balance, layer {layer}")
        fig.colorbar(image, ax=axes[0].tolist(), label="selection frequency")
        path = os.path.join(options.out, f"expert_frequency_{result.scope}.png")
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def log_wandb(results: list[RunResult], options: DemoOptions) -> str:
    """One wandb run per (scope, seed): offline unless the user configured wandb."""
    import wandb

    mode = "online" if (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "online") else "offline"
    directory = os.path.abspath(options.out)
    for result in results:
        run = wandb.init(project="moe-lbl-demo", name=f"{result.scope}-seed{result.seed}", mode=mode, dir=directory,
                         config={**asdict(options), "scope": result.scope, "seed": result.seed},
                         reinit="finish_previous")
        for step, values in enumerate(zip(result.losses, result.balancing_losses, result.micro_max_vio,
                                          result.global_max_vio)):
            run.log(dict(zip(("loss", "balancing_loss", "max_vio_micro", "max_vio_global"), values)), step=step)
        run.summary.update({f"val_loss/{d}": v for d, v in result.val_loss.items()})
        run.summary.update({f"max_frequency/{d}": v for d, v in result.max_frequency.items()})
        run.summary.update({"divergence": result.divergence})
        run.finish()
    return os.path.join(directory, "wandb")


def main(options: DemoOptions) -> int:
    results = run(options)
    rows = summary_rows(results, options)
    table = format_rows(rows)
    paired = paired_differences(results)
    if paired:
        table += "\n" + paired
    paths = [write_trend(results, options), *write_heatmaps(results, options)]
    os.makedirs(options.out, exist_ok=True)
    with open(os.path.join(options.out, "summary.txt"), "w") as f:
        f.write(table + "\n")
    print(table)
    print("(balance tokens: those over which f is counted, at a step's last micro-batch; validation loss in nats "
          "per byte; MaxVio over the last quarter of training; max freq: the highest expert selection frequency "
          f"per domain, uniform is topk/experts = {options.topk / options.num_experts:.3f})")
    print(STEP_TIME_NOTE)
    for path in paths:
        print(f"wrote {path}")
    if options.wandb:
        print(f"wandb runs in {log_wandb(results, options)}")
    sys.stdout.flush()
    return 0
