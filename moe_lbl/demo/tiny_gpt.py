"""A tiny Megatron-Core GPT-MoE trained with data-parallel ranks on one machine.

What `moe-lbl demo`, the throughput benchmark, the example and the tests train. On CPU the ranks
use gloo and the CPU shims (moe_lbl.patches.cpu); where CUDA is available, NCCL and one GPU per
rank.
`spawn` starts the ranks; `distributed` sets up the process group and Megatron's parallel state;
`build_gpt` makes the model (`build_router` a bare router); `train_step` mirrors Megatron's no-pipelining schedule
(`forward_backward_no_pipelining` hard-codes CUDA tensors) followed by `finalize_model_grads`.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_lbl.patches.cpu import cpu_shims


@dataclass
class TinyGPT:
    """Shape and routing of the test model; `overrides` go to Megatron's TransformerConfig."""

    num_layers: int = 2
    hidden_size: int = 32
    num_attention_heads: int = 4
    num_experts: int = 8
    topk: int = 2
    moe_ffn_hidden_size: int = 32
    vocab_size: int = 64
    seq_length: int = 16
    load_balancing_type: object = "aux_loss"
    aux_loss_coeff: object = 1e-2
    overrides: dict = field(default_factory=dict)


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


@contextlib.contextmanager
def distributed(rank: int, world_size: int, init_file: str, tensor_parallel: int = 1):
    """Process group and Megatron parallel state (plus the CPU shims on CPU), torn down on exit."""
    from megatron.core import parallel_state

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=world_size)
    try:
        with contextlib.nullcontext() if cuda else cpu_shims():
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel)
            try:
                yield
            finally:
                parallel_state.destroy_model_parallel()
    finally:
        dist.destroy_process_group()


def build_router(num_experts: int = 8, topk: int = 2, is_mtp_layer: bool = False, **overrides):
    """A bare training-mode TopKRouter (layer 1 of 1; an MTP layer's router with is_mtp_layer,
    0.17+) on Megatron's default process groups, for each supported Megatron-Core's constructor;
    `overrides` go to its TransformerConfig."""
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(num_layers=1, hidden_size=16, num_attention_heads=1, num_moe_experts=num_experts,
                  moe_router_topk=topk, moe_router_load_balancing_type="aux_loss",
                  moe_aux_loss_coeff=1e-2, use_cpu_initialization=True, add_bias_linear=False)
    kwargs.update(overrides)
    config = TransformerConfig(**kwargs)
    parameters = inspect.signature(TopKRouter.__init__).parameters
    if "pg_collection" in parameters:  # 0.15+
        from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

        mtp = {"is_mtp_layer": True} if is_mtp_layer else {}
        router = TopKRouter(config, pg_collection=get_default_pg_collection(), **mtp)
    elif "model_comm_pgs" in parameters:  # 0.13, 0.14
        from megatron.core.process_groups_config import ModelCommProcessGroups

        router = TopKRouter(config, model_comm_pgs=ModelCommProcessGroups.use_mpu_process_groups())
    else:
        router = TopKRouter(config)
    router.set_layer_number(1)
    return router.train()


def transformer_config(spec: TinyGPT):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_attention_heads,
        ffn_hidden_size=2 * spec.hidden_size,
        num_moe_experts=spec.num_experts,
        moe_router_topk=spec.topk,
        moe_ffn_hidden_size=spec.moe_ffn_hidden_size,
        moe_router_load_balancing_type=spec.load_balancing_type,
        moe_aux_loss_coeff=spec.aux_loss_coeff,
        moe_token_dispatcher_type="allgather",  # alltoall creates a torch.cuda.Stream
        add_bias_linear=False,  # the MoE MLP modifies a view in place with biases on CPU
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    kwargs.update(spec.overrides)
    return TransformerConfig(**kwargs)


def build_gpt(spec: TinyGPT, seed: int = 0):
    """The model (seeded identically on every rank) and its TransformerConfig."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    config = transformer_config(spec)
    torch.manual_seed(seed)
    with contextlib.suppress(Exception):  # the CUDA RNG tracker is not needed on CPU
        model_parallel_cuda_manual_seed(seed)
    layer_spec = get_gpt_layer_local_spec(num_experts=spec.num_experts, moe_grouped_gemm=False)
    model = GPTModel(config=config, transformer_layer_spec=layer_spec,
                     vocab_size=spec.vocab_size, max_sequence_length=spec.seq_length)
    return model.to(device()), config


def wrap_ddp(model, config):
    """Megatron's DistributedDataParallel, grads reduced by finalize_model_grads."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=False)
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)


