"""A miniature pretrain_gpt: a Megatron-Core GPT-MoE trained from Megatron's public pieces.

It knows nothing of moe-lbl; launch it through the launcher to balance globally:

    torchrun --standalone --nproc_per_node 2 -m moe_lbl.run --scope global -- \\
        examples/pretrain_gpt_moe.py --steps 5

On CPU it uses gloo and moe-lbl's CPU step (Megatron's schedule needs CUDA); on GPUs, NCCL and
Megatron's own forward_backward_func.
"""

import argparse
import contextlib
import os

import torch
import torch.distributed as dist


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=32)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--moe-router-topk", type=int, default=2)
    parser.add_argument("--moe-router-load-balancing-type", default="aux_loss")
    parser.add_argument("--moe-aux-loss-coeff", type=float, default=1e-2)
    parser.add_argument("--lr", type=float, default=3e-3)
    return parser.parse_args()


def model_provider(args):
    """The model, as Megatron's pretrain_gpt builds it from a TransformerConfig and a layer spec."""
    from moe_lbl.tiny_gpt import TinyGPT, build_gpt

    spec = TinyGPT(num_experts=args.num_experts, topk=args.moe_router_topk, seq_length=args.seq_length,
                   load_balancing_type=args.moe_router_load_balancing_type, aux_loss_coeff=args.moe_aux_loss_coeff)
    return build_gpt(spec, seed=1234), spec


def data_iterator(args, spec, rank):
    from moe_lbl.tiny_gpt import synthetic_batches

    step = 0
    while True:
        yield synthetic_batches(step, rank, args.micro_batches, args.micro_batch_size, args.seq_length, spec.vocab_size)
        step += 1


def main():
    args = parse_args()
    from megatron.core import parallel_state

    import moe_lbl
    from moe_lbl.patches.cpu import cpu_shims
    from moe_lbl.tiny_gpt import train_step, wrap_ddp

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    with contextlib.nullcontext() if cuda else cpu_shims():
        parallel_state.initialize_model_parallel()
        (model, config), spec = model_provider(args)
        ddp = wrap_ddp(model, config)
        optimizer = torch.optim.AdamW(ddp.parameters(), lr=args.lr)
        batches = data_iterator(args, spec, rank)
        print(f"rank {rank}: moe-lbl patched={moe_lbl.is_patched()}", flush=True)
        for step in range(args.steps):
            loss = train_step(ddp, optimizer, next(batches))
            layers = moe_lbl.balance_metrics(ddp) if moe_lbl.is_patched() else []
            if rank == 0:
                vio = (f" max_vio micro {layers[0].micro_max_vio:.3f} global {layers[0].global_max_vio:.3f}"
                       if layers else "")
                print(f"step {step + 1} loss {loss:.4f}{vio}", flush=True)
        parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
