"""The fused router's per-sequence statistics (seq_aux_loss) against a float64 reference.

Tokens are laid out as Megatron's [s, b]: token t is of sequence t % b. The kernels keep each
program's rows on fixed sequences by the number of programs they launch; the launches here pick
programs and block sizes for which that needs rounding (sequences above, below and not dividing
the block), so a per-row sum filed under the wrong sequence shows.
"""

import pytest
import torch

from moe_lbl.kernels import Launch, fused_topk_router
from moe_lbl.kernels.launcher import interpreting
from moe_lbl.kernels.topk_router_reference import near_tie_rows, reference_routing
from moe_lbl.selftest.kernels import EPS, GRAD_TOL, Case, inputs, poisoned

CASES = [
    pytest.param(Case(8, 2, 0, torch.bfloat16, padding=0.2), id="softmax-E8-k2-bf16-pad"),
    pytest.param(Case(64, 8, 0, torch.float32, score="sigmoid", groups=8, group_topk=4, bias=True, scaling=2.5),
                 id="sigmoid-bias-E64-k8-groups8x4"),
    pytest.param(Case(60, 4, 0, torch.bfloat16, score="sigmoid", padding=0.3), id="sigmoid-E60-k4-bf16-pad"),
    pytest.param(Case(64, 4, 0, torch.float32, pre=True), id="softmax-pre-E64-k4"),
]
# (sequences, sequence length, launch): 3 and 5 sequences do not divide the 3 programs' blocks of
# 32 rows, 7 is more than the 2-row blocks, 4 fewer than the 8-row blocks (rows 4 apart share one).
LAYOUTS = [
    pytest.param(3, 40, Launch(block_t=32, num_programs=3), id="S3-rows32-programs3"),
    pytest.param(5, 23, Launch(block_t=32, num_programs=3), id="S5-rows32-programs3"),
    pytest.param(7, 9, Launch(block_t=2, num_programs=3), id="S7-rows2-programs3"),
    pytest.param(4, 30, Launch(block_t=8, num_programs=2), id="S4-rows8-programs2"),
    pytest.param(1, 61, Launch(block_t=16, num_programs=3), id="S1"),
]


@pytest.fixture
def device():
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not interpreting():
        pytest.skip("no CUDA device and no Triton interpreter")
    return torch.device("cpu")


def sized(c: Case, sequences: int, length: int) -> Case:
    return Case(c.E, c.k, sequences * length, c.dtype, c.score, c.pre, c.groups, c.group_topk, c.bias, c.scaling,
                c.padding)


def reference(c, logits, bias, padding, sequences, x=None):
    """Per-sequence aux-top-k maps and aux scores of valid tokens [s, S, E], float64."""
    ref = reference_routing(logits, c.k, expert_bias=bias, x=x, **c.routing())
    valid = torch.ones(c.T, dtype=torch.bool) if padding is None else ~padding
    aux_map = torch.zeros(c.T, c.E, dtype=torch.bool).scatter(1, ref.aux_indices, True) & valid[:, None]
    scores = ref.aux_scores * valid[:, None]
    return ref, aux_map.reshape(-1, sequences, c.E), scores.reshape(-1, sequences, c.E), valid


