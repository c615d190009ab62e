"""The fused router against the float64 reference, forward and backward, on this machine.

Every case draws fresh random inputs (seeded by the time of the run, printed in its row, so a
failure can be rerun), poisons the kernels' output buffers (NaN, -7, True) so an element never
written shows, and uses token counts that no block divides. Selections must equal the
reference's (ties toward the lower expert index) wherever no near tie could flip them.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from moe_lbl.selftest import Check, timed

SECTION = "kernels"
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
EPS = {torch.float32: 1.2e-7, torch.bfloat16: 7.9e-3, torch.float16: 9.8e-4}
PROBS_TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1.6e-2, 1e-5), torch.float16: (2e-3, 1e-6)}
GRAD_TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 1e-2), torch.float16: (4e-3, 2e-3)}


@dataclass(frozen=True)
class Case:
    """One router configuration: E experts, top-k, T tokens of `dtype` logits."""

    E: int
    k: int
    T: int
    dtype: torch.dtype
    score: str = "softmax"
    pre: bool = False  # softmax before top-k
    groups: Optional[int] = None
    group_topk: Optional[int] = None
    bias: bool = False  # an expert bias (sigmoid)
    scaling: Optional[float] = None
    padding: float = 0.0  # the fraction of padding tokens

    @property
    def name(self) -> str:
        parts = [self.score + ("-pre" if self.pre else ""), f"E{self.E}-k{self.k}-T{self.T}",
                 str(self.dtype).replace("torch.", "")]
        if self.bias:
            parts.append("bias")
        if self.groups:
            parts.append(f"groups{self.groups}x{self.group_topk}")
        if self.scaling:
            parts.append(f"scale{self.scaling:g}")
        if self.padding:
            parts.append("padding")
        return "-".join(parts)

    def routing(self) -> dict:
        return dict(score_function=self.score, use_pre_softmax=self.pre, num_groups=self.groups,
                    group_topk=self.group_topk, scaling_factor=self.scaling)

    @property
    def aux_dtype(self) -> torch.dtype:
        """The dtype of the aux scores: fp32 softmax, or sigmoid scores in the logits dtype."""
        return self.dtype if self.score == "sigmoid" else FP32


# The interpreter's subset: every option once, small E (its cost is per element).
INTERPRETER_CASES = [
    Case(8, 2, 77, FP32, padding=0.2),
    Case(12, 3, 77, BF16, pre=True, scaling=2.5),
    Case(16, 4, 77, FP32, "sigmoid", groups=4, group_topk=2, bias=True, scaling=2.5, padding=0.1),
    Case(16, 4, 77, BF16, "sigmoid", padding=0.3),
    Case(8, 1, 77, FP16, pre=True),
]
# On CUDA: the headline configurations and every option, in each dtype.
CUDA_CASES = [
    *(Case(E, k, 4099, dtype) for E in (64, 128, 256) for k in (4, 8) for dtype in (BF16, FP32)),
    Case(256, 8, 4099, BF16, "sigmoid", groups=8, group_topk=4, bias=True, scaling=2.5, padding=0.1),
    Case(256, 8, 4099, FP32, "sigmoid", groups=8, group_topk=4, bias=True, scaling=2.5),
    Case(160, 6, 1021, BF16, groups=8, group_topk=3, padding=0.2),
    Case(64, 8, 1021, FP32, pre=True, groups=8, group_topk=4, scaling=1.5),
    Case(60, 4, 1021, BF16, "sigmoid", padding=0.2),
    Case(512, 8, 1021, BF16),
    Case(2048, 16, 257, BF16),
    Case(8, 1, 1021, FP32, pre=True),
    Case(256, 4, 1021, FP16),
    Case(64, 6, 1021, FP16, "sigmoid", groups=4, group_topk=2, scaling=2.0),
]


@contextlib.contextmanager
def poisoned():
    """The kernels' output buffers start as NaN / -7 / True (they all come from _ops._empty)."""
    from moe_lbl.kernels.topk_router_details import _ops

    def empty(shape, dtype, device):
        if dtype.is_floating_point:
            return torch.full(shape, float("nan"), dtype=dtype, device=device)
        if dtype == torch.bool:
            return torch.ones(shape, dtype=dtype, device=device)
        return torch.full(shape, -7, dtype=dtype, device=device)

    saved, _ops._empty = _ops._empty, empty
    try:
        yield
    finally:
        _ops._empty = saved


