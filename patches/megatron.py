"""Runtime adapter: moe-lbl's balancing engine inside Megatron-Core's TopKRouter.

What it changes (and restores on unpatch), by what the installed Megatron-Core has:
- the micro-batch aux loss becomes the micro/global/hybrid loss of moe_lbl.engine, one per
  layer: TopKRouter._apply_aux_loss (0.14+) or TopKRouter.apply_load_balancing_loss (0.12, 0.13);
- TopKRouter._apply_global_aux_loss (0.15+): a no-op; the engine's global term replaces
  Megatron's (whose gradient is about 1/dp too small, NVIDIA/Megatron-LM #3672, and whose
  accumulated counts are normalized by the current micro-batch's tokens, #7213);
- TopKRouter.is_aux_loss_enabled (0.14+): true when the engine has a term or seq_aux_loss is set;
- TopKRouter.routing: records the dispatched tokens per expert for the balance metrics, and
  runs the fused Triton router (moe_lbl.kernels; 0.14+) instead of Megatron's PyTorch routing
  when kernels are on: automatically for CUDA logits, or forced with kernels=True;
- the per-step reset closes every engine's step (empties the count buffer), whatever balancing
  type is configured: finalize_model_grads.reset_model_temporary_tensors (0.15+), or
  DistributedDataParallel.finish_grad_sync (0.12 to 0.14), both called by finalize_model_grads;
- MoEMetricsTracker.report (0.18+): adds each layer's MaxVio of the micro-batches and of the
  global batch to what Megatron's training log and writers report.
Megatron's own behaviour the patch follows, by version: MTP routers (0.17+) log at
layer_number + num_layers and, when repeated, weigh their loss 1/mtp_num_layers; 0.18+ log through
moe_logging's metrics tracker and route 16-bit logits in fp32 (the fused kernels get fp32 logits);
0.19+ scale aux and z-loss under per-token loss by the tokens of the whole tensor x context group
(_loss_scale). Routing types that balance by themselves (sinkhorn; quantile_balancing, 0.19+)
take no moe-lbl loss.
Methods are patched on the class (router.py imports moe_utils' functions by name, so patching
moe_utils would change nothing), guarded by a sentinel attribute. While patched, each replacement's
`__wrapped__` is the original it replaced, and its docstring says what it replaces and why.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from moe_lbl.engine import GLOBAL_LOSS_NAME, MICRO_LOSS_NAME, BalanceConfig, LoadBalancer

# The Megatron-Core releases the patch supports; pyproject.toml requires the same range (a test
# keeps the two equal).
SUPPORTED_MEGATRON = ">=0.12.0,<0.20.0"
# The release CI runs the whole suite on (scripts/setup.sh installs it); error messages suggest it.
NEWEST_TESTED_MEGATRON = "0.19.2"
# Megatron-Core 0.17+ wheels declare Requires-Python >= 3.12; their cp311 builds run on 3.11 (without
# --no-deps, pip would also take dependencies built for 3.12 only).
_PIP_NOTE = "; on Python 3.11 add --no-deps --ignore-requires-python, then pip install numpy packaging"

_FINALIZE_MODULE = "megatron.core.distributed.finalize_model_grads"
_DDP_MODULE = "megatron.core.distributed.distributed_data_parallel"
_LOGGING_MODULE = "megatron.core.transformer.moe.moe_logging"
# The balance metrics Megatron's training log (and its TensorBoard and wandb writers) shows beside
# the losses (0.18+): per-layer-averaged MaxVio of the micro-batches and of the global batch.
MAX_VIO_NAMES = ("micro_max_vio", "global_max_vio")

_SENTINEL = "_moe_lbl_patch"
_BALANCER = "_moe_lbl_balancer"


class UnsupportedMegatronVersion(RuntimeError):
    pass


@dataclass(frozen=True)
class PatchOptions:
    """The arguments of patch_megatron; coeff None means Megatron's moe_aux_loss_coeff."""

    scope: str = "global"
    coeff: Optional[float] = None
    micro_coeff: float = 0.0
    buffer: bool = True
    async_sync: bool = True
    kernels: Union[str, bool] = "auto"

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
    """What the installed Megatron-Core offers that the patch depends on."""

    version: str
    padding_mask: bool  # routing(logits, padding_mask) (0.16+)
    apply_aux_loss: bool  # TopKRouter._apply_aux_loss and is_aux_loss_enabled (0.14+)
    global_aux_loss: bool  # the "global_aux_loss" balancing type (0.15+)
    reset_model_temporary_tensors: bool  # else the per-step reset hooks DDP.finish_grad_sync (0.15+)
    metrics_tracker: bool  # moe_logging.get_moe_metrics_tracker; save_to_aux_losses_tracker deprecated (0.18+)
    # Under per-token loss, aux and z-loss scaled by the valid tokens times the tensor x context
    # group size, and z_loss logged averaged over tensor x data x context ranks (0.19+): a change
    # of arithmetic with no new name to detect, so it is read off the version.
    tp_cp_token_scale: bool
    # Routing scores of 16-bit logits kept in fp32 until the final probs (0.18+; read off the
    # version too): the fused kernels then route fp32 logits.
    fp32_routing: bool

    @property
    def fused_routing(self) -> bool:
        return self.apply_aux_loss  # the fused path uses moe_utils.apply_router_token_dropping


