"""The fused router kernels against a float64 reference and Megatron-Core's own implementation.

On CPU they run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest); the `cuda`
variants (marker `gpu`) run the same checks compiled where a GPU is present.
"""


import pytest
import torch

from moe_lbl.kernels import Launch, fused_topk_router, topk_routing_with_score_function
from moe_lbl.kernels import topk_router as kernel_module
from moe_lbl.kernels.launcher import interpreting
from moe_lbl.kernels.topk_router_reference import near_tie_rows, reference_routing
from moe_lbl.selftest.kernels import EPS, GRAD_TOL, PROBS_TOL, Case, inputs, selection_near_ties
from moe_lbl.selftest.kernels import poisoned as poison_outputs


def case(id, *args, **kwargs):
    return pytest.param(Case(*args, **kwargs), id=id)


CASES = [
    case("softmax-pre-E8-k1", 8, 1, 300, torch.float32, pre=True),
    case("softmax-E8-k2-bf16-pad", 8, 2, 517, torch.bfloat16, padding=0.2),
    case("softmax-E60-k6-scale", 60, 6, 300, torch.float32, scaling=2.5),
    case("softmax-pre-E64-k4-bf16-pad", 64, 4, 517, torch.bfloat16, pre=True, padding=0.3),
    case("softmax-pre-E64-k8-groups8x4-scale", 64, 8, 300, torch.float32, pre=True, groups=8, group_topk=4,
         scaling=1.5),
    case("softmax-E160-k6-groups8x3-bf16-pad", 160, 6, 300, torch.bfloat16, groups=8, group_topk=3, padding=0.1),
    case("sigmoid-bias-E256-k8-groups8x4-scale", 256, 8, 300, torch.float32, score="sigmoid", groups=8, group_topk=4,
         bias=True, scaling=2.5),
    case("sigmoid-bias-E256-k8-groups8x4-bf16-pad", 256, 8, 300, torch.bfloat16, score="sigmoid", groups=8,
         group_topk=4, bias=True, padding=0.25),
    case("sigmoid-E64-k1", 64, 1, 300, torch.float32, score="sigmoid"),
    case("sigmoid-E60-k4-bf16-pad", 60, 4, 517, torch.bfloat16, score="sigmoid", padding=0.2),
    case("sigmoid-bias-E160-k2", 160, 2, 300, torch.float32, score="sigmoid", bias=True),
    case("softmax-E256-k4-fp16", 256, 4, 300, torch.float16),
    case("softmax-pre-E8-k8", 8, 8, 300, torch.float32, pre=True),
    case("sigmoid-E64-k6-groups4x2-fp16-scale", 64, 6, 300, torch.float16, score="sigmoid", groups=4, group_topk=2,
         scaling=2.0),
]


