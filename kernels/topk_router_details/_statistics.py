"""The forward's per-program statistics, summed in one fixed order (deterministic for a grid)."""

import triton
import triton.language as tl


@triton.jit
def router_statistics(
    # inputs: per forward program, counts [P, 2, E] (aux top-k, dispatched), score sums [P, E]
    # (with PER_SEQUENCE: per row of its blocks, [R, ...], row r of sequence r % num_sequences),
    # z sums [P], valid tokens [P]
    counts_partial_ptr, scores_partial_ptr, z_partial_ptr, valid_partial_ptr, num_partials, num_programs,
    num_sequences,
    # outputs: counts [2, E] int64, score sums [E] fp32, z sum [1] fp32, valid tokens [1] int64;
    # with PER_SEQUENCE, per sequence: aux counts [S, E] int64 and score sums [S, E] fp32
    counts_ptr, score_sums_ptr, z_sum_ptr, valid_ptr, sequence_counts_ptr, sequence_scores_ptr,
    # a balancing engine's registration (REGISTER): its counters [2] (registrations, those in
    # forward), its step's tags [slots, 3]; to fill: the slot [1] and the vectors its count sums
    # carry over the sequence group [counts E | dispatched E | tag 3] and the batch group
    # [counts E | valid tokens | tag 3]
    counters_ptr, tags_ptr, slot_ptr, sequence_ptr, batch_ptr,
    E: tl.constexpr, SEPARATE_AUX_TOPK: tl.constexpr, PER_SEQUENCE: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_E: tl.constexpr, REGISTER: tl.constexpr, IN_FORWARD: tl.constexpr, SEQUENCE: tl.constexpr,
    BATCH: tl.constexpr,
):
    """Each program sums a block of experts over the partials (with PER_SEQUENCE, per sequence and
    then over the sequences); program 0 also the z sums and the valid tokens. Without
    SEPARATE_AUX_TOPK the dispatched counts are the aux counts. With REGISTER the statistics also
    become the engine's registration of the micro-batch (what moe_lbl.engine.LoadBalancer does in
    torch operations otherwise)."""
    pid = tl.program_id(0)
    expert = pid * BLOCK_E + tl.arange(0, BLOCK_E)
    expert_ok = expert < E
    aux = tl.zeros([BLOCK_E], tl.int64)
    dispatched = tl.zeros([BLOCK_E], tl.int64)
    scores = tl.zeros([BLOCK_E], tl.float32)
    if PER_SEQUENCE:
        rows_per_sequence = num_partials // num_sequences
        for sequence in range(num_sequences):
            sequence_aux = tl.zeros([BLOCK_E], tl.int64)
            sequence_scores = tl.zeros([BLOCK_E], tl.float32)
            for start in range(0, rows_per_sequence, BLOCK_P):
                index = start + tl.arange(0, BLOCK_P)
                partial = sequence + index * num_sequences
                ok = (index < rows_per_sequence)[:, None] & expert_ok[None, :]
                counts = counts_partial_ptr + partial[:, None] * (2 * E) + expert[None, :]
                sequence_aux += tl.sum(tl.load(counts, mask=ok, other=0).to(tl.int64), 0)
                if SEPARATE_AUX_TOPK:
                    dispatched += tl.sum(tl.load(counts + E, mask=ok, other=0).to(tl.int64), 0)
                sequence_scores += tl.sum(tl.load(scores_partial_ptr + partial[:, None] * E + expert[None, :],
                                                  mask=ok, other=0.0), 0)
            tl.store(sequence_counts_ptr + sequence * E + expert, sequence_aux, mask=expert_ok)
            tl.store(sequence_scores_ptr + sequence * E + expert, sequence_scores, mask=expert_ok)
            aux += sequence_aux
            scores += sequence_scores
    else:
        for start in range(0, num_partials, BLOCK_P):
            partial = start + tl.arange(0, BLOCK_P)
            ok = (partial < num_partials)[:, None] & expert_ok[None, :]
            counts = counts_partial_ptr + partial[:, None] * (2 * E) + expert[None, :]
            aux += tl.sum(tl.load(counts, mask=ok, other=0).to(tl.int64), 0)
            if SEPARATE_AUX_TOPK:
                dispatched += tl.sum(tl.load(counts + E, mask=ok, other=0).to(tl.int64), 0)
            scores += tl.sum(tl.load(scores_partial_ptr + partial[:, None] * E + expert[None, :], mask=ok,
                                     other=0.0), 0)
    if not SEPARATE_AUX_TOPK:
        dispatched = aux
    tl.store(counts_ptr + expert, aux, mask=expert_ok)
    tl.store(counts_ptr + E + expert, dispatched, mask=expert_ok)
    tl.store(score_sums_ptr + expert, scores, mask=expert_ok)
    if SEQUENCE:
        tl.store(sequence_ptr + expert, aux, mask=expert_ok)
        tl.store(sequence_ptr + E + expert, dispatched, mask=expert_ok)
    if BATCH:
        tl.store(batch_ptr + expert, aux, mask=expert_ok)
    if pid == 0:
        z = tl.zeros([BLOCK_P], tl.float32)
        valid = tl.zeros([BLOCK_P], tl.int64)
        for start in range(0, num_programs, BLOCK_P):
            partial = start + tl.arange(0, BLOCK_P)
            ok = partial < num_programs
            z += tl.load(z_partial_ptr + partial, mask=ok, other=0.0)
            valid += tl.load(valid_partial_ptr + partial, mask=ok, other=0).to(tl.int64)
        tl.store(z_sum_ptr, tl.sum(z, 0))
        tl.store(valid_ptr, tl.sum(valid, 0))
        if REGISTER:
            slot = tl.load(counters_ptr)  # the step's registrations so far: this one's tag slot
            if SEQUENCE or BATCH:
                tl.store(slot_ptr, slot)
                for i in tl.static_range(3):
                    tag = tl.load(tags_ptr + slot * 3 + i)
                    if SEQUENCE:
                        tl.store(sequence_ptr + 2 * E + i, tag)
                    if BATCH:
                        tl.store(batch_ptr + E + 1 + i, tag)
            if BATCH:
                tl.store(batch_ptr + E, tl.sum(valid, 0))
            tl.store(counters_ptr, slot + 1)
            if IN_FORWARD:
                tl.store(counters_ptr + 1, tl.load(counters_ptr + 1) + 1)
