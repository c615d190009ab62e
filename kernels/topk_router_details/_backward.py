"""Backward router kernel: the logits gradient of the routing, balancing and z-losses in one pass.

The balancing and z-loss gradients reach every expert (dense). The routing gradient reaches only
the K chosen experts: with only the dense probs differentiated (Megatron's path) it is computed
densely from the routing map; with topk_probs it is computed on [BLOCK_T, KP] tiles from the
saved indices and stored over the dense result at those positions.
"""

import triton
import triton.language as tl

from moe_lbl.kernels.topk_router_details._common import (
    LOG2E,
    NEG_INF,
    SIGMOID_EPS,
    cast_to,
    exp,
    expert_tile,
    load_rows,
    log,
    row_max,
    row_sum,
    sigmoid,
)


@triton.jit
def _balancing_grad(softmax, scores, lbl_grad, lbl_dot, sigmoid_total, z_lse, valid,
                    SOFTMAX: tl.constexpr, HAS_LBL: tl.constexpr, HAS_Z: tl.constexpr):
    """Gradient of the balancing and z-losses at the given experts (any tile shape; the row
    terms lbl_dot, sigmoid_total and z_lse come broadcast to it)."""
    grad = tl.zeros(softmax.shape, tl.float32)
    if HAS_LBL:
        if SOFTMAX:
            grad += softmax * (lbl_grad - lbl_dot)
        else:
            grad += (lbl_grad - lbl_dot) / sigmoid_total * scores * (1.0 - scores)
    if HAS_Z:
        grad += z_lse * softmax
    return tl.where(valid, grad, 0.0)


@triton.jit
def _routing_grad_dense(x, shifted, softmax, taken, grad, SOFTMAX: tl.constexpr, PRE_SOFTMAX: tl.constexpr,
                        GROUP_TOPK: tl.constexpr, K: tl.constexpr):
    """d(sum probs * grad)/d logits over a [BLOCK_T, BLOCK_G, BLOCK_GS] tile; grad is zero
    outside the chosen experts (`taken`)."""
    if SOFTMAX:
        if PRE_SOFTMAX:  # probs = softmax over all experts
            return softmax * (grad - row_sum(softmax * grad)[:, None, None])
        else:  # probs = softmax over the chosen logits
            if GROUP_TOPK > 0:
                chosen_max = row_max(tl.where(taken, x, NEG_INF))
                chosen_exp = tl.where(taken, exp(x - chosen_max[:, None, None]), 0.0)
            else:  # the largest chosen logit is the row's largest
                chosen_exp = tl.where(taken, shifted, 0.0)
            probs = chosen_exp * (1.0 / row_sum(chosen_exp))[:, None, None]
            return probs * (grad - row_sum(probs * grad)[:, None, None])
    else:
        scores = tl.where(taken, sigmoid(x), 0.0)
        if K > 1:  # probs = scores / (sum of the chosen scores + eps)
            total = (row_sum(scores) + SIGMOID_EPS)[:, None, None]
            grad = (grad - row_sum(grad * scores)[:, None, None] / total) / total
        return grad * scores * (1.0 - scores)