def features() -> Features:
    import inspect

    from megatron.core.transformer.moe.router import TopKRouter

    finalize = importlib.import_module(_FINALIZE_MODULE)
    methods = TopKRouter.__dict__
    version = check_megatron_version()
    return Features(
        version=version,
        padding_mask="padding_mask" in inspect.signature(TopKRouter.routing).parameters,
        apply_aux_loss="_apply_aux_loss" in methods and "is_aux_loss_enabled" in methods,
        global_aux_loss="_apply_global_aux_loss" in methods,
        reset_model_temporary_tensors=hasattr(finalize, "reset_model_temporary_tensors"),
        metrics_tracker=importlib.util.find_spec(_LOGGING_MODULE) is not None,
        tp_cp_token_scale=Version(version).release >= (0, 19),
        fp32_routing=Version(version).release >= (0, 18),
    )


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
        logging = importlib.import_module(_LOGGING_MODULE)
        points.append((logging.MoEMetricsTracker, "report", _report))
    if found.reset_model_temporary_tensors:
        finalize = importlib.import_module(_FINALIZE_MODULE)
        points.append((finalize, "reset_model_temporary_tensors", _reset_model_temporary_tensors))
    else:
        ddp = importlib.import_module(_DDP_MODULE).DistributedDataParallel
        points.append((ddp, "finish_grad_sync", _finish_grad_sync))
    return points


def _balancing_types(config) -> dict[str, float]:
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
_SELF_BALANCING_TYPES = ("sinkhorn", "quantile_balancing")


def resolve_balance_config(config, options: PatchOptions) -> BalanceConfig:
    """The engine config for routers built from a Megatron TransformerConfig under these options.

    "aux_loss" takes the patch's scope; "global_aux_loss" is global; both together are the
    hybrid (global at the global_aux_loss coefficient plus micro at the aux_loss one). An explicit
    coeff replaces the coefficient of the scope's main term, micro_coeff > 0 the micro term's.
    """
    types = _balancing_types(config)
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
    routing = next((t for t in _SELF_BALANCING_TYPES if t in types), None)
    if routing and (balance_config.scope == "global" or balance_config.terms()):
        raise ValueError(
            f"{routing} routing balances tokens by itself and takes no load-balancing loss; "
            f"moe-lbl cannot apply scope={balance_config.scope!r} to it: use "
            "moe_router_load_balancing_type='aux_loss' (or 'global_aux_loss'), or unpatch_megatron()"
        )
    return balance_config


