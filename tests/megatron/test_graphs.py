"""The patched router under CUDA-graph semantics (tests/helpers/graphs.py), on 2 data-parallel
gloo ranks, 3 micro-batches a step with padding, 3 steps: the first eager (Megatron's graphs
start after eager warmup steps), then graphs recorded once and replayed on every later
micro-batch. Two ways of capturing, as Megatron-Core's cuda_graph_impl offers them:

- "layer": the router's forward and backward of one micro-batch ("local" or
  "transformer_engine" with cuda_graph_modules holding moe_router, or whole layers), replayed
  for each micro-batch; the step's reset runs eagerly in finalize_model_grads;
- "step": the whole step, every micro-batch's forward and backward and the reset
  ("full_iteration").

Each micro-batch's logits gradient and logged values, and each step's balance metrics, equal
eager mode's and the float64 formulas'. Eager mode runs under the sync guard: no router
forward or backward waits for the host. A mutant engine that keeps the buffer's history in a
Python list passes in eager mode and fails under replay.
"""

from typing import NamedTuple

import pytest
import torch

from moe_lbl.demo.tiny_gpt import spawn
from moe_lbl.engine import BalanceConfig
from tests.helpers.reference import MicroBatchResult, reference_losses

pytestmark = pytest.mark.cpu_harness

NUM_EXPERTS, TOPK, COEFF, MICRO_COEFF = 8, 2, 1.0, 0.01
SEQ, BATCH = 7, 2  # the same shape every micro-batch, as a graph replays
NUM_MICRO_BATCHES, STEPS = 3, 3
SCOPES = {
    "micro": dict(scope="micro"),
    "global": dict(scope="global"),
    "global-no-buffer": dict(scope="global", buffer=False),
    "hybrid": dict(scope="global", micro_coeff=MICRO_COEFF),
}
MODES = ("eager", "layer", "step")
PATHS = {"megatron": False, "fused": True}  # Megatron's routing, or the fused kernels (interpreted on CPU)


def micro_batch(rank, step, j):
    """Logits [SEQ, BATCH, E] and padding [SEQ, BATCH] of one rank's micro-batch."""
    g = torch.Generator().manual_seed(10_000 * step + 100 * rank + j)
    logits = torch.randn(SEQ, BATCH, NUM_EXPERTS, generator=g)
    padding = torch.zeros(SEQ * BATCH, dtype=torch.bool)
    padding[torch.randperm(SEQ * BATCH, generator=g)[:(rank + 2 * j + step) % 5]] = True
    return logits, padding.view(SEQ, BATCH)


class StepResult(NamedTuple):
    micro_batches: list  # [MicroBatchResult]: logits gradient, logged values by scope
    balance: object  # the layer's moe_lbl.metrics.LayerBalance of the step


def rank_worker(rank, world_size, mode, scopes, kernels=False, mutant=False) -> dict:
    """{scope: [StepResult per step]} of one rank."""
    if mutant:
        python_list_buffer()
    return {scope: run_scope(rank, SCOPES[scope], mode, kernels) for scope in scopes}


def run_scope(rank, options, mode, kernels) -> list:
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    import moe_lbl
    from moe_lbl.demo.tiny_gpt import build_router
    from moe_lbl.metrics import layer_balance
    from moe_lbl.patches.megatron.configuration import tracker_names
    from moe_lbl.patches.megatron.layer import balancer_of
    from tests.helpers.graphs import SyncGuard, capture
    from tests.helpers.megatron import aux_loss_tracker, take_tracker

    moe_lbl.patch_megatron(kernels=kernels, **options)
    router = build_router(NUM_EXPERTS, TOPK, moe_aux_loss_coeff=COEFF)
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1) / NUM_MICRO_BATCHES)
    balancer = balancer_of(router)
    names = tracker_names(router.config, balancer.config)

    def forward_backward(logits, padding):
        x = logits.detach().requires_grad_()
        probs, _ = router.routing(x, padding_mask=padding)
        (grad,) = torch.autograd.grad((probs * 0).sum(), x)  # only the balancing loss reaches the logits
        return grad.view(-1, NUM_EXPERTS)

    def whole_step(*inputs):
        grads = [forward_backward(*inputs[2 * j:2 * j + 2]) for j in range(NUM_MICRO_BATCHES)]
        moe_lbl.end_step(router)  # finalize_model_grads' reset, inside the captured step
        return grads

    def logged():
        tracker = take_tracker()
        return {scope: float(tracker[name][0]) for scope, name in names.items() if name in tracker}

    def state():  # what Megatron's local graphs save and restore around a capture
        return [*router.buffers(), *aux_loss_tracker().values()]

    graph, results = None, []
    for step in range(STEPS):
        inputs = [micro_batch(rank, step, j) for j in range(NUM_MICRO_BATCHES)]
        if mode == "step" and step > 0:
            flat = [t for pair in inputs for t in pair]
            graph = graph or capture(whole_step, *flat, state=state())
            grads = graph(*flat)
            values = logged()  # the step's sum over its micro-batches
            micro_batches = [MicroBatchResult(grad, values if j == 0 else {}) for j, grad in enumerate(grads)]
        else:
            micro_batches = []
            for logits, padding in inputs:
                if mode == "layer" and step > 0:
                    graph = graph or capture(forward_backward, logits, padding, state=state())
                    grad = graph(logits, padding)
                else:
                    with SyncGuard():
                        grad = forward_backward(logits, padding)
                micro_batches.append(MicroBatchResult(grad, logged()))
            moe_lbl.end_step(router)
        results.append(StepResult(micro_batches, layer_balance(router.layer_number, balancer)))
    moe_lbl.unpatch_megatron()
    return results