@triton.jit
def router_backward(
    # inputs
    logits_ptr, stride_t, num_tokens, map_ptr, indices_ptr, padding_ptr, scaling_factor,
    # incoming gradients: dense probs [T, E], sparse topk_probs [T, K], score_sums [E], z_sum [1],
    # per-sequence score sums [S, E] (tokens laid out [s, S])
    grad_probs_ptr, grad_topk_probs_ptr, grad_score_sums_ptr, grad_z_sum_ptr, grad_sequence_scores_ptr,
    num_sequences,
    # output [T, E]
    grad_logits_ptr,
    # routing
    E: tl.constexpr, K: tl.constexpr, G: tl.constexpr, GS: tl.constexpr, GROUP_TOPK: tl.constexpr,
    SOFTMAX: tl.constexpr, PRE_SOFTMAX: tl.constexpr, HAS_PADDING: tl.constexpr, HAS_SCALING: tl.constexpr,
    # which gradients arrive
    HAS_GRAD_PROBS: tl.constexpr, HAS_GRAD_TOPK_PROBS: tl.constexpr, HAS_LBL: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_SEQUENCE_LBL: tl.constexpr,
    # tiles
    BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_GS: tl.constexpr, KP: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    DTYPE: tl.constexpr = logits_ptr.dtype.element_ty
    FROM_MAP: tl.constexpr = HAS_GRAD_PROBS and not HAS_GRAD_TOPK_PROBS
    ANY_LBL: tl.constexpr = HAS_LBL or HAS_SEQUENCE_LBL
    pid = tl.program_id(0)
    expert, col_ok = expert_tile(G, GS, BLOCK_G, BLOCK_GS)
    # d loss / d aux score of every valid token: the gradient of its sum over tokens.
    lbl_grad = tl.zeros([1, BLOCK_G, BLOCK_GS], tl.float32)
    if HAS_LBL:
        lbl_grad = tl.load(grad_score_sums_ptr + expert, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_SEQUENCE_LBL:
        # Plus that of its sequence's sum. The launch makes programs * BLOCK_T a multiple of the
        # sequences, so row i of every block this program walks is of sequence (pid * BLOCK_T + i) % S.
        sequence = (pid * BLOCK_T + tl.arange(0, BLOCK_T)) % num_sequences
        lbl_grad += tl.load(grad_sequence_scores_ptr + sequence[:, None, None] * E + expert, mask=col_ok, other=0.0)
    z_grad = 0.0  # d loss / d lse_t = 2 lse_t * d loss / d z_sum
    if HAS_Z:
        z_grad = 2.0 * tl.load(grad_z_sum_ptr).to(tl.float32)

    for block in range(pid, tl.cdiv(num_tokens, BLOCK_T), tl.num_programs(0)):
        rows, row_ok, ok, x = load_rows(logits_ptr, block, num_tokens, stride_t, expert, col_ok, BLOCK_T)
        r3 = rows[:, None, None]
        # The forward stores no logsumexp: recomputing it here is cheaper than its store there.
        row_max_x = row_max(x)
        shifted = tl.exp2(x * LOG2E - (row_max_x * LOG2E)[:, None, None])
        denominator = row_sum(shifted)
        softmax = shifted * (1.0 / denominator)[:, None, None]
        lse = row_max_x + log(denominator, INTERPRETED)
        valid = row_ok
        if HAS_PADDING:
            valid = valid & (tl.load(padding_ptr + rows, mask=row_ok, other=1) == 0)

        # Row terms of the balancing gradient: d LBL / d score_e = lbl_grad_e (engine's weights).
        scores = softmax  # sigmoid scores where the balancing loss takes them
        lbl_dot = tl.zeros([BLOCK_T], tl.float32)
        sigmoid_total = tl.zeros([BLOCK_T], tl.float32) + 1.0
        if ANY_LBL:
            if SOFTMAX:
                lbl_dot = row_sum(softmax * lbl_grad)
            else:
                scores = tl.where(col_ok, sigmoid(x), 0.0)
                sigmoid_total = row_sum(scores) + SIGMOID_EPS
                lbl_dot = row_sum(lbl_grad * scores) / sigmoid_total
        z_lse = z_grad * lse
        grad = _balancing_grad(softmax, scores, lbl_grad, lbl_dot[:, None, None], sigmoid_total[:, None, None],
                               z_lse[:, None, None], valid[:, None, None], SOFTMAX, ANY_LBL, HAS_Z)

        if FROM_MAP:
            # Outside the tile's valid elements read "chosen": rows past the end then have chosen
            # experts too (no 0 / 0 where nothing is stored), and a padded expert's probability is 0.
            taken = tl.load(map_ptr + r3 * E + expert, mask=ok, other=1) != 0
            grad_probs = tl.load(grad_probs_ptr + r3 * E + expert, mask=ok, other=0.0).to(tl.float32)
            grad_probs = tl.where(taken, grad_probs, 0.0)
            if HAS_SCALING:
                grad_probs = grad_probs * scaling_factor
            grad += _routing_grad_dense(x, shifted, softmax, taken, grad_probs, SOFTMAX, PRE_SOFTMAX, GROUP_TOPK, K)
        if HAS_GRAD_TOPK_PROBS:  # on the K chosen experts, [BLOCK_T, KP]
            rank = tl.arange(0, KP)[None, :]
            top_ok = row_ok[:, None] & (rank < K)
            indices = tl.load(indices_ptr + rows[:, None] * K + rank, mask=top_ok, other=0)
            chosen = tl.load(logits_ptr + rows[:, None] * stride_t + indices, mask=top_ok, other=0.0).to(tl.float32)
            # Gradient reaching the chosen probabilities (dense and sparse outputs together).
            grad_top = tl.load(grad_topk_probs_ptr + rows[:, None] * K + rank, mask=top_ok, other=0.0).to(tl.float32)
            if HAS_GRAD_PROBS:
                grad_top += tl.load(grad_probs_ptr + rows[:, None] * E + indices, mask=top_ok, other=0.0).to(tl.float32)
            if HAS_SCALING:
                grad_top = grad_top * scaling_factor
            softmax_top = exp(chosen - lse[:, None])
            if SOFTMAX:
                if PRE_SOFTMAX:
                    # probs = softmax over all experts: a dense term, -(sum_k p_k g_k) * softmax.
                    routing_dot = tl.sum(tl.where(top_ok, softmax_top * grad_top, 0.0), 1)
                    grad -= routing_dot[:, None, None] * softmax
                    routing_top = softmax_top * (grad_top - routing_dot[:, None])
                else:
                    chosen_max = tl.max(tl.where(rank < K, chosen, NEG_INF), 1)
                    chosen_exp = tl.where(rank < K, exp(chosen - chosen_max[:, None]), 0.0)
                    probs = chosen_exp / tl.sum(chosen_exp, 1)[:, None]
                    routing_top = probs * (grad_top - tl.sum(probs * grad_top, 1)[:, None])
            else:
                chosen_sigmoid = tl.where(rank < K, sigmoid(chosen), 0.0)
                if K > 1:
                    total = tl.sum(chosen_sigmoid, 1)[:, None] + SIGMOID_EPS
                    grad_sigmoid = (grad_top - tl.sum(grad_top * chosen_sigmoid / total, 1)[:, None]) / total
                else:
                    grad_sigmoid = grad_top
                routing_top = grad_sigmoid * chosen_sigmoid * (1.0 - chosen_sigmoid)
            lbl_top = tl.zeros([BLOCK_T, KP], tl.float32)
            if HAS_LBL:
                lbl_top += tl.load(grad_score_sums_ptr + indices, mask=top_ok, other=0.0).to(tl.float32)
            if HAS_SEQUENCE_LBL:
                lbl_top += tl.load(grad_sequence_scores_ptr + (rows % num_sequences)[:, None] * E + indices,
                                   mask=top_ok, other=0.0)
            routing_top += _balancing_grad(softmax_top, sigmoid(chosen), lbl_top, lbl_dot[:, None],
                                           sigmoid_total[:, None], z_lse[:, None], valid[:, None],
                                           SOFTMAX, ANY_LBL, HAS_Z)

        tl.store(grad_logits_ptr + r3 * E + expert, cast_to(grad, DTYPE, INTERPRETED), mask=ok)
        if HAS_GRAD_TOPK_PROBS:
            # The chosen experts' whole gradient over the dense one just stored: the barrier
            # orders the two stores of one element made by different threads.
            tl.debug_barrier()
            tl.store(grad_logits_ptr + rows[:, None] * E + indices, cast_to(routing_top, DTYPE, INTERPRETED),
                     mask=top_ok)
