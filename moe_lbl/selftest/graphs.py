"""The engine and the fused kernels under real CUDA graphs (torch.cuda.graph), on a GPU.

One micro-batch's router forward and backward (fused_topk_router registering with the engine,
the engine's backward step as its kernel) is captured once and replayed for every micro-batch of
later steps, with the step's reset eager in between, as Megatron's "local" graphs replay a
router; global scope with the buffer, padding, 3 micro-batches a step. Each replay's logits
gradient and the buffer after it must equal eager mode's. (The CPU test suite proves the same
semantics with tests/helpers/graphs.py, against the float64 formulas.)
"""

from __future__ import annotations

from typing import Iterator

import torch

from moe_lbl.engine import BalanceConfig, LoadBalancer
from moe_lbl.selftest import Check, timed

SECTION = "graphs"
NUM_EXPERTS, TOPK, TOKENS, MICRO_BATCHES, STEPS = 16, 4, 37, 3, 3


def micro_batch(step, j):
    g = torch.Generator().manual_seed(100 * step + j)
    logits = torch.randn(TOKENS, NUM_EXPERTS, generator=g)
    padding = torch.zeros(TOKENS, dtype=torch.bool)
    padding[torch.randperm(TOKENS, generator=g)[:(step + 2 * j) % 6]] = True
    return logits.cuda(), padding.cuda()


def run(graphs: bool):
    """[(logits gradient, buffer)] per micro-batch of every step."""
    from moe_lbl.kernels import fused_topk_router

    balancer = LoadBalancer(BalanceConfig("global", coeff=1.0), NUM_EXPERTS, TOPK, device="cuda", kernels=True)
    weight = torch.randn(TOKENS, NUM_EXPERTS, generator=torch.Generator().manual_seed(7)).cuda()

    def forward_backward(logits, padding):
        x = logits.detach().requires_grad_()
        registration = balancer.prepare()
        out = fused_topk_router(x, TOPK, padding_mask=padding, dense=True, sparse=False, registration=registration)
        stats = out.stats
        probs = balancer.attach(out.probs, stats.score_sums, stats.aux_counts, stats.valid_tokens,
                                load=stats.dispatch_counts, registration=registration)
        (grad,) = torch.autograd.grad((probs * weight).sum(), x)
        return grad

    static_logits, static_padding = micro_batch(0, 0)
    graph, static_grad, results = None, None, []
    for step in range(STEPS):
        for j in range(MICRO_BATCHES):
            logits, padding = micro_batch(step, j)
            if graphs and step > 0:
                if graph is None:
                    state = [t.clone() for t in balancer.state.tensors()]
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):  # warmup, as torch.cuda.graph asks: compiles and loads
                        for _ in range(2):
                            forward_backward(static_logits, static_padding)
                    torch.cuda.current_stream().wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        static_grad = forward_backward(static_logits, static_padding)
                    for tensor, saved in zip(balancer.state.tensors(), state):  # what warmup did is undone
                        tensor.copy_(saved)
                static_logits.copy_(logits)
                static_padding.copy_(padding)
                graph.replay()
                grad = static_grad.clone()
            else:
                grad = forward_backward(logits, padding)
            results.append((grad, balancer.buffered_counts.clone()))
        balancer.end_step()
    torch.cuda.synchronize()
    return results



def replays_match_eager() -> str:
    eager, graphs = run(graphs=False), run(graphs=True)
    for index, ((grad, buffer), (want_grad, want_buffer)) in enumerate(zip(graphs, eager)):
        torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=1e-9, msg=lambda m, i=index: f"call {i}: {m}")
        if not torch.equal(buffer, want_buffer):
            raise AssertionError(f"call {index}: the buffer after the replay differs from eager mode's")
    # The buffer grew within each step and restarted with the next: replays did not repeat one value.
    if torch.equal(graphs[-1][1], graphs[-2][1]):
        raise AssertionError("the buffer did not change between the last two replays")
    return f"{len(graphs)} calls, {STEPS - 1} steps replayed, equal to eager"


def checks(cuda: bool) -> Iterator[Check]:
    if not cuda:
        yield Check(SECTION, "CUDA-graph replay of the fused router and engine", "skipped", "no CUDA device")
        return
    yield timed(SECTION, "CUDA-graph replay of the fused router and engine", replays_match_eager)