def python_list_buffer():
    """The mutant: the buffer as a Python list of the step's back-propagated sums, as state
    kept on the host would be (a capture bakes in the list it saw)."""
    import moe_lbl.engine as engine

    def pool(self, totals):
        history = self.__dict__.setdefault("history", [])
        history.append(totals.clone())
        return torch.stack(history).sum(0)

    def end_step(self, original=engine.LoadBalancer.end_step):
        self.__dict__["history"] = []
        original(self)

    engine.LoadBalancer._pool = pool
    engine.LoadBalancer.end_step = end_step


def expected(options, step):
    """Per (rank, micro-batch) of one step: the float64 logits gradient and logged values."""
    data = {}
    for r in range(2):
        for j in range(NUM_MICRO_BATCHES):
            logits, padding = micro_batch(r, step, j)
            data[r, j] = (logits.view(-1, NUM_EXPERTS), padding.reshape(-1))
    config = BalanceConfig(**{"coeff": COEFF, **options})
    return reference_losses(data, config, NUM_EXPERTS, TOPK, loss_scale=1.0 / NUM_MICRO_BATCHES)


def assert_step_matches(got, want, eager, rank, step_values):
    for j, (result, reference) in enumerate(zip(got.micro_batches, [want[rank, j] for j in range(NUM_MICRO_BATCHES)])):
        torch.testing.assert_close(result.grad.double(), reference.grad, rtol=1e-5, atol=1e-8,
                                   msg=lambda m, j=j: f"rank {rank}, micro-batch {j}: {m}")
        torch.testing.assert_close(result.grad, eager.micro_batches[j].grad, rtol=1e-6, atol=1e-9)
    if step_values:  # "step" mode logs the step's sum: compare the sums
        for scope in step_values:
            total = sum(want[rank, j].values[scope] for j in range(NUM_MICRO_BATCHES))
            assert got.micro_batches[0].values[scope] == pytest.approx(total, rel=1e-5), scope
    else:
        for result, reference in zip(got.micro_batches, [want[rank, j] for j in range(NUM_MICRO_BATCHES)]):
            assert result.values.keys() == reference.values.keys()
            for scope, value in reference.values.items():
                assert result.values[scope] == pytest.approx(value, rel=1e-5), scope
    assert got.balance == eager.balance


@pytest.fixture(scope="module")
def runs():
    return {(path, mode): spawn(rank_worker, 2, mode, list(SCOPES), kernels) for path, kernels in PATHS.items()
            for mode in MODES}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scope", list(SCOPES))
def test_graph_replays_match_eager_and_the_formulas(runs, scope, mode, path):
    for step in range(STEPS):
        want = expected(SCOPES[scope], step)
        step_values = list(want[0, 0].values) if mode == "step" and step > 0 else []
        for rank in range(2):
            assert_step_matches(runs[path, mode][rank][scope][step], want, runs[path, "eager"][rank][scope][step],
                                rank, step_values)


def test_a_python_side_buffer_fails_under_replay():
    """The harness has teeth: keeping the buffer's history on the host gives eager mode's
    results, and wrong ones once a recorded graph replays."""
    eager = spawn(rank_worker, 2, "eager", ["global"], False, True)
    graphs = spawn(rank_worker, 2, "layer", ["global"], False, True)
    want = expected(SCOPES["global"], 1)
    for rank in range(2):
        assert_step_matches(eager[rank]["global"][1], want, eager[rank]["global"][1], rank, [])
        with pytest.raises(AssertionError):
            assert_step_matches(graphs[rank]["global"][1], want, eager[rank]["global"][1], rank, [])


