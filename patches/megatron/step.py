"""The step's end: every engine's step closes after the gradient sync, and Megatron's metrics
report (0.18+) carries each layer's balance beside the losses."""

from __future__ import annotations

import importlib
from typing import Iterator

import torch

from moe_lbl.engine import LoadBalancer
from moe_lbl.patches.megatron import live
from moe_lbl.patches.megatron.compatibility import DDP_MODULE, FINALIZE_MODULE, LOGGING_MODULE
from moe_lbl.patches.megatron.layer import layer_of, layers

# The balance metrics Megatron's training log (and its TensorBoard and wandb writers) shows beside
# the losses (0.18+): per-layer-averaged MaxVio of the micro-batches and of the global batch.
MAX_VIO_NAMES = ("micro_max_vio", "global_max_vio")


def iter_balancers(model) -> Iterator[tuple[int, LoadBalancer]]:
    """(layer_number, engine) for every patched router of a model (or a list of model chunks)."""
    for router, layer in layers(model):
        yield router.layer_number, layer.balancer


def end_steps(model) -> None:
    """Close the step of every patched router of a model (or a list of model chunks)."""
    for _, balancer in iter_balancers(model):
        balancer.end_step()


def _reset_model_temporary_tensors(config, model):
    """Replaces finalize_model_grads.reset_model_temporary_tensors (0.15+): after Megatron's own
    reset, closes every engine's step (empties the count buffer), whatever the balancing type.
    """
    finalize = importlib.import_module(FINALIZE_MODULE)
    live.current().original(finalize, "reset_model_temporary_tensors")(config, model)
    end_steps(model)


def _finish_grad_sync(self, *args, **kwargs):
    """Replaces DistributedDataParallel.finish_grad_sync (0.12 to 0.14, which have no
    reset_model_temporary_tensors): after the gradient sync, closes every engine's step.
    """
    ddp = importlib.import_module(DDP_MODULE).DistributedDataParallel
    result = live.current().original(ddp, "finish_grad_sync")(self, *args, **kwargs)
    end_steps(self)
    return result


def _report(self, loss_scale, iteration, *args, track_names=None, **kwargs):
    """Replaces MoEMetricsTracker.report (0.18+): first records each layer's MaxVio of the last
    step (micro-batches and global batch; a collective, as report's own reduction is) and adds
    them to the reported names, so Megatron's log and writers show them beside the losses.
    """
    from moe_lbl.metrics import layer_balance

    patch = live.current()
    routers = sorted(patch.routers, key=lambda r: layer_of(r).balancer.serial)  # the same order on every rank
    for router in routers if loss_scale else []:
        layer = layer_of(router)
        balance = layer_balance(router.layer_number, layer.balancer)
        if balance is not None:  # report multiplies by loss_scale (1 / micro-batches): undo it
            device = layer.balancer.state.ints.device
            for name, value in zip(MAX_VIO_NAMES, (balance.micro_max_vio, balance.global_max_vio)):
                self.record(name, torch.tensor(value / loss_scale, device=device), layer.log_layer, layer.num_layers)
    if track_names is not None:  # every rank adds the names: report's reduction spans pipeline stages
        track_names = [track_names] if isinstance(track_names, str) else list(track_names)
        track_names += [name for name in MAX_VIO_NAMES if name not in track_names]
    original = patch.original(importlib.import_module(LOGGING_MODULE).MoEMetricsTracker, "report")
    return original(self, loss_scale, iteration, *args, track_names=track_names, **kwargs)