def tracker_names(config, balance_config: BalanceConfig) -> dict[str, str]:
    """Megatron tracker name for each engine term.

    Megatron's training log reduces across ranks (and, in newer versions, reports) only the names
    its configured types ask for: "aux_loss" asks for load_balancing_loss, "global_aux_loss" for
    global_load_balancing_loss. The main term takes the name of the type it stands for; a hybrid
    micro term with no type of its own is logged as micro_load_balancing_loss.
    """
    if balance_config.scope == "micro":
        return {MICRO_LOSS_NAME: "load_balancing_loss"}
    if _balancing_types(config).get("global_aux_loss", 0.0) > 0:
        return {GLOBAL_LOSS_NAME: "global_load_balancing_loss", MICRO_LOSS_NAME: "load_balancing_loss"}
    return {GLOBAL_LOSS_NAME: "load_balancing_loss", MICRO_LOSS_NAME: "micro_load_balancing_loss"}


@dataclass
class _Patch:
    options: PatchOptions
    version: str
    originals: list  # (owner, attribute, original)
    routers: "weakref.WeakSet"
    features: Features
    load_failures: dict = field(default_factory=dict)  # kernel specialization -> why it cannot load, or None
    fallback_warned: set = field(default_factory=set)  # reasons kernels='auto' has warned of

    def original(self, owner, name):
        return next(o for w, n, o in self.originals if w is owner and n == name)


_patch: Optional[_Patch] = None


def is_patched() -> bool:
    return _patch is not None


def patch_options() -> Optional[PatchOptions]:
    return None if _patch is None else _patch.options


def _num_layers(config) -> int:
    return config.num_layers + (getattr(config, "mtp_num_layers", None) or 0)


def balancer_of(router) -> LoadBalancer:
    """The router's engine, built on first use from its config and the patch options.

    Its balance config is resolved again at every call: Megatron reads moe_aux_loss_coeff (and
    the balancing types) at every forward, so a coefficient schedule works patched as unpatched.
    """
    balancer = getattr(router, _BALANCER, None)
    if balancer is None:
        if _patch is None:
            raise RuntimeError("moe-lbl is not patched into Megatron-Core: call moe_lbl.patch_megatron()")
        balancer = LoadBalancer(
            resolve_balance_config(router.config, _patch.options),
            num_experts=router.config.num_moe_experts,
            topk=router.topk,
            sequence_group=_sequence_group(router),
            batch_group=_batch_group(router),
            name=f"the router of layer {router.layer_number}",
        )
        setattr(router, _BALANCER, balancer)
        _patch.routers.add(router)
    elif _patch is not None:
        balancer.config = resolve_balance_config(router.config, _patch.options)
    return balancer


def _sequence_group(router):
    """Tensor x context parallel ranks (they split the same sequences)."""
    if getattr(router, "tp_cp_group", None) is not None:
        return router.tp_cp_group
    from megatron.core import parallel_state

    return parallel_state.get_tensor_and_context_parallel_group()


def _batch_group(router):
    """Tensor x data x context parallel ranks (together they hold the global batch)."""
    if getattr(router, "tp_dp_cp_group", None) is not None:
        return router.tp_dp_cp_group
    from megatron.core import parallel_state

    return parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)


def _loss_scale(router, valid_tokens):
    """Megatron's aux-loss gradient scale, read at backward time as MoEAuxLossAutoScaler does.

    With per-token loss Megatron multiplies aux losses by the local valid tokens, from 0.19 on
    times the tensor x context group size (see TopKRouter.attach_and_log_load_balancing_loss).
    """
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    scale = MoEAuxLossAutoScaler.main_loss_backward_scale
    scale = 1.0 if scale is None else scale
    if router.calculate_per_token_loss and _patch.features.tp_cp_token_scale:
        return scale * valid_tokens * _sequence_group(router).size()  # 0.19+
    return scale * valid_tokens if router.calculate_per_token_loss else scale


