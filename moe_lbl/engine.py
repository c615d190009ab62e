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
- coeff: the weight of one loss term; a term (Term) is one (scope, coeff) of
  BalanceConfig.terms(); scope: "micro" or "global" (SCOPES), where f is pooled. Values are
  reported per scope; the names a framework logs them under are the adapter's.
- gradient: d loss / d s, [N_E], the same for every valid token of a micro-batch.
- BalanceConfig is a balance config, LoadBalancer a balancer (one per MoE layer), and
  metrics.LayerBalance one layer's balance over a step.
- topk_probs: only the kernels' [T, k] probs of the chosen experts (the kernels name the rest
  alike).
"""

from __future__ import annotations

import datetime
import itertools
import math
import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.distributed as dist

from moe_lbl.validation import check_known

SCOPES = ("micro", "global")


class Term(NamedTuple):
    """One term of the loss: f pooled per micro-batch ("micro") or over the batch group ("global")."""

    scope: str
    coeff: float


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

    def terms(self) -> tuple[Term, ...]:
        """The terms with a non-zero coefficient: the scope's, then a hybrid's micro term."""
        terms = (Term(self.scope, self.coeff),) + ((Term("micro", self.micro_coeff),) if self.scope == "global" else ())
        return tuple(t for t in terms if t.coeff > 0)


_WARNED: set = set()


def _warn_once(kind: str, message: str) -> None:
    if kind not in _WARNED:
        _WARNED.add(kind)
        warnings.warn(message, stacklevel=3)


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


# How long a rank waits for a count sum before it raises. Gloo honours it; with NCCL the wait is
# on the GPU stream and NCCL's own watchdog bounds it.
SYNC_TIMEOUT = datetime.timedelta(minutes=10)
_TAG_STEPS = 1 << 10  # tags wrap after this many steps (t^2 summed over many ranks stays in int64)


class MicroBatchMismatch(RuntimeError):
    """Ranks summed counts of different micro-batches, or one waited for a sum that never came."""


class _PendingSum:
    """A [N_E + 1] int64 vector (per-expert counts, then tokens) summed over a group.

    Blocking sums are reduced at once; asynchronous ones join the group's bucket and are
    reduced together with the other layers' vectors of the same micro-batch. The vector travels
    with a tag of its micro-batch (step and position in the step): t and t^2 summed over n ranks
    satisfy n * sum(t^2) == sum(t)^2 only if every rank sent the same t, so ranks that paired
    different micro-batches find out at the step's end (mismatch()), before the optimizer applies
    a step made of mixed counts; reading the tags then costs one host sync per layer and step,
    none in backward.
    """

    def __init__(self, owner: int, local: torch.Tensor, tag: tuple[int, int], what: str, group, async_op: bool):
        self.local = local  # this rank's vector
        self.tag, self.what = tag, what
        self._size = group_size(group)
        self._bucket = None
        self._value = local
        self._work = None
        if self._size > 1:
            step, index = tag
            code = (step % _TAG_STEPS) * MAX_STEP_MICRO_BATCHES + index
            header = local.new_full((2,), code)  # filled on the device: no host-to-device copy
            header[1:].fill_(code * code)
            self.sent = torch.cat([local, header])
            if async_op:
                self._bucket = _bucket(group)
                self._bucket.add(owner, self)
            else:
                self._value = self.sent.clone()
                self._work = dist.all_reduce(self._value, group=group, async_op=True)

    def launched(self, value: torch.Tensor, work) -> None:
        """The bucket's collective `work` will leave the sum in `value` (a view of its buffer)."""
        self._value, self._work = value, work

    def get(self) -> torch.Tensor:
        if self._bucket is not None:
            if self._work is None:  # not launched yet: launch the bucket, this vector with it
                self._bucket.flush()
            self._bucket = None
        if self._work is not None:
            try:
                self._work.wait(timeout=SYNC_TIMEOUT)
            except RuntimeError as error:
                raise MicroBatchMismatch(
                    f"moe-lbl: waited {SYNC_TIMEOUT.total_seconds():g} s for the other ranks' counts of {self.what}, "
                    f"step {self.tag[0]}, micro-batch {self.tag[1]}: the ranks of a group must run the same "
                    "micro-batches in every step (as many, and evaluation passes under torch.no_grad() or "
                    "model.eval()), or a rank stopped") from error
            self._work = None
        return self._value[:-2] if self._size > 1 else self._value

    def tags(self) -> Optional[torch.Tensor]:
        """[code, code^2]: what this rank sent, then the group's sums (None without a group)."""
        if self._size == 1:
            return None
        self.get()
        return torch.cat([self.sent[-2:], self._value[-2:]])

    def mismatch(self, tags: list[int]) -> Optional[str]:
        """Why the group summed different micro-batches, given tags() as integers, or None."""
        sent, _, code, square = tags
        if self._size * square == code * code:
            return None
        return (f"moe-lbl: ranks summed the counts of different micro-batches for {self.what}: this rank sent "
                f"step {self.tag[0]}, micro-batch {self.tag[1]}, the others on average micro-batch code "
                f"{(code - sent) / (self._size - 1):g} (step * {MAX_STEP_MICRO_BATCHES} + micro-batch). The ranks "
                "of a group must run the same micro-batches in every step: as many, with evaluation passes "
                "under torch.no_grad() or model.eval()")


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
        packed = torch.cat([e.sent for e in entries])
        work = dist.all_reduce(packed, group=self.group, async_op=True)
        offset = 0
        for entry in entries:
            size = entry.sent.numel()
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


