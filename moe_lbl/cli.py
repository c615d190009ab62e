"""The `moe-lbl` command line: `info` and `selftest` for bug reports, `demo` for the main job,
`run` to launch a training script with the patch applied."""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys

MAIN_JOB = "bash scripts/setup.sh && .venv/bin/moe-lbl demo"


def info_lines() -> list[str]:
    import torch

    from moe_lbl import __version__
    from moe_lbl.environment import installed_version
    from moe_lbl.patches import megatron as patch

    cuda = (f"{torch.version.cuda}, {torch.cuda.device_count()} device(s): "
            f"{', '.join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))}"
            if torch.cuda.is_available() else f"not available (torch built with CUDA {torch.version.cuda})")
    # The PyPI package called "apex" is an unrelated web toolkit: NVIDIA's has apex.normalization.
    apex = ("NVIDIA apex" if importlib.util.find_spec("apex") and importlib.util.find_spec("apex.normalization")
            else "not installed")
    try:  # the imported megatron.core, which a source checkout first on the path may be
        install = patch.check_megatron_version()
        megatron, supported = install.describe(), f"yes ({install.version})"
        changes = ", ".join(patch.replaced_names())
    except patch.UnsupportedMegatronVersion as error:
        megatron, supported, changes = "unusable (see patch supported)", f"no: {error}", "nothing"
    from moe_lbl.kernels import interpreting

    kernels = ("compiled for CUDA (patch_megatron(kernels='auto') uses them on CUDA logits)"
               if torch.cuda.is_available()
               else "Triton CPU interpreter (TRITON_INTERPRET=1): kernels=True runs them, slowly" if interpreting()
               else "unavailable here (no CUDA); the patch uses Megatron's PyTorch routing")
    lines = [
        f"moe-lbl            {__version__}",
        f"python             {platform.python_version()} ({sys.executable})",
        f"torch              {installed_version('torch')}",
        f"triton             {installed_version('triton')}",
        f"megatron-core      {megatron}",
        f"transformer-engine {installed_version('transformer-engine', 'transformer_engine')}",
        f"apex               {apex}",
        f"CUDA               {cuda}",
        f"patch supported    {supported}",
        f"fused kernels      {kernels}",
        f"patch changes      {changes}",
        f"main job           {MAIN_JOB}",
    ]
    return lines


def _demo(args) -> int:
    from moe_lbl.demo.compare import DemoOptions, missing_extras
    from moe_lbl.demo.compare import main as demo

    try:
        options = DemoOptions(steps=args.steps, ranks=args.ranks, micro_batches=args.micro_batches,
                              micro_batch_size=args.micro_batch_size, seq_length=args.seq_length,
                              layers=args.layers, num_experts=args.experts, topk=args.topk, coeff=args.coeff,
                              seeds=tuple(args.seeds), scopes=tuple(args.scopes), domains=tuple(args.domains),
                              out=args.out, wandb=not args.no_wandb)
    except ValueError as error:
        print(f"moe-lbl demo: {error}", file=sys.stderr)
        return 2
    missing = missing_extras(options)
    if missing:
        print(f"moe-lbl demo: {' and '.join(missing)} not installed: pip install 'moe-lbl[demo]' "
              "(bash scripts/setup.sh installs it)", file=sys.stderr)
        return 2
    return demo(options)


def _analyze(args) -> int:
    from moe_lbl.analysis import RoutingRecorder

    for path in args.records:
        try:
            recorder = RoutingRecorder.load(path)
        except (OSError, ValueError, KeyError) as error:
            print(f"moe-lbl analyze: {path}: {error}", file=sys.stderr)
            return 2
        print(f"== {path}")
        print(recorder.report())
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:  # everything after "run" belongs to the launcher and the script
        from moe_lbl.run import main as run

        run(argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog="moe-lbl", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="run a training script with the patch applied: "
                                    "moe-lbl run [options] -- SCRIPT.py [args]")
    commands.add_parser("info", help="versions, CUDA and patch support, for bug reports")
    selftest = commands.add_parser("selftest", help="check the kernels and the patch on this machine, with a report "
                                                    "to attach to a bug")
    selftest.add_argument("--out", default="moe-lbl-selftest", help="folder for selftest.md and selftest.csv")
    demo = commands.add_parser("demo", help="balance batch size from micro-batch to global batch, on a mixed-domain "
                                            "corpus, on CPU")
    from moe_lbl.demo.compare import BALANCES, DemoOptions
    from moe_lbl.demo.corpus import DOMAINS

    defaults = DemoOptions()
    demo.add_argument("--steps", type=int, default=defaults.steps)
    demo.add_argument("--ranks", type=int, default=defaults.ranks, help="data-parallel gloo ranks")
    demo.add_argument("--micro-batches", type=int, default=defaults.micro_batches,
                      help="gradient-accumulation micro-batches per step")
    demo.add_argument("--micro-batch-size", type=int, default=defaults.micro_batch_size,
                      help="sequences per micro-batch")
    demo.add_argument("--seq-length", type=int, default=defaults.seq_length, help="bytes per sequence")
    demo.add_argument("--layers", type=int, default=defaults.layers)
    demo.add_argument("--experts", type=int, default=defaults.num_experts)
    demo.add_argument("--topk", type=int, default=defaults.topk)
    demo.add_argument("--coeff", type=float, default=defaults.coeff, help="load-balancing loss coefficient")
    demo.add_argument("--seeds", type=int, nargs="+", default=list(defaults.seeds))
    demo.add_argument("--scopes", nargs="+", default=list(defaults.scopes), choices=list(BALANCES),
                      help="the balances to train: " + "; ".join(f"{name}: {b.label}" for name, b in BALANCES.items()))
    demo.add_argument("--domains", nargs="+", default=list(DOMAINS),
                      help=f"corpus domains, from {', '.join(DOMAINS)}")
    demo.add_argument("--out", default=defaults.out, help="folder for the table, heatmaps and wandb runs")
    demo.add_argument("--no-wandb", action="store_true", help="do not write wandb runs")
    analyze = commands.add_parser("analyze",
                                  help="specialization metrics of routing records (moe-lbl demo writes them)")
    analyze.add_argument("records", nargs="+", help="routing_*.json files written by RoutingRecorder.save")
    args = parser.parse_args(argv)
    if args.command == "analyze":
        return _analyze(args)
    if args.command == "info":
        print("\n".join(info_lines()))
        return 0
    if args.command == "selftest":
        from moe_lbl.selftest import main as selftest

        return selftest(args.out)
    return _demo(args)


if __name__ == "__main__":
    sys.exit(main())