def _mtp_repeats(router) -> int:
    """How often one forward runs this router: mtp_num_layers for a repeated MTP layer (0.17+,
    where Megatron divides that layer's aux loss, and the logged z-loss, by it), else 1."""
    config = router.config
    if getattr(router, "is_mtp_layer", False) and getattr(config, "mtp_use_repeated_layer", False):
        return config.mtp_num_layers or 1
    return 1


def _log_layer(router) -> int:
    """The tracker row of this router's values: MTP routers (0.17+) log after the decoder layers."""
    if getattr(router, "is_mtp_layer", False):
        return router.layer_number + router.config.num_layers
    return router.layer_number


def _track(name, value, router, **groups):
    """Megatron's per-layer tracker: moe_logging's metrics tracker (0.18+, where
    save_to_aux_losses_tracker is a deprecated wrapper of it), else save_to_aux_losses_tracker."""
    if _patch.features.metrics_tracker:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

        get_moe_metrics_tracker().record(name, value, _log_layer(router), _num_layers(router.config), **groups)
    else:
        from megatron.core.transformer.moe.moe_utils import save_to_aux_losses_tracker

        save_to_aux_losses_tracker(name, value, _log_layer(router), _num_layers(router.config), **groups)


def _register_callbacks(router, valid_tokens):
    names = tracker_names(router.config, balancer_of(router).config)

    def report(name, value):
        _track(names[name], value / _mtp_repeats(router), router, reduce_group=_sequence_group(router))

    return (lambda: _loss_scale(router, valid_tokens) / _mtp_repeats(router)), report


def _apply_aux_loss(self, probs, scores_for_aux_loss, routing_map, with_padding_mask=False):
    """Replaces TopKRouter._apply_aux_loss (0.14+): the micro-batch aux loss becomes the engine's
    micro, global or hybrid loss, its gradient attached to the aux-loss scores.
    """
    balancer = balancer_of(self)
    if not balancer.enabled:
        return probs
    valid_tokens = routing_map.sum() // self.topk if with_padding_mask else routing_map.shape[0]
    grad_scale, report = _register_callbacks(self, valid_tokens)
    return balancer.attach(probs, scores_for_aux_loss, routing_map.sum(dim=0), valid_tokens, grad_scale, report)


def _apply_load_balancing_loss(self, activation, load_balancing_loss_func):
    """Replaces TopKRouter.apply_load_balancing_loss (0.12, 0.13): as _apply_aux_loss, for the
    versions whose aux loss arrives as a partial of switch_load_balancing_loss_func. Other loss
    functions (seq_aux_loss) go to Megatron's original.
    """
    from megatron.core.transformer.moe.moe_utils import switch_load_balancing_loss_func
    from megatron.core.transformer.moe.router import TopKRouter

    if getattr(load_balancing_loss_func, "func", None) is not switch_load_balancing_loss_func:
        return _patch.original(TopKRouter, "apply_load_balancing_loss")(self, activation, load_balancing_loss_func)
    balancer = balancer_of(self)
    if not balancer.enabled:
        return activation
    scores = load_balancing_loss_func.keywords["probs"]
    counts = load_balancing_loss_func.keywords["tokens_per_expert"]
    grad_scale, report = _register_callbacks(self, scores.shape[0])
    return balancer.attach(activation, scores, counts, scores.shape[0], grad_scale, report)


def _apply_global_aux_loss(self, probs, *args, **kwargs):
    """Replaces TopKRouter._apply_global_aux_loss (0.15+) with nothing: the engine's global term
    takes its place (Megatron's has the gradient and normalization bugs #3672 and #7213).
    """
    return probs


def _is_aux_loss_enabled(self) -> bool:
    """Replaces TopKRouter.is_aux_loss_enabled (0.14+): true when the engine has a term or
    seq_aux_loss is set, so that Megatron computes the aux-loss scores the engine needs.
    """
    return balancer_of(self).enabled or self.get_aux_loss_coeff("seq_aux_loss") > 0


