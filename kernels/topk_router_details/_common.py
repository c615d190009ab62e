"""Pieces shared by the forward and backward router kernels."""

import triton
import triton.language as tl
from triton.language.extra import libdevice

from moe_lbl import scores

# Globals read inside @triton.jit code must be tl.constexpr objects: the compiler refuses an
# annotated plain float ("Cannot access global variable"), though the interpreter accepts it.
NEG_INF = tl.constexpr(float("-inf"))
SIGMOID_EPS = tl.constexpr(scores.SIGMOID_EPS)
INDEX_BITS = tl.constexpr(12)  # low bits of a sort key hold (4095 - expert): up to 4096 experts
INDEX_MASK = tl.constexpr((1 << 12) - 1)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def row_max(v):
    return tl.max(tl.max(v, 2), 1)


@triton.jit
def row_sum(v):
    return tl.sum(tl.sum(v, 2), 1)


@triton.jit
def exp(x):
    """e**x as one ex2 (tl.exp adds a denormal range fix-up: several instructions per element)."""
    return tl.exp2(x * LOG2E)


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp2(-x * LOG2E))


@triton.jit
def round_to(v, DTYPE: tl.constexpr, INTERPRETED: tl.constexpr):
    """Round fp32 values to DTYPE (to nearest, ties to even) and back: Megatron's value there.

    INTERPRETED: in Triton's interpreter, which truncates fp32 -> bf16 casts (even with
    fp_downcast_rounding="rtne"): there bf16 is rounded by hand; compiled casts round.
    """
    if DTYPE == tl.bfloat16 and INTERPRETED:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    elif DTYPE == tl.float16 or DTYPE == tl.bfloat16:
        return v.to(DTYPE).to(tl.float32)
    else:
        return v


@triton.jit
def cast_to(v, DTYPE: tl.constexpr, INTERPRETED: tl.constexpr):
    """fp32 values as DTYPE, rounded to nearest (a plain cast where casts round)."""
    if INTERPRETED:
        return round_to(v, DTYPE, INTERPRETED).to(DTYPE)
    else:
        return v.to(DTYPE)


@triton.jit
def log(x, INTERPRETED: tl.constexpr):
    """Natural log as one lg2 where compiled (tl.log2 is a polynomial of about 30 instructions);
    the interpreter has no libdevice."""
    if INTERPRETED:
        return tl.log2(x) * LN2
    else:
        return libdevice.fast_log2f(x) * LN2


@triton.jit
def expert_tile(G, GS, BLOCK_G: tl.constexpr, BLOCK_GS: tl.constexpr):
    """Expert index and validity of a [1, BLOCK_G, BLOCK_GS] tile (groups x experts per group)."""
    g3 = tl.arange(0, BLOCK_G)[None, :, None]
    j3 = tl.arange(0, BLOCK_GS)[None, None, :]
    return g3 * GS + j3, (g3 < G) & (j3 < GS)


@triton.jit
def load_rows(logits_ptr, block, num_tokens, stride_t, expert, col_ok, BLOCK_T: tl.constexpr,
              NAN_TO_INF: tl.constexpr = False):
    """Rows of one block and their logits in fp32 (-inf outside the experts).

    NAN_TO_INF: a NaN logit becomes +inf, ranked above every number as torch.topk ranks NaN
    (a NaN's own sort key would rank by its sign bit, and torch's fp32 -> bf16 casts make
    negative NaNs); the row's softmax is NaN all the same. One min instruction per element.
    """
    rows = block * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)  # int64: T * E may pass 2**31
    row_ok = rows < num_tokens
    ok = row_ok[:, None, None] & col_ok
    x = tl.load(logits_ptr + rows[:, None, None] * stride_t + expert, mask=ok, other=0.0).to(tl.float32)
    if NAN_TO_INF:
        x = tl.minimum(x, float("inf"))  # min.f32 returns the number when one operand is NaN
    return rows, row_ok, ok, tl.where(col_ok, x, NEG_INF)


@triton.jit
def no_key(VALUE_BITS: tl.constexpr):
    """Below every sort_key."""
    if VALUE_BITS == 32:
        return -(1 << 62)
    else:
        return -(1 << 31)


@triton.jit
def above_keys(VALUE_BITS: tl.constexpr):
    """Above every sort_key."""
    if VALUE_BITS == 32:
        return (1 << 63) - 1
    else:
        return (1 << 31) - 1


