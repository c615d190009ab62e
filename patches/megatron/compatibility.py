"""Which Megatron-Core releases the patch supports, and what each offers that the patch follows.

Nothing here imports Megatron at module level, and nothing imports moe-lbl: `python
patches/megatron/compatibility.py` prints NEWEST_TESTED_MEGATRON for the setup script.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
from dataclasses import dataclass
from typing import Optional

# The releases the patch supports; pyproject.toml requires the same range (a test keeps the two equal).
SUPPORTED_MEGATRON = ">=0.12.0,<0.20.0"
# The release CI runs the whole suite on (scripts/setup.sh installs it); error messages suggest it.
NEWEST_TESTED_MEGATRON = "0.19.2"
# Megatron-Core 0.17+ wheels declare Requires-Python >= 3.12; their cp311 builds run on 3.11 (without
# --no-deps, pip would also take dependencies built for 3.12 only).
_PIP_NOTE = "; on Python 3.11 add --no-deps --ignore-requires-python, then pip install numpy packaging"

FINALIZE_MODULE = "megatron.core.distributed.finalize_model_grads"
DDP_MODULE = "megatron.core.distributed.distributed_data_parallel"
LOGGING_MODULE = "megatron.core.transformer.moe.moe_logging"


class UnsupportedMegatronVersion(RuntimeError):
    pass


def megatron_core_version() -> Optional[str]:
    """The installed megatron-core version (also from a source checkout), or None."""
    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        try:
            from megatron.core import package_info
        except ImportError:
            return None
        return package_info.__version__


def check_megatron_version(version: Optional[str] = None) -> str:
    """Raise UnsupportedMegatronVersion unless megatron-core is installed in the supported range."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    version = megatron_core_version() if version is None else version
    if version is None:
        raise UnsupportedMegatronVersion(
            f"megatron-core is not installed; moe-lbl's patch needs megatron-core{SUPPORTED_MEGATRON} "
            f"(pip install 'megatron-core=={NEWEST_TESTED_MEGATRON}'{_PIP_NOTE})"
        )
    if not SpecifierSet(SUPPORTED_MEGATRON).contains(Version(version).base_version):
        raise UnsupportedMegatronVersion(
            f"megatron-core {version} is not supported by moe-lbl's patch "
            f"(supported: megatron-core{SUPPORTED_MEGATRON}); nothing was patched. "
            f"Install a supported version, e.g. pip install 'megatron-core=={NEWEST_TESTED_MEGATRON}'{_PIP_NOTE}"
        )
    return version


@dataclass(frozen=True)
class Features:
    """What the installed Megatron-Core offers that the patch depends on, and what follows.

    The one account of the patch's behaviour by version; each field is found by what the
    installed Megatron-Core has, except where no name tells (then by the version).
    """

    version: str
    # routing(logits, padding_mask) (0.16+): padding masks reach the router.
    padding_mask: bool
    # TopKRouter._apply_aux_loss and is_aux_loss_enabled (0.14+): the aux loss is patched there;
    # before (0.12, 0.13), at apply_load_balancing_loss. The fused path needs it.
    apply_aux_loss: bool
    # The "global_aux_loss" balancing type (0.15+): Megatron's own is replaced (its bugs
    # NVIDIA/Megatron-LM #3672 and #7213).
    global_aux_loss: bool
    # finalize_model_grads.reset_model_temporary_tensors (0.15+) carries the per-step reset; before
    # (0.12 to 0.14), DistributedDataParallel.finish_grad_sync.
    reset_model_temporary_tensors: bool
    # moe_logging.get_moe_metrics_tracker (0.18+): values are recorded there
    # (save_to_aux_losses_tracker is a deprecated wrapper), and the MaxVio metrics join its report.
    metrics_tracker: bool
    # Under per-token loss, aux and z-loss scaled by the valid tokens times the tensor x context
    # group size, and z_loss logged averaged over tensor x data x context ranks (0.19+).
    tp_cp_token_scale: bool
    # Routing scores of 16-bit logits kept in fp32 until the final probs (0.18+): the fused
    # kernels then route fp32 logits (but where softmax after top-k chooses by the logits).
    fp32_routing: bool
    # MTP routers (0.17+, detected per router by is_mtp_layer) log after the decoder layers and,
    # when the layer repeats, weigh their aux loss and logged z-loss by 1/mtp_num_layers;
    # sqrtsoftplus scores arrive in 0.17 and quantile_balancing in 0.19 (both detected by name).

    @property
    def fused_routing(self) -> bool:
        return self.apply_aux_loss  # the fused path uses moe_utils.apply_router_token_dropping


def features() -> Features:
    from megatron.core.transformer.moe.router import TopKRouter
    from packaging.version import Version

    finalize = importlib.import_module(FINALIZE_MODULE)
    methods = TopKRouter.__dict__
    version = check_megatron_version()
    release = Version(version).release
    return Features(
        version=version,
        padding_mask="padding_mask" in inspect.signature(TopKRouter.routing).parameters,
        apply_aux_loss="_apply_aux_loss" in methods and "is_aux_loss_enabled" in methods,
        global_aux_loss="_apply_global_aux_loss" in methods,
        reset_model_temporary_tensors=hasattr(finalize, "reset_model_temporary_tensors"),
        metrics_tracker=importlib.util.find_spec(LOGGING_MODULE) is not None,
        tp_cp_token_scale=release >= (0, 19),
        fp32_routing=release >= (0, 18),
    )


if __name__ == "__main__":
    print(NEWEST_TESTED_MEGATRON)
