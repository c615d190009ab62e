"""Forward router kernel: routing, dense or sparse outputs and the balancing statistics in one pass."""

import triton
import triton.language as tl

from moe_lbl.kernels.topk_router_details._common import (
    LOG2E,
    NO_VALUE,
    SIGMOID_EPS,
    above_keys,
    cast_to,
    exp,
    expert_tile,
    key_index,
    key_value,
    load_rows,
    log,
    max_key,
    merge_runs,
    merge_values,
    no_key,
    round_to,
    row_max,
    row_sum,
    shift_runs,
    sigmoid,
    sort_key,
    sorted_runs,
    top_keys,
    top_mask,
    value_key,
    value_of,
)


@triton.jit
def _group_mask(keys, G, K: tl.constexpr, GROUP_TOPK: tl.constexpr, BLOCK_G: tl.constexpr, RUN: tl.constexpr,
                KEY_BITS: tl.constexpr, VALUE_KEYS: tl.constexpr, ROUND_GROUP: tl.constexpr, DTYPE: tl.constexpr,
                INTERPRETED: tl.constexpr):
    """Keep the keys of each row's GROUP_TOPK best groups, a group scored by the sum of its top
    K // GROUP_TOPK values (Megatron's group-limited routing); the rest become no_key. Returns
    the masked keys and their sorted_runs (RUN divides a group: a run is one group's). Value
    keys (VALUE_KEYS) may repeat: a round drops every head equal to the largest, and its value is
    added once per drop still wanted, one addition at a time as for distinct keys."""
    PER_GROUP: tl.constexpr = K // GROUP_TOPK
    run = sorted_runs(keys, RUN, min(RUN, K))
    RUNS: tl.constexpr = keys.shape[2] // RUN  # per group
    in_group = ()
    for i in tl.static_range(len(run)):
        in_group = in_group + (tl.reshape(run[i], [keys.shape[0], BLOCK_G, RUNS]),)
    group_score = tl.zeros([keys.shape[0], BLOCK_G], tl.float32)
    added = tl.zeros([keys.shape[0], BLOCK_G], tl.int32)
    for r in tl.static_range(PER_GROUP):
        if VALUE_KEYS:
            best = tl.max(in_group[0], 2)
            popped = in_group[0] == best[:, :, None]
            value = value_of(best)
            count = tl.sum(popped.to(tl.int32), 2)
            for j in tl.static_range(PER_GROUP - r):
                group_score += tl.where((j < count) & (added + j < PER_GROUP), value, 0.0)
            added += count
        else:
            best = max_key(in_group[0], 2, KEY_BITS)
            popped = in_group[0] == best[:, :, None]
            group_score += key_value(best, KEY_BITS)
        if r + 1 < PER_GROUP:
            in_group = shift_runs(in_group, popped, PER_GROUP - r - 1, 16 if VALUE_KEYS else KEY_BITS)
    if ROUND_GROUP:
        group_score = round_to(group_score, DTYPE, INTERPRETED)
    g2 = tl.arange(0, BLOCK_G)[None, :]
    GROUP_BITS: tl.constexpr = 32 if VALUE_KEYS else KEY_BITS  # fp32 group scores of fp32 values
    group_keys = sort_key(group_score, g2, g2 < G, GROUP_BITS)
    best = max_key(group_keys, 1, GROUP_BITS)
    for _ in tl.static_range(1, GROUP_TOPK):
        best = max_key(tl.where(group_keys < best[:, None], group_keys, no_key(GROUP_BITS)), 1, GROUP_BITS)
    kept = (group_keys >= best[:, None])[:, :, None]
    if VALUE_KEYS:
        empty = NO_VALUE
    else:
        empty = no_key(KEY_BITS)
    masked_run = ()
    for i in tl.static_range(len(run)):
        masked = tl.where(kept, tl.reshape(run[i], [keys.shape[0], BLOCK_G, RUNS]), empty)
        masked_run = masked_run + (tl.reshape(masked, [keys.shape[0], BLOCK_G * RUNS]),)
    return tl.where(kept, keys, empty), masked_run


@triton.jit
def _select_key(value, index, ok, SELECT_BITS: tl.constexpr, VALUE_KEYS: tl.constexpr):
    if VALUE_KEYS:
        return value_key(value, ok)
    else:
        return sort_key(value, index, ok, SELECT_BITS)


@triton.jit
def _select_value(key, SELECT_BITS: tl.constexpr, VALUE_KEYS: tl.constexpr):
    if VALUE_KEYS:
        return value_of(key)
    else:
        return key_value(key, SELECT_BITS)


