"""The installed versions of what moe-lbl runs on, for `moe-lbl info` and the benchmarks' rows."""

from __future__ import annotations

import importlib.metadata

PACKAGES = ("torch", "triton", "megatron-core", "transformer-engine")


def installed_version(*distributions: str) -> str:
    """The version of the first of these distributions that is installed, or "not installed"."""
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def versions() -> str:
    """"name=version" of each installed package of PACKAGES, space-separated (megatron-core: the
    imported one, which a source checkout first on the path may be)."""
    from moe_lbl.patches.megatron.compatibility import megatron_core_version

    found = ((name, megatron_core_version() or "not installed" if name == "megatron-core" else installed_version(name))
             for name in PACKAGES)
    return " ".join(f"{name}={version}" for name, version in found if version != "not installed")
