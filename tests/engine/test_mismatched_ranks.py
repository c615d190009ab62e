"""Ranks that disagree on a step's micro-batches get an error, never a hang or mixed counts.

2 gloo ranks, one layer, global scope. Each count sum travels with its micro-batch's tag: ranks
that paired different micro-batches raise when the step ends, before an optimizer step; a rank
left waiting for a sum that never comes raises after engine.SYNC_TIMEOUT (here 4 s), naming what
it waited for.
"""

import datetime
import time

import pytest
import torch

from moe_lbl.demo.tiny_gpt import spawn

pytestmark = pytest.mark.cpu_harness


def micro_batch(balancer, backward=True):
    scores = torch.softmax(torch.randn(6, 4), -1).requires_grad_()
    counts = torch.tensor([3, 1, 2, 0])
    out = balancer.attach(torch.zeros(6, 4, requires_grad=True), scores, counts, 6)
    if backward:
        out.sum().backward()


def run_steps(rank, micro_batches_per_step, evaluations_before, async_sync, kernels=False):
    """Micro-batches of each step on this rank (with evaluation passes, forward only, before them);
    returns what was raised, or 'ok'."""
    import torch.distributed as dist

    import moe_lbl.engine as engine

    engine.SYNC_TIMEOUT = datetime.timedelta(seconds=4)
    balancer = engine.LoadBalancer(engine.BalanceConfig("global", async_sync=async_sync), 4, 2,
                                   batch_group=dist.group.WORLD, name="layer 1", kernels=kernels)
    try:
        for count, evaluations in zip(micro_batches_per_step[rank], evaluations_before[rank]):
            for _ in range(evaluations):
                micro_batch(balancer, backward=False)
            for _ in range(count):
                micro_batch(balancer)
            balancer.end_step()
    except engine.MicroBatchMismatch as error:
        return str(error)
    time.sleep(6)  # stay in the group while the other rank may still wait on it
    return "ok"


def run_steps_worker(rank, world_size, micro_batches_per_step, evaluations_before, async_sync, kernels=False):
    return run_steps(rank, micro_batches_per_step, evaluations_before, async_sync, kernels)


@pytest.mark.parametrize("async_sync,kernels", [(True, False), (False, False), (True, True)],
                         ids=["async", "blocking", "async-kernel"])
def test_ranks_with_different_micro_batch_counts_both_raise(async_sync, kernels):
    """Rank 0 runs 3 micro-batches in step 0, rank 1 runs 2: the global scope used to hang (gloo
    30 min, NCCL until its watchdog), with no message. With kernels, the backward step's kernel
    writes the tags the check reads."""
    start = time.monotonic()
    results = spawn(run_steps_worker, 2, {0: [3, 1], 1: [2, 1]}, {0: [0, 0], 1: [0, 0]}, async_sync, kernels,
                    timeout=120)
    assert time.monotonic() - start < 60
    for rank, message in enumerate(results):
        assert message.startswith("moe-lbl: ranks summed the counts of different micro-batches for layer 1"), (
            rank, message)
        assert "must run the same micro-batches in every step" in message
    assert "this rank sent step 0 (mod 64), micro-batch 2" in results[0]
    assert "this rank sent step 1 (mod 64), micro-batch 0" in results[1]


def test_an_evaluation_pass_on_one_rank_ends_in_an_error_that_says_what_was_awaited():
    """A forward pass with gradients on rank 0 only: its sum pairs with rank 1's first
    micro-batch (both are micro-batch 0 of the step, so the tags agree), and rank 0's last one
    waits for a sum rank 1 never sends. Before, that wait lasted until gloo's timeout."""
    start = time.monotonic()
    results = spawn(run_steps_worker, 2, {0: [2], 1: [2]}, {0: [1], 1: [0]}, True, timeout=120)
    assert time.monotonic() - start < 60
    assert results[0].startswith("moe-lbl: waited 4 s for the other ranks' counts of layer 1, step 0, "
                                 "micro-batch 2: the ranks of a group must run the same micro-batches"), results[0]
    assert "torch.no_grad()" in results[0]
    assert results[1] == "ok"
