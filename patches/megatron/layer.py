"""One patched router's moe-lbl state: its engine, its process groups, and where it logs.

A Layer is made at a router's first use. Its balance config is resolved once per router
forward (`refresh`, called by the routing replacement), because Megatron reads
moe_aux_loss_coeff and the balancing types at every forward (a coefficient schedule works
patched as unpatched); the aux-loss replacements that the forward calls use it as it is.
"""

from __future__ import annotations

import importlib
from typing import Optional, Union

import torch

from moe_lbl import engine
from moe_lbl.engine import GradScale, LoadBalancer, Report, ZLoss
from moe_lbl.patches.megatron import live
from moe_lbl.patches.megatron.compatibility import LOGGING_MODULE
from moe_lbl.patches.megatron.configuration import resolve_balance_config, tracker_names

_LAYER = "_moe_lbl_layer"
_BUFFER = "_moe_lbl_state"  # prefix of the engine's state buffers on the router


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


class Layer:
    """moe-lbl's side of one TopKRouter (held by the router; build with layer_of)."""

    def __init__(self, router, patch: live.LivePatch):
        config = router.config
        self.features = patch.features
        self.options = patch.options
        self.sequence_group = _sequence_group(router)
        self.batch_group = _batch_group(router)
        self.num_layers = config.num_layers + (getattr(config, "mtp_num_layers", None) or 0)
        # MTP routers (0.17+) log after the decoder layers and, when one MTP layer runs
        # mtp_num_layers times per forward, weigh their aux loss and logged z-loss by 1/that.
        mtp = getattr(router, "is_mtp_layer", False)
        self.log_layer = router.layer_number + config.num_layers if mtp else router.layer_number
        self.repeats = (config.mtp_num_layers or 1) if mtp and getattr(config, "mtp_use_repeated_layer", False) else 1
        # Megatron's aux-loss gradient scale: the main loss's; under per-token loss times the valid
        # tokens, from 0.19 on times the tensor x context group size too; over the MTP repeats.
        tokens_factor = None
        if router.calculate_per_token_loss:
            tokens_factor = self.sequence_group.size() if patch.features.tp_cp_token_scale else 1
        self.grad_scale = GradScale(_main_loss_scale, tokens_factor, self.repeats)
        balance_config = resolve_balance_config(config, patch.options)
        self.names = tracker_names(config, balance_config)
        # Each backward step is one fused kernel where the kernels run: on CUDA unless kernels=False,
        # in Triton's interpreter with kernels=True.
        device = router.weight.device
        kernels = patch.options.kernels is True or (patch.options.kernels == "auto" and device.type == "cuda")
        self.balancer = LoadBalancer(balance_config, num_experts=config.num_moe_experts, topk=router.topk,
                                     sequence_group=self.sequence_group, batch_group=self.batch_group,
                                     name=f"the router of layer {router.layer_number}", even_split=True,
                                     device=device, kernels=kernels)
        # The engine's state as buffers of the router: Megatron's CUDA graphs (cuda_graph_impl
        # "local") save and restore a layer's buffers around their warmup and capture passes.
        for index, tensor in enumerate(self.balancer.state.tensors()):
            router.register_buffer(f"{_BUFFER}{index}", tensor, persistent=False)

    def refresh(self, router) -> "Layer":
        """Resolve the balance config from the router's config as it is now (once per forward)."""
        balance_config = resolve_balance_config(router.config, self.options)
        self.balancer.config = balance_config
        self.names = tracker_names(router.config, balance_config)
        return self

    def attach(self, probs: torch.Tensor, scores: torch.Tensor, counts: torch.Tensor,
               valid_tokens: Union[int, torch.Tensor], load: Optional[torch.Tensor] = None,
               z_sum: Optional[torch.Tensor] = None, z_coeff: Optional[float] = None,
               registration=None) -> torch.Tensor:
        """The engine's loss on one micro-batch, its gradient attached to the balancing scores (or
        their sums), its values logged under Megatron's names when backward has them; with z_sum,
        Megatron's z-loss (coeff * mean lse^2) on the same micro-batch."""
        terms = self.balancer.config.terms()
        report = Report({t.scope: self.target(self.names[t.scope], reduce_group=self.sequence_group) for t in terms},
                        divisor=self.repeats)
        z = None
        if z_sum is not None:
            groups = {"avg_group": self.batch_group} if self.features.tp_cp_token_scale else {}
            z = ZLoss(z_sum, z_coeff, self.target("z_loss", **groups))
        return self.balancer.attach(probs, scores, counts, valid_tokens, self.grad_scale, report, load=load, z=z,
                                    registration=registration)

    def target(self, name: str, **groups) -> torch.Tensor:
        """This layer's entry of `name` in Megatron's tracker (a one-element view its values are
        added to), made as Megatron's record makes it where it is missing: moe_logging's metrics
        tracker (0.18+, where save_to_aux_losses_tracker is a deprecated wrapper of it), else the
        aux-loss tracker."""
        def zero():
            return torch.zeros((), device=self.balancer.state.ints.device)

        if self.features.metrics_tracker:
            tracker = importlib.import_module(LOGGING_MODULE).get_moe_metrics_tracker()
            if name not in tracker.metrics:
                tracker.record(name, zero(), self.log_layer, self.num_layers, **groups)
            values = tracker.metrics[name].values
        else:
            from megatron.core.transformer.moe import moe_utils

            tracker = _aux_losses_tracker()
            if name not in tracker:
                moe_utils.save_to_aux_losses_tracker(name, zero(), self.log_layer, self.num_layers, **groups)
            values = tracker[name]["values"]
        return values[self.log_layer - 1:self.log_layer]


