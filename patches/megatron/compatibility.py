"""Which Megatron-Core releases the patch supports, and what each offers that the patch follows.

Nothing here imports Megatron at module level, and nothing imports moe-lbl: `python
patches/megatron/compatibility.py` prints NEWEST_TESTED_MEGATRON for the setup script.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
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


@dataclass(frozen=True)
class MegatronInstall:
    """The megatron.core that Python imports here, and the release it says it is.

    A source checkout first on sys.path (`cd Megatron-LM && torchrun pretrain_gpt.py`) shadows an
    installed megatron-core wheel of another release; what runs is the checkout, so its own
    package_info decides. The distribution's metadata only fills in where package_info cannot be
    read, and only when that distribution's files are the imported ones.
    """

    version: str  # the imported release, e.g. "0.19.1" or, from a git checkout, "0.19.1+abc1234"
    location: str  # the imported megatron/core directory
    distribution: Optional[str] = None  # the installed megatron-core distribution's version, if any
    distribution_is_imported: bool = False  # that distribution's files are the ones imported

    @property
    def release(self) -> tuple[int, ...]:
        from packaging.version import Version

        return Version(self.version).release

    def describe(self) -> str:
        """The version, and, where an installed distribution is not what runs, both and where."""
        if self.distribution is None or self.distribution_is_imported:
            return self.version
        return (f"{self.version} (imported from {self.location}; the installed distribution "
                f"megatron-core {self.distribution} is not the one that runs)")


def _imported_location() -> Optional[Path]:
    """The megatron/core directory that `import megatron.core` uses (already imported or not)."""
    module = sys.modules.get("megatron.core")
    if module is not None and getattr(module, "__file__", None):
        return Path(module.__file__).parent.resolve()
    try:  # finds without importing megatron.core (which takes seconds); imports only the namespace
        spec = importlib.util.find_spec("megatron.core")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def _package_info_version(location: Path) -> Optional[str]:
    """__version__ of the package_info.py at location, read without importing megatron.core."""
    module = sys.modules.get("megatron.core.package_info")
    if module is not None and Path(module.__file__).parent.resolve() == location:
        return getattr(module, "__version__", None)
    path = location / "package_info.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("_moe_lbl_megatron_package_info", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)  # standard library only; in a git checkout it asks git for the commit
    except Exception:  # noqa: BLE001 - a broken package_info leaves the distribution's metadata to tell
        return None
    return getattr(module, "__version__", None)


def _how_installed(distribution: importlib.metadata.Distribution, location: Path) -> Optional[str]:
    """"wheel" or "editable" where this distribution installed the megatron/core at location, else None."""
    if Path(distribution.locate_file("megatron/core")).resolve() == location:
        return "wheel"
    direct_url = json.loads(distribution.read_text("direct_url.json") or "{}")
    if direct_url.get("dir_info", {}).get("editable") and direct_url.get("url", "").startswith("file://"):
        source = Path(urllib.parse.unquote(urllib.parse.urlparse(direct_url["url"]).path)).resolve()
        return "editable" if location.is_relative_to(source) else None
    return None


def _public(version: str) -> str:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version).public
    except InvalidVersion:
        return version


def megatron_core_install() -> Optional[MegatronInstall]:
    """Which megatron.core Python imports, and its release; None where there is none."""
    location = _imported_location()
    if location is None:
        return None
    distributions = list(importlib.metadata.distributions(name="megatron-core"))
    imported, how = next(((found, how) for found in distributions if (how := _how_installed(found, location))),
                         (None, None))
    version = _package_info_version(location)
    if imported is not None and (version is None or (how == "wheel" and _public(version) == imported.version)):
        # A wheel's package_info appends the commit of whatever git repository holds the
        # environment; the wheel's metadata names the release cleanly. (An editable install's
        # commit is its checkout's, and stays.)
        version = imported.version
    if version is None:
        raise UnsupportedMegatronVersion(
            f"cannot tell which release the megatron.core at {location} is: it has no readable "
            "package_info.py and no installed megatron-core distribution holds these files. "
            f"Install a supported release (pip install 'megatron-core=={NEWEST_TESTED_MEGATRON}'{_PIP_NOTE}) "
            "or put a complete Megatron-LM checkout first on the path"
        )
    shown = imported if imported is not None else (distributions[0] if distributions else None)
    return MegatronInstall(version=version, location=str(location),
                           distribution=None if shown is None else shown.version,
                           distribution_is_imported=imported is not None)


def megatron_core_version() -> Optional[str]:
    """The imported megatron.core's release (a source checkout's too), or None."""
    install = megatron_core_install()
    return None if install is None else install.version


def check_megatron_version() -> MegatronInstall:
    """The imported megatron.core, or UnsupportedMegatronVersion unless it is a supported release."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    install = megatron_core_install()
    if install is None:
        raise UnsupportedMegatronVersion(
            f"megatron-core is not installed; moe-lbl's patch needs megatron-core{SUPPORTED_MEGATRON} "
            f"(pip install 'megatron-core=={NEWEST_TESTED_MEGATRON}'{_PIP_NOTE})"
        )
    try:
        supported = SpecifierSet(SUPPORTED_MEGATRON).contains(Version(install.version).base_version)
    except InvalidVersion:
        supported = False
    if not supported:
        raise UnsupportedMegatronVersion(
            f"megatron-core {install.describe()} is not supported by moe-lbl's patch "
            f"(supported: megatron-core{SUPPORTED_MEGATRON}); nothing was patched. "
            f"Install a supported version, e.g. pip install 'megatron-core=={NEWEST_TESTED_MEGATRON}'{_PIP_NOTE}"
        )
    return install


