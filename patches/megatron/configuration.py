"""The patch's options, and Megatron's balancing flags read as an engine config and log names.

PatchOptions is the one statement of the options: patch_megatron's signature and the launcher's
flags and environment variables (moe_lbl.run) are made from its fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from moe_lbl.engine import BalanceConfig


def _option(default, kind: str, help: str):
    """A PatchOptions field; `kind` says how the launcher reads it from text (moe_lbl.run)."""
    return field(default=default, metadata={"kind": kind, "help": help})


@dataclass(frozen=True)
class PatchOptions:
    """The arguments of patch_megatron."""

    scope: str = _option("global", "scope", "'global' or 'micro': where f is pooled")
    coeff: Optional[float] = _option(None, "number", "loss coefficient; default: Megatron's moe_aux_loss_coeff")
    micro_coeff: float = _option(0.0, "number", "with scope='global', a micro-batch term at this weight (hybrid)")
    buffer: bool = _option(True, "bool", "accumulate counts over the step's micro-batches")
    async_sync: bool = _option(True, "bool", "launch the count all-reduce in forward, wait in backward")
    kernels: Union[str, bool] = _option("auto", "kernels", "fused Triton router: 'auto', True or False")

    def __post_init__(self):
        # BalanceConfig validates every balancing field; coeff None is checked as 0.
        BalanceConfig(self.scope, 0.0 if self.coeff is None else self.coeff,
                      self.micro_coeff, self.buffer, self.async_sync)
        if not (isinstance(self.kernels, bool) or self.kernels == "auto"):
            raise ValueError(f"kernels must be 'auto', True or False, got {self.kernels!r}")
        if self.kernels is True:
            from moe_lbl.kernels import interpreting

            if not (torch.cuda.is_available() or interpreting()):
                raise ValueError("kernels=True runs the fused router on CUDA, and this machine has none: "
                                 "use kernels='auto' (fused where CUDA is) or False (or TRITON_INTERPRET=1 "
                                 "to run the kernels on CPU, slowly)")


OPTIONS = tuple(dataclasses.fields(PatchOptions))


def balancing_types(config) -> dict[str, float]:
    """Megatron's moe_router_load_balancing_type / moe_aux_loss_coeff as {type: coeff}."""
    types = config.moe_router_load_balancing_type
    coeffs = config.moe_aux_loss_coeff
    if isinstance(types, str):
        types = [types]
    if not isinstance(coeffs, (list, tuple)):
        coeffs = [coeffs] * len(types)
    if len(coeffs) != len(types):
        raise ValueError(
            f"moe_aux_loss_coeff {list(coeffs)} must give one coefficient per "
            f"moe_router_load_balancing_type {list(types)}"
        )
    return {t: float(c or 0.0) for t, c in zip(types, coeffs)}


# Routing types that balance by themselves and take no load-balancing loss (quantile_balancing:
# 0.19+, its per-expert bias; Megatron asserts that no aux loss is enabled with it).
SELF_BALANCING_TYPES = ("sinkhorn", "quantile_balancing")


def resolve_balance_config(config, options: PatchOptions) -> BalanceConfig:
    """The engine config for routers built from a Megatron TransformerConfig under these options.

    "aux_loss" takes the patch's scope; "global_aux_loss" is global; both together are the
    hybrid (global at the global_aux_loss coefficient plus micro at the aux_loss one). An explicit
    coeff replaces the coefficient of the scope's main term, micro_coeff > 0 the micro term's.
    """
    types = balancing_types(config)
    aux, global_aux = types.get("aux_loss", 0.0), types.get("global_aux_loss", 0.0)
    if options.scope == "micro":
        if global_aux > 0:
            raise ValueError(
                "moe_router_load_balancing_type asks for 'global_aux_loss' but patch_megatron was "
                "given scope='micro': use scope='global', or drop 'global_aux_loss' from the config"
            )
        balance_config = BalanceConfig("micro", aux if options.coeff is None else options.coeff,
                                       0.0, options.buffer, options.async_sync)
    else:
        main = global_aux if global_aux > 0 else aux
        micro = aux if global_aux > 0 else 0.0
        balance_config = BalanceConfig(
            "global",
            main if options.coeff is None else options.coeff,
            options.micro_coeff if options.micro_coeff > 0 else micro,
            options.buffer,
            options.async_sync,
        )
    routing = next((t for t in SELF_BALANCING_TYPES if t in types), None)
    if routing and (balance_config.scope == "global" or balance_config.terms()):
        raise ValueError(
            f"{routing} routing balances tokens by itself and takes no load-balancing loss; "
            f"moe-lbl cannot apply scope={balance_config.scope!r} to it: use "
            "moe_router_load_balancing_type='aux_loss' (or 'global_aux_loss'), or unpatch_megatron()"
        )
    return balance_config


def tracker_names(config, balance_config: BalanceConfig) -> dict[str, str]:
    """The name Megatron's tracker logs each engine term under, by the term's scope.

    Megatron's training log reduces across ranks (and, in newer versions, reports) only the names
    its configured types ask for: "aux_loss" asks for load_balancing_loss, "global_aux_loss" for
    global_load_balancing_loss. The main term takes the name of the type it stands for; a hybrid
    micro term with no type of its own is logged as micro_load_balancing_loss.
    """
    if balance_config.scope == "micro":
        return {"micro": "load_balancing_loss"}
    if balancing_types(config).get("global_aux_loss", 0.0) > 0:
        return {"global": "global_load_balancing_loss", "micro": "load_balancing_loss"}
    return {"global": "load_balancing_loss", "micro": "micro_load_balancing_loss"}