# Balancing types the fused path computes; any other (sinkhorn, quantile balancing, a newer
# Megatron's own) keeps Megatron's routing.
_FUSED_BALANCING_TYPES = {"aux_loss", "global_aux_loss", "none"}


def _fused_unsupported(router, logits) -> Optional[str]:
    """Why the fused router cannot serve this router's options, or None."""
    from moe_lbl.kernels.topk_router import MAX_EXPERTS, MAX_TOPK, SCORE_FUNCTIONS, SUPPORTED_DTYPES

    config = router.config
    if not _patch.features.fused_routing:
        return f"megatron-core {_patch.version} (the fused path needs 0.14 or newer)"
    other_types = sorted(t for t, coeff in _balancing_types(config).items()
                         if t not in _FUSED_BALANCING_TYPES and (coeff > 0 or t != "seq_aux_loss"))
    if other_types:
        return f"{', '.join(other_types)} balancing"
    if router.score_function not in SCORE_FUNCTIONS:
        return f"score function {router.score_function!r} (the kernels have {', '.join(SCORE_FUNCTIONS)})"
    if getattr(router, "router_replay", None) is not None:
        return "router replay"
    if getattr(config, "moe_router_fusion", False):
        return "moe_router_fusion (TransformerEngine's fused router) is on"
    if config.num_moe_experts > MAX_EXPERTS or router.topk > MAX_TOPK:
        return f"more than {MAX_EXPERTS} experts or top-k above {MAX_TOPK}"
    if logits.dtype not in SUPPORTED_DTYPES:
        return f"router logits in {logits.dtype}"
    return None


def _fused_options(router, logits, padding_mask, training: bool) -> dict:
    """fused_topk_router's arguments for this router and call (the gradient sources as flags)."""
    config = router.config
    return dict(
        score_function=router.score_function, use_pre_softmax=config.moe_router_pre_softmax,
        num_groups=config.moe_router_num_groups, group_topk=config.moe_router_group_topk,
        scaling_factor=config.moe_router_topk_scaling_factor, expert_bias=router.expert_bias,
        padding_mask=padding_mask, compute_stats=training, dense=True, sparse=False,
        lbl_grad=training and balancer_of(router).enabled,
        z_grad=training and config.moe_z_loss_coeff is not None)


def _on_gpu(logits) -> bool:
    """Logits the compiled kernels run on (kernels='auto' fuses only these)."""
    return logits.is_cuda


def _load_failure(router, logits, padding_mask) -> Optional[str]:
    """Why the kernels for this call fail to compile or load on its GPU, or None; once per
    specialization (compiling on meta tensors, before anything runs: a backward that could not
    compile would otherwise fail after the forward had been fused)."""
    if not _on_gpu(logits):
        return None  # the interpreter compiles nothing
    from moe_lbl.kernels.topk_router import load_router

    training = router.training and torch.is_grad_enabled()
    options = _fused_options(router, logits, padding_mask, training)
    logits = _kernel_logits(router, logits)
    num_tokens = logits.numel() // router.config.num_moe_experts
    key = (logits.dtype, logits.device, num_tokens == 1, num_tokens % 16 == 0,
           *((name, value if not isinstance(value, torch.Tensor) else value.dtype)
             for name, value in sorted(options.items())))
    if key not in _patch.load_failures:
        try:
            load_router(logits.view(-1, router.config.num_moe_experts), router.topk, backward=training,
                        **{**options, "lbl_grad": (lambda: None) if options["lbl_grad"] else None,
                           "z_grad": (lambda: 0.0) if options["z_grad"] else None})
            _patch.load_failures[key] = None
        except Exception as error:  # whatever the first launch would raise, it raises here
            _patch.load_failures[key] = f"the kernels failed to compile or load: {type(error).__name__}: " + (
                str(error).strip().splitlines() or [""])[0]
    return _patch.load_failures[key]