# A layer registering more micro-batches than this without a step reset is not resetting: a loop
# without Megatron's finalize_model_grads that does not call end_step (moe_lbl.end_step(model)).
MAX_STEP_MICRO_BATCHES = 1024


def _loss_dtype(scores_dtype: torch.dtype) -> torch.dtype:
    """The loss arithmetic's dtype for scores of this dtype: fp64 stays fp64, the rest is fp32."""
    return torch.float64 if scores_dtype == torch.float64 else torch.float32


def _in_backward() -> bool:
    """Whether autograd is running a backward pass (activation checkpointing recomputes there)."""
    return torch._C._current_graph_task_id() != -1


@dataclass
class _Step:
    """One optimizer step of one layer: its micro-batches in registration order, and the summed
    batch vectors of those back-propagated so far (which define the buffered global batch)."""

    handles: list
    pooled: Optional[torch.Tensor] = None


@dataclass
class BalanceHandle:
    """One registered micro-batch of one layer."""

    balancer: "LoadBalancer"
    step: _Step
    sequence: _PendingSum  # summed over the sequence group
    batch: Optional[_PendingSum]  # summed over the batch group (global scope only)
    score_sum: torch.Tensor  # [N_E]: sum of this rank's balancing scores (fp32, or fp64 for fp64 scores)
    config: BalanceConfig  # the balancer's config when this micro-batch was registered
    grad_scale: Callable[[], Union[torch.Tensor, float]]
    report: Optional[Callable[[str, torch.Tensor], None]]
    pooled: Optional[torch.Tensor] = None  # the buffered global batch that defines f, once back-propagated
    backpropagated: bool = False
    reported: bool = False  # a retained graph may be back-propagated again: report once

    def gradient(self) -> torch.Tensor:
        """[N_E] in the dtype of score_sum: d(loss)/d(score) of every valid token of this
        micro-batch, loss scale included.

        Waits for the counts if they are still in flight and reports the values the first time.
        """
        gradient = self.balancer.score_gradient(self)
        return (gradient.to(self.score_sum.dtype) * self.grad_scale()).to(self.score_sum.dtype)


