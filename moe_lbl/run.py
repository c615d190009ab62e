"""Run a training script with moe-lbl patched into Megatron-Core, without editing the script.

    moe-lbl run [options] -- SCRIPT.py [script args]
    torchrun --nproc_per_node 8 -m moe_lbl.run --scope global -- pretrain_gpt.py ...

Every rank applies the patch, then runs SCRIPT.py as __main__ with its own argv. Options may
also come from the environment (for job systems that only pass environments); flags win:
MOE_LBL_SCOPE, MOE_LBL_COEFF, MOE_LBL_MICRO_COEFF, MOE_LBL_BUFFER, MOE_LBL_ASYNC_SYNC,
MOE_LBL_KERNELS. Bad options or an unsupported Megatron-Core stop before the script starts.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys

ENVIRONMENT = {
    "scope": "MOE_LBL_SCOPE",
    "coeff": "MOE_LBL_COEFF",
    "micro_coeff": "MOE_LBL_MICRO_COEFF",
    "buffer": "MOE_LBL_BUFFER",
    "async_sync": "MOE_LBL_ASYNC_SYNC",
    "kernels": "MOE_LBL_KERNELS",
}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class UsageError(ValueError):
    pass


def _bool(text: str, source: str) -> bool:
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise UsageError(f"{source} must be one of {_TRUE + _FALSE}, got {text!r}")


def _float(text: str, source: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"{source} must be a number, got {text!r}") from None


def _kernels(text: str, source: str):
    return "auto" if text.lower() == "auto" else _bool(text, source)


_PARSERS = {"scope": lambda t, s: t, "coeff": _float, "micro_coeff": _float, "buffer": _bool,
            "async_sync": _bool, "kernels": _kernels}


def _argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-lbl run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scope", help="'global' or 'micro' (MOE_LBL_SCOPE); default global")
    parser.add_argument("--coeff", help="loss coefficient; default: Megatron's moe_aux_loss_coeff")
    parser.add_argument("--micro-coeff", dest="micro_coeff", help="hybrid micro-batch term weight")
    parser.add_argument("--buffer", help="accumulate counts over micro-batches: true/false")
    parser.add_argument("--async-sync", dest="async_sync", help="overlap the count all-reduce: true/false")
    parser.add_argument("--kernels", help="fused Triton router: auto/true/false")
    parser.add_argument("script", help="the training script, run as __main__")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments")
    return parser


def parse(argv: list[str], environ=os.environ) -> tuple[dict, str, list[str]]:
    """(patch_megatron keyword arguments, script, script argv) from flags and the environment."""
    if "--" in argv:
        split = argv.index("--")
        ours, script_part = argv[:split], argv[split + 1:]
        if not script_part:
            raise UsageError("no script after '--'")
        args = _argument_parser().parse_args(ours + script_part[:1])
        script, script_args = script_part[0], script_part[1:]
    else:
        args = _argument_parser().parse_args(argv)
        script, script_args = args.script, args.script_args
    unknown = sorted(v for v in environ if v.startswith("MOE_LBL_") and v not in ENVIRONMENT.values())
    if unknown:
        raise UsageError(f"unknown environment variable {', '.join(unknown)}: the launcher reads "
                         f"{', '.join(ENVIRONMENT.values())}")
    launcher_flags = {"--" + name.replace("_", "-") for name in ENVIRONMENT}
    for flag in {argument.split("=", 1)[0] for argument in script_args} & launcher_flags:
        if _is_rank_zero():  # as torchrun does, arguments after the script are the script's
            print(f"moe-lbl run: warning: {flag} comes after the script, so it goes to the script "
                  "(launcher options go before it)", file=sys.stderr)
    options = {}
    for name, variable in ENVIRONMENT.items():
        if environ.get(variable, "") != "":
            options[name] = _PARSERS[name](environ[variable], variable)
        flag = getattr(args, name)
        if flag is not None:
            options[name] = _PARSERS[name](flag, "--" + name.replace("_", "-"))
    if not os.path.isfile(script):
        raise UsageError(f"script not found: {script}")
    return options, script, script_args


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    import moe_lbl
    from moe_lbl.patches.megatron import UnsupportedMegatronVersion, megatron_core_version

    try:
        options, script, script_args = parse(argv)
        applied = moe_lbl.patch_megatron(**options)
    except (UsageError, ValueError, TypeError, UnsupportedMegatronVersion) as error:
        print(f"moe-lbl run: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    if _is_rank_zero():
        import torch

        kernels = applied.kernels
        if kernels == "auto":
            kernels = "auto (on: CUDA)" if torch.cuda.is_available() else "auto (off: no CUDA)"
        coeff = "Megatron's moe_aux_loss_coeff" if applied.coeff is None else applied.coeff
        print(f"moe-lbl: patched megatron-core {megatron_core_version()}: scope={applied.scope} "
              f"coeff={coeff} micro_coeff={applied.micro_coeff} buffer={applied.buffer} "
              f"async_sync={applied.async_sync} kernels={kernels}", flush=True)
    sys.argv = [script, *script_args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