@dataclass(frozen=True)
class Features:
    """What the imported Megatron-Core offers that the patch depends on, and what follows.

    The one account of the patch's behaviour by release. Each gate says what it is keyed on: a
    name the imported Megatron-Core has ("by name"), or, where no name tells, the imported
    release (MegatronInstall.version, a source checkout's own, never a shadowed wheel's).
    """

    install: MegatronInstall
    # By name: routing(logits, padding_mask) (0.16+): padding masks reach the router.
    padding_mask: bool
    # By name: TopKRouter._apply_aux_loss and is_aux_loss_enabled (0.14+): the aux loss is patched
    # there; before (0.12, 0.13), at apply_load_balancing_loss. The fused path needs it.
    apply_aux_loss: bool
    # By name: TopKRouter._apply_global_aux_loss, the "global_aux_loss" balancing type (0.15+):
    # Megatron's own is replaced (its bugs NVIDIA/Megatron-LM #3672 and #7213).
    global_aux_loss: bool
    # By name: finalize_model_grads.reset_model_temporary_tensors (0.15+) carries the per-step
    # reset; before (0.12 to 0.14), DistributedDataParallel.finish_grad_sync.
    reset_model_temporary_tensors: bool
    # By name: moe_logging (get_moe_metrics_tracker, 0.18+): values are recorded there
    # (save_to_aux_losses_tracker is a deprecated wrapper), and the MaxVio metrics join its report.
    metrics_tracker: bool
    # By name: attach_and_log_load_balancing_loss(valid_token_count) (0.16+): the aux losses pass
    # their valid tokens (per-token loss scales by them).
    valid_token_count: bool
    # By release (0.19+; a change inside _apply_aux_loss, no name tells): under per-token loss, aux
    # and z-loss scaled by the valid tokens times the tensor x context group size, and z_loss
    # logged averaged over tensor x data x context ranks; seq_aux_loss passes the micro-batch's
    # valid tokens (before, a sequence's).
    tp_cp_token_scale: bool
    # By release (0.18+; a change inside topk_routing_with_score_function, no name tells): routing
    # scores of 16-bit logits kept in fp32 until the final probs, so the fused kernels route fp32
    # logits (but where softmax after top-k chooses by the logits).
    fp32_routing: bool
    # By name, per router (not here): MTP routers (is_mtp_layer, 0.17+) log after the decoder
    # layers and, when the layer repeats, weigh their aux loss and logged z-loss by
    # 1/mtp_num_layers; sqrtsoftplus scores (0.17+) and quantile_balancing (0.19+).

    @property
    def version(self) -> str:
        return self.install.version

    @property
    def fused_routing(self) -> bool:
        return self.apply_aux_loss  # the fused path uses moe_utils.apply_router_token_dropping


def features() -> Features:
    from megatron.core.transformer.moe.router import TopKRouter

    finalize = importlib.import_module(FINALIZE_MODULE)
    methods = TopKRouter.__dict__
    install = check_megatron_version()  # after the import: the megatron.core now in sys.modules
    return Features(
        install=install,
        padding_mask="padding_mask" in inspect.signature(TopKRouter.routing).parameters,
        apply_aux_loss="_apply_aux_loss" in methods and "is_aux_loss_enabled" in methods,
        global_aux_loss="_apply_global_aux_loss" in methods,
        reset_model_temporary_tensors=hasattr(finalize, "reset_model_temporary_tensors"),
        metrics_tracker=importlib.util.find_spec(LOGGING_MODULE) is not None,
        valid_token_count="attach_and_log_load_balancing_loss" in methods and "valid_token_count" in
        inspect.signature(TopKRouter.attach_and_log_load_balancing_loss).parameters,
        tp_cp_token_scale=install.release >= (0, 19),
        fp32_routing=install.release >= (0, 18),
    )


if __name__ == "__main__":
    print(NEWEST_TESTED_MEGATRON)
