"""One micro-batch's balancing step in backward, as one kernel: moe_lbl::balance_backward.

What moe_lbl.engine.LoadBalancer computes in torch operations when a micro-batch is
back-propagated (its terms' gradients to the score sums, their values, its share of the step's
buffer, loads, MaxVio, counters and tag check, and a z-loss's gradient and value), fused into
one program: the engine runs it where the kernels run, so that a layer's backward launches it
and nothing else for its balancing loss. The state it updates in place is the engine's
(moe_lbl.engine.BalanceState); it knows nothing of Megatron. Deterministic: one program, a fixed
order.
"""

from __future__ import annotations

from typing import Optional

import torch

from moe_lbl.kernels import launcher
from moe_lbl.kernels.balance_step_details._backward import balance_backward as _balance_backward_kernel
from moe_lbl.kernels.topk_router_details._spec import MAX_EXPERTS


def _backward(counts, load, valid, valid_tokens, score_sums, sequence, batch, slot, tags, pooled, loads, counters,
              max_vio, received, scale, per_token, tokens_factor, divisor, global_coeff, micro_coeff, buffer,
              global_target, micro_target, report_divisor, z_sum, z_coeff, z_target, topk, sequence_size, in_forward,
              tokens_from_counts, launches=True):
    """(d loss / d score_sums [E], d loss / d z_sum), None where there is none."""
    num_experts = counts.shape[0]
    has_loss = score_sums is not None
    dtype = score_sums.dtype if has_loss else torch.float32
    grad_score_sums = torch.empty(num_experts, dtype=dtype, device=counts.device) if has_loss else None
    grad_z_sum = torch.empty((), dtype=torch.float32, device=counts.device) if z_sum is not None else None
    if launches:
        def pointer(tensor):
            return counts if tensor is None else tensor  # never read: its flag is off

        launcher.launch(
            _balance_backward_kernel, 1,
            counts, load, pointer(valid), valid_tokens, pointer(score_sums), pointer(sequence), pointer(batch),
            pointer(slot), tags, pooled, loads, counters, max_vio, received, tags.shape[0],
            pointer(scale), tokens_factor, divisor, global_coeff, micro_coeff, pointer(global_target),
            pointer(micro_target), report_divisor, pointer(z_sum), z_coeff, pointer(z_target),
            pointer(grad_score_sums), pointer(grad_z_sum),
            E=num_experts, K=topk, SEQUENCE_SIZE=sequence_size, BLOCK_E=1 << (num_experts - 1).bit_length(),
            HAS_SEQUENCE=sequence is not None, HAS_BATCH=batch is not None, IN_FORWARD=in_forward,
            HAS_LOSS=has_loss, GLOBAL=has_loss and global_coeff > 0, MICRO=has_loss and micro_coeff > 0, BUFFER=buffer,
            VALID_IS_INT=valid is None, TOKENS_FROM_COUNTS=tokens_from_counts, HAS_SCALE=scale is not None,
            PER_TOKEN=per_token, REPORT_GLOBAL=global_target is not None, REPORT_MICRO=micro_target is not None,
            HAS_Z=z_sum is not None, REPORT_Z=z_target is not None, F64=dtype == torch.float64,
            num_warps=4 if num_experts <= 1024 else 8)
    return grad_score_sums, grad_z_sum


_LIBRARY = torch.library.Library("moe_lbl", "FRAGMENT")
_LIBRARY.define(
    "balance_backward(Tensor counts, Tensor load, Tensor? valid, int valid_tokens, Tensor? score_sums, "
    "Tensor? sequence, Tensor? batch, Tensor? slot, Tensor tags, Tensor(a!) pooled, Tensor(b!) loads, "
    "Tensor(c!) counters, Tensor(d!) max_vio, Tensor(e!) received, Tensor? scale, bool per_token, int tokens_factor, "
    "int divisor, float global_coeff, float micro_coeff, bool buffer, Tensor(f!)? global_target, "
    "Tensor(g!)? micro_target, int report_divisor, Tensor? z_sum, float z_coeff, Tensor(h!)? z_target, int topk, "
    "int sequence_size, bool in_forward, bool tokens_from_counts) -> (Tensor?, Tensor?)")
_LIBRARY.impl("balance_backward", _backward, "CompositeExplicitAutograd")
torch.library.register_fake("moe_lbl::balance_backward",
                            lambda *args: _backward(*args, launches=launcher.capturing()), lib=_LIBRARY)


def balance_backward(*, counts: torch.Tensor, load: torch.Tensor, valid_tokens, score_sums: Optional[torch.Tensor],
                     sequence: Optional[torch.Tensor], batch: Optional[torch.Tensor], slot: Optional[torch.Tensor],
                     state, scale: Optional[torch.Tensor], tokens_factor: Optional[int], divisor: int,
                     global_coeff: float, micro_coeff: float, buffer: bool, global_target: Optional[torch.Tensor],
                     micro_target: Optional[torch.Tensor], report_divisor: int, z_sum: Optional[torch.Tensor],
                     z_coeff: float, z_target: Optional[torch.Tensor], topk: int, sequence_size: int,
                     in_forward: bool, tokens_from_counts: bool):
    """Launch the step (see the module). valid_tokens: an int, or a [1] or 0-d int64 tensor.
    state: the engine's BalanceState (its pooled, loads, backward counters, max_vio, received and
    tags are read and updated in place). Returns (d loss / d score_sums, d loss / d z_sum)."""
    if counts.shape[0] > MAX_EXPERTS:
        raise ValueError(f"balance_backward supports up to {MAX_EXPERTS} experts, got {counts.shape[0]}")
    valid = None if isinstance(valid_tokens, int) else valid_tokens.reshape(1)
    return torch.ops.moe_lbl.balance_backward(
        counts, load, valid, valid_tokens if valid is None else 0, score_sums, sequence, batch, slot, state.tags,
        state.pooled, state.loads, state.backward_counters, state.max_vio.view(1), state.received, scale,
        tokens_factor is not None, tokens_factor or 1, divisor, global_coeff, micro_coeff, buffer, global_target,
        micro_target, report_divisor, z_sum, z_coeff, z_target, topk, sequence_size, in_forward, tokens_from_counts)