def _kernels_on(router, logits, padding_mask) -> bool:
    """Whether this call runs the fused kernels. kernels='auto' falls back to Megatron's routing,
    with one warning per reason; kernels=True raises the reason instead."""
    mode = _patch.options.kernels
    if mode is False or (mode == "auto" and not _on_gpu(logits)):
        return False
    from moe_lbl.kernels import interpreting

    if mode is True and not (_on_gpu(logits) or interpreting()):
        raise RuntimeError("patch_megatron(kernels=True) needs CUDA logits (or TRITON_INTERPRET=1 on CPU)")
    reason = _fused_unsupported(router, logits) or _load_failure(router, logits, padding_mask)
    if reason is None:
        return True
    if mode is True:
        raise ValueError(f"patch_megatron(kernels=True) cannot fuse this router: {reason}; "
                         "use kernels='auto' to fall back to Megatron's routing where needed")
    if reason not in _patch.fallback_warned:
        _patch.fallback_warned.add(reason)
        warnings.warn(f"moe-lbl: the fused router falls back to Megatron's routing: {reason}", stacklevel=3)
    return False


def _fused_routing(router, logits, padding_mask):
    """TopKRouter.routing on the fused kernels: the same outputs, losses and logged values."""
    from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping

    from moe_lbl.kernels import fused_topk_router

    config = router.config
    dtype = logits.dtype
    logits = _kernel_logits(router, logits.view(-1, config.num_moe_experts))
    if padding_mask is not None:
        padding_mask = padding_mask.reshape(-1)
    training = router.training and torch.is_grad_enabled()
    balancer = balancer_of(router)
    z_coeff = None
    if training and config.moe_z_loss_coeff is not None:
        z_coeff = config.moe_z_loss_coeff / _sequence_group(router).size()
    handle = []  # the balancing gradient needs counts that the forward produces

    def z_grad():
        # d(coeff * mean_valid lse^2)/d lse_t = 2 coeff lse_t / N, times the aux-loss scale
        # (which carries a factor N under per-token loss).
        return 2 * z_coeff * _loss_scale(router, stats.valid_tokens) / stats.valid_tokens.clamp(min=1)

    options = _fused_options(router, logits, padding_mask, training)
    options["lbl_grad"] = (lambda: handle[0].gradient()) if options["lbl_grad"] else None
    options["z_grad"] = z_grad if options["z_grad"] else None
    out = fused_topk_router(logits, router.topk, **options)
    stats = out.stats
    if z_coeff is not None:
        z_value = stats.z_sum / stats.valid_tokens.clamp(min=1)  # z_loss / coeff, as Megatron logs it
        groups = {"avg_group": _batch_group(router)} if _patch.features.tp_cp_token_scale else {}
        _track("z_loss", z_value / _mtp_repeats(router), router, **groups)
    probs, routing_map = out.probs.to(dtype), out.routing_map
    if config.moe_expert_capacity_factor is not None:
        probs, routing_map = apply_router_token_dropping(
            probs, routing_map, router_topk=router.topk, capacity_factor=config.moe_expert_capacity_factor,
            drop_policy=config.moe_token_drop_policy, pad_to_capacity=config.moe_pad_expert_input_to_capacity)
    if options["lbl_grad"] is not None:  # a balancing loss on this micro-batch
        grad_scale, report = _register_callbacks(router, stats.valid_tokens)
        handle.append(balancer.register(stats.aux_counts, stats.valid_tokens, stats.score_sums, grad_scale, report))
    if torch.is_grad_enabled() and (training or router.enable_expert_bias):
        if stats is not None and config.moe_expert_capacity_factor is None:
            load = stats.dispatch_counts
        else:
            load = _dispatched(routing_map, padding_mask)
        if training:
            balancer.record_load(load)
        if router.enable_expert_bias:
            # What TopKRouter._apply_expert_bias does, which in 0.16 fails with a padding mask
            # (it combines the [T, E] map with the [T] mask without broadcasting).
            with torch.no_grad():
                router.local_tokens_per_expert += load
    return probs, routing_map