@triton.jit
def _flip_negatives(bits):
    """fp32 bits as an int32 ordered as the values (the magnitude bits of negatives flipped), and
    back: the map is its own inverse."""
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def sort_key(value, index, ok, VALUE_BITS: tl.constexpr):
    """Unique integer keys ordered as (value, then lower index): one reduction per top-k round.

    The value's order-preserving integer (its fp32 bits, magnitude flipped for negatives) keeps
    its VALUE_BITS significant high bits (16 for bf16 values, 19 for fp16: int32 keys; 32 for
    fp32: int64 keys) above INDEX_BITS bits holding INDEX_MASK - index. Outside `ok` the key is
    below every valid one. Below 32 bits, `value` must be a number of that dtype (its low
    32 - VALUE_BITS bits zero, as every value of bf16 or fp16 is in fp32, NaN and inf included).
    """
    bits = value.to(tl.int32, bitcast=True)
    if VALUE_BITS == 32:
        key = (_flip_negatives(bits).to(tl.int64) << INDEX_BITS) | (index ^ INDEX_MASK).to(tl.int64)
    else:  # the low 32 - VALUE_BITS >= INDEX_BITS bits are zero, kept so by the flip: the index goes there
        key = (bits ^ ((bits >> 31) & (0x7FFFFFFF & (-1 << (32 - VALUE_BITS))))) | (index ^ INDEX_MASK)
    return tl.where(ok, key, no_key(VALUE_BITS))


@triton.jit
def key_index(key):
    return ((key & INDEX_MASK) ^ INDEX_MASK).to(tl.int32)


@triton.jit
def key_value(key, VALUE_BITS: tl.constexpr):
    """The fp32 value a sort_key was made from."""
    if VALUE_BITS == 32:
        bits = _flip_negatives((key >> INDEX_BITS).to(tl.int32))
    else:
        ordered = key & (-1 << (32 - VALUE_BITS))
        bits = ordered ^ ((ordered >> 31) & (0x7FFFFFFF & (-1 << (32 - VALUE_BITS))))
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _compare_exchange(run, a: tl.constexpr, b: tl.constexpr):
    """Entries a < b of a tuple, the larger first."""
    high = tl.maximum(run[a], run[b])
    low = tl.minimum(run[a], run[b])
    return run[:a] + (high,) + run[a + 1:b] + (low,) + run[b + 1:]


@triton.jit
def _sort(run):
    """A tuple sorted, largest first: Batcher's odd-even merge sort (19 compare-exchanges for 8;
    the compiler drops those no kept entry needs), merging sorted blocks of 2**stage."""
    SIZE: tl.constexpr = len(run)
    for stage in tl.static_range(SIZE.bit_length() - 1):
        for step in tl.static_range(stage + 1):
            for j in tl.static_range((1 << (stage - step)) % (1 << stage), SIZE - (1 << (stage - step)),
                                     2 << (stage - step)):
                for i in tl.static_range(1 << (stage - step)):
                    if (i + j) >> (stage + 1) == (i + j + (1 << (stage - step))) >> (stage + 1):
                        run = _compare_exchange(run, i + j, i + j + (1 << (stage - step)))
    return run


@triton.jit
def sorted_runs(keys, RUN: tl.constexpr, LENGTH: tl.constexpr):
    """The LENGTH <= RUN largest of each run of RUN consecutive keys of a [BLOCK_T, BLOCK_G,
    BLOCK_GS] tile (what one thread holds), sorted: a tuple of LENGTH [BLOCK_T, W // RUN]
    tensors, the i-th holding every run's i-th largest key. In registers, a merge round moves
    one key per thread, not RUN.
    """
    WIDTH: tl.constexpr = keys.shape[1] * keys.shape[2]
    run = (tl.reshape(keys, [keys.shape[0], WIDTH]),)
    for level in tl.static_range(RUN.bit_length() - 1):  # halve each part: its even, odd entries
        halves = ()
        for part in tl.static_range(len(run)):
            even, odd = tl.split(tl.reshape(run[part], [keys.shape[0], WIDTH >> (level + 1), 2]))
            halves = halves + (even, odd)
        run = halves
    return _sort(run)[:LENGTH]


@triton.jit
def max_key(keys, axis: tl.constexpr, VALUE_BITS: tl.constexpr):
    """tl.max(keys, axis); int64 keys as two 32-bit maxima, high word then low word among the
    highest (a warp reduces 32 bits in one instruction, 64 bits in a chain of shuffles)."""
    if VALUE_BITS == 32:
        high = (keys >> 32).to(tl.int32)
        top = tl.max(high, axis)
        low = keys.to(tl.int32) ^ (-(1 << 31))  # unsigned order as signed
        low = tl.max(tl.where(high == tl.expand_dims(top, axis), low, -(1 << 31)), axis)
        return (top.to(tl.int64) << 32) | ((low ^ (-(1 << 31))).to(tl.int64) & 0xFFFFFFFF)
    else:
        return tl.max(keys, axis)


@triton.jit
def shift_runs(run, popped, LENGTH: tl.constexpr, VALUE_BITS: tl.constexpr):
    """The first LENGTH entries of sorted runs after the runs where `popped` dropped their head."""
    shifted = ()
    for i in tl.static_range(min(len(run), LENGTH)):
        if i + 1 < len(run):
            shifted = shifted + (tl.where(popped, run[i + 1], run[i]),)
        else:
            shifted = shifted + (tl.where(popped, no_key(VALUE_BITS), run[i]),)
    return shifted


