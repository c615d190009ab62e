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

State across calls lives in device tensors updated in place (BalanceState): the step's pooled
counts, loads and counters, and the checks read at the step's end. Nothing a forward or
backward computes depends on Python-side history, and neither syncs with the host, so a CUDA
graph that captured one micro-batch's forward and backward replays them correctly on the next
ones. Under capture (`capturing()`) each count sum completes inside the forward.

Nothing here knows Megatron: the caller passes process groups, how the gradient is scaled
(GradScale) and where the values go (Report).

Naming convention (one meaning per word, in the code, the docs and the tests):
- logits: the router's output for each token, [T, N_E].
- scores: the balancing scores s_t, [T, N_E] (moe_lbl.scores): softmax over all experts, or
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


def _no_scale() -> None:
    return None


@dataclass(frozen=True)
class GradScale:
    """How a micro-batch's loss gradient is scaled, read when backward runs (a training loop's
    loss scale changes between steps): source() (a tensor; None for 1), times tokens_factor and
    then the valid tokens when tokens_factor is set (a loss summed over tokens, not averaged),
    over divisor. Megatron's aux-loss scale, in the order its autograd forms it."""

    source: Callable[[], Optional[torch.Tensor]] = _no_scale
    tokens_factor: Optional[int] = None
    divisor: int = 1

    def value(self, valid_tokens: Union[int, torch.Tensor], dtype: torch.dtype, divide: bool = True):
        scale = self.source()
        scale = 1.0 if scale is None else scale.to(dtype)  # as ones_like(loss) * scale
        if self.tokens_factor is not None:
            if self.tokens_factor != 1:
                scale = scale * self.tokens_factor
            scale = scale * valid_tokens
        return scale / self.divisor if divide and self.divisor != 1 else scale


@dataclass(frozen=True)
class Report:
    """Where each term's value goes when backward has it: targets[scope] (a one-element tensor)
    gains the term's loss over divisor, over its coefficient (what Megatron logs)."""

    targets: dict
    divisor: int = 1


@dataclass(frozen=True)
class ZLoss:
    """A router z-loss carried by the same micro-batch (the fused path): coeff * z_sum / valid
    tokens, its gradient to z_sum scaled as the balancing loss's but for the divisor; its value
    z_sum / valid / divisor added to target."""

    z_sum: torch.Tensor
    coeff: float
    target: Optional[torch.Tensor] = None


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
    async_sync: launch the count all-reduce in forward and wait for it only in backward (under
        CUDA-graph capture the sum completes inside the forward whatever this says).
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