def _kernel_logits(router, logits):
    """The logits the kernels route: fp32 where Megatron routes 16-bit logits in fp32 (0.18+),
    else as they are (the kernels round scores to the logits dtype, as Megatron did before).

    Softmax after top-k over all experts chooses by the logits themselves and rounds only the
    final probs, so 16-bit logits stay 16-bit there: half the bytes, 32-bit sort keys.
    """
    config = router.config
    chosen_by_logits = (router.score_function == "softmax" and not config.moe_router_pre_softmax
                        and not config.moe_router_group_topk)
    return logits.float() if _patch.features.fp32_routing and not chosen_by_logits else logits


def _dispatched(routing_map, padding_mask):
    if padding_mask is not None:
        routing_map = routing_map & ~padding_mask.reshape(-1, 1)
    return routing_map.sum(dim=0)


def _routing(self, logits, padding_mask=None):
    """Replaces TopKRouter.routing: runs the fused kernels when they are on, else Megatron's
    routing; records each training micro-batch's dispatched tokens for the balance metrics.
    """
    from megatron.core.transformer.moe.router import TopKRouter

    if _kernels_on(self, logits, padding_mask):
        return _fused_routing(self, logits, padding_mask)
    original = _patch.original(TopKRouter, "routing")
    if padding_mask is None:
        probs, routing_map = original(self, logits)
    else:
        probs, routing_map = original(self, logits, padding_mask=padding_mask)
    if self.training and torch.is_grad_enabled():  # once per micro-batch, also under recompute
        balancer_of(self).record_load(_dispatched(routing_map, padding_mask))
    return probs, routing_map


def _end_steps(module) -> None:
    for submodule in module.modules():
        balancer = getattr(submodule, _BALANCER, None)
        if balancer is not None:
            balancer.end_step()


def _reset_model_temporary_tensors(config, model):
    """Replaces finalize_model_grads.reset_model_temporary_tensors (0.15+): after Megatron's own
    reset, closes every engine's step (empties the count buffer), whatever the balancing type.
    """
    finalize = importlib.import_module(_FINALIZE_MODULE)
    _patch.original(finalize, "reset_model_temporary_tensors")(config, model)
    for chunk in model:
        _end_steps(chunk)


def _finish_grad_sync(self, *args, **kwargs):
    """Replaces DistributedDataParallel.finish_grad_sync (0.12 to 0.14, which have no
    reset_model_temporary_tensors): after the gradient sync, closes every engine's step.
    """
    ddp = importlib.import_module(_DDP_MODULE).DistributedDataParallel
    result = _patch.original(ddp, "finish_grad_sync")(self, *args, **kwargs)
    _end_steps(self)
    return result


def _report(self, loss_scale, iteration, *args, track_names=None, **kwargs):
    """Replaces MoEMetricsTracker.report (0.18+): first records each layer's MaxVio of the last
    step (micro-batches and global batch; a collective, as report's own reduction is) and adds
    them to the reported names, so Megatron's log and writers show them beside the losses.
    """
    from moe_lbl.metrics import layer_balance

    logging = importlib.import_module(_LOGGING_MODULE)
    routers = sorted(_patch.routers, key=lambda r: getattr(r, _BALANCER).serial)  # the same order on every rank
    for router in routers if loss_scale else []:
        balancer = getattr(router, _BALANCER)
        balance = layer_balance(router.layer_number, balancer)
        if balance is not None:  # report multiplies by loss_scale (1 / micro-batches): undo it
            device = balancer.last_step_loads[0].device
            for name, value in zip(MAX_VIO_NAMES, (balance.micro_max_vio, balance.global_max_vio)):
                self.record(name, torch.tensor(value / loss_scale, device=device), _log_layer(router),
                            _num_layers(router.config))
    if track_names is not None:  # every rank adds the names: report's reduction spans pipeline stages
        track_names = [track_names] if isinstance(track_names, str) else list(track_names)
        track_names += [name for name in MAX_VIO_NAMES if name not in track_names]
    return _patch.original(logging.MoEMetricsTracker, "report")(
        self, loss_scale, iteration, *args, track_names=track_names, **kwargs)