@triton.jit
def merge_runs(run, K: tl.constexpr, KP: tl.constexpr, VALUE_BITS: tl.constexpr, GATHER: tl.constexpr):
    """The K largest keys of each row of sorted_runs: (all K, largest first, as [BLOCK_T, KP]
    when GATHER (columns from K on repeat the K-th), the K-th).

    A K-way merge: keys are unique, so each round the run whose head is the largest drops it.
    (Every value here derives from the runs: a row maximum of the tile would pull the runs into
    its layout, each thread holding all of them.)
    """
    rank = tl.arange(0, KP)[None, :]
    best = max_key(run[0], 1, VALUE_BITS)
    chosen = best[:, None]
    if GATHER:
        chosen = tl.zeros([best.shape[0], KP], best.dtype) + best[:, None]
    for r in tl.static_range(1, K):
        run = shift_runs(run, run[0] == best[:, None], K - r, VALUE_BITS)  # later rounds read K - r entries
        best = max_key(run[0], 1, VALUE_BITS)
        if GATHER:
            chosen = tl.where(rank >= r, best[:, None], chosen)
    return chosen, best


# Value keys: fp32 values as order-preserving int32s without the expert index, for a top-k that
# only needs the set (the dense outputs, the counts): 32-bit compare-exchanges and reductions
# where (value, index) keys of fp32 values take 64 bits. Equal values make equal keys: the
# merge drops one head a round, of the lowest run among the equal largest, so the K largest are
# those above the K-th, the K-th's equals in lower runs, and in the K-th's own run as many of
# its equals, in index order, as the merge dropped there (top_mask).
NO_VALUE = tl.constexpr(-(1 << 31))  # below every value key (the key of no fp32 value but one negative NaN)


@triton.jit
def value_key(value, ok):
    """fp32 values as order-preserving int32 keys (magnitude flipped for negatives); NO_VALUE
    outside `ok`."""
    return tl.where(ok, _flip_negatives(value.to(tl.int32, bitcast=True)), NO_VALUE)


@triton.jit
def value_of(key):
    """The fp32 value of a value_key."""
    return _flip_negatives(key).to(tl.float32, bitcast=True)


@triton.jit
def merge_values(run, K: tl.constexpr):
    """Of each row of sorted_runs of value keys (equal keys allowed): the K-th largest key, the
    run it came from, and how many keys equal to it that run gave (as many of its equals, in
    index order). Each round the lowest run whose head is the largest drops it: equal keys leave
    run by run, in index order."""
    run_index = tl.arange(0, run[0].shape[1])[None, :]
    best = tl.max(run[0], 1)
    source = tl.min(tl.where(run[0] == best[:, None], run_index, run[0].shape[1]), 1)
    given = tl.zeros(best.shape, tl.int32) + 1
    for r in tl.static_range(1, K):
        run = shift_runs(run, run_index == source[:, None], K - r, 16)  # later rounds read K - r entries
        next_best = tl.max(run[0], 1)
        next_source = tl.min(tl.where(run[0] == next_best[:, None], run_index, run[0].shape[1]), 1)
        given = tl.where((next_best == best) & (next_source == source), given + 1, 1)
        best, source = next_best, next_source
    return best, source, given


@triton.jit
def top_mask(keys, kth, source, given, RUN: tl.constexpr):
    """The K largest of each row of a [BLOCK_T, BLOCK_G, BLOCK_GS] tile of value keys, given
    merge_values of its runs of RUN keys: ties go to the lower index, as Megatron orders them."""
    RUNS: tl.constexpr = keys.shape[1] * keys.shape[2] // RUN
    shape: tl.constexpr = [keys.shape[0], RUNS, RUN]
    in_runs = tl.reshape(keys, shape)
    equal = in_runs == kth[:, None, None]
    run_index = tl.arange(0, RUNS)[None, :, None]
    equal_before = tl.cumsum(equal.to(tl.int32), 2) - equal.to(tl.int32)  # within the run: in registers
    from_source = (run_index == source[:, None, None]) & (equal_before < given[:, None, None])
    taken = (in_runs > kth[:, None, None]) | (equal & ((run_index < source[:, None, None]) | from_source))
    return tl.reshape(taken, keys.shape)


@triton.jit
def top_keys(keys, K: tl.constexpr, KP: tl.constexpr, VALUE_BITS: tl.constexpr, GATHER: tl.constexpr,
             RUN: tl.constexpr):
    """merge_runs of a [BLOCK_T, BLOCK_G, BLOCK_GS] tile's runs of RUN keys."""
    return merge_runs(sorted_runs(keys, RUN, min(RUN, K)), K, KP, VALUE_BITS, GATHER)