@pytest.fixture(params=[pytest.param("cpu", id="interpreter"), pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")])
def device(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if request.param == "cpu" and not interpreting():
        pytest.skip("Triton compiles for the GPU here: the cuda variant runs these checks")
    return torch.device(request.param)


@pytest.fixture
def poisoned():
    """Output buffers start as NaN / -7 / True, so an element the kernel never writes shows."""
    with poison_outputs():
        yield


def launch_for(device):
    # The interpreter's cost is per program: few, large blocks, still not dividing T evenly.
    return Launch(block_t=128, num_programs=3) if device.type == "cpu" else Launch()


def make_inputs(c, seed, device):
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return (*inputs(c, seed), to)


def assert_counts_close(got, want_map, near_rows, valid):
    """Counts equal, except that each near-tie row may move one choice (two counts) per slot."""
    want = (want_map & valid[:, None]).sum(0)
    allowed = 2 * int((near_rows & valid).sum()) * want_map.shape[1]
    assert int((got.cpu() - want).abs().sum()) <= allowed, (got, want)
    if allowed == 0:
        assert torch.equal(got.cpu(), want)


OUTPUTS = {"both": dict(dense=True, sparse=True), "dense": dict(dense=True, sparse=False),
           "sparse": dict(dense=False, sparse=True)}


def kernel_selection(out, T, k):
    """The kernel's chosen experts [T, k]: topk_indices (in selection order), else from the map."""
    if out.topk_indices is not None:
        return out.topk_indices.cpu().long()
    return out.routing_map.cpu().nonzero()[:, 1].view(T, k)


@pytest.mark.parametrize("outputs", list(OUTPUTS))
@pytest.mark.parametrize("c", CASES)
def test_forward_matches_reference(c, outputs, device, poisoned):
    logits, bias, padding, to = make_inputs(c, seed=c.E * 31 + c.k, device=device)
    out = fused_topk_router(to(logits), c.k, expert_bias=to(bias), padding_mask=to(padding),
                            launch=launch_for(device), **OUTPUTS[outputs], **c.routing())
    assert (out.probs is None, out.topk_probs is None) == (not OUTPUTS[outputs]["dense"], outputs == "dense")
    ref = reference_routing(logits, c.k, expert_bias=bias, **c.routing())
    T, k = c.T, c.k
    valid = torch.ones(T, dtype=torch.bool) if padding is None else ~padding
    indices = kernel_selection(out, T, k)
    selected = torch.zeros(T, c.E, dtype=torch.bool).scatter(1, indices, True)

    # Every row holds exactly k distinct choices, consistent across map, indices and topk_probs.
    assert torch.equal(selected.sum(1), torch.full((T,), k))
    if outputs == "both":
        assert torch.equal(out.routing_map.cpu(), selected)
        assert torch.equal(out.topk_probs.cpu(), out.probs.cpu().gather(1, indices))
    # The same selection as the reference (ties toward the lower index; in selection order where
    # topk_indices tell it) wherever no near-tie could flip it; elsewhere still a valid top-k.
    near = selection_near_ties(ref, c)
    if out.topk_indices is not None:
        assert torch.equal(indices[~near], ref.indices[~near])
    ref_selected = torch.zeros(T, c.E, dtype=torch.bool).scatter(1, ref.indices, True)
    assert torch.equal(selected[~near], ref_selected[~near])
    chosen_min = torch.where(selected, ref.select, torch.inf).amin(1)
    other_max = torch.where(selected, -torch.inf, ref.select).amax(1)
    scale = ref.select.abs().nan_to_num(posinf=0, neginf=0).amax(1).clamp(min=1)
    grouped_near = (near_tie_rows(ref.group_scores, c.group_topk, 1e-6) if ref.group_scores is not None
                    else torch.zeros(T, dtype=torch.bool))
    assert bool((chosen_min >= other_max - 8 * EPS[c.dtype] * scale)[~grouped_near].all())
    # Probabilities of the kernel's selection.
    ref_mine = reference_routing(logits, k, expert_bias=bias, indices=indices, **c.routing())
    rtol, atol = PROBS_TOL[c.dtype]
    if out.probs is not None:
        torch.testing.assert_close(out.probs.cpu().double(), ref_mine.probs, rtol=rtol, atol=atol)
    if out.topk_probs is not None:
        torch.testing.assert_close(out.topk_probs.cpu().double(), ref_mine.topk_probs, rtol=rtol, atol=atol)

    # Statistics over valid tokens.
    stats = out.stats
    assert int(stats.valid_tokens) == int(valid.sum())
    assert torch.equal(stats.dispatch_counts.cpu(), (selected & valid[:, None]).sum(0))
    aux_map = torch.zeros(T, c.E, dtype=torch.bool).scatter(1, ref.aux_indices, True)
    aux_near = near_tie_rows(ref.aux_scores.detach(), k, 4 * EPS[c.aux_dtype])
    assert_counts_close(stats.aux_counts, aux_map, aux_near, valid)
    torch.testing.assert_close(stats.score_sums.cpu().double(), ref.aux_scores[valid].sum(0).detach(),
                               rtol=1e-5 if c.aux_dtype == torch.float32 else 1e-3, atol=T * EPS[c.aux_dtype])
    torch.testing.assert_close(stats.z_sum.cpu().double(), (ref.lse[valid] ** 2).sum(), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("c", CASES)
def test_forward_matches_megatron(c, device):
    """Megatron-Core's own implementation, wherever no near-tie can flip a choice."""
    moe_utils = pytest.importorskip("megatron.core.transformer.moe.moe_utils")
    logits, bias, padding, to = make_inputs(c, seed=c.E * 31 + c.k, device=device)
    out = fused_topk_router(to(logits), c.k, expert_bias=to(bias), padding_mask=to(padding),
                            launch=launch_for(device), **c.routing())
    probs, routing_map = out.probs.cpu(), out.routing_map.cpu()
    ref = reference_routing(logits, c.k, expert_bias=bias, **c.routing())
    near = selection_near_ties(ref, c)
    k = c.k
    valid = torch.ones(c.T, dtype=torch.bool) if padding is None else ~padding
    rtol, atol = PROBS_TOL[c.dtype]
    m_probs, m_map = moe_utils.topk_routing_with_score_function(logits, k, expert_bias=bias, **c.routing())
    assert torch.equal(m_map[~near], routing_map[~near])
    torch.testing.assert_close(probs[~near].double(), m_probs[~near].double(), rtol=rtol, atol=atol)
    m_aux_map, _ = moe_utils.compute_routing_scores_for_aux_loss(logits, k, c.score, padding_mask=padding)
    aux_near = near_tie_rows(ref.aux_scores.detach(), k, 4 * EPS[c.aux_dtype])
    assert_counts_close(out.stats.aux_counts, m_aux_map, aux_near, valid)


@pytest.mark.parametrize("outputs", list(OUTPUTS))
@pytest.mark.parametrize("c", CASES)
def test_backward_matches_float64_autograd(c, outputs, device):
    """The gradient reaching the logits from whichever outputs are used (the dense path reads the
    chosen experts from the routing map, the sparse one from topk_indices), plus a balancing loss
    linear in score_sums and a z-loss in z_sum."""
    logits, bias, padding, to = make_inputs(c, seed=c.E * 17 + c.k, device=device)
    g = torch.Generator().manual_seed(c.T)
    grad_probs = torch.randn(c.T, c.E, generator=g).to(c.dtype)
    grad_topk_probs = torch.randn(c.T, c.k, generator=g).to(c.dtype)
    lbl = torch.randn(c.E, generator=g) * 0.1
    z = 0.03
    x = to(logits).clone().requires_grad_()
    out = fused_topk_router(x, c.k, expert_bias=to(bias), padding_mask=to(padding), launch=launch_for(device),
                            **OUTPUTS[outputs], **c.routing())
    loss = (out.stats.score_sums * to(lbl)).sum() + z / 2 * out.stats.z_sum
    if out.probs is not None:
        loss = loss + (out.probs * to(grad_probs)).sum()
    if out.topk_probs is not None:
        loss = loss + (out.topk_probs * to(grad_topk_probs)).sum()
    loss.backward()

    x64 = logits.double().requires_grad_()
    ref = reference_routing(logits, c.k, expert_bias=bias, indices=kernel_selection(out, c.T, c.k), x=x64,
                            **c.routing())
    valid = torch.ones(c.T, dtype=torch.bool) if padding is None else ~padding
    total = (ref.aux_scores[valid] * lbl.double()).sum() + z / 2 * (ref.lse[valid] ** 2).sum()
    if out.probs is not None:
        total = total + (ref.probs * grad_probs.double()).sum()
    if out.topk_probs is not None:
        total = total + (ref.topk_probs * grad_topk_probs.double()).sum()
    total.backward()
    rtol, atol = GRAD_TOL[c.dtype]
    torch.testing.assert_close(x.grad.cpu().double(), x64.grad, rtol=rtol, atol=atol * float(x64.grad.abs().max()))


def assert_ties_routed_as_reference(out, ref, T, E):
    """The selection of ref (ties toward the lower index): in order where topk_indices tell it,
    else as the map; the aux top-k counts alike."""
    if out.topk_indices is not None:
        assert torch.equal(out.topk_indices.cpu().long(), ref.indices)
    if out.routing_map is not None:
        assert torch.equal(out.routing_map.cpu(), torch.zeros(T, E, dtype=torch.bool).scatter(1, ref.indices, True))
    aux_map = torch.zeros(T, E, dtype=torch.bool).scatter(1, ref.aux_indices, True)
    assert torch.equal(out.stats.aux_counts.cpu(), aux_map.sum(0))


# Dense outputs alone select fp32 scores by value keys (no index in the key, ties resolved by the
# merge's order), sparse ones by (value, index) keys: both must break ties alike.
TIE_OUTPUTS = [pytest.param(dict(dense=True, sparse=True), id="sparse"),
               pytest.param(dict(dense=True, sparse=False), id="dense")]


@pytest.mark.parametrize("outputs", TIE_OUTPUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("score,pre,groups", [("softmax", False, None), ("softmax", True, None),
                                              ("sigmoid", False, None), ("softmax", False, (4, 2))])
def test_exact_ties_break_toward_the_lower_index(dtype, score, pre, groups, outputs, device, poisoned):
    g = torch.Generator().manual_seed(7)
    logits = torch.randint(-4, 5, (300, 16), generator=g).to(dtype)  # small integers: many exact ties
    routing = dict(score_function=score, use_pre_softmax=pre, num_groups=groups and groups[0],
                   group_topk=groups and groups[1])
    out = fused_topk_router(logits.to(device), 4, launch=launch_for(device), **outputs, **routing)
    ref = reference_routing(logits, 4, **routing)
    assert_ties_routed_as_reference(out, ref, 300, 16)


@pytest.mark.parametrize("outputs", TIE_OUTPUTS)
def test_exact_ties_of_biased_scores_and_group_scores_break_toward_the_lower_index(outputs, device, poisoned):
    """fp32 selection keys (bf16 sigmoid + an fp32 bias, exact sums here) and group scores, with
    many exact ties inside and across each thread's run of experts."""
    g = torch.Generator().manual_seed(8)
    logits = torch.randint(-4, 5, (300, 64), generator=g).to(torch.bfloat16)
    bias = torch.randint(-2, 3, (64,), generator=g).float() / 16
    routing = dict(score_function="sigmoid", num_groups=8, group_topk=4, expert_bias=bias)
    ref = reference_routing(logits, 8, **routing)
    out = fused_topk_router(logits.to(device), 8, **{**routing, "expert_bias": bias.to(device)},
                            launch=launch_for(device), **outputs)
    assert_ties_routed_as_reference(out, ref, 300, 64)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_without_the_z_loss_nothing_else_changes(score, device, poisoned):
    """compute_z=False drops z_sum (and the logsumexp per token); every other output is the same,
    and the backward of the rest is too."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(301, 24, generator=g)
    padding = torch.rand(301, generator=g) < 0.2
    runs = []
    for compute_z in (True, False):
        x = logits.to(device).requires_grad_()
        out = fused_topk_router(x, 4, score_function=score, padding_mask=padding.to(device), compute_z=compute_z,
                                launch=launch_for(device))
        ((out.probs * torch.arange(24.0, device=device)).sum() + out.stats.score_sums.sum()).backward()
        runs.append((out, x.grad))
    (with_z, grad_with_z), (without_z, grad_without_z) = runs
    assert with_z.stats.z_sum is not None and without_z.stats.z_sum is None
    for name in ("aux_counts", "dispatch_counts", "score_sums", "valid_tokens"):
        assert torch.equal(getattr(with_z.stats, name), getattr(without_z.stats, name)), name
    assert torch.equal(with_z.probs, without_z.probs) and torch.equal(with_z.topk_indices, without_z.topk_indices)
    assert torch.equal(grad_with_z, grad_without_z)


def test_results_are_deterministic(device):
    logits = torch.randn(1000, 64).to(device)
    runs = [fused_topk_router(logits, 4, launch=launch_for(device)) for _ in range(2)]
    for a, b in zip(runs[0].stats.__dict__.values(), runs[1].stats.__dict__.values()):
        assert (a is None and b is None) or torch.equal(a, b)
    assert torch.equal(runs[0].probs, runs[1].probs)


def test_no_tokens(device):
    out = fused_topk_router(torch.empty(0, 8, device=device), 2, launch=launch_for(device))
    assert out.probs.shape == (0, 8) and out.topk_indices.shape == (0, 2)
    assert int(out.stats.aux_counts.sum()) == 0 and int(out.stats.valid_tokens) == 0


def test_megatron_signature_returns_probs_and_map(device):
    moe_utils = pytest.importorskip("megatron.core.transformer.moe.moe_utils")
    logits = torch.randn(77, 32)
    probs, routing_map = topk_routing_with_score_function(logits.to(device), 4, scaling_factor=2.0)
    m_probs, m_map = moe_utils.topk_routing_with_score_function(logits, 4, scaling_factor=2.0)
    assert torch.equal(routing_map.cpu(), m_map)
    torch.testing.assert_close(probs.cpu(), m_probs)


@pytest.mark.parametrize("kwargs,error", [
    (dict(logits=torch.zeros(2, 3, 8), topk=2), "2-D tensor"),
    (dict(logits=torch.zeros(4, 8, dtype=torch.int32), topk=2), "dtype must be one of"),
    (dict(logits=torch.zeros(8, 4).t(), topk=2), "contiguous along the expert dimension"),
    (dict(logits=torch.zeros(4, 8), topk=9), r"topk must be in \[1, min\(num_experts, 16\)\] = \[1, 8\]"),
    (dict(logits=torch.zeros(4, 64), topk=17), r"= \[1, 16\], got 17"),
    (dict(logits=torch.zeros(4, 60), topk=4, num_groups=8, group_topk=2), "divisible by num_groups"),
    (dict(logits=torch.zeros(4, 64), topk=4, num_groups=8, group_topk=9), "group_topk must be in"),
    (dict(logits=torch.zeros(4, 8), topk=2, score_function="relu"), "score_function must be"),
    (dict(logits=torch.zeros(4, 8), topk=2, expert_bias=torch.zeros(7)), r"expert_bias must have shape \(8,\)"),
    (dict(logits=torch.zeros(4, 8), topk=2, padding_mask=torch.zeros(4)), "padding_mask must be a bool tensor"),
])
def test_bad_input_gets_a_clear_error(kwargs, error):
    with pytest.raises((ValueError, TypeError), match=error):
        fused_topk_router(kwargs.pop("logits"), kwargs.pop("topk"), **kwargs)


def test_router_replay_and_cpu_without_interpreter_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="router_replay is not supported"):
        topk_routing_with_score_function(torch.zeros(4, 8), 2, router_replay=object())
    if not torch.cuda.is_available():
        monkeypatch.setattr(kernel_module, "interpreting", lambda: False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            fused_topk_router(torch.zeros(4, 8), 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_and_inf_logits_route_as_megatron_does(dtype, device, poisoned):
    """torch.topk ranks NaN above every number: a row with a NaN logit chooses that expert, an
    all-NaN row still chooses k experts. The kernels once skipped a NaN expert and wrote index
    2**30 for an all-NaN row."""
    moe_utils = pytest.importorskip("megatron.core.transformer.moe.moe_utils")
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(40, 16, generator=g)
    logits[3, 5] = float("nan")
    logits[7] = float("nan")
    logits[9, 2] = float("inf")
    logits[11, 4] = float("-inf")
    logits = logits.to(dtype)
    for pre in (False, True) if dtype == torch.float32 else (False,):  # bf16 softmax scores tie often
        out = fused_topk_router(logits.to(device), 4, use_pre_softmax=pre, launch=launch_for(device))
        indices = out.topk_indices.cpu().long()
        assert bool(((indices >= 0) & (indices < 16)).all())
        assert torch.equal(out.routing_map.cpu().sum(1), torch.full((40,), 4))
        m_probs, m_map = moe_utils.topk_routing_with_score_function(logits, 4, use_pre_softmax=pre)
        selection = torch.softmax(logits.float(), -1) if pre else logits.float()
        tied = selection.isnan().all(1)  # all NaN: any 4 experts are Megatron's choice
        assert int(tied.sum()) == (3 if pre else 1)  # rows 3 and 9 have NaN softmax scores
        finite = torch.isfinite(selection).all(1)
        tied |= finite & near_tie_rows(selection, 4, 0.0)  # exact ties among numbers (bf16 has some)
        assert torch.equal(out.routing_map.cpu()[~tied], m_map[~tied])
        if not pre:
            assert bool(out.routing_map[3, 5]) and not bool(out.routing_map[11, 4])
        # NaN where Megatron has NaN, the same values elsewhere.
        probs = out.probs.cpu().float()
        assert torch.equal(probs.isnan()[~tied], m_probs.float().isnan()[~tied])
        numbers = ~m_probs.float().isnan() & ~tied[:, None]
        torch.testing.assert_close(probs[numbers], m_probs.float()[numbers], **dict(zip(("rtol", "atol"),
                                                                                     PROBS_TOL[dtype])))


def test_load_router_compiles_each_specialization_once_and_keeps_its_verdict(monkeypatch):
    """The kernels own their compile-and-load cache: one compile per specialization (what Triton
    compiles an integer for: 1, a multiple of 16, or other), a failure raised again each time."""
    compiled = []

    def compile_and_load(logits, topk, gradients, options):
        compiled.append((logits.shape[0], gradients))
        if logits.shape[0] == 32:
            raise RuntimeError("out of resource: shared memory")

    monkeypatch.setattr(kernel_module, "_compile_and_load", compile_and_load)
    monkeypatch.setattr(kernel_module, "_loads", {})
    for tokens, gradients in ((12, ("probs",)), (13, ("probs",)), (16, ("probs",)), (13, ())):
        kernel_module.load_router(torch.empty(tokens, 8), 2, gradients=gradients)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="shared memory"):
            kernel_module.load_router(torch.empty(32, 8), 2, gradients=("probs", "score_sums"))
    assert compiled == [(12, ("probs",)), (16, ("probs",)), (13, ()), (32, ("probs", "score_sums"))]
    with pytest.raises(ValueError, match="unknown gradients \\['logits'\\]: choose from probs"):
        kernel_module.load_router(torch.empty(4, 8), 2, gradients=("logits",))


def test_a_padding_mask_of_another_length_is_the_same_specialization(monkeypatch):
    """Triton specializes a pointer on its dtype, not on its tensor's shape: routers whose token
    count changes (within one integer specialization) compile and check their kernels once."""
    compiled = []
    monkeypatch.setattr(kernel_module, "_compile_and_load", lambda logits, *args: compiled.append(logits.shape[0]))
    monkeypatch.setattr(kernel_module, "_loads", {})
    for tokens in (12, 13, 28):
        kernel_module.load_router(torch.empty(tokens, 8), 2, padding_mask=torch.zeros(tokens, dtype=torch.bool))
    kernel_module.load_router(torch.empty(12, 8), 2, padding_mask=None)  # no mask: another specialization
    assert compiled == [12, 12]
    key = kernel_module.specialization_key(torch.empty(12, 8), 2, padding_mask=torch.zeros(12, dtype=torch.bool))
    kernel_module.load_router(torch.empty(13, 8), 2, specialization=key)  # the caller's key is the one used
    assert compiled == [12, 12]
