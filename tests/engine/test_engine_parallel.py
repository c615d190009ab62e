"""The engine with tensor parallelism: 4 gloo ranks as TP=2 x DP=2, 2 micro-batches each.

Tensor-parallel ranks hold different tokens of the same sequences (sequence parallelism, which
Megatron requires for MoE with TP): T and P count the tokens of both, as Megatron's aux_loss does.
"""

import itertools
from typing import NamedTuple

import pytest
import torch

from moe_lbl.demo.tiny_gpt import spawn
from moe_lbl.engine import BalanceConfig, GradScale, LoadBalancer
from tests.helpers.reference import (
    MicroBatchResult,
    ValueRecorder,
    assert_matches_reference,
    random_micro_batch,
    reference_losses,
    topk_mask,
)

pytestmark = pytest.mark.cpu_harness

NUM_EXPERTS, TOPK, NUM_MICRO_BATCHES = 6, 2, 2
CONFIGS = {
    "micro": BalanceConfig("micro", coeff=1.0),
    "global": BalanceConfig("global", coeff=1.0),
    "hybrid-no-buffer": BalanceConfig("global", coeff=1.0, micro_coeff=0.1, buffer=False),
}


def micro_batch(rank, j):
    return random_micro_batch(7 + 3 * rank + j, NUM_EXPERTS, num_padding=(rank + 2 * j) % 4, seed=50 * rank + j)


def rank_worker(rank, world_size):
    from megatron.core import parallel_state

    results = {}
    for (name, config), kernels in itertools.product(CONFIGS.items(), (False, True)):
        balancer = LoadBalancer(config, NUM_EXPERTS, TOPK,
                                sequence_group=parallel_state.get_tensor_and_context_parallel_group(),
                                batch_group=parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True),
                                kernels=kernels)
        micro_batches = []
        for j in range(NUM_MICRO_BATCHES):
            logits, padding = micro_batch(rank, j)
            logits.requires_grad_()
            scores = torch.softmax(logits, dim=-1) * (~padding).unsqueeze(1)
            recorder = ValueRecorder(config)
            out = balancer.attach(torch.zeros_like(scores, requires_grad=True), scores,
                                  topk_mask(logits.detach(), TOPK, padding).sum(0), int((~padding).sum()),
                                  GradScale(lambda: torch.ones(1) / NUM_MICRO_BATCHES), recorder.report)
            out.sum().backward()
            micro_batches.append(MicroBatchResult(logits.grad, recorder.values()))
        balancer.end_step()
        results[name, kernels] = micro_batches
    return results


@pytest.fixture(scope="module")
def ranks():
    return spawn(rank_worker, 4, tensor_parallel=2)


@pytest.mark.parametrize("kernels", [False, True], ids=["torch", "kernel"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_tensor_parallel_ranks_share_token_totals(ranks, name, kernels):
    data = {(r, j): micro_batch(r, j) for r in range(4) for j in range(NUM_MICRO_BATCHES)}
    want = reference_losses(data, CONFIGS[name], NUM_EXPERTS, TOPK, 1.0 / NUM_MICRO_BATCHES, tensor_parallel=2)
    assert_matches_reference({(r, j): result[name, kernels][j] for r, result in enumerate(ranks)
                              for j in range(NUM_MICRO_BATCHES)}, want)


class Coalesced(NamedTuple):
    all_reduce_sizes: list  # elements of each all-reduce, in order
    after_forward: list  # all-reduces issued by the end of each micro-batch's forward
    micro_batches: dict  # (layer, rank, j) -> MicroBatchResult


def coalescing_worker(rank, world_size) -> Coalesced:
    """3 layers x 3 micro-batches, global async: one all-reduce per micro-batch, launched at the
    end of the forward pass once the layers are known."""
    import torch.distributed as dist

    import moe_lbl.engine as engine

    calls = []
    real_all_reduce = engine.dist.all_reduce
    engine.dist.all_reduce = lambda *a, **k: calls.append(a[0].numel()) or real_all_reduce(*a, **k)
    try:
        layers = [LoadBalancer(BalanceConfig("global", coeff=1.0), NUM_EXPERTS, TOPK, batch_group=dist.group.WORLD)
                  for _ in range(3)]
        after_forward, results = [], {}
        for j in range(3):
            outs = []
            for layer, balancer in enumerate(layers):
                logits, padding = micro_batch(rank + 2 * layer, j)
                logits.requires_grad_()
                scores = torch.softmax(logits, dim=-1) * (~padding).unsqueeze(1)
                recorder = ValueRecorder(balancer.config)
                counts = topk_mask(logits.detach(), TOPK, padding).sum(0)
                out = balancer.attach(torch.zeros_like(scores, requires_grad=True), scores, counts,
                                      int((~padding).sum()), report=recorder.report, load=counts)
                outs.append((layer, logits, out, recorder))
            after_forward.append(len(calls))
            for layer, logits, out, recorder in reversed(outs):  # backward runs the last layer first
                out.sum().backward()
                results[layer, rank, j] = MicroBatchResult(logits.grad, recorder.values())
    finally:
        engine.dist.all_reduce = real_all_reduce
    return Coalesced(calls, after_forward, results)


def test_layers_share_one_all_reduce_per_micro_batch():
    results = spawn(coalescing_worker, 2)
    for result in results:
        # per layer: counts, tokens and the micro-batch tag [1, t, t^2]
        assert result.all_reduce_sizes == [3 * (NUM_EXPERTS + 4)] * 3
        assert result.after_forward == [0, 2, 3]  # micro-batches 1 and 2 launched before their backward
    for layer in range(3):
        data = {(r, j): micro_batch(r + 2 * layer, j) for r in range(2) for j in range(3)}
        want = reference_losses(data, BalanceConfig("global", coeff=1.0), NUM_EXPERTS, TOPK)
        assert_matches_reference({(r, j): results[r].micro_batches[layer, r, j] for r in range(2) for j in range(3)},
                                 want)