@triton.jit
def router_forward(
    # inputs
    logits_ptr, stride_t, num_tokens, bias_ptr, padding_ptr, scaling_factor,
    # outputs: dense [T, E], sparse [T, K]
    probs_ptr, map_ptr, indices_ptr, topk_probs_ptr,
    # per-program statistics: counts [P, 2, E] (aux top-k, dispatched), score sums [P, E] (with
    # PER_SEQUENCE: [P * BLOCK_T, ...], per row of the program's blocks), z sums [P], valid tokens [P]
    counts_partial_ptr, scores_partial_ptr, z_partial_ptr, valid_partial_ptr,
    # routing
    E: tl.constexpr, K: tl.constexpr, G: tl.constexpr, GS: tl.constexpr, GROUP_TOPK: tl.constexpr,
    SOFTMAX: tl.constexpr, PRE_SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PADDING: tl.constexpr,
    HAS_SCALING: tl.constexpr, LOGIT_BITS: tl.constexpr, SELECT_BITS: tl.constexpr,
    # what to compute
    WRITE_DENSE: tl.constexpr, WRITE_SPARSE: tl.constexpr, COMPUTE_STATS: tl.constexpr, COMPUTE_Z: tl.constexpr,
    SEPARATE_AUX_TOPK: tl.constexpr, PER_SEQUENCE: tl.constexpr,
    # tiles
    BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_GS: tl.constexpr, KP: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    DTYPE: tl.constexpr = logits_ptr.dtype.element_ty
    pid = tl.program_id(0)
    expert, col_ok = expert_tile(G, GS, BLOCK_G, BLOCK_GS)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert, mask=col_ok, other=0.0).to(tl.float32)
    if COMPUTE_STATS:
        count_aux = tl.zeros([BLOCK_T, BLOCK_G, BLOCK_GS], tl.int32)
        count_dispatch = tl.zeros([BLOCK_T, BLOCK_G, BLOCK_GS], tl.int32)
        score_sum = tl.zeros([BLOCK_T, BLOCK_G, BLOCK_GS], tl.float32)
        z_sum = tl.zeros([BLOCK_T], tl.float32)
        valid_count = tl.zeros([BLOCK_T], tl.int32)

    for block in range(pid, tl.cdiv(num_tokens, BLOCK_T), tl.num_programs(0)):
        rows, row_ok, ok, x = load_rows(logits_ptr, block, num_tokens, stride_t, expert, col_ok, BLOCK_T,
                                        NAN_TO_INF=True)
        # Scores that choose the experts, as Megatron compares them, as unique sort keys (fp32
        # scores where only the set is wanted: value keys). After softmax the logits themselves
        # choose: their largest key gives the row's largest logit.
        POST_SOFTMAX: tl.constexpr = SOFTMAX and not PRE_SOFTMAX
        VALUE_KEYS: tl.constexpr = SELECT_BITS == 32 and not WRITE_SPARSE
        if POST_SOFTMAX:
            all_keys = _select_key(x, expert, col_ok, SELECT_BITS, VALUE_KEYS)
            first_of_all = row_max(all_keys)
            row_max_x = _select_value(first_of_all, SELECT_BITS, VALUE_KEYS)
        else:
            row_max_x = row_max(x)
        shifted = tl.exp2(x * LOG2E - (row_max_x * LOG2E)[:, None, None])
        denominator = row_sum(shifted)
        inv_denominator = 1.0 / denominator
        if PRE_SOFTMAX:
            select = round_to(shifted * inv_denominator[:, None, None], DTYPE, INTERPRETED)
            all_keys = _select_key(select, expert, col_ok, SELECT_BITS, VALUE_KEYS)
        if not SOFTMAX:
            scores = round_to(sigmoid(x), DTYPE, INTERPRETED)
            if HAS_BIAS:  # fp32, as in Megatron
                all_keys = _select_key(scores + bias, expert, col_ok, SELECT_BITS, VALUE_KEYS)
            else:
                all_keys = _select_key(scores, expert, col_ok, SELECT_BITS, VALUE_KEYS)
        # Runs of a thread's consecutive experts: those of one load of the logits (16 bytes, or
        # what divides a group of experts).
        RUN: tl.constexpr = min(128 // DTYPE.primitive_bitwidth, GS & -GS, BLOCK_G * BLOCK_GS)
        if GROUP_TOPK > 0:
            keys, run = _group_mask(all_keys, G, K, GROUP_TOPK, BLOCK_G, RUN, SELECT_BITS, VALUE_KEYS, not HAS_BIAS,
                                    DTYPE, INTERPRETED)
        else:
            keys, run = all_keys, sorted_runs(all_keys, RUN, min(RUN, K))
        if POST_SOFTMAX and GROUP_TOPK == 0:
            first = first_of_all
        else:
            first = row_max(keys)
        valid = row_ok
        if HAS_PADDING:
            valid = valid & (tl.load(padding_ptr + rows, mask=row_ok, other=1) == 0)
        # Rows past the end choose nothing (they are never stored; their normalizers are 1, not
        # 1 / 0): then the chosen experts mark the map and the counts alike.
        if VALUE_KEYS:
            kth, source, given = merge_values(run, K)
            taken = top_mask(keys, kth, source, given, RUN)
            if COMPUTE_STATS and not HAS_PADDING:
                taken = taken & valid[:, None, None]
        else:
            top, kth = merge_runs(run, K, KP, SELECT_BITS, WRITE_SPARSE)
            if COMPUTE_STATS and not HAS_PADDING:
                kth = tl.where(valid, kth, above_keys(SELECT_BITS))
            taken = keys >= kth[:, None, None]

        if WRITE_DENSE:
            # Probabilities of the chosen experts, zero elsewhere, as Megatron computes them; the
            # last rounding to the logits dtype is the store's. Selected after the product: a NaN
            # normalizer (a NaN or inf logit chosen) leaves the other experts at 0, as Megatron's
            # scatter does.
            if SOFTMAX:
                if PRE_SOFTMAX:
                    probs = tl.where(taken, select, 0.0)  # the rounded softmax
                else:  # softmax over the chosen logits, shifted by the largest chosen one
                    if GROUP_TOPK > 0:
                        chosen_exp = exp(x - _select_value(first, SELECT_BITS, VALUE_KEYS)[:, None, None])
                    else:
                        chosen_exp = shifted  # the largest chosen logit is the row's largest
                    normalizer = 1.0 / tl.where(row_ok, row_sum(tl.where(taken, chosen_exp, 0.0)), 1.0)
                    probs = tl.where(taken, chosen_exp * normalizer[:, None, None], 0.0)
            else:
                probs = tl.where(taken, scores, 0.0)
                if K > 1:
                    total = round_to(round_to(row_sum(probs), DTYPE, INTERPRETED) + SIGMOID_EPS, DTYPE, INTERPRETED)
                    normalizer = 1.0 / tl.where(row_ok, total, 1.0)
                    probs = tl.where(taken, scores * normalizer[:, None, None], 0.0)
            if HAS_SCALING:
                probs = round_to(probs, DTYPE, INTERPRETED) * scaling_factor
            r3 = rows[:, None, None]
            tl.store(probs_ptr + r3 * E + expert, cast_to(probs, DTYPE, INTERPRETED), mask=ok)
            tl.store(map_ptr + r3 * E + expert, taken.to(tl.uint8), mask=ok)

        if WRITE_SPARSE:
            rank = tl.arange(0, KP)[None, :]
            top_ok = row_ok[:, None] & (rank < K)
            topk_indices = key_index(top)
            tl.store(indices_ptr + rows[:, None] * K + rank, topk_indices, mask=top_ok)
            if WRITE_DENSE:
                # The same values, read back: the barrier orders the dense stores of other threads
                # before these loads.
                tl.debug_barrier()
                topk_probs = tl.load(probs_ptr + rows[:, None] * E + topk_indices, mask=top_ok, other=0.0)
            else:  # the dense formulas on the K chosen experts, [BLOCK_T, KP]
                if SOFTMAX:
                    if PRE_SOFTMAX:
                        topk_probs = key_value(top, SELECT_BITS)
                    else:
                        chosen_exp = tl.where(rank < K, exp(key_value(top, SELECT_BITS)
                                                            - key_value(first, SELECT_BITS)[:, None]), 0.0)
                        topk_probs = round_to(chosen_exp * (1.0 / tl.sum(chosen_exp, 1))[:, None], DTYPE, INTERPRETED)
                else:
                    if HAS_BIAS:  # the keys hold sigmoid + bias: read the logits back (a cached row)
                        chosen_logits = tl.load(logits_ptr + rows[:, None] * stride_t + topk_indices, mask=top_ok,
                                                other=0.0)
                        topk_probs = round_to(sigmoid(chosen_logits.to(tl.float32)), DTYPE, INTERPRETED)
                    else:
                        topk_probs = key_value(top, SELECT_BITS)
                    if K > 1:
                        topk_probs = tl.where(rank < K, topk_probs, 0.0)
                        total = round_to(round_to(tl.sum(topk_probs, 1), DTYPE, INTERPRETED) + SIGMOID_EPS, DTYPE,
                                         INTERPRETED)
                        topk_probs = round_to(topk_probs * (1.0 / total)[:, None], DTYPE, INTERPRETED)
                if HAS_SCALING:
                    topk_probs = round_to(topk_probs * scaling_factor, DTYPE, INTERPRETED)
            tl.store(topk_probs_ptr + rows[:, None] * K + rank, topk_probs.to(DTYPE), mask=top_ok)

        if COMPUTE_STATS:
            # Padding tokens count nothing: no key reaches their threshold, their scores weigh 0.
            counted = taken
            if HAS_PADDING:
                if VALUE_KEYS:
                    counted = taken & valid[:, None, None]
                else:
                    counted = keys >= tl.where(valid, kth, above_keys(SELECT_BITS))[:, None, None]
            # The aux-loss scores of compute_routing_scores_for_aux_loss, their sums and top-k.
            if SOFTMAX:
                score_sum += shifted * tl.where(valid, inv_denominator, 0.0)[:, None, None]
            else:
                total = round_to(round_to(row_sum(scores), DTYPE, INTERPRETED) + SIGMOID_EPS, DTYPE, INTERPRETED)
                aux = round_to(scores * (1.0 / total)[:, None, None], DTYPE, INTERPRETED)
                score_sum += aux * valid.to(tl.float32)[:, None, None]
            if SEPARATE_AUX_TOPK:
                # No bias here: keys of logits-dtype values (value keys for fp32: only counted).
                AUX_VALUE_KEYS: tl.constexpr = VALUE_KEYS if POST_SOFTMAX else LOGIT_BITS == 32
                if POST_SOFTMAX:  # softmax keeps the logits' order: rank the logits themselves
                    aux_keys = all_keys
                elif SOFTMAX:
                    aux_keys = _select_key(x, expert, col_ok, LOGIT_BITS, AUX_VALUE_KEYS)
                else:
                    aux_keys = _select_key(aux, expert, col_ok, LOGIT_BITS, AUX_VALUE_KEYS)
                if AUX_VALUE_KEYS:
                    aux_kth, aux_source, aux_given = merge_values(sorted_runs(aux_keys, RUN, min(RUN, K)), K)
                    aux_taken = top_mask(aux_keys, aux_kth, aux_source, aux_given, RUN) & valid[:, None, None]
                else:
                    _, aux_kth = top_keys(aux_keys, K, KP, LOGIT_BITS, False, RUN)
                    aux_taken = aux_keys >= tl.where(valid, aux_kth, above_keys(LOGIT_BITS))[:, None, None]
                count_aux += aux_taken.to(tl.int32)
                count_dispatch += counted.to(tl.int32)
            else:
                count_aux += counted.to(tl.int32)
            if COMPUTE_Z:  # else the z partials stay 0, and no one reads their sum
                lse = row_max_x + log(denominator, INTERPRETED)
                z_sum += tl.where(valid, lse * lse, 0.0)
            valid_count += valid.to(tl.int32)

    if COMPUTE_STATS and PER_SEQUENCE:
        # Tokens are laid out [s, S] (S sequences). The launch makes programs * BLOCK_T a multiple
        # of S, so row i of every block this program walks is of one sequence, (pid * BLOCK_T + i)
        # % S: the per-row sums are per-sequence sums already; the statistics kernel adds up the
        # rows of each sequence.
        partial_row = pid * BLOCK_T + tl.arange(0, BLOCK_T)[:, None, None]
        tl.store(counts_partial_ptr + partial_row * 2 * E + expert, count_aux, mask=col_ok)
        if SEPARATE_AUX_TOPK:
            tl.store(counts_partial_ptr + partial_row * 2 * E + E + expert, count_dispatch, mask=col_ok)
        tl.store(scores_partial_ptr + partial_row * E + expert, score_sum, mask=col_ok)
    elif COMPUTE_STATS:
        g2 = tl.arange(0, BLOCK_G)[:, None]
        j2 = tl.arange(0, BLOCK_GS)[None, :]
        e2 = g2 * GS + j2
        ok2 = (g2 < G) & (j2 < GS)
        tl.store(counts_partial_ptr + pid * 2 * E + e2, tl.sum(count_aux, 0), mask=ok2)
        if SEPARATE_AUX_TOPK:
            tl.store(counts_partial_ptr + pid * 2 * E + E + e2, tl.sum(count_dispatch, 0), mask=ok2)
        tl.store(scores_partial_ptr + pid * E + e2, tl.sum(score_sum, 0), mask=ok2)
    if COMPUTE_STATS:
        tl.store(z_partial_ptr + pid, tl.sum(z_sum, 0))
        tl.store(valid_partial_ptr + pid, tl.sum(valid_count, 0))
