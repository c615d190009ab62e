"""The balancing step of one micro-batch's backward, in one program (E <= BLOCK_E experts)."""

import triton
import triton.language as tl


@triton.jit
def balance_backward(
    # this rank's micro-batch: aux counts [E], dispatched load [E] (int64), valid tokens [1], score sums [E]
    counts_ptr, load_ptr, valid_ptr, valid_tokens, score_sums_ptr,
    # its count sums over the sequence group [counts E | load E | n, code, code^2] and the batch
    # group [counts E | tokens | n, code, code^2]; its tag slot [1]; the step's tags [slots, 3]
    sequence_ptr, batch_ptr, slot_ptr, tags_ptr,
    # the layer's state, updated in place: pooled [E + 1], loads [E], backward counters [2],
    # max_vio [1] (fp64), received [2, slots, 4]
    pooled_ptr, loads_ptr, counters_ptr, max_vio_ptr, received_ptr, slots,
    # the gradient scale: the loss scale [1], the per-token factor, the divisor
    scale_ptr, tokens_factor, divisor,
    # the terms, and where their values go
    global_coeff, micro_coeff, global_target_ptr, micro_target_ptr, report_divisor,
    # a z-loss: z sum [1], its coefficient, where its value goes
    z_sum_ptr, z_coeff, z_target_ptr,
    # outputs: d loss / d score sums [E], d loss / d z sum [1]
    grad_score_sums_ptr, grad_z_sum_ptr,
    E: tl.constexpr, K: tl.constexpr, SEQUENCE_SIZE: tl.constexpr, BLOCK_E: tl.constexpr,
    HAS_SEQUENCE: tl.constexpr, HAS_BATCH: tl.constexpr, IN_FORWARD: tl.constexpr, HAS_LOSS: tl.constexpr,
    GLOBAL: tl.constexpr, MICRO: tl.constexpr, BUFFER: tl.constexpr, VALID_IS_INT: tl.constexpr,
    TOKENS_FROM_COUNTS: tl.constexpr, HAS_SCALE: tl.constexpr, PER_TOKEN: tl.constexpr,
    REPORT_GLOBAL: tl.constexpr, REPORT_MICRO: tl.constexpr, HAS_Z: tl.constexpr, REPORT_Z: tl.constexpr,
    F64: tl.constexpr,
):
    """What moe_lbl.engine.LoadBalancer._backward computes, for a micro-batch registered in its
    step: its loads, MaxVio and counters join the step's, its summed tags the step's check, its
    global counts the buffer; the gradients of its terms (and z-loss) are written, their values
    added to their targets."""
    DTYPE: tl.constexpr = tl.float64 if F64 else tl.float32
    expert = tl.arange(0, BLOCK_E)
    ok = expert < E
    counts = tl.load(counts_ptr + expert, mask=ok, other=0)
    load = tl.load(load_ptr + expert, mask=ok, other=0)
    if VALID_IS_INT:
        valid = valid_tokens
    else:
        valid = tl.load(valid_ptr)
    if HAS_SEQUENCE:
        group_counts = tl.load(sequence_ptr + expert, mask=ok, other=0)
        group_load = tl.load(sequence_ptr + E + expert, mask=ok, other=0)
    else:
        group_counts = counts
        group_load = load

    # The metrics: max load over mean load - 1 of the sequence group (0 without load), this
    # rank's loads, the back-propagated micro-batches.
    total = tl.sum(group_load, 0)
    excess = tl.max(group_load, 0) * E - total
    tl.store(max_vio_ptr, tl.load(max_vio_ptr) + excess.to(tl.float64) / tl.maximum(total, 1).to(tl.float64))
    tl.store(loads_ptr + expert, tl.load(loads_ptr + expert, mask=ok) + load, mask=ok)
    tl.store(counters_ptr, tl.load(counters_ptr) + 1)
    if IN_FORWARD:
        tl.store(counters_ptr + 1, tl.load(counters_ptr + 1) + 1)

    # The summed tags [n, sum code, sum code^2] and this rank's code, for the step's check.
    if HAS_SEQUENCE or HAS_BATCH:
        slot = tl.load(slot_ptr)
        code = tl.load(tags_ptr + slot * 3 + 1)
        if HAS_SEQUENCE:
            row = received_ptr + slot * 4
            for i in tl.static_range(3):
                tl.store(row + i, tl.load(sequence_ptr + 2 * E + i))
            tl.store(row + 3, code)
        if HAS_BATCH:
            row = received_ptr + (slots + slot) * 4
            for i in tl.static_range(3):
                tl.store(row + i, tl.load(batch_ptr + E + 1 + i))
            tl.store(row + 3, code)

    # The gradient scale, in the order of Megatron's autograd.
    scale = tl.full([], 1.0, DTYPE)
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(DTYPE)
    if PER_TOKEN:
        scale = scale * tokens_factor
        scale = scale * valid.to(DTYPE)
    z_scale = scale
    scale = scale / divisor

    if HAS_LOSS:
        # T of the sequence group: from the counts (k per valid token), or the caller's.
        if TOKENS_FROM_COUNTS:
            tokens = tl.maximum(tl.sum(group_counts, 0).to(tl.float32) / K, 1.0)
        else:
            tokens = tl.full([], tl.maximum(valid_tokens * SEQUENCE_SIZE, 1), tl.float32)
        score_sums = tl.load(score_sums_ptr + expert, mask=ok, other=0.0).to(DTYPE)
        gradient = tl.zeros([BLOCK_E], tl.float64)  # the terms are summed in fp64, as the engine sums them
        if MICRO:
            weight = (E * micro_coeff) / (K * tokens * tokens)
            loss = tl.sum(score_sums * group_counts.to(DTYPE), 0) * weight
            gradient += ((scale * weight) * group_counts.to(DTYPE)).to(tl.float64)
            if REPORT_MICRO:
                tl.store(micro_target_ptr, tl.load(micro_target_ptr) + ((loss / report_divisor) / micro_coeff).to(
                    micro_target_ptr.dtype.element_ty))
        if GLOBAL:
            if HAS_BATCH:
                pooled_counts = tl.load(batch_ptr + expert, mask=ok, other=0)
                pooled_tokens = tl.load(batch_ptr + E)
            else:
                pooled_counts = counts
                pooled_tokens = valid.to(tl.int64)
            if BUFFER:
                pooled_counts += tl.load(pooled_ptr + expert, mask=ok, other=0)
                pooled_tokens += tl.load(pooled_ptr + E)
                tl.store(pooled_ptr + expert, pooled_counts, mask=ok)
                tl.store(pooled_ptr + E, pooled_tokens)
            f = pooled_counts.to(tl.float64) / (K * tl.maximum(pooled_tokens, 1)).to(tl.float64)
            weight = global_coeff * E / tokens
            loss = (tl.sum(f * score_sums.to(tl.float64), 0) * weight).to(DTYPE)
            gradient += (scale * weight) * f
            if REPORT_GLOBAL:
                tl.store(global_target_ptr, tl.load(global_target_ptr) + ((loss / report_divisor) / global_coeff).to(
                    global_target_ptr.dtype.element_ty))
        tl.store(grad_score_sums_ptr + expert, gradient.to(DTYPE), mask=ok)

    if HAS_Z:
        per_token = tl.maximum(valid, 1).to(tl.float32)
        tl.store(grad_z_sum_ptr, (z_scale.to(tl.float32) * z_coeff) / per_token)
        if REPORT_Z:
            value = tl.load(z_sum_ptr) / per_token
            tl.store(z_target_ptr, tl.load(z_target_ptr) + (value / report_divisor).to(z_target_ptr.dtype.element_ty))