def capturing() -> bool:
    """Whether the current CUDA stream is being captured into a graph (then nothing may wait
    for the host, and a collective must complete inside the captured region)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _in_backward() -> bool:
    """Whether autograd is running a backward pass (activation checkpointing recomputes there)."""
    return torch._C._current_graph_task_id() != -1


# How long a rank waits for a count sum in eager mode before it raises. Gloo honours it; with
# NCCL the wait stays on the GPU stream (a timeout would make it poll on the host) and NCCL's
# own watchdog bounds it.
SYNC_TIMEOUT = datetime.timedelta(minutes=10)

# A layer registering more micro-batches than this without a step reset is not resetting: a loop
# without Megatron's finalize_model_grads that does not call end_step (moe_lbl.end_step(model)).
MAX_STEP_MICRO_BATCHES = 1024
# Each count sum carries its micro-batch's tag [1, code, code^2], code = (step % _TAG_STEPS) *
# _TAG_SLOTS + its registration in the step: summed over n ranks, n * sum(code^2) == sum(code)^2
# only if every rank sent the same code. Recomputed forwards register too, hence the slots.
_TAG_SLOTS = 4 * MAX_STEP_MICRO_BATCHES
_TAG_STEPS = 64  # code^2 summed over 8192 ranks, times 8192, stays within int64


class MicroBatchMismatch(RuntimeError):
    """Ranks summed counts of different micro-batches, or one waited for a sum that never came."""


class BalanceState:
    """What one layer keeps across calls, in device tensors updated in place.

    ints (int64):
      pooled [E+1]    counts and tokens of the step's back-propagated micro-batches, all ranks
      loads [E]       tokens dispatched in the step's back-propagated micro-batches, this rank
      backpropagated  micro-batches back-propagated in the step
      forward_backpropagated  of the forward registrations, those back-propagated
      sent            registrations in the step (the next one's tag slot)
      forward         registrations in forward (a recompute in backward is none)
      code_base       (step % _TAG_STEPS) * _TAG_SLOTS: the code of the step's first slot
      last_loads [E], last_backpropagated: the last closed step's, for the metrics
      last_pooled [E+1]: the last closed step's buffer (for a graph back-propagated after it)
      what the checks read (`checked`), in steps not yet checked:
      skipped         forward registrations never back-propagated
      mismatches      count sums whose tags disagreed
      first_mismatch [4]: the first of them, as `received` held it
    tags [_TAG_SLOTS, 3] (int64): the tag [1, code, code^2] each slot sends this step
    received [2, _TAG_SLOTS, 4] (int64): per sum (over the sequence group, over the batch group)
      and slot, the summed tag [n, sum code, sum code^2] and the code this rank sent (zero until
      the sum was back-propagated), until the checks read them
    floats (float64): max_vio (the step's sum over its back-propagated micro-batches of
      max load / mean load - 1, each over its sequence group), last_max_vio.
    """

    def __init__(self, num_experts: int, device):
        E = num_experts
        self.ints = torch.zeros(4 * E + 14, dtype=torch.int64, device=device)
        ints = self.ints
        self.pooled = ints[:E + 1]
        self.loads = ints[E + 1:2 * E + 1]
        self.loads_and_backpropagated = ints[E + 1:2 * E + 2]
        self.backward_counters = ints[2 * E + 1:2 * E + 3]  # backpropagated, forward_backpropagated
        self.forward_counters = ints[2 * E + 3:2 * E + 5]  # sent, forward
        self.sent = ints[2 * E + 3:2 * E + 4]  # a one-element index
        self.step = ints[:2 * E + 5]  # zeroed when the step ends
        self.code_base = ints[2 * E + 5]
        self.last = ints[2 * E + 6:3 * E + 7]  # last_loads, last_backpropagated
        self.last_pooled = ints[3 * E + 7:4 * E + 8]
        self.checked = ints[4 * E + 8:]  # skipped, mismatches, first_mismatch
        self.skipped, self.mismatches, self.first_mismatch = self.checked[0], self.checked[1], self.checked[2:]
        self.slots = torch.arange(_TAG_SLOTS, device=device)
        self.tags = torch.stack([torch.ones_like(self.slots), self.slots, self.slots * self.slots], dim=1)
        self.received = torch.zeros(2, _TAG_SLOTS, 4, dtype=torch.int64, device=device)
        self.floats = torch.zeros(2, dtype=torch.float64, device=device)
        self.max_vio, self.last_max_vio = self.floats[0], self.floats[1]
        # Constant increments, made once: adding one is one kernel, making it would be another.
        self.forward_increment = torch.tensor([1, 1], device=device)
        self.recompute_increment = torch.tensor([1, 0], device=device)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor a graph capture must treat as persistent (a framework may register them
        as module buffers, to be saved and restored around its warmup and capture)."""
        return (self.ints, self.slots, self.tags, self.received, self.floats, self.forward_increment,
                self.recompute_increment)

    def close_step(self) -> None:
        """Empty the step, keep what the metrics and the checks read: kernels only."""
        forward, forward_backpropagated = self.forward_counters[1], self.backward_counters[1]
        self.skipped.add_(forward - forward_backpropagated)
        registered = self.forward_counters[0] > 0  # a second reset keeps the last step's values
        self.last.copy_(torch.where(registered, self.loads_and_backpropagated, self.last))
        self.last_pooled.copy_(torch.where(registered, self.pooled, self.last_pooled))
        self.last_max_vio.copy_(torch.where(registered, self.max_vio, self.last_max_vio))
        self.step.zero_()
        self.max_vio.zero_()
        self.code_base.add_(_TAG_SLOTS).remainder_(_TAG_SLOTS * _TAG_STEPS)
        self.tags[:, 1:2].copy_(self.code_base + self.slots[:, None])
        self.tags[:, 2:3].copy_(self.tags[:, 1:2] * self.tags[:, 1:2])
        # The tags received join the checks' record (the first disagreeing sum is kept until the
        # check reads it): a step closed inside a graph is checked at the next read.
        rows = self.received.view(-1, 4)
        n, code_sum, square_sum, sent = rows.unbind(1)
        bad = (n > 0) & ((n * square_sum != code_sum * code_sum) | (code_sum != n * sent))
        first = rows.index_select(0, bad.int().argmax().view(1)).view(4)
        self.first_mismatch.copy_(torch.where((self.mismatches == 0) & bad.any(), first, self.first_mismatch))
        self.mismatches.add_(bad.sum())
        self.received.zero_()


class _PendingSum:
    """A local int64 vector summed over a group, as one of the forward's count collectives.

    Eager asynchronous sums join their group's bucket, launched with the other layers' vectors
    of the same micro-batch; eager blocking ones are launched at once; both are waited for in
    backward. Under capture the sum is a functional collective that completes in the forward.
    Eager sums are summed in place where the vector is alone in its collective: the caller hands
    `local` over.
    """

    def __init__(self, owner: int, local: torch.Tensor, group, async_op: bool, what: Callable[[], str]):
        self.local, self.what = local, what  # what(): the sum, for a message (read only then)
        self._bucket, self._work = None, None
        if capturing():
            self._value = torch.ops._c10d_functional.wait_tensor(
                torch.ops._c10d_functional.all_reduce(local, "sum", group.group_name))
        elif async_op:
            self._value = None
            self._bucket = _bucket(group)
            self._bucket.add(owner, self)
        else:
            self._value = local
            self._work = dist.all_reduce(local, group=group, async_op=True)

    def launched(self, value: torch.Tensor, work) -> None:
        """The bucket's collective `work` will leave the sum in `value` (a view of its buffer)."""
        self._value, self._work = value, work

    def get(self) -> torch.Tensor:
        """The sum; waits for it in eager mode (raises MicroBatchMismatch after SYNC_TIMEOUT on gloo)."""
        if self._bucket is not None:
            if self._work is None:  # not launched yet: launch the bucket, this vector with it
                self._bucket.flush()
            self._bucket = None
        if self._work is not None:
            try:
                if self.local.is_cuda:
                    self._work.wait()
                else:
                    self._work.wait(timeout=SYNC_TIMEOUT)
            except RuntimeError as error:
                raise MicroBatchMismatch(
                    f"moe-lbl: waited {SYNC_TIMEOUT.total_seconds():g} s for the other ranks' counts of "
                    f"{self.what()}: the ranks of a group must run the same micro-batches in every step (as many, "
                    "and evaluation passes under torch.no_grad() or model.eval()), or a rank stopped") from error
            self._work = None
        return self._value


class _CountBucket:
    """Coalesces one micro-batch's count all-reduces of all layers into one collective.

    The bucket is flushed (the collective launched asynchronously) as soon as the layers that
    made up the previous flush have all added their vectors, which is the end of the forward
    pass in steady state; otherwise when a value is first needed, or when a layer adds a second
    vector before a flush. These points depend only on the order of the calls, which is the same
    on every rank, so every rank issues the same collectives. Eager mode only: it decides when a
    collective starts, never what a sum holds.
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
        packed = entries[0].local if len(entries) == 1 else torch.cat([e.local for e in entries])
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


def _loss_dtype(scores_dtype: torch.dtype) -> torch.dtype:
    """The loss arithmetic's dtype for scores of this dtype: fp64 stays fp64, the rest is fp32."""
    return torch.float64 if scores_dtype == torch.float64 else torch.float32


@dataclass
class _MicroBatch:
    """One registered micro-batch of one layer, as its backward needs it."""

    config: BalanceConfig  # the balancer's config at registration (coefficients may change later)
    counts: torch.Tensor  # [E], this rank's
    valid_tokens: Union[int, torch.Tensor]  # this rank's (an int where the caller knows it without padding)
    score_sum: Optional[torch.Tensor]  # [E]: the balancing scores summed over this rank's tokens (None: no loss)
    grad_scale: GradScale
    report: Optional[Report]
    z: Optional[ZLoss]
    in_forward: bool  # registered in forward (not by a recomputation in backward)
    step: int  # the balancer's step number (eager bookkeeping, for a graph back-propagated late)
    exact_micro: bool = False  # per-token scores: a micro term's value in Megatron's arithmetic
    load: Optional[torch.Tensor] = None  # [E] int64: dispatched tokens, this rank's (set at launch)
    slot: Optional[torch.Tensor] = None  # [1]: its tag slot in the step
    code: Optional[torch.Tensor] = None  # [1]: the tag code it sent (where registered by torch operations)
    sequence: Optional[_PendingSum] = None  # [counts, load, tag] summed over the sequence group
    batch: Optional[_PendingSum] = None  # [counts, tokens, tag] summed over the batch group
    gradients: Optional[tuple] = None  # the first backward's (a retained graph may be back-propagated again)


class LoadBalancer:
    """Load-balancing loss of one MoE layer: its micro-batches' registrations and its state.

    sequence_group: ranks that split the tokens of the same sequences (tensor x context
        parallel); their counts and tokens are summed, as in a plain micro-batch LBL.
    batch_group: ranks that together hold the global batch (tensor x data x context parallel);
        used by the global scope.
    even_split: the sequence group's ranks hold equally many tokens (Megatron's sequence and
        context parallelism split sequences evenly): an int valid_tokens then gives the group's
        T as valid_tokens times its size, as Megatron counts it; else T comes from the summed
        counts (k per valid token).
    device: where the state lives (the router's logits' device).
    kernels: run each micro-batch's backward step as one fused kernel (moe_lbl.kernels.balance_step:
        CUDA, or Triton's interpreter on CPU) instead of torch operations.
    """

    def __init__(self, config: BalanceConfig, num_experts: int, topk: int, sequence_group=None,
                 batch_group=None, name: Optional[str] = None, even_split: bool = False, device="cpu",
                 kernels: bool = False):
        if not isinstance(config, BalanceConfig):
            raise TypeError(f"config must be a BalanceConfig, got {type(config).__name__}")
        if not 1 <= topk <= num_experts:
            raise ValueError(f"topk must be in [1, num_experts={num_experts}], got {topk}")
        self.config = config  # read at each registration: coefficients may change between them
        self.serial = next(_SERIALS)  # creation order: the same on every rank, unlike id()
        self.name = name or f"balancer {self.serial}"  # for messages
        self.num_experts = num_experts
        self.topk = topk
        self.sequence_group = sequence_group
        self.batch_group = batch_group
        self._sequence_size, self._batch_size = group_size(sequence_group), group_size(batch_group)
        self.even_split = even_split
        self.kernels = kernels
        self.state = BalanceState(num_experts, device)
        # Eager bookkeeping (a graph replay runs none of it, and no tensor math reads it):
        self._step_number = 0  # steps closed: a late backward tells its own step by it
        self._registrations = 0  # forward registrations in the step, against MAX_STEP_MICRO_BATCHES
        self._waiting: list[_PendingSum] = []  # the step's eager sums, each waited for by the step's end
        self._open: Optional[_MicroBatch] = None  # attached in this forward, its load to come

    @property
    def enabled(self) -> bool:
        return bool(self.config.terms())

    def prepare(self):
        """A registration for the fused router kernels to fill as they sum the statistics of the
        micro-batch about to be attached (moe_lbl.kernels.topk_router.Registration): pass it to
        fused_topk_router, then to attach, and registering costs no kernel of its own."""
        from moe_lbl.kernels.topk_router import Registration

        state, E = self.state, self.num_experts
        needs_sequence, needs_batch = self._sums(self.config, loss=True)
        device = state.ints.device

        def vector(size):
            return torch.empty(size, dtype=torch.int64, device=device)

        return Registration(state.forward_counters, state.tags, not _in_backward(),
                            slot=vector(1) if needs_sequence or needs_batch else None,
                            sequence=vector(2 * E + 3) if needs_sequence else None,
                            batch=vector(E + 4) if needs_batch else None)

    def attach(self, probs: torch.Tensor, scores: torch.Tensor, counts: torch.Tensor,
               valid_tokens: Union[int, torch.Tensor], grad_scale: GradScale = GradScale(),
               report: Optional[Report] = None, load: Optional[torch.Tensor] = None,
               z: Optional[ZLoss] = None, registration=None) -> torch.Tensor:
        """Register one micro-batch and return `probs` carrying the loss gradient to `scores`.

        scores: the balancing scores of the valid tokens, [T, N_E] (rows of padding tokens zero),
        or their sum over the tokens, [N_E] (what the fused router kernels return): the loss is
        linear in them, with the same gradient for every token. counts: [N_E] tokens per expert
        under the top-k of those scores (padding excluded); valid_tokens: this rank's non-padding
        tokens (an int where there is no padding). report: where each term's value goes once the
        counts have arrived. load: this micro-batch's dispatched tokens per expert, for the
        metrics; without it here, record_load gives it before the forward ends. z: a z-loss whose
        gradient reaches z.z_sum in the same backward. registration: what prepare() gave, which
        the fused kernels filled (then load is required).
        """
        if scores.shape[-1:] != (self.num_experts,) or scores.dim() not in (1, 2):
            raise ValueError(f"scores must be [tokens, {self.num_experts}] or [{self.num_experts}], "
                             f"got {tuple(scores.shape)}")
        if counts.shape != (self.num_experts,):
            raise ValueError(f"counts must have shape ({self.num_experts},), got {tuple(counts.shape)}")
        self._launch_open()
        score_sum = scores.detach().sum(dim=0) if scores.dim() == 2 else scores.detach()
        micro_batch = self._register(counts, valid_tokens, score_sum, grad_scale, report, z)
        micro_batch.exact_micro = scores.dim() == 2
        if load is None:
            self._open = micro_batch
        else:
            self._launch(micro_batch, load, registration)
        return _AttachLoss.apply(probs, scores, None if z is None else z.z_sum, self, micro_batch)

    def record_load(self, probs: torch.Tensor, load: torch.Tensor) -> torch.Tensor:
        """Give this forward's dispatched tokens per expert (for the metrics) and return `probs`.

        The micro-batch attached in this forward takes it; without one (a router with no loss
        term), `probs` carries it to the step's loads when back-propagated. Only back-propagated
        micro-batches count, so a recomputed forward counts once.
        """
        micro_batch, self._open = self._open, None
        if micro_batch is not None:
            self._launch(micro_batch, load)
            return probs
        micro_batch = self._register(load, 0, None, GradScale(), None, None)
        self._launch(micro_batch, load)
        return _AttachLoss.apply(probs, None, None, self, micro_batch)

    def _register(self, counts, valid_tokens, score_sum, grad_scale, report, z) -> _MicroBatch:
        in_forward = not _in_backward()
        if in_forward:
            if self._registrations >= MAX_STEP_MICRO_BATCHES:
                _warn_once("growing step", f"moe-lbl: a layer registered {MAX_STEP_MICRO_BATCHES} micro-batches "
                           "without a step reset, so its global batch would grow without end; moe-lbl closes the "
                           "step now. A training loop without Megatron's finalize_model_grads must call "
                           "moe_lbl.end_step(model) after each optimizer step")
                self.end_step()
            self._registrations += 1
        return _MicroBatch(self.config, counts, valid_tokens, score_sum, grad_scale, report, z, in_forward,
                           self._step_number)

    def _launch_open(self) -> None:
        """A micro-batch attached without its load (its forward never gave one) sends its counts."""
        micro_batch, self._open = self._open, None
        if micro_batch is not None:
            self._launch(micro_batch, micro_batch.counts)

    def _sums(self, config: BalanceConfig, loss: bool) -> tuple[bool, bool]:
        """Which count sums a micro-batch needs: over the sequence group, over the batch group."""
        return self._sequence_size > 1, loss and config.scope == "global" and self._batch_size > 1

    def _launch(self, micro_batch: _MicroBatch, load: torch.Tensor, registration=None) -> None:
        """Take the micro-batch's tag slot, and start the count sums its terms and metrics need
        (from the vectors the fused kernels filled, with a registration)."""
        state = self.state
        if self._open is micro_batch:
            self._open = None
        micro_batch.load = load = load.to(torch.int64)
        needs_sequence, needs_batch = self._sums(micro_batch.config, micro_batch.score_sum is not None)
        if needs_sequence or needs_batch:
            if registration is not None:
                micro_batch.slot = registration.slot
                sequence, batch = registration.sequence, registration.batch
            else:
                micro_batch.slot = state.sent.clone()  # the counter moves on; its slot stays
                tag = state.tags.index_select(0, micro_batch.slot).view(3)
                micro_batch.code = tag[1:2]
                counts = micro_batch.counts.to(torch.int64)
                sequence = torch.cat([counts, load, tag]) if needs_sequence else None
                batch = (torch.cat([counts, _tokens_tensor(micro_batch.valid_tokens, counts.device), tag])
                         if needs_batch else None)
            async_op = micro_batch.config.async_sync
            step, slot = self._step_number, micro_batch.slot

            def what():
                return f"{self.name}, step {step}, micro-batch {int(slot)}"

            if needs_sequence:
                micro_batch.sequence = self._pending(sequence, self.sequence_group, async_op, what)
            if needs_batch:
                micro_batch.batch = self._pending(batch, self.batch_group, async_op, what)
        if registration is None:
            state.forward_counters.add_(state.forward_increment if micro_batch.in_forward
                                        else state.recompute_increment)

    def _pending(self, local: torch.Tensor, group, async_op: bool, what: Callable[[], str]) -> _PendingSum:
        pending = _PendingSum(self.serial, local, group, async_op, what)
        if not capturing():
            self._waiting.append(pending)
        return pending

    def end_step(self) -> None:
        """Close the optimizer step: empty the buffer, keep the step's loads for the metrics,
        and (outside a graph capture) check the step (see check).

        A step that registered nothing (a second reset, an evaluation-only step) keeps the last
        step's metrics.
        """
        if capturing():  # each statement of close_step is a kernel, replayed with the graph
            self.state.close_step()
            return
        self._launch_open()
        for pending in self._waiting:  # never leave a collective in flight
            pending.get()
        self._waiting = []
        self.state.close_step()
        self._step_number += 1
        self._registrations = 0
        self.check()  # raised once the step is closed: nothing is left half-reset

    def check(self) -> None:
        """Read what the closed steps recorded since the last check (one host read; end_step does
        it outside graphs, the metrics before they read a step): ranks that summed different
        micro-batches raise MicroBatchMismatch, micro-batches never back-propagated warn."""
        state = self.state
        skipped, mismatches, n, code_sum, _, sent = state.checked.tolist()
        state.checked.zero_()
        if skipped:
            _warn_once("not back-propagated", f"moe-lbl: a layer registered {skipped} micro-batch(es) that were "
                       "never back-propagated (a forward pass in training mode with gradients enabled, such as an "
                       "evaluation); they were left out of the global batch. Run such passes under torch.no_grad() "
                       "or after model.eval()")
        if mismatches:
            step, micro_batch = divmod(sent, _TAG_SLOTS)
            raise MicroBatchMismatch(
                f"moe-lbl: ranks summed the counts of different micro-batches for {self.name}: this rank sent step "
                f"{step} (mod {_TAG_STEPS}), micro-batch {micro_batch}, the others on average micro-batch code "
                f"{(code_sum - sent) / max(n - 1, 1):g} (step * {_TAG_SLOTS} + micro-batch; {mismatches} sum(s) "
                "disagreed). The ranks of a group must run the same micro-batches in every step: as many, with "
                "evaluation passes under torch.no_grad() or model.eval()")

    @property
    def buffered_counts(self) -> torch.Tensor:
        """Global counts and tokens of this step's micro-batches back-propagated so far."""
        return self.state.pooled

    def _backward(self, micro_batch: _MicroBatch, loss_dtype: torch.dtype):
        """The micro-batch's share of the step, once back-propagated: its loads join the step's
        and its counts the buffer; its values go to its report. Returns (d loss / d score [E],
        d loss / d z_sum), None where it has neither."""
        state, E = self.state, self.num_experts
        if micro_batch.load is None:  # attached without a load, and never given one
            self._launch(micro_batch, micro_batch.counts)
        late = micro_batch.step != self._step_number  # a graph back-propagated after its step closed
        if late and micro_batch.step != self._step_number - 1:
            raise RuntimeError(f"moe-lbl: {self.name} back-propagated a micro-batch of step {micro_batch.step} "
                               f"after step {self._step_number - 1} closed: back-propagate each micro-batch before "
                               "its step ends")
        if self.kernels and not late:
            return self._backward_kernel(micro_batch, loss_dtype)
        sequence = self._sum(micro_batch, micro_batch.sequence, 0, late)
        batch = self._sum(micro_batch, micro_batch.batch, 1, late)
        if not late:
            load = micro_batch.load if sequence is None else sequence[E:2 * E]
            total = load.sum()
            excess = torch.add(total, load.amax(), alpha=-E)  # sum - E max = -(max / mean - 1) sum
            state.max_vio.sub_(excess.double() / total.clamp(min=1))  # 0 for a micro-batch with no load
            state.loads.add_(micro_batch.load)
            state.backward_counters.add_(state.forward_increment if micro_batch.in_forward
                                         else state.recompute_increment)
        valid, report = micro_batch.valid_tokens, micro_batch.report
        z_gradient = None
        if micro_batch.z is not None:  # coeff * z_sum / valid, scaled as the balancing loss but for the divisor
            z = micro_batch.z
            divisor = valid.clamp(min=1) if isinstance(valid, torch.Tensor) else max(valid, 1)
            z_gradient = micro_batch.grad_scale.value(valid, torch.float32, divide=False) * z.coeff / divisor
            if not isinstance(z_gradient, torch.Tensor):
                z_gradient = torch.full((), z_gradient, device=z.z_sum.device)
            if z.target is not None:
                value = z.z_sum.detach() / divisor
                z.target.add_(value / report.divisor if report is not None and report.divisor != 1 else value)
        if micro_batch.score_sum is None:
            return None, z_gradient
        counts = micro_batch.counts if sequence is None else sequence[:E]
        tokens = self._tokens(valid, counts)
        scale, gradient = micro_batch.grad_scale.value(valid, loss_dtype), None
        for term in micro_batch.config.terms():
            if term.scope == "micro":
                weight, loss = self._micro_loss(micro_batch.score_sum, counts, tokens, term.coeff)
                vector = counts
            else:
                totals = batch if batch is not None else torch.cat(
                    [micro_batch.counts.to(torch.int64), _tokens_tensor(valid, counts.device)])
                if micro_batch.config.buffer:
                    totals = state.last_pooled + totals if late else self._pool(totals)
                vector = totals[:E].double() / (self.topk * totals[E].clamp(min=1))  # f, exact to fp64
                weight = term.coeff * E / tokens
                loss = (torch.sum(vector * micro_batch.score_sum.double()) * weight).to(loss_dtype)
            if report is not None and term.scope in report.targets:
                value = loss / report.divisor if report.divisor != 1 else loss
                report.targets[term.scope].add_(value / term.coeff)
            term_gradient = (scale * weight) * vector  # Megatron's autograd: (scale * weight) * counts
            gradient = term_gradient if gradient is None else gradient + term_gradient
        return gradient, z_gradient

    def _tokens(self, valid: Union[int, torch.Tensor], counts: torch.Tensor):
        """T of the sequence group, as Megatron counts it: an int where the split is even (or the
        group one rank), else from the (summed) counts, which hold k per valid token; at least 1
        (a micro-batch of padding only has no loss, where Megatron's would be 0/0)."""
        if self._tokens_from_valid(valid):
            return max(valid * self._sequence_size, 1)
        return (counts.sum() / self.topk).clamp(min=1)

    def _tokens_from_valid(self, valid: Union[int, torch.Tensor]) -> bool:
        return isinstance(valid, int) and (self.even_split or self._sequence_size == 1)

    def _micro_loss(self, score_sum: torch.Tensor, counts: torch.Tensor, tokens, coeff: float):
        """(weight, loss) of a micro term: Megatron's switch_load_balancing_loss_func, in its
        order, so that its value is Megatron's to the bit."""
        weight = self.num_experts * coeff / (self.topk * tokens * tokens)
        return weight, torch.sum(score_sum * counts) * weight

    def _backward_kernel(self, micro_batch: _MicroBatch, loss_dtype: torch.dtype):
        """_backward's work as one kernel (moe_lbl.kernels.balance_step), for a micro-batch back-
        propagated in its step. A micro term of per-token scores (Megatron's routing) keeps its
        value in torch operations, Megatron's to the bit."""
        from moe_lbl.kernels.balance_step import balance_backward

        sequence = micro_batch.sequence.get() if micro_batch.sequence is not None else None
        batch = micro_batch.batch.get() if micro_batch.batch is not None else None
        has_loss = micro_batch.score_sum is not None
        coeffs = {term.scope: term.coeff for term in micro_batch.config.terms()} if has_loss else {}
        report, z, valid = micro_batch.report, micro_batch.z, micro_batch.valid_tokens
        targets = dict(report.targets) if report is not None else {}
        if micro_batch.exact_micro and "micro" in targets:
            counts = micro_batch.counts if sequence is None else sequence[:self.num_experts]
            _, loss = self._micro_loss(micro_batch.score_sum, counts, self._tokens(valid, counts), coeffs["micro"])
            value = loss / report.divisor if report.divisor != 1 else loss
            targets.pop("micro").add_(value / coeffs["micro"])
        scale = micro_batch.grad_scale
        return balance_backward(
            counts=micro_batch.counts.to(torch.int64), load=micro_batch.load, valid_tokens=valid,
            score_sums=micro_batch.score_sum.to(loss_dtype) if has_loss else None, sequence=sequence, batch=batch,
            slot=micro_batch.slot, state=self.state, scale=scale.source(), tokens_factor=scale.tokens_factor,
            divisor=scale.divisor, global_coeff=coeffs.get("global", 0.0), micro_coeff=coeffs.get("micro", 0.0),
            buffer=micro_batch.config.buffer, global_target=targets.get("global"), micro_target=targets.get("micro"),
            report_divisor=report.divisor if report is not None else 1,
            z_sum=z.z_sum.detach() if z is not None else None, z_coeff=z.coeff if z is not None else 0.0,
            z_target=z.target if z is not None else None, topk=self.topk, sequence_size=self._sequence_size,
            in_forward=micro_batch.in_forward, tokens_from_counts=not self._tokens_from_valid(valid))

    def _pool(self, totals: torch.Tensor) -> torch.Tensor:
        """The buffer with this micro-batch's global counts and tokens added: the prefix of the
        step's back-propagated micro-batches (paper's Alg. 1), in place."""
        return self.state.pooled.add_(totals)

    def _sum(self, micro_batch: _MicroBatch, pending: Optional[_PendingSum], which: int,
             late: bool) -> Optional[torch.Tensor]:
        """A count sum without its tag, the tag recorded for the step's check (`which`: 0 for the
        sequence group's sum, 1 for the batch group's)."""
        if pending is None:
            return None
        value = pending.get()
        if not late:  # [n, sum code, sum code^2] and this rank's code
            code = micro_batch.code if micro_batch.code is not None else self.state.tags[:, 1].index_select(
                0, micro_batch.slot)
            row = torch.cat([value[-3:], code])[None]
            self.state.received[which].index_copy_(0, micro_batch.slot, row)
        return value[:-3]


def _tokens_tensor(valid_tokens: Union[int, torch.Tensor], device) -> torch.Tensor:
    """[1] int64; filled on the device from an int (no host-to-device copy, which a capture refuses)."""
    if isinstance(valid_tokens, int):
        return torch.full((1,), valid_tokens, dtype=torch.int64, device=device)
    return valid_tokens.to(torch.int64).reshape(1)


class _AttachLoss(torch.autograd.Function):
    """Identity on probs; in backward, the micro-batch's gradients to the scores (or their sums)
    and to a z-loss's z_sum."""

    @staticmethod
    def forward(ctx, probs, scores, z_sum, balancer: LoadBalancer, micro_batch: _MicroBatch):
        ctx.balancer, ctx.micro_batch = balancer, micro_batch
        ctx.scores_dtype = scores.dtype if scores is not None else torch.float32
        ctx.scores_shape = scores.shape if scores is not None else None
        return probs

    @staticmethod
    def backward(ctx, grad_probs):
        micro_batch = ctx.micro_batch
        if micro_batch.gradients is None:  # once, though a retained graph be back-propagated again
            micro_batch.gradients = ctx.balancer._backward(micro_batch, _loss_dtype(ctx.scores_dtype))
        gradient, z_gradient = micro_batch.gradients
        if gradient is not None and ctx.needs_input_grad[1]:
            gradient = gradient.to(ctx.scores_dtype).expand(ctx.scores_shape)
        else:
            gradient = None
        z_gradient = z_gradient if ctx.needs_input_grad[2] else None
        return grad_probs, gradient, z_gradient, None, None