@pytest.mark.parametrize("sequences,length,launch", LAYOUTS)
@pytest.mark.parametrize("c", CASES)
def test_sequence_statistics_match_reference(c, sequences, length, launch, device):
    c = sized(c, sequences, length)
    logits, bias, padding = inputs(c, seed=c.E * 13 + sequences)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    with poisoned():
        out = fused_topk_router(to(logits), c.k, expert_bias=to(bias), padding_mask=to(padding), sequences=sequences,
                                launch=launch, **c.routing())
    plain = fused_topk_router(to(logits), c.k, expert_bias=to(bias), padding_mask=to(padding), launch=launch,
                              **c.routing())
    ref, aux_map, scores, valid = reference(c, logits, bias, padding, sequences)
    stats = out.stats
    assert stats.sequence_aux_counts.shape == stats.sequence_score_sums.shape == (sequences, c.E)
    assert stats.sequence_aux_counts.dtype == torch.int64
    # Per sequence: counts exact (rows whose aux top-k has a near tie may move one choice).
    near = near_tie_rows(ref.aux_scores.detach(), c.k, 4 * EPS[c.aux_dtype]).reshape(-1, sequences)
    want_counts = aux_map.sum(0)
    moved = (stats.sequence_aux_counts.cpu() - want_counts).abs().sum(1)
    assert bool((moved <= 2 * c.k * near.sum(0)).all()), (stats.sequence_aux_counts, want_counts)
    torch.testing.assert_close(stats.sequence_score_sums.cpu().double(), scores.sum(0).detach(),
                               rtol=1e-5 if c.aux_dtype == torch.float32 else 1e-3,
                               atol=length * EPS[c.aux_dtype])
    # The per-sequence sums add up to the call's totals, and the rest is the call without sequences.
    assert torch.equal(stats.sequence_aux_counts.sum(0), stats.aux_counts)
    torch.testing.assert_close(stats.sequence_score_sums.sum(0), stats.score_sums, rtol=1e-6, atol=1e-6)
    for name in ("aux_counts", "dispatch_counts", "valid_tokens"):
        assert torch.equal(getattr(stats, name), getattr(plain.stats, name)), name
    torch.testing.assert_close(stats.score_sums, plain.stats.score_sums, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.z_sum, plain.stats.z_sum, rtol=1e-6, atol=1e-6)
    assert torch.equal(out.probs, plain.probs) and torch.equal(out.routing_map, plain.routing_map)


@pytest.mark.parametrize("outputs", [dict(dense=True, sparse=False), dict(dense=False, sparse=True)],
                         ids=["dense", "sparse"])
@pytest.mark.parametrize("sequences,length,launch", LAYOUTS[:4])
@pytest.mark.parametrize("c", CASES[:3])
def test_sequence_score_sums_backward_matches_float64_autograd(c, sequences, length, launch, outputs, device):
    """The logits gradient of a loss on the per-sequence score sums (seq_aux_loss's gradient is
    per sequence and expert), beside one on the totals and on the probs."""
    c = sized(c, sequences, length)
    logits, bias, padding = inputs(c, seed=c.E * 7 + sequences)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    g = torch.Generator().manual_seed(sequences)
    per_sequence = torch.randn(sequences, c.E, generator=g)
    total = torch.randn(c.E, generator=g) * 0.1
    grad_probs = torch.randn(c.T, c.E, generator=g).to(c.dtype)
    x = to(logits).clone().requires_grad_()
    out = fused_topk_router(x, c.k, expert_bias=to(bias), padding_mask=to(padding), sequences=sequences,
                            launch=launch, **outputs, **c.routing())
    loss = (out.stats.sequence_score_sums * to(per_sequence)).sum() + (out.stats.score_sums * to(total)).sum()
    if out.probs is not None:
        loss = loss + (out.probs * to(grad_probs)).sum()
    else:
        loss = loss + (out.topk_probs * to(grad_probs).gather(1, out.topk_indices.long())).sum()
    loss.backward()

    x64 = logits.double().requires_grad_()
    ref, _, scores, _ = reference(c, logits, bias, padding, sequences, x=x64)
    indices = out.topk_indices if out.topk_indices is not None else out.routing_map.nonzero()[:, 1].view(c.T, c.k)
    mine = reference_routing(logits, c.k, expert_bias=bias, indices=indices.cpu(), x=x64, **c.routing())
    want = ((scores.sum(0) * per_sequence.double()).sum() + (scores.sum((0, 1)) * total.double()).sum()
            + (mine.probs * grad_probs.double()).sum())
    want.backward()
    rtol, atol = GRAD_TOL[c.dtype]
    torch.testing.assert_close(x.grad.cpu().double(), x64.grad, rtol=rtol, atol=atol * float(x64.grad.abs().max()))


@pytest.mark.parametrize("kwargs,error", [
    (dict(sequences=4), "sequences must be a positive int dividing the 6 tokens"),
    (dict(sequences=0), "sequences must be a positive int"),
    (dict(sequences=2.0), "sequences must be a positive int"),
    (dict(sequences=2, compute_stats=False), "needs compute_stats=True"),
])
def test_bad_sequences_get_a_clear_error(kwargs, error):
    with pytest.raises(ValueError, match=error):
        fused_topk_router(torch.zeros(6, 8), 2, **kwargs)