def _launch(cuda: bool):
    from moe_lbl.kernels import Launch

    # The interpreter's cost is per program: few, large blocks, still not dividing T.
    return Launch() if cuda else Launch(block_t=32, num_programs=2)


def inputs(c: Case, seed: int):
    """Logits (CPU), an expert bias and a padding mask (None where the case has none)."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(c.T, c.E, generator=g) * 2).to(c.dtype)
    bias = torch.randn(c.E, generator=g) * 0.05 if c.bias else None
    padding = torch.rand(c.T, generator=g) < c.padding if c.padding else None
    return logits, bias, padding


def selection_near_ties(ref, c: Case) -> torch.Tensor:
    """Rows where a near tie of the selection (or group) scores could flip a choice."""
    from moe_lbl.kernels.topk_router_reference import near_tie_rows

    tol = max(4 * EPS[c.dtype] if not (c.score == "softmax" and not c.pre) else 0.0, 4 * EPS[FP32])
    near = near_tie_rows(ref.select, c.k, tol)
    if ref.group_scores is not None:
        near |= near_tie_rows(ref.group_scores, c.group_topk, tol)
    return near


def _close(name, got, want, rtol, atol):
    error = (got.double() - want.double()).abs()
    bound = atol + rtol * want.double().abs()
    if not bool((error <= bound).all()):
        worst = int((error - bound).argmax())
        raise AssertionError(f"{name}: {float(error.flatten()[worst]):.3g} off at {worst} "
                             f"(bound {float(bound.flatten()[worst]):.3g})")
    return float(error.max()) if error.numel() else 0.0


def check_case(c: Case, cuda: bool, seed: int) -> str:
    """Forward (dense and sparse outputs, statistics) and backward of one case; raises on a failure."""
    from moe_lbl.kernels import fused_topk_router
    from moe_lbl.kernels.topk_router_reference import near_tie_rows, reference_routing

    device = torch.device("cuda" if cuda else "cpu")
    logits, bias, padding = inputs(c, seed)
    on = (lambda t: None if t is None else t.to(device))  # noqa: E731
    x = on(logits).clone().requires_grad_()
    with poisoned():
        out = fused_topk_router(x, c.k, expert_bias=on(bias), padding_mask=on(padding), launch=_launch(cuda),
                                dense=True, sparse=True, **c.routing())
    ref = reference_routing(logits, c.k, expert_bias=bias, **c.routing())
    indices = out.topk_indices.cpu().long()
    routing_map = out.routing_map.cpu()
    if not bool(((indices >= 0) & (indices < c.E)).all()):
        raise AssertionError("topk_indices: values outside [0, E)")
    selected = torch.zeros(c.T, c.E, dtype=torch.bool).scatter(1, indices, True)
    if not (torch.equal(selected.sum(1), torch.full((c.T,), c.k)) and torch.equal(routing_map, selected)):
        raise AssertionError("routing_map: not k distinct experts per row, or not topk_indices")
    near = selection_near_ties(ref, c)
    wrong = (indices != ref.indices).any(1) & ~near
    if wrong.any():
        raise AssertionError(f"selection: {int(wrong.sum())} of {c.T} rows differ from the reference "
                             f"(first: row {int(wrong.nonzero()[0])})")
    mine = reference_routing(logits, c.k, expert_bias=bias, indices=indices, **c.routing())
    rtol, atol = PROBS_TOL[c.dtype]
    probs_error = _close("probs", out.probs.detach().cpu(), mine.probs, rtol, atol)
    _close("topk_probs", out.topk_probs.detach().cpu(), mine.topk_probs, rtol, atol)
    valid = torch.ones(c.T, dtype=torch.bool) if padding is None else ~padding
    stats = out.stats
    if int(stats.valid_tokens) != int(valid.sum()):
        raise AssertionError(f"valid_tokens: {int(stats.valid_tokens)} against {int(valid.sum())}")
    if not torch.equal(stats.dispatch_counts.cpu(), (selected & valid[:, None]).sum(0)):
        raise AssertionError("dispatch_counts differ from the routing map's")
    aux_dtype = c.aux_dtype
    aux_near = near_tie_rows(ref.aux_scores.detach(), c.k, 4 * EPS[aux_dtype]) & valid
    aux_map = torch.zeros(c.T, c.E, dtype=torch.bool).scatter(1, ref.aux_indices, True)
    moved = int((stats.aux_counts.cpu() - (aux_map & valid[:, None]).sum(0)).abs().sum())
    if moved > 2 * c.k * int(aux_near.sum()):
        raise AssertionError(f"aux_counts: {moved} off, {int(aux_near.sum())} near-tie rows")
    _close("score_sums", stats.score_sums.detach().cpu(), ref.aux_scores[valid].sum(0).detach(),
           1e-5 if aux_dtype == FP32 else 1e-3, c.T * EPS[aux_dtype])
    _close("z_sum", stats.z_sum.detach().cpu(), (ref.lse[valid] ** 2).sum().detach(), 1e-5, 1e-3)

    g = torch.Generator().manual_seed(seed + 1)
    grad_probs = torch.randn(c.T, c.E, generator=g).to(c.dtype)
    grad_topk = torch.randn(c.T, c.k, generator=g).to(c.dtype)
    lbl, z = torch.randn(c.E, generator=g) * 0.1, 0.03
    loss = ((out.probs * on(grad_probs)).sum() + (out.topk_probs * on(grad_topk)).sum()
            + (stats.score_sums * on(lbl)).sum() + z / 2 * stats.z_sum)
    with poisoned():
        loss.backward()
    x64 = logits.double().requires_grad_()
    ref64 = reference_routing(logits, c.k, expert_bias=bias, indices=indices, x=x64, **c.routing())
    total = ((ref64.probs * grad_probs.double()).sum() + (ref64.topk_probs * grad_topk.double()).sum()
             + (ref64.aux_scores[valid] * lbl.double()).sum() + z / 2 * (ref64.lse[valid] ** 2).sum())
    total.backward()
    rtol, atol = GRAD_TOL[c.dtype]
    grad_error = _close("logits gradient", x.grad.cpu(), x64.grad, rtol, atol * float(x64.grad.abs().max()))
    return (f"seed {seed}; probs {probs_error:.2g}, gradient {grad_error:.2g} off at most; "
            f"{int(near.sum())} near-tie rows")


def check_ties(cuda: bool, seed: int) -> str:
    """Small integer logits (many exact ties): the lower expert index wins, as the reference's."""
    from moe_lbl.kernels import fused_topk_router
    from moe_lbl.kernels.topk_router_reference import reference_routing

    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(-4, 5, (97, 16), generator=g).float()
    for score, pre in (("softmax", False), ("softmax", True), ("sigmoid", False)):
        ref = reference_routing(logits, 4, score_function=score, use_pre_softmax=pre)
        # With topk_indices fp32 scores are chosen by (value, index) keys; by value keys without.
        for sparse in (True, False):
            with poisoned():
                out = fused_topk_router(logits.to("cuda" if cuda else "cpu"), 4, score_function=score,
                                        use_pre_softmax=pre, sparse=sparse, launch=_launch(cuda))
            if sparse:
                chosen, want = out.topk_indices.cpu().long(), ref.indices
            else:
                chosen = out.routing_map.cpu()
                want = torch.zeros(97, 16, dtype=torch.bool).scatter(1, ref.indices, True)
            if not torch.equal(chosen, want):
                raise AssertionError(f"{score}{' pre' if pre else ''}{'' if sparse else ' (dense)'}: ties broken "
                                     "otherwise than toward the lower index")
    return f"seed {seed}; softmax, pre-softmax and sigmoid, sparse and dense"