def iter_balancers(model) -> Iterator[tuple[int, LoadBalancer]]:
    """(layer_number, engine) for every router of a model (or a list of model chunks)."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        for module in chunk.modules():
            balancer = getattr(module, _BALANCER, None)
            if balancer is not None:
                yield module.layer_number, balancer


def patch_megatron(scope: str = "global", coeff: Optional[float] = None, micro_coeff: float = 0.0,
                   buffer: bool = True, async_sync: bool = True, kernels: Union[str, bool] = "auto",
                   config=None) -> PatchOptions:
    """Make every Megatron-Core TopKRouter compute moe-lbl's load-balancing loss.

    kernels: "auto" runs the fused Triton router on CUDA logits where the router's options allow
    it; True requires it (CUDA, or TRITON_INTERPRET=1 on CPU); False keeps Megatron's routing.
    Idempotent for the same arguments; new arguments re-apply the patch (routers rebuild their
    engine on their next forward). With a TransformerConfig as `config`, the mapping of its
    balancing flags is checked now instead of at the first forward. Nothing is patched if any
    check fails.
    """
    global _patch
    options = PatchOptions(scope, coeff, micro_coeff, buffer, async_sync, kernels)
    version = check_megatron_version()
    if config is not None:
        resolve_balance_config(config, options)
    if _patch is not None and _patch.options == options:
        return options
    from megatron.core.transformer.moe.router import TopKRouter

    if _patch is None and _SENTINEL in TopKRouter.__dict__:
        raise RuntimeError(
            "TopKRouter is already patched by another copy of moe_lbl.patches.megatron (a reloaded or "
            "second import); call that copy's unpatch_megatron() first. Nothing was patched.")
    found = features()
    points = replacements(found)  # may refuse this Megatron-Core: before anything changes
    unpatch_megatron()
    _patch = _Patch(options, version, [(owner, name, owner.__dict__[name]) for owner, name, _ in points],
                    weakref.WeakSet(), found)
    for owner, name, replacement in points:
        replacement.__wrapped__ = owner.__dict__[name]  # the original, as functools.wraps keeps it
        setattr(owner, name, replacement)
    setattr(TopKRouter, _SENTINEL, options)
    return options


def unpatch_megatron() -> None:
    """Restore every original and drop the engines of live routers. A no-op when not patched.

    Call it on every rank: counts still in flight are waited for, which is a collective.
    """
    global _patch
    if _patch is None:
        return
    from megatron.core.transformer.moe.router import TopKRouter

    patch, _patch = _patch, None
    for owner, name, original in patch.originals:
        current = owner.__dict__.get(name)
        if getattr(current, "__wrapped__", None) is original:
            del current.__wrapped__
        setattr(owner, name, original)
    delattr(TopKRouter, _SENTINEL)
    balancers = []
    for router in list(patch.routers):
        balancers.append(getattr(router, _BALANCER))
        delattr(router, _BALANCER)
    for balancer in balancers:  # only now, as end_step may raise (ranks that ran different micro-batches)
        balancer.end_step()  # waits for counts in flight: a collective, as on every rank


def replaced_names() -> list[str]:
    """What patch_megatron replaces on the installed Megatron-Core, as dotted names."""
    return [f"{getattr(owner, '__qualname__', owner.__name__)}.{name}" for owner, name, _ in replacements()]