def _main_loss_scale() -> Optional[torch.Tensor]:
    """Megatron's aux-loss gradient scale as MoEAuxLossAutoScaler reads it in backward."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    return MoEAuxLossAutoScaler.main_loss_backward_scale


def _aux_losses_tracker() -> dict:
    """Megatron's aux-loss tracker before 0.18 (in parallel_state before 0.13)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe import moe_utils

    getter = getattr(moe_utils, "get_moe_layer_wise_logging_tracker", None)
    return (getter or parallel_state.get_moe_layer_wise_logging_tracker)()


def find(router) -> Optional[Layer]:
    """The router's Layer, or None before its first use."""
    return getattr(router, _LAYER, None)


def layer_of(router) -> Layer:
    """The router's Layer, made at its first use under the live patch (once the router knows
    its layer number: Megatron sets it after building the router)."""
    layer = find(router)
    if layer is None:
        if engine.capturing():
            # Its state would live in the graph's memory pool, made by kernels that replay, and its
            # kernels would be compiled and loaded while the stream is captured.
            raise RuntimeError(f"moe-lbl: the router of layer {router.layer_number} first ran inside a CUDA graph "
                               "capture: run at least one eager training step before capturing (Megatron-Core: "
                               "cuda_graph_warmup_steps >= 1 with cuda_graph_impl='full_iteration')")
        patch = live.current()
        layer = Layer(router, patch)
        setattr(router, _LAYER, layer)
        patch.routers.add(router)
    return layer


def balancer_of(router) -> LoadBalancer:
    """The engine of a patched router."""
    return layer_of(router).balancer


def layers(model):
    """(router, Layer) for every router of a model (or a list of model chunks) that has one."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        for module in chunk.modules():
            layer = getattr(module, _LAYER, None)
            if layer is not None:
                yield module, layer


def drop(router) -> Layer:
    """Detach the router's Layer and its state buffers (unpatch); returns it."""
    layer = getattr(router, _LAYER)
    delattr(router, _LAYER)
    for name in [name for name in router._buffers if name.startswith(_BUFFER)]:
        del router._buffers[name]
    return layer
