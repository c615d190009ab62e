"""Runtime adapter: moe-lbl's balancing engine inside Megatron-Core's TopKRouter.

What it replaces (and restores on unpatch), by what the installed Megatron-Core has
(compatibility.Features tells the versions):
- the micro-batch aux loss becomes the engine's micro/global/hybrid loss, one engine per layer:
  TopKRouter._apply_aux_loss or apply_load_balancing_loss; TopKRouter._apply_global_aux_loss
  becomes a no-op and is_aux_loss_enabled follows the engine (losses.py);
- TopKRouter.routing records the dispatched tokens for the balance metrics and runs the fused
  Triton router instead of Megatron's routing where kernels are on (routing.py);
- the per-step reset closes every engine's step after the gradient sync, whatever balancing
  type is configured, and Megatron's metrics report shows each layer's MaxVio (step.py).
How Megatron's flags map onto the engine and its log names: configuration.py; one router's state
(engine, groups, log row): layer.py; the live patch: live.py.

Methods are patched on the class (router.py imports moe_utils' functions by name, so patching
moe_utils would change nothing), guarded by a sentinel attribute. While patched, each replacement's
`__wrapped__` is the original it replaced, and its docstring says what it replaces and why.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Optional

from moe_lbl.patches.megatron import live
from moe_lbl.patches.megatron.compatibility import (
    DDP_MODULE,
    FINALIZE_MODULE,
    LOGGING_MODULE,
    NEWEST_TESTED_MEGATRON,
    SUPPORTED_MEGATRON,
    Features,
    MegatronInstall,
    UnsupportedMegatronVersion,
    check_megatron_version,
    features,
    megatron_core_install,
    megatron_core_version,
)
from moe_lbl.patches.megatron.configuration import OPTIONS, PatchOptions, resolve_balance_config
from moe_lbl.patches.megatron.layer import drop
from moe_lbl.patches.megatron.losses import (
    _apply_aux_loss,
    _apply_global_aux_loss,
    _apply_load_balancing_loss,
    _is_aux_loss_enabled,
)
from moe_lbl.patches.megatron.routing import _routing
from moe_lbl.patches.megatron.step import _finish_grad_sync, _report, _reset_model_temporary_tensors, iter_balancers

__all__ = [
    "NEWEST_TESTED_MEGATRON", "SUPPORTED_MEGATRON", "Features", "MegatronInstall", "PatchOptions",
    "UnsupportedMegatronVersion", "check_megatron_version", "features", "is_patched", "iter_balancers",
    "megatron_core_install", "megatron_core_version",
    "patch_megatron", "patch_options", "replaced_names", "replacements", "unpatch_megatron",
]

_SENTINEL = "_moe_lbl_patch"


def replacements(found: Optional[Features] = None) -> list[tuple[object, str, object]]:
    """(owner, attribute, replacement) for the installed Megatron-Core."""
    from megatron.core.transformer.moe.router import TopKRouter

    found = features() if found is None else found
    points = [(TopKRouter, "routing", _routing)]
    if found.apply_aux_loss:
        points += [(TopKRouter, "_apply_aux_loss", _apply_aux_loss),
                   (TopKRouter, "is_aux_loss_enabled", _is_aux_loss_enabled)]
        if found.global_aux_loss:
            points.append((TopKRouter, "_apply_global_aux_loss", _apply_global_aux_loss))
    elif "apply_load_balancing_loss" in TopKRouter.__dict__:
        points.append((TopKRouter, "apply_load_balancing_loss", _apply_load_balancing_loss))
    else:
        raise UnsupportedMegatronVersion(
            f"megatron-core {found.version}: TopKRouter has neither _apply_aux_loss nor "
            f"apply_load_balancing_loss; supported: megatron-core{SUPPORTED_MEGATRON}; nothing was patched")
    if found.metrics_tracker:
        points.append((importlib.import_module(LOGGING_MODULE).MoEMetricsTracker, "report", _report))
    if found.reset_model_temporary_tensors:
        points.append((importlib.import_module(FINALIZE_MODULE), "reset_model_temporary_tensors",
                       _reset_model_temporary_tensors))
    else:
        points.append((importlib.import_module(DDP_MODULE).DistributedDataParallel, "finish_grad_sync",
                       _finish_grad_sync))
    return points


def is_patched() -> bool:
    return live.get() is not None


def patch_options() -> Optional[PatchOptions]:
    patch = live.get()
    return None if patch is None else patch.options


def patch_megatron(*, config=None, **options) -> PatchOptions:
    """Make every Megatron-Core TopKRouter compute moe-lbl's load-balancing loss.

    options: the fields of PatchOptions, by name (this signature lists them). kernels: "auto"
    runs the fused Triton router on CUDA logits where the router's options allow it; True
    requires it (CUDA, or TRITON_INTERPRET=1 on CPU); False keeps Megatron's routing.
    Idempotent for the same options; new options re-apply the patch (routers rebuild their
    engine on their next forward). With a TransformerConfig as `config`, the mapping of its
    balancing flags is checked now instead of at the first forward. Nothing is patched if any
    check fails.
    """
    unknown = sorted(set(options) - {option.name for option in OPTIONS})
    if unknown:
        raise TypeError(f"patch_megatron() got unknown options {unknown}: it takes "
                        f"{', '.join(option.name for option in OPTIONS)} and config")
    options = PatchOptions(**options)
    check_megatron_version()
    if config is not None:
        resolve_balance_config(config, options)
    current = live.get()
    if current is not None and current.options == options:
        return options
    from megatron.core.transformer.moe.router import TopKRouter

    if current is None and _SENTINEL in TopKRouter.__dict__:
        raise RuntimeError(
            "TopKRouter is already patched by another copy of moe_lbl.patches.megatron (a reloaded or "
            "second import); call that copy's unpatch_megatron() first. Nothing was patched.")
    found = features()
    points = replacements(found)  # may refuse this Megatron-Core: before anything changes
    unpatch_megatron()
    live.install(live.LivePatch(options, found, [(owner, name, owner.__dict__[name]) for owner, name, _ in points]))
    for owner, name, replacement in points:
        replacement.__wrapped__ = owner.__dict__[name]  # the original, as functools.wraps keeps it
        setattr(owner, name, replacement)
    setattr(TopKRouter, _SENTINEL, options)
    return options


patch_megatron.__signature__ = inspect.Signature(
    [inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=option.default,
                       annotation=option.type) for option in OPTIONS]
    + [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None)],
    return_annotation="PatchOptions")


def unpatch_megatron() -> None:
    """Restore every original and drop the engines of live routers. A no-op when not patched.

    Call it on every rank: counts still in flight are waited for, which is a collective.
    """
    patch = live.install(None)
    if patch is None:
        return
    from megatron.core.transformer.moe.router import TopKRouter

    for owner, name, original in patch.originals:
        current = owner.__dict__.get(name)
        if getattr(current, "__wrapped__", None) is original:
            del current.__wrapped__
        setattr(owner, name, original)
    delattr(TopKRouter, _SENTINEL)
    balancers = [drop(router).balancer for router in list(patch.routers)]
    for balancer in balancers:  # only now, as end_step may raise (ranks that ran different micro-batches)
        balancer.end_step()  # waits for counts in flight: a collective, as on every rank


def replaced_names() -> list[str]:
    """What patch_megatron replaces on the installed Megatron-Core, as dotted names."""
    return [f"{getattr(owner, '__qualname__', owner.__name__)}.{name}" for owner, name, _ in replacements()]