def check_nan_rows(cuda: bool, seed: int) -> str:
    """A NaN logit is chosen first (torch.topk ranks NaN above numbers); an all-NaN row still
    chooses k distinct experts; inf and -inf rank as numbers."""
    from moe_lbl.kernels import fused_topk_router

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(41, 16, generator=g)
    logits[3, 5], logits[9, 2], logits[11, 4] = float("nan"), float("inf"), float("-inf")
    logits[7] = float("nan")
    with poisoned():
        out = fused_topk_router(logits.to("cuda" if cuda else "cpu"), 4, launch=_launch(cuda))
    routing_map = out.routing_map.cpu()
    if not torch.equal(routing_map.sum(1), torch.full((41,), 4)):
        raise AssertionError("a row does not choose 4 experts")
    if not (bool(routing_map[3, 5]) and bool(routing_map[9, 2]) and not bool(routing_map[11, 4])):
        raise AssertionError("NaN or inf logits ranked otherwise than torch.topk ranks them")
    numbers = torch.isfinite(logits).all(1)
    expected = torch.zeros_like(routing_map).scatter(1, torch.topk(logits, 4).indices, True)
    if not torch.equal(routing_map[numbers], expected[numbers]):
        raise AssertionError("rows of numbers beside NaN rows route otherwise")
    return f"seed {seed}; rows 3 (one NaN), 7 (all NaN), 9 (inf), 11 (-inf)"


