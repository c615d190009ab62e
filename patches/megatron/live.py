"""The live patch: what patch_megatron applied, held in one place for every replacement to read."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Optional

from moe_lbl.patches.megatron.compatibility import Features
from moe_lbl.patches.megatron.configuration import PatchOptions


@dataclass
class LivePatch:
    options: PatchOptions
    features: Features
    originals: list  # (owner, attribute, original)
    routers: "weakref.WeakSet" = field(default_factory=weakref.WeakSet)  # routers with a moe-lbl layer
    fallback_warned: set = field(default_factory=set)  # reasons kernels='auto' has warned of

    def original(self, owner, name):
        return next(o for w, n, o in self.originals if w is owner and n == name)


_live: Optional[LivePatch] = None


def get() -> Optional[LivePatch]:
    return _live


def current() -> LivePatch:
    if _live is None:
        raise RuntimeError("moe-lbl is not patched into Megatron-Core: call moe_lbl.patch_megatron()")
    return _live


def install(patch: Optional[LivePatch]) -> Optional[LivePatch]:
    """Make `patch` the live one (None: none); returns the one it replaces."""
    global _live
    previous, _live = _live, patch
    return previous