class LoadBalancer:
    """Load-balancing loss state of one MoE layer: the step's micro-batches and count buffer.

    sequence_group: ranks that split the tokens of the same sequences (tensor x context
        parallel); their counts and tokens are summed, as in a plain micro-batch LBL.
    batch_group: ranks that together hold the global batch (tensor x data x context parallel);
        used by the global scope and by the global-batch load metric.
    """

    def __init__(self, config: BalanceConfig, num_experts: int, topk: int,
                 sequence_group=None, batch_group=None, name: Optional[str] = None):
        if not isinstance(config, BalanceConfig):
            raise TypeError(f"config must be a BalanceConfig, got {type(config).__name__}")
        if not 1 <= topk <= num_experts:
            raise ValueError(f"topk must be in [1, num_experts={num_experts}], got {topk}")
        self.config = config  # read at each registration: coefficients may change between them
        self.serial = next(_SERIALS)  # creation order: the same on every rank, unlike id()
        self.name = name or f"balancer {self.serial}"  # for messages
        self._step_number = 0  # steps closed with micro-batches: the same on every rank of a group
        self.num_experts = num_experts
        self.topk = topk
        self.sequence_group = sequence_group
        self.batch_group = batch_group
        self._step = _Step([])
        self._loads: list[torch.Tensor] = []
        self._forward_loads: list[int] = []  # loads recorded outside backward, not yet recomputed
        self.last_step_loads: list[torch.Tensor] = []

    @property
    def enabled(self) -> bool:
        return bool(self.config.terms())

    def attach(self, probs: torch.Tensor, scores: torch.Tensor, counts: torch.Tensor,
               valid_tokens: Union[int, torch.Tensor],
               grad_scale: Callable[[], Union[torch.Tensor, float]],
               report: Optional[Callable[[str, torch.Tensor], None]] = None) -> torch.Tensor:
        """Register one micro-batch and return `probs` carrying the loss gradient to `scores`.

        scores: the balancing scores of the valid tokens, [T, N_E] (rows of padding tokens zero),
        or their sum over the tokens, [N_E] (what the fused router kernels return): the loss is
        linear in them, with the same gradient for every token. counts: [N_E] tokens per expert
        under the top-k of those scores (padding excluded); valid_tokens: this rank's non-padding
        tokens. grad_scale() is read in backward (Megatron's aux-loss scale); report(scope, value)
        receives each term's loss value divided by its coefficient once the counts have arrived.
        """
        if scores.shape[-1:] != (self.num_experts,) or scores.dim() not in (1, 2):
            raise ValueError(f"scores must be [tokens, {self.num_experts}] or [{self.num_experts}], "
                             f"got {tuple(scores.shape)}")
        score_sum = scores.detach().sum(dim=0, dtype=_loss_dtype(scores.dtype)) if scores.dim() == 2 else scores
        handle = self._register(counts, valid_tokens, score_sum, grad_scale, report)
        return _AttachLoss.apply(probs, scores, handle)

    def _register(self, counts: torch.Tensor, valid_tokens: Union[int, torch.Tensor], score_sum: torch.Tensor,
                  grad_scale: Callable[[], Union[torch.Tensor, float]],
                  report: Optional[Callable[[str, torch.Tensor], None]]) -> "BalanceHandle":
        if counts.shape != (self.num_experts,):
            raise ValueError(f"counts must have shape ({self.num_experts},), got {tuple(counts.shape)}")
        score_sum = score_sum.detach()
        tokens = torch.as_tensor(valid_tokens, dtype=torch.int64, device=counts.device).reshape(1)
        local = torch.cat([counts.to(torch.int64), tokens])  # one collective carries counts and tokens
        if _in_backward():
            # Activation checkpointing recomputing a forward: non-reentrant checkpointing had
            # registered it already (the same statistics, not yet back-propagated); reentrant
            # checkpointing ran the first forward without gradients, and registers it now.
            for earlier in self._step.handles:
                if (not earlier.backpropagated and torch.equal(earlier.sequence.local, local)
                        and torch.equal(earlier.score_sum, score_sum.to(earlier.score_sum.dtype))):
                    return earlier
        if len(self._step.handles) >= MAX_STEP_MICRO_BATCHES:
            _warn_once("growing step", f"moe-lbl: a layer registered {MAX_STEP_MICRO_BATCHES} micro-batches without "
                       "a step reset, so its global batch would grow without end; moe-lbl closes the step now. A "
                       "training loop without Megatron's finalize_model_grads must call moe_lbl.end_step(model) "
                       "after each optimizer step")
            self.end_step()
        async_op = self.config.async_sync
        tag = (self._step_number, len(self._step.handles))
        handle = BalanceHandle(
            balancer=self,
            step=self._step,
            sequence=_PendingSum(self.serial, local, tag, self.name, self.sequence_group, async_op),
            batch=(_PendingSum(self.serial, local, tag, self.name, self.batch_group, async_op)
                   if self.config.scope == "global" else None),
            score_sum=score_sum.to(_loss_dtype(score_sum.dtype)),
            config=self.config,
            grad_scale=grad_scale,
            report=report,
        )
        self._step.handles.append(handle)
        return handle

    def record_load(self, tokens_per_expert: torch.Tensor) -> None:
        """Record this rank's dispatched tokens per expert of one micro-batch, for the metrics
        (once: a recomputation in backward of a forward recorded before is not recorded again)."""
        load = tokens_per_expert.detach().to(torch.int64)
        if _in_backward():
            for position, index in enumerate(self._forward_loads):
                if torch.equal(self._loads[index], load):
                    del self._forward_loads[position]
                    return
        else:
            self._forward_loads.append(len(self._loads))
        self._loads.append(load)

    def end_step(self) -> None:
        """Close the optimizer step: empty the buffer, keep the step's loads for the metrics.

        A step that recorded nothing (a second reset, an evaluation-only step) changes nothing.
        """
        handles = self._step.handles
        if not handles and not self._loads:
            return
        # Never leave a collective in flight; check every sum's tags, all in one host sync.
        tagged = [(s, s.tags()) for h in handles for s in (h.sequence, h.batch) if s is not None]
        tagged = [(s, t) for s, t in tagged if t is not None]
        values = torch.stack([t for _, t in tagged]).tolist() if tagged else []
        problems = [p for (s, _), v in zip(tagged, values) if (p := s.mismatch(v))]
        skipped = sum(1 for h in handles if h.batch is not None and not h.backpropagated)
        if skipped:
            _warn_once("not back-propagated", f"moe-lbl: {skipped} of the {len(handles)} micro-batches a layer "
                       "registered in this step were never back-propagated (a forward pass in training mode with "
                       "gradients enabled, such as an evaluation); they were left out of the global batch. Run "
                       "such passes under torch.no_grad() or after model.eval()")
        # A new step, not a cleared one: a handle of the closed step (a graph back-propagated
        # again) keeps reading its own step.
        if handles:
            self._step_number += 1
        self._step = _Step([])
        self.last_step_loads = self._loads
        self._loads = []
        self._forward_loads = []
        if problems:  # raised once the step is closed: nothing is left half-reset
            raise MicroBatchMismatch(problems[0])

    @property
    def buffered_counts(self) -> Optional[torch.Tensor]:
        """Global counts and tokens of this step's micro-batches back-propagated so far."""
        return self._step.pooled

    def _pooled(self, handle: BalanceHandle) -> torch.Tensor:
        """Counts and tokens that define f for the global term of this micro-batch.

        With the buffer: this micro-batch's and those of its step back-propagated before it.
        Only back-propagated micro-batches make up the global batch; every Megatron schedule
        back-propagates a layer's micro-batches in forward order, so that is the prefix of the
        paper's Alg. 1.
        """
        if not handle.config.buffer:
            return handle.batch.get()
        if handle.pooled is None:
            vector = handle.batch.get()
            step = handle.step
            handle.pooled = vector if step.pooled is None else step.pooled + vector
            step.pooled = handle.pooled
        return handle.pooled

    def score_gradient(self, handle: BalanceHandle) -> torch.Tensor:
        """d loss / d s_t,i for every valid local token (the same for all tokens), unscaled.

        Also reports each term's value divided by its coefficient, the first time.
        """
        sequence = handle.sequence.get()
        handle.backpropagated = True
        scale = self.num_experts / sequence[-1].clamp(min=1).double()  # N_E / T over the sequence group
        gradient = torch.zeros(self.num_experts, dtype=torch.float64, device=sequence.device)
        for term in handle.config.terms():
            totals = self._pooled(handle) if term.scope == "global" else sequence
            f = totals[:-1].double() / (self.topk * totals[-1].clamp(min=1).double())
            gradient += (term.coeff * scale) * f
            if handle.report is not None and not handle.reported:
                handle.report(term.scope, (scale * (f * handle.score_sum.double()).sum()).to(handle.score_sum.dtype))
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
