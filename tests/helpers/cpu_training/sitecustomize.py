"""Megatron's own training loop on CPU with gloo ranks, for the tests only.

Put this folder on PYTHONPATH and set MOELBL_TEST_CPU_TRAINING=1: Python imports this module at the
start of every process, and it acts in the ranks torchrun starts (LOCAL_RANK set) and nowhere
else. megatron.training assumes CUDA throughout; each shim below names the call it removes. The
flags of the test avoid the rest (--transformer-impl local, --distributed-backend gloo, no
fusions, the allgather dispatcher). Two recorders serve the test's checks:
- TensorBoard is not installed here: a writer that appends each scalar Megatron writes to
  `scalars.jsonl` in --tensorboard-dir takes its place (full precision, unlike the console log);
- with MOELBL_TEST_ROUTING_RECORD=DIR, every router's aux-loss routing (per-expert counts of its
  top-k, score sums, tokens) is appended to DIR/rank<R>.jsonl, one line per layer and micro-batch.
"""

import json
import os
import sys
import types
import typing


def _apply():
    import torch

    if torch.cuda.is_available():
        return  # a GPU machine runs Megatron as it is
    if not hasattr(typing, "override"):  # megatron.training.models (0.18+) imports it; Python 3.12+
        import typing_extensions

        typing.override = typing_extensions.override

    # What any CPU run of Megatron-Core needs (router buffers and the loop on
    # torch.cuda.current_device(), DDP waiting on the current stream, the RNG tracker's fork).
    from moe_lbl.patches.cpu import apply_cpu_shims

    apply_cpu_shims()
    # DDP is built under a side stream and the loop synchronizes: torch.cpu has no-op versions.
    for name in ("Stream", "stream", "synchronize"):
        setattr(torch.cuda, name, getattr(torch.cpu, name))
    # Megatron moves the model with .cuda() (Module.cuda calls Tensor.cuda) and creates tensors
    # with device="cuda" (loss reductions, grad norm, log buffers): keep them on the CPU.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    _CpuDevices().__enter__()

    import megatron.training.initialize as initialize
    import megatron.training.training as training

    # initialize_megatron asserts CUDA unless allow_no_cuda.
    original_initialize = training.initialize_megatron
    training.initialize_megatron = lambda *args, **kwargs: original_initialize(*args, **kwargs, allow_no_cuda=True)
    # _initialize_distributed builds the parallel groups only when device_count() > 0, and sets
    # the device of the local rank.
    original_distributed = initialize._initialize_distributed

    def initialize_distributed(*args, **kwargs):
        count, set_device = torch.cuda.device_count, torch.cuda.set_device
        torch.cuda.device_count, torch.cuda.set_device = (lambda: 1), (lambda device: None)
        try:
            return original_distributed(*args, **kwargs)
        finally:
            torch.cuda.device_count, torch.cuda.set_device = count, set_device

    initialize._initialize_distributed = initialize_distributed
    # The wheel ships the dataset helpers compiled (helpers_cpp) but not their Makefile, and
    # initialize_megatron runs make on rank 0.
    import megatron.core.datasets.utils as dataset_utils

    dataset_utils.compile_helpers = lambda: None
    # The JIT warm-up runs fused bias-gelu and bias-dropout kernels on CUDA tensors.
    training.set_jit_fusion_options = lambda *args, **kwargs: None
    _record_scalars()
    if os.environ.get("MOELBL_TEST_ROUTING_RECORD"):
        _record_routing(os.environ["MOELBL_TEST_ROUTING_RECORD"])


class _ScalarWriter:
    """The part of TensorBoard's SummaryWriter that Megatron's training log uses."""

    def __init__(self, log_dir, **kwargs):
        os.makedirs(log_dir, exist_ok=True)
        self.path = os.path.join(log_dir, "scalars.jsonl")

    def add_scalar(self, tag, value, step, *args, **kwargs):
        with open(self.path, "a") as f:
            f.write(json.dumps({"tag": tag, "value": float(value), "step": int(step)}) + "\n")

    def add_text(self, *args, **kwargs):
        pass

    def flush(self):
        pass

    def close(self):
        pass


def _record_scalars():
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = _ScalarWriter
    sys.modules["torch.utils.tensorboard"] = module


def _record_routing(folder):
    from megatron.core.transformer.moe import router as router_module

    original = router_module.compute_routing_scores_for_aux_loss
    path = os.path.join(folder, f"rank{os.environ['RANK']}.jsonl")

    def compute_routing_scores_for_aux_loss(logits, topk, *args, **kwargs):
        routing_map, scores = original(logits, topk, *args, **kwargs)
        record = {"counts": routing_map.sum(0).tolist(), "score_sums": scores.double().sum(0).tolist(),
                  "tokens": int(routing_map.shape[0])}
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        return routing_map, scores

    router_module.compute_routing_scores_for_aux_loss = compute_routing_scores_for_aux_loss


class _CpuDevices(__import__("torch").overrides.TorchFunctionMode):
    """Tensors created with device="cuda" (or cuda:N) are created on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and "cuda" in str(device):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


if os.environ.get("LOCAL_RANK") is not None and os.environ.get("MOELBL_TEST_CPU_TRAINING") == "1":
    _apply()
