"""Global-batch balancing across 2 data-parallel gloo ranks x 2 micro-batches, against the formulas.

Each rank routes its own micro-batches (uneven sizes and padding) through a patched TopKRouter
and returns its logits gradients and logged values; this process recomputes every micro-batch's
loss and gradient in float64 from all ranks' data.
"""

import pytest
import torch

from moe_lbl.testing.harness import spawn

NUM_EXPERTS, TOPK, COEFF, MICRO_COEFF = 8, 2, 1.0, 0.01
SHAPES = {0: (13, 2), 1: (9, 3)}  # rank -> (seq, micro-batch size): uneven tokens per rank
PADDING = {(0, 0): 3, (0, 1): 0, (1, 0): 11, (1, 1): 5}  # (rank, micro-batch) -> padding tokens
NUM_MICRO_BATCHES = 2
VARIANTS = {
    "global": dict(scope="global"),
    "global-sync": dict(scope="global", async_sync=False),
    "global-no-buffer": dict(scope="global", buffer=False),
    "hybrid": dict(scope="global", micro_coeff=MICRO_COEFF),
    "micro": dict(scope="micro"),
}


def micro_batch(rank, j):
    seq, batch = SHAPES[rank]
    g = torch.Generator().manual_seed(1000 * rank + j)
    logits = torch.randn(seq, batch, NUM_EXPERTS, generator=g)
    padding = torch.zeros(seq * batch, dtype=torch.bool)
    padding[torch.randperm(seq * batch, generator=g)[:PADDING[rank, j]]] = True
    return logits, padding.view(seq, batch)


def rank_worker(rank, world_size):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    import moe_lbl
    from moe_lbl.patches.megatron import balancer_of
    from moe_lbl.testing.harness import build_router, take_tracker

    results = {}
    for name, options in VARIANTS.items():
        moe_lbl.patch_megatron(**options)
        router = build_router(NUM_EXPERTS, TOPK, moe_aux_loss_coeff=COEFF)
        grads, logged = [], []
        for j in range(NUM_MICRO_BATCHES):
            logits, padding = micro_batch(rank, j)
            logits.requires_grad_()
            MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1) / NUM_MICRO_BATCHES)
            probs, _ = router.routing(logits, padding_mask=padding)
            (probs * 0).sum().backward()  # only the balancing loss reaches the logits
            grads.append(logits.grad.view(-1, NUM_EXPERTS))
            logged.append({k: float(v[0]) for k, v in take_tracker().items() if v[0] != 0})
        balancer_of(router).end_step()
        moe_lbl.unpatch_megatron()
        results[name] = (grads, logged)
    return results


def expected(options):
    """Per (rank, micro-batch): float64 logits gradient and logged values from the formulas."""
    data = {(r, j): micro_batch(r, j) for r in SHAPES for j in range(NUM_MICRO_BATCHES)}
    counts, tokens = {}, {}
    for key, (logits, padding) in data.items():
        valid = ~padding.reshape(-1)
        scores = torch.softmax(logits.view(-1, NUM_EXPERTS), dim=-1)
        index = torch.topk(scores, TOPK, dim=-1).indices
        mask = torch.zeros_like(scores, dtype=torch.bool).scatter(1, index, True) & valid.unsqueeze(1)
        counts[key], tokens[key] = mask.sum(0).double(), float(valid.sum())
    out = {}
    for (r, j), (logits, padding) in data.items():
        window = range(j + 1) if options.get("buffer", True) else [j]
        pooled = [(rr, jj) for rr in SHAPES for jj in window]
        f_global = sum(counts[k] for k in pooled) / (TOPK * sum(tokens[k] for k in pooled))
        f_micro = counts[r, j] / (TOPK * tokens[r, j])
        x = logits.view(-1, NUM_EXPERTS).double().requires_grad_()
        P = torch.softmax(x, dim=-1)[~padding.reshape(-1)].sum(0) / tokens[r, j]
        if options["scope"] == "micro":
            terms = {"load_balancing_loss": (f_micro, COEFF)}
        else:
            terms = {"global_load_balancing_loss": (f_global, COEFF)}
            if options.get("micro_coeff", 0) > 0:
                terms["load_balancing_loss"] = (f_micro, options["micro_coeff"])
        values = {name: NUM_EXPERTS * (f * P).sum() for name, (f, _) in terms.items()}
        loss = sum(coeff * values[name] for name, (_, coeff) in terms.items())
        (loss / NUM_MICRO_BATCHES).backward()
        out[r, j] = (x.grad, {name: float(v) for name, v in values.items()})
    return out


@pytest.fixture(scope="module")
def ranks():
    return spawn(rank_worker, 2)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_micro_batch_matches_the_formulas(ranks, variant):
    want = expected(VARIANTS[variant])
    for r, result in enumerate(ranks):
        grads, logged = result[variant]
        for j in range(NUM_MICRO_BATCHES):
            want_grad, want_values = want[r, j]
            torch.testing.assert_close(grads[j].double(), want_grad, rtol=1e-5, atol=1e-9)
            assert logged[j].keys() == want_values.keys()
            for name, value in want_values.items():
                assert logged[j][name] == pytest.approx(value, rel=1e-6), (r, j, name)


def test_async_and_sync_give_identical_results(ranks):
    for result in ranks:
        assert result["global"][1] == result["global-sync"][1]
        for a, b in zip(result["global"][0], result["global-sync"][0]):
            assert torch.equal(a, b)


def test_global_differs_from_micro(ranks):
    # Guards the comparison above against a reference that ignores the other rank.
    grads_global, grads_micro = ranks[1]["global"][0], ranks[1]["micro"][0]
    assert not torch.allclose(grads_global[0], grads_micro[0], rtol=1e-3)
