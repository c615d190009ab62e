"""The load-balancing engine: micro-, global- and buffered global-batch LBL.

Qiu et al., "Demons in the Detail" (arXiv 2501.11873). For one MoE layer, on data-parallel
rank r and gradient-accumulation micro-batch j:

    loss_rj = coeff * N_E * sum_i f_i * P_rj,i,   P_rj = (1/T_rj) sum_t s_t

where s_t are the balancing scores of the local tokens and T_rj the valid tokens of the
sequence group (the ranks that split one sequence: tensor x context parallel). f is a constant:

    micro:            f = c_rj / (k T_rj)                       (counts of the sequence group)
    global:           f = sum_r c_rj / (k sum_r T_rj)           (counts of the whole batch group)
    global + buffer:  f = sum_r sum_{j'<=j} c_rj' / (k sum_r sum_{j'<=j} T_rj')   (paper's Alg. 1)

The step objective is the mean of loss_rj over ranks and micro-batches (paper Eq. 6), which the
caller's loss scale provides. Since f is needed only for the gradient (and the logged value),
the count all-reduce is launched in forward and waited on in backward when `async_sync` is set;
the layers' counts of one micro-batch travel in one collective.

Nothing here knows Megatron: the caller passes process groups, a loss-scale callable and a
reporting callable.

Naming convention (one meaning per word, in the code, the docs and the tests):
- logits: the router's output for each token, [T, N_E].
- scores: the balancing scores s_t, [T, N_E] (`balancing_scores`): softmax over all experts, or
  sigmoid scores normalized to sum 1. P is their mean over a micro-batch's valid tokens.
- probs: the routing probabilities the router returns, [T, N_E], zero outside each token's
  selection. The engine passes them through unchanged and sends the loss gradient to `scores`.
- routing_map: [T, N_E] bool, the experts each token is dispatched to.
- counts: c, [N_E], the valid tokens whose top-k of the scores includes each expert; f is made
  of counts. score_sum: [N_E], the scores summed over the valid tokens (T * P).
- valid_tokens: T, the tokens that are not padding.
- load: the tokens dispatched to each expert (from routing_map), for the balance metrics; it
  differs from counts where routing selects by other scores (expert bias, groups).
- coeff: the weight of one loss term; a term is one (name, coeff, pooled) of
  BalanceConfig.terms(); scope: "micro" or "global" (SCOPES), where f is pooled.
- gradient: d loss / d s, [N_E], the same for every valid token of a micro-batch.
- BalanceConfig is a balance config, LoadBalancer a balancer (one per MoE layer), and
  metrics.LayerBalance one layer's balance over a step.
- weights: only the kernels' routing weights, [T, k], the probs of the chosen experts.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.distributed as dist

from moe_lbl.validation import check_known

SCOPES = ("micro", "global")

SCORE_FUNCTIONS = ("softmax", "sigmoid", "sqrtsoftplus")  # Megatron-Core's (sqrtsoftplus: 0.17+)
SIGMOID_EPS = 1e-20  # Megatron's epsilon when it normalizes sigmoid scores to sum 1

# Names under which the loss values are reported; Megatron's training log knows these two.
MICRO_LOSS_NAME = "load_balancing_loss"
GLOBAL_LOSS_NAME = "global_load_balancing_loss"


def balancing_scores(logits: torch.Tensor, score_function: str) -> torch.Tensor:
    """s_t of every token, [T, N_E]: softmax over all experts, or sigmoid (sqrtsoftplus) scores
    normalized to sum 1.

    What Megatron-Core's compute_routing_scores_for_aux_loss computes (0.14 and newer; older
    versions compute the same inside their routing), in the dtype of `logits`.
    """
    check_known("score function", score_function, SCORE_FUNCTIONS)
    if score_function == "softmax":
        return torch.softmax(logits, dim=-1)
    if score_function == "sigmoid":
        scores = torch.sigmoid(logits)
    else:  # sqrtsoftplus (Megatron-Core 0.17+)
        scores = torch.nn.functional.softplus(logits).sqrt()
    return scores / (scores.sum(dim=-1, keepdim=True) + SIGMOID_EPS)


def _check_coeff(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")


@dataclass(frozen=True)
class BalanceConfig:
    """How the load-balancing loss of every MoE layer is computed.

    scope: "micro" balances each micro-batch (what most frameworks do); "global" balances the
        global batch: counts are all-reduced over all data-parallel ranks.
    coeff: weight of the loss of the chosen scope.
    micro_coeff: with scope="global", adds a micro-batch loss at this weight (the paper's hybrid,
        Tab. 5; about 1% of coeff there).
    buffer: with scope="global", accumulate counts over the gradient-accumulation micro-batches
        of the step (paper's Alg. 1); without it, each micro-batch uses the counts of the
        micro-batches processed at the same time on all ranks.
    async_sync: launch the count all-reduce in forward and wait for it only in backward.
    """

    scope: str = "global"
    coeff: float = 1e-2
    micro_coeff: float = 0.0
    buffer: bool = True
    async_sync: bool = True

    def __post_init__(self):
        check_known("scope", self.scope, SCOPES)
        _check_coeff("coeff", self.coeff)
        _check_coeff("micro_coeff", self.micro_coeff)
        if self.scope == "micro" and self.micro_coeff > 0:
            raise ValueError(
                "micro_coeff adds a micro-batch term to the global loss (the hybrid); "
                "with scope='micro' set coeff instead"
            )
        for name in ("buffer", "async_sync"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def terms(self) -> tuple[tuple[str, float, bool], ...]:
        """(reported name, coefficient, pooled over the batch group) for each non-zero term."""
        if self.scope == "micro":
            terms = ((MICRO_LOSS_NAME, self.coeff, False),)
        else:
            terms = ((GLOBAL_LOSS_NAME, self.coeff, True), (MICRO_LOSS_NAME, self.micro_coeff, False))
        return tuple(t for t in terms if t[1] > 0)


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


class _PendingSum:
    """A [N_E + 1] int64 vector (per-expert counts, then tokens) summed over a group.

    Blocking sums are reduced at once; asynchronous ones join the group's bucket and are
    reduced together with the other layers' vectors of the same micro-batch.
    """

    def __init__(self, owner: int, local: torch.Tensor, group, async_op: bool):
        self.local = local  # this rank's vector
        self._bucket = None
        self._value = local
        self._work = None
        if group_size(group) > 1:
            if async_op:
                self._bucket = _bucket(group)
                self._bucket.add(owner, self)
            else:
                self._value = local.clone()
                dist.all_reduce(self._value, group=group)

    def launched(self, value: torch.Tensor, work) -> None:
        """The bucket's collective `work` will leave the sum in `value` (a view of its buffer)."""
        self._value, self._work = value, work

    def get(self) -> torch.Tensor:
        if self._bucket is not None:
            if self._work is None:  # not launched yet: launch the bucket, this vector with it
                self._bucket.flush()
            self._bucket = None
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._value


class _CountBucket:
    """Coalesces one micro-batch's count all-reduces of all layers into one collective.

    The bucket is flushed (the collective launched asynchronously) as soon as the layers that
    made up the previous flush have all added their vectors, which is the end of the forward
    pass in steady state; otherwise when a value is first needed, or when a layer adds a second
    vector before a flush. These points depend only on the order of the calls, which is the same
    on every rank, so every rank issues the same collectives.
    """

    def __init__(self, group):
        self.group = group
        self.pending: list[tuple[int, _PendingSum]] = []
        self.expected: Optional[list[int]] = None  # owners of the previous flush, in order

    def add(self, owner: int, entry: _PendingSum) -> None:
        if any(owner == o for o, _ in self.pending):
            self.flush()
        self.pending.append((owner, entry))
        if [o for o, _ in self.pending] == self.expected:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        entries = [e for _, e in self.pending]
        packed = torch.cat([e.local for e in entries])
        work = dist.all_reduce(packed, group=self.group, async_op=True)
        offset = 0
        for entry in entries:
            size = entry.local.numel()
            entry.launched(packed[offset:offset + size], work)
            offset += size
        self.expected = [o for o, _ in self.pending]
        self.pending = []


_BUCKETS: dict = {}
_SERIALS = itertools.count()


def _bucket(group) -> _CountBucket:
    if group not in _BUCKETS:
        _BUCKETS[group] = _CountBucket(group)
    return _BUCKETS[group]


@dataclass
class BalanceHandle:
    """One registered micro-batch of one layer."""

    balancer: "LoadBalancer"
    index: int
    step: list  # the handles of its optimizer step, in registration order
    prefix: list  # running sums of the step's resolved batch vectors
    sequence: _PendingSum  # summed over the sequence group
    batch: Optional[_PendingSum]  # summed over the batch group (global scope only)
    score_sum: torch.Tensor  # [N_E] fp32: sum of this rank's balancing scores
    grad_scale: Callable[[], Union[torch.Tensor, float]]
    report: Optional[Callable[[str, torch.Tensor], None]]
    reported: bool = False  # a retained graph may be back-propagated again: report once

    def gradient(self) -> torch.Tensor:
        """fp32 [N_E]: d(loss)/d(score) of every valid token of this micro-batch, loss scale included.

        Waits for the counts if they are still in flight and reports the values the first time.
        """
        gradient = self.balancer.score_gradient(self)
        return (gradient.float() * self.grad_scale()).float()


class LoadBalancer:
    """Load-balancing loss state of one MoE layer: the step's micro-batches and count buffer.

    sequence_group: ranks that split the tokens of the same sequences (tensor x context
        parallel); their counts and tokens are summed, as in a plain micro-batch LBL.
    batch_group: ranks that together hold the global batch (tensor x data x context parallel);
        used by the global scope and by the global-batch load metric.
    """

    def __init__(self, config: BalanceConfig, num_experts: int, topk: int,
                 sequence_group=None, batch_group=None):
        if not isinstance(config, BalanceConfig):
            raise TypeError(f"config must be a BalanceConfig, got {type(config).__name__}")
        if not 1 <= topk <= num_experts:
            raise ValueError(f"topk must be in [1, num_experts={num_experts}], got {topk}")
        self.config = config
        self.serial = next(_SERIALS)  # creation order: the same on every rank, unlike id()
        self.num_experts = num_experts
        self.topk = topk
        self.sequence_group = sequence_group
        self.batch_group = batch_group
        self._terms = config.terms()
        self._micro_batches: list[BalanceHandle] = []
        self._batch_prefix: list[torch.Tensor] = []  # running sums of resolved batch vectors
        self._loads: list[torch.Tensor] = []
        self.last_step_loads: list[torch.Tensor] = []

    @property
    def enabled(self) -> bool:
        return bool(self._terms)

    def attach(self, probs: torch.Tensor, scores: torch.Tensor, counts: torch.Tensor,
               valid_tokens: Union[int, torch.Tensor],
               grad_scale: Callable[[], Union[torch.Tensor, float]],
               report: Optional[Callable[[str, torch.Tensor], None]] = None) -> torch.Tensor:
        """Register one micro-batch and return `probs` carrying the loss gradient to `scores`.

        scores: [T, N_E] balancing scores (rows of padding tokens zero); counts: [N_E] tokens
        per expert under the top-k of those scores (padding excluded); valid_tokens: this rank's
        non-padding tokens. grad_scale() is read in backward (Megatron's aux-loss scale);
        report(name, value) receives each term's loss value divided by its coefficient once the
        counts have arrived.
        """
        if scores.dim() != 2 or scores.shape[1] != self.num_experts:
            raise ValueError(f"scores must be [tokens, {self.num_experts}], got {tuple(scores.shape)}")
        handle = self.register(counts, valid_tokens, scores.detach().sum(dim=0, dtype=torch.float32),
                               grad_scale, report)
        return _AttachLoss.apply(probs, scores, handle)

    def register(self, counts: torch.Tensor, valid_tokens: Union[int, torch.Tensor], score_sum: torch.Tensor,
                 grad_scale: Callable[[], Union[torch.Tensor, float]],
                 report: Optional[Callable[[str, torch.Tensor], None]] = None) -> "BalanceHandle":
        """Register one micro-batch from its statistics; the caller applies handle.gradient().

        For callers that compute the statistics themselves (the fused router kernels): counts
        [N_E] of the top-k over the balancing scores and score_sum [N_E] over valid tokens.
        """
        if counts.shape != (self.num_experts,) or score_sum.shape != (self.num_experts,):
            raise ValueError(f"counts and score_sum must have shape ({self.num_experts},), "
                             f"got {tuple(counts.shape)} and {tuple(score_sum.shape)}")
        tokens = torch.as_tensor(valid_tokens, dtype=torch.int64, device=counts.device).reshape(1)
        local = torch.cat([counts.to(torch.int64), tokens])  # one collective carries counts and tokens
        async_op = self.config.async_sync
        handle = BalanceHandle(
            balancer=self,
            index=len(self._micro_batches),
            step=self._micro_batches,
            prefix=self._batch_prefix,
            sequence=_PendingSum(self.serial, local, self.sequence_group, async_op),
            batch=(_PendingSum(self.serial, local, self.batch_group, async_op)
                   if self.config.scope == "global" else None),
            score_sum=score_sum.detach().float(),
            grad_scale=grad_scale,
            report=report,
        )
        self._micro_batches.append(handle)
        return handle

    def record_load(self, tokens_per_expert: torch.Tensor) -> None:
        """Record this rank's dispatched tokens per expert of one micro-batch, for the metrics."""
        self._loads.append(tokens_per_expert.detach().to(torch.int64))

    def end_step(self) -> None:
        """Close the optimizer step: empty the buffer, keep the step's loads for the metrics.

        A step that recorded nothing (a second reset, an evaluation-only step) changes nothing.
        """
        if not self._micro_batches and not self._loads:
            return
        for handle in self._micro_batches:  # never leave a collective in flight
            handle.sequence.get()
            if handle.batch is not None:
                handle.batch.get()
        # New lists, not cleared ones: a handle of the closed step (a graph back-propagated
        # again) keeps reading its own step.
        self._micro_batches = []
        self._batch_prefix = []
        self.last_step_loads = self._loads
        self._loads = []

    @property
    def buffered_counts(self) -> Optional[torch.Tensor]:
        """Global counts and tokens accumulated so far this step (resolved micro-batches only)."""
        return self._batch_prefix[-1] if self._batch_prefix else None

    def _pooled(self, handle: BalanceHandle) -> torch.Tensor:
        """Counts and tokens that define f for the global term of this micro-batch."""
        if not self.config.buffer:
            return handle.batch.get()
        prefix = handle.prefix
        while len(prefix) <= handle.index:
            vector = handle.step[len(prefix)].batch.get()
            if prefix:
                vector = prefix[-1] + vector
            prefix.append(vector)
        return prefix[handle.index]

    def score_gradient(self, handle: BalanceHandle) -> torch.Tensor:
        """d loss / d s_t,i for every valid local token (the same for all tokens), unscaled.

        Also reports each term's value divided by its coefficient, the first time.
        """
        sequence = handle.sequence.get()
        scale = self.num_experts / sequence[-1].clamp(min=1).double()  # N_E / T over the sequence group
        gradient = torch.zeros(self.num_experts, dtype=torch.float64, device=sequence.device)
        for name, coeff, pooled in self._terms:
            totals = self._pooled(handle) if pooled else sequence
            f = totals[:-1].double() / (self.topk * totals[-1].clamp(min=1).double())
            gradient += (coeff * scale) * f
            if handle.report is not None and not handle.reported:
                handle.report(name, (scale * (f * handle.score_sum.double()).sum()).float())
        handle.reported = True
        return gradient


class _AttachLoss(torch.autograd.Function):
    """Identity on probs; in backward, adds the balancing-loss gradient to the scores."""

    @staticmethod
    def forward(ctx, probs, scores, handle: BalanceHandle):
        ctx.handle = handle
        ctx.scores_shape = scores.shape
        ctx.scores_dtype = scores.dtype
        return probs

    @staticmethod
    def backward(ctx, grad_probs):
        gradient = ctx.handle.gradient()  # also reports the values
        if not ctx.needs_input_grad[1]:
            return grad_probs, None, None
        return grad_probs, gradient.to(ctx.scores_dtype).expand(ctx.scores_shape), None