def causal_mask(seq_length: int) -> torch.Tensor:
    # Passed explicitly: Megatron's default causal mask is built on "cuda".
    mask = torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool), diagonal=1)
    return mask.view(1, 1, seq_length, seq_length)


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [b, s] int64
    labels: torch.Tensor  # [b, s] int64
    loss_mask: torch.Tensor  # [b, s] float, 0 on padding
    padding_mask: Optional[torch.Tensor] = None  # [b, s] bool, True on padding (Megatron's meaning)


def forward_loss(model, batch: MicroBatch) -> torch.Tensor:
    """Mean token loss of one micro-batch (loss_mask-weighted)."""
    dev = device()
    b, s = batch.tokens.shape
    positions = torch.arange(s, device=dev).unsqueeze(0).expand(b, s)
    kwargs = {} if batch.padding_mask is None else {"padding_mask": batch.padding_mask.to(dev)}
    losses = model(batch.tokens.to(dev), positions, causal_mask(s).to(dev), labels=batch.labels.to(dev), **kwargs)
    loss_mask = batch.loss_mask.to(dev)
    return (losses.float() * loss_mask).sum() / loss_mask.sum().clamp(min=1)


def train_step(ddp_model, optimizer, micro_batches: list[MicroBatch]) -> float:
    """One optimizer step as Megatron's no-pipelining schedule runs it; returns the mean loss."""
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    ddp_model.zero_grad_buffer()
    optimizer.zero_grad(set_to_none=True)
    num_micro_batches = len(micro_batches)
    total = torch.zeros((), device=device())
    for batch in micro_batches:
        loss = forward_loss(ddp_model, batch) / num_micro_batches
        MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1, device=device()) / num_micro_batches)
        loss.backward()
        total += loss.detach()
    finalize_model_grads([ddp_model])
    for param in ddp_model.parameters():
        param.grad = param.main_grad.to(param.dtype)
    optimizer.step()
    return float(total)  # the step's one host synchronization


def _worker(fn, rank, world_size, init_file, out_dir, tensor_parallel, args, initializer):
    try:
        if initializer is not None:
            initializer()
        with distributed(rank, world_size, init_file, tensor_parallel):
            result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def spawn(fn: Callable, world_size: int, *args, tensor_parallel: int = 1, timeout: float = 600,
          initializer: Optional[Callable[[], None]] = None) -> list:
    """Run fn(rank, world_size, *args) in `world_size` gloo ranks; return each rank's result.

    Megatron's parallel state is initialized with `tensor_parallel` (ranks 2t, 2t+1 share a
    tensor-parallel group when it is 2).
    fn (and `initializer`, run first in each rank, before Megatron is set up) must be importable
    (module-level functions). A rank's exception is re-raised here with its traceback.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        init_file = os.path.join(out_dir, "init")
        procs = [ctx.Process(target=_worker, args=(fn, r, world_size, init_file, out_dir, tensor_parallel, args,
                                                          initializer))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        # A failed rank leaves the others blocked in a collective: stop them all at once.
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            if any(p.exitcode not in (None, 0) for p in procs):
                break
            time.sleep(0.05)
        errors = []
        for rank, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                p.join()
                if time.monotonic() >= deadline:
                    errors.append(f"rank {rank} timed out after {timeout}s")
            err = os.path.join(out_dir, f"rank{rank}.err")
            if os.path.exists(err):
                errors.append(f"rank {rank} failed:\n" + open(err).read())
            elif p.exitcode not in (0, -9) or (p.exitcode == -9 and not errors):
                errors.append(f"rank {rank} exited with code {p.exitcode}")
        if errors:
            raise RuntimeError("\n".join(errors))
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def synthetic_batches(step: int, rank: int, num_micro_batches: int, micro_batch_size: int,
                      seq_length: int, vocab_size: int) -> list[MicroBatch]:
    """Learnable token streams (arithmetic progressions mod vocab), distinct per step and rank."""
    g = torch.Generator().manual_seed(1_000_003 * step + 7919 * rank)
    batches = []
    for _ in range(num_micro_batches):
        start = torch.randint(0, vocab_size, (micro_batch_size, 1), generator=g)
        stride = torch.randint(1, 5, (micro_batch_size, 1), generator=g)
        seq = (start + stride * torch.arange(seq_length + 1)) % vocab_size
        batches.append(MicroBatch(seq[:, :-1], seq[:, 1:], torch.ones(micro_batch_size, seq_length)))
    return batches