def mismatch_worker(rank, world_size, kernels):
    """Steps of the "step" mode in global scope, where rank 0's registrations run one ahead of
    rank 1's before the third step (as after a forward that rank 1 never ran): what the step's
    balance metrics raise, the first host read after the replayed step closed itself."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    import moe_lbl
    from moe_lbl.demo.tiny_gpt import build_router
    from moe_lbl.engine import MicroBatchMismatch
    from moe_lbl.metrics import layer_balance
    from moe_lbl.patches.megatron.layer import balancer_of
    from tests.helpers.graphs import capture

    moe_lbl.patch_megatron(kernels=kernels, scope="global")
    router = build_router(NUM_EXPERTS, TOPK, moe_aux_loss_coeff=COEFF)
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1) / NUM_MICRO_BATCHES)
    balancer = balancer_of(router)

    def whole_step(*inputs):
        for j in range(NUM_MICRO_BATCHES):
            probs, _ = router.routing(inputs[2 * j].detach().requires_grad_(), padding_mask=inputs[2 * j + 1])
            probs.sum().backward()
        moe_lbl.end_step(router)
        return []

    graph, outcomes = None, []
    for step in range(STEPS):
        flat = [t for j in range(NUM_MICRO_BATCHES) for t in micro_batch(rank, step, j)]
        if step == 0:
            whole_step(*flat)
        else:
            graph = graph or capture(whole_step, *flat, state=router.buffers())
            if step == 2 and rank == 0:
                balancer.state.forward_counters[0] += 1
            graph(*flat)
        try:
            layer_balance(router.layer_number, balancer)
            outcomes.append("ok")
        except MicroBatchMismatch as error:
            outcomes.append(str(error))
    moe_lbl.unpatch_megatron()
    return outcomes


@pytest.mark.parametrize("path", list(PATHS))
def test_a_mismatch_in_a_replayed_step_surfaces_at_the_next_host_read(path):
    """Under full_iteration the step's reset is replayed too, and no check runs in it: the
    replayed close keeps the first disagreeing sum on the device for the next read."""
    results = spawn(mismatch_worker, 2, PATHS[path])
    for rank, outcomes in enumerate(results):
        assert outcomes[:2] == ["ok", "ok"], (rank, outcomes)
        assert outcomes[2].startswith("moe-lbl: ranks summed the counts of different micro-batches"), (rank, outcomes)
    assert "this rank sent step 2 (mod 64), micro-batch 1" in results[0][2], results[0][2]
    assert "this rank sent step 2 (mod 64), micro-batch 0" in results[1][2], results[1][2]


def first_call_captured_worker(rank, world_size):
    import moe_lbl
    from moe_lbl.demo.tiny_gpt import build_router
    from moe_lbl.patches.megatron.layer import find
    from tests.helpers.graphs import capture

    moe_lbl.patch_megatron(scope="global")
    router = build_router(NUM_EXPERTS, TOPK, moe_aux_loss_coeff=COEFF)
    logits, padding = micro_batch(rank, 0, 0)
    try:
        capture(lambda x, p: router.routing(x.requires_grad_(), padding_mask=p)[0], logits, padding)
        outcome = "captured"
    except RuntimeError as error:
        outcome = str(error)
    made = find(router) is not None
    moe_lbl.unpatch_megatron()
    return outcome, made


def test_a_router_first_run_inside_a_capture_is_refused():
    """Its state would be made by kernels the graph replays (zeroing it at every replay)."""
    (outcome, made), = spawn(first_call_captured_worker, 1)
    assert outcome.startswith("moe-lbl: the router of layer 1 first ran inside a CUDA graph capture: run at least "
                              "one eager training step before capturing"), outcome
    assert not made


@pytest.mark.parametrize("read", [
    lambda x: x.sum().item(), lambda x: int(x[0]), lambda x: bool(x.any()), lambda x: x.tolist(),
    lambda x: torch.equal(x, x), lambda x: x.nonzero(), lambda x: torch.tensor([1.0]) + x,
], ids=["item", "int", "bool", "tolist", "equal", "nonzero", "tensor-from-host"])
def test_the_sync_guard_refuses_every_host_read(read):
    from tests.helpers.graphs import HostSync, SyncGuard

    x = torch.arange(4.0)
    with pytest.raises(HostSync), SyncGuard():
        read(x)
    read(x)  # and only while it is on