def check_sequences(cuda: bool, seed: int) -> str:
    """Per-sequence statistics (seq_aux_loss) of 4 sequences laid out [s, 4], DeepSeek-V3 style
    routing with padding: counts and score sums per sequence, and the gradient of a loss on them."""
    from moe_lbl.kernels import fused_topk_router
    from moe_lbl.kernels.topk_router_reference import near_tie_rows, reference_routing

    sequences = 4
    c = Case(64, 8, sequences * (1025 if cuda else 37), torch.bfloat16, score="sigmoid", groups=8, group_topk=4,
             bias=True, padding=0.1)
    device = torch.device("cuda" if cuda else "cpu")
    logits, bias, padding = inputs(c, seed)
    on = (lambda t: None if t is None else t.to(device))  # noqa: E731
    x = on(logits).clone().requires_grad_()
    with poisoned():
        out = fused_topk_router(x, c.k, expert_bias=on(bias), padding_mask=on(padding), sequences=sequences,
                                launch=_launch(cuda), sparse=False, **c.routing())
    x64 = logits.double().requires_grad_()
    ref = reference_routing(logits, c.k, expert_bias=bias, x=x64, **c.routing())
    valid = ~padding
    per_sequence = (-1, sequences, c.E)
    aux_map = torch.zeros(c.T, c.E, dtype=torch.bool).scatter(1, ref.aux_indices, True) & valid[:, None]
    aux_near = (near_tie_rows(ref.aux_scores.detach(), c.k, 4 * EPS[c.aux_dtype]) & valid).reshape(-1, sequences)
    moved = (out.stats.sequence_aux_counts.cpu() - aux_map.reshape(per_sequence).sum(0)).abs().sum(1)
    if bool((moved > 2 * c.k * aux_near.sum(0)).any()):
        raise AssertionError(f"sequence_aux_counts: {moved.tolist()} off per sequence")
    want = (ref.aux_scores * valid[:, None]).reshape(per_sequence).sum(0)
    _close("sequence_score_sums", out.stats.sequence_score_sums.detach().cpu(), want.detach(), 1e-3,
           c.T // sequences * EPS[c.aux_dtype])
    weights = torch.randn(sequences, c.E, generator=torch.Generator().manual_seed(seed + 1))
    with poisoned():
        (out.stats.sequence_score_sums * on(weights)).sum().backward()
    (want * weights.double()).sum().backward()
    rtol, atol = GRAD_TOL[c.dtype]
    error = _close("logits gradient", x.grad.cpu(), x64.grad, rtol, atol * float(x64.grad.abs().max()))
    return f"seed {seed}; {sequences} sequences of {c.T // sequences} tokens, gradient {error:.2g} off at most"


def checks(cuda: bool) -> Iterator[Check]:
    seed = int(time.time()) % 100_000
    for index, case in enumerate(CUDA_CASES if cuda else INTERPRETER_CASES):
        yield timed(SECTION, case.name, lambda case=case, index=index: check_case(case, cuda, seed + index))
    yield timed(SECTION, "exact ties", lambda: check_ties(cuda, seed))
    yield timed(SECTION, "NaN and inf rows", lambda: check_nan_rows(cuda, seed))
    yield timed(SECTION, "per-sequence statistics", lambda: check_sequences(cuda, seed))
