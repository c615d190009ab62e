"""Run a training script with moe-lbl patched into Megatron-Core, without editing the script.

    moe-lbl run [options] -- SCRIPT.py [script args]
    torchrun --nproc_per_node 8 -m moe_lbl.run --scope global -- pretrain_gpt.py ...

Every rank applies the patch, then runs SCRIPT.py as __main__ with its own argv. The options are
patch_megatron's (PatchOptions), as flags (--micro-coeff for micro_coeff) or from the environment
(MOE_LBL_MICRO_COEFF; for job systems that only pass environments); flags win. Bad options or an
unsupported Megatron-Core stop before the script starts.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from typing import NamedTuple

from moe_lbl.patches.megatron.configuration import OPTIONS

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


# How each kind of PatchOptions field is read from text.
_PARSERS = {"scope": lambda text, source: text, "number": _float, "bool": _bool, "kernels": _kernels}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def variable(name: str) -> str:
    return "MOE_LBL_" + name.upper()


def _argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-lbl run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for option in OPTIONS:
        parser.add_argument(flag(option.name), dest=option.name,
                            help=f"{option.metadata['help']} ({variable(option.name)}; default {option.default!r})")
    parser.add_argument("script", help="the training script, run as __main__")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments")
    return parser


class Invocation(NamedTuple):
    options: dict  # patch_megatron's keyword arguments
    script: str
    script_args: list


def parse(argv: list[str], environ=os.environ) -> Invocation:
    """What to patch and run, from flags and the environment."""
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
    variables = [variable(option.name) for option in OPTIONS]
    unknown = sorted(v for v in environ if v.startswith("MOE_LBL_") and v not in variables)
    if unknown:
        raise UsageError(f"unknown environment variable {', '.join(unknown)}: the launcher reads "
                         f"{', '.join(variables)}")
    launcher_flags = {flag(option.name) for option in OPTIONS}
    for misplaced in {argument.split("=", 1)[0] for argument in script_args} & launcher_flags:
        if _is_rank_zero():  # as torchrun does, arguments after the script are the script's
            print(f"moe-lbl run: warning: {misplaced} comes after the script, so it goes to the script "
                  "(launcher options go before it)", file=sys.stderr)
    options = {}
    for option in OPTIONS:
        read = _PARSERS[option.metadata["kind"]]
        if environ.get(variable(option.name), "") != "":
            options[option.name] = read(environ[variable(option.name)], variable(option.name))
        given = getattr(args, option.name)
        if given is not None:
            options[option.name] = read(given, flag(option.name))
    if not os.path.isfile(script):
        raise UsageError(f"script not found: {script}")
    return Invocation(options, script, script_args)


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    import moe_lbl
    from moe_lbl.patches.megatron import UnsupportedMegatronVersion, megatron_core_install

    script_dir = None
    try:
        options, script, script_args = parse(argv)
        # The script's directory first on the path, as `python SCRIPT.py` has it, before the patch
        # imports megatron.core: a Megatron-LM checkout there is then the one patched and run.
        script_dir = os.path.dirname(os.path.abspath(script))
        sys.path.insert(0, script_dir)
        applied = moe_lbl.patch_megatron(**options)
    except (UsageError, ValueError, TypeError, UnsupportedMegatronVersion) as error:
        if script_dir is not None:
            sys.path.remove(script_dir)
        print(f"moe-lbl run: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    if _is_rank_zero():
        import torch

        kernels = applied.kernels
        if kernels == "auto":
            kernels = "auto (on: CUDA)" if torch.cuda.is_available() else "auto (off: no CUDA)"
        shown = {option.name: getattr(applied, option.name) for option in OPTIONS}
        shown.update(kernels=kernels, coeff="Megatron's moe_aux_loss_coeff" if applied.coeff is None else applied.coeff)
        print(f"moe-lbl: patched megatron-core {megatron_core_install().describe()}: "
              + " ".join(f"{name}={value}" for name, value in shown.items()), flush=True)
    sys.argv = [script, *script_args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
