"""The patch on a real Megatron-Core TopKRouter, one rank, in this process."""

from typing import NamedTuple

import pytest
import torch

import moe_lbl
from moe_lbl.demo.tiny_gpt import build_router
from moe_lbl.patches.megatron.configuration import tracker_names
from moe_lbl.patches.megatron.layer import balancer_of
from tests.helpers.megatron import take_tracker


class Routed(NamedTuple):
    probs: torch.Tensor
    routing_map: torch.Tensor
    grad: torch.Tensor  # of the logits
    tracker: dict  # Megatron's tracker values by name


def route(router, logits, padding_mask, probs_weight, loss_scale) -> Routed:
    """One training micro-batch through router.routing."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    logits = logits.clone().requires_grad_()
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor([loss_scale]))
    kwargs = {} if padding_mask is None else {"padding_mask": padding_mask}
    probs, routing_map = router.routing(logits, **kwargs)
    (probs * probs_weight).sum().backward()
    return Routed(probs.detach(), routing_map, logits.grad, take_tracker())


def random_case(seq, batch, num_experts, num_padding, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(seq, batch, num_experts, generator=g)
    padding = None
    if num_padding:
        padding = torch.zeros(seq * batch, dtype=torch.bool)
        padding[torch.randperm(seq * batch, generator=g)[:num_padding]] = True
        padding = padding.view(seq, batch)
    weight = torch.randn(seq * batch, num_experts, generator=g)
    return logits, padding, weight


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
@pytest.mark.parametrize("topk", [1, 2, 4])
@pytest.mark.parametrize("num_padding", [0, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_micro_scope_reproduces_megatron_aux_loss(megatron_world, megatron_features, score_function, topk, num_padding,
                                                  dtype):
    """Megatron's own router tests compare aux losses with ==: micro scope logs the value
    Megatron logs to the bit, and gives its gradient (its arithmetic, in its order)."""
    if num_padding and not megatron_features.padding_mask:
        pytest.skip(f"megatron-core {megatron_features.version} routes without padding masks")
    logits, padding, weight = random_case(13, 3, 8, num_padding, seed=topk * 10 + num_padding)
    logits, weight = logits.to(dtype), weight.to(dtype)
    kwargs = dict(num_experts=8, topk=topk, moe_router_score_function=score_function, moe_aux_loss_coeff=0.3,
                  moe_router_pre_softmax=topk == 1)  # Megatron requires it for softmax top-1
    want = route(build_router(**kwargs), logits, padding, weight, loss_scale=0.5)
    moe_lbl.patch_megatron(scope="micro")
    got = route(build_router(**kwargs), logits, padding, weight, loss_scale=0.5)
    torch.testing.assert_close(got.probs, want.probs, rtol=0, atol=0)
    assert torch.equal(got.routing_map, want.routing_map)
    torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=0)
    assert got.tracker.keys() == want.tracker.keys() == {"load_balancing_loss"}
    torch.testing.assert_close(got.tracker["load_balancing_loss"], want.tracker["load_balancing_loss"], rtol=0, atol=0)


def test_global_equals_micro_with_one_rank_and_one_micro_batch(megatron_world, megatron_features):
    logits, padding, weight = random_case(11, 2, 16, 4 if megatron_features.padding_mask else 0, seed=3)
    moe_lbl.patch_megatron(scope="micro")
    micro = route(build_router(num_experts=16, topk=4), logits, padding, weight, 1.0)
    moe_lbl.patch_megatron(scope="global")
    glob = route(build_router(num_experts=16, topk=4), logits, padding, weight, 1.0)
    torch.testing.assert_close(glob.grad, micro.grad, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(glob.tracker["load_balancing_loss"], micro.tracker["load_balancing_loss"],
                               rtol=1e-6, atol=0)


def test_megatron_flags_map_onto_the_engine(megatron_world, megatron_features):
    moe_lbl.patch_megatron(scope="global", micro_coeff=0.0)
    cases = {("aux_loss", 0.1): ("global", 0.1, 0.0)}
    if megatron_features.global_aux_loss:
        cases.update({
            ("global_aux_loss", 0.2): ("global", 0.2, 0.0),
            (("aux_loss", "global_aux_loss"), (0.001, 0.1)): ("global", 0.1, 0.001),
            (("seq_aux_loss", "global_aux_loss"), (0.5, 0.1)): ("global", 0.1, 0.0),
        })
    for (types, coeffs), (scope, coeff, micro_coeff) in cases.items():
        router = build_router(moe_router_load_balancing_type=list(types) if isinstance(types, tuple) else types,
                              moe_aux_loss_coeff=list(coeffs) if isinstance(coeffs, tuple) else coeffs)
        config = balancer_of(router).config
        assert (config.scope, config.coeff, config.micro_coeff) == (scope, coeff, micro_coeff), types
        # The main term is logged under the name Megatron's training log asks for with these types.
        main = tracker_names(router.config, config)["global"]
        assert main == ("global_load_balancing_loss" if "global_aux_loss" in types else "load_balancing_loss")
    moe_lbl.patch_megatron(scope="global", micro_coeff=1e-4)
    router = build_router(moe_aux_loss_coeff=0.1)
    assert tracker_names(router.config, balancer_of(router).config) == {
        "global": "load_balancing_loss", "micro": "micro_load_balancing_loss"}
    moe_lbl.patch_megatron(scope="micro", coeff=0.05)
    assert balancer_of(build_router(moe_aux_loss_coeff=0.1)).config.coeff == 0.05


def test_seq_aux_loss_is_left_to_megatron(megatron_world, megatron_features):
    if not megatron_features.global_aux_loss:
        pytest.skip(f"megatron-core {megatron_features.version} has no global_aux_loss type")
    logits, _, weight = random_case(8, 2, 8, 0, seed=5)
    kwargs = dict(moe_router_load_balancing_type=["seq_aux_loss", "global_aux_loss"],
                  moe_aux_loss_coeff=[0.1, 0.2])
    moe_lbl.patch_megatron(scope="global")
    tracker = route(build_router(**kwargs), logits, None, weight, 1.0).tracker
    assert set(tracker) == {"seq_load_balancing_loss", "global_load_balancing_loss"}
    assert float(tracker["seq_load_balancing_loss"][0]) > 0


def test_mismatched_flags_fail_with_a_clear_error(megatron_world, megatron_features):
    if not megatron_features.global_aux_loss:
        pytest.skip(f"megatron-core {megatron_features.version} has no global_aux_loss type")
    moe_lbl.patch_megatron(scope="micro")
    router = build_router(moe_router_load_balancing_type="global_aux_loss", moe_aux_loss_coeff=0.1)
    logits = torch.randn(4, 1, 8)
    with pytest.raises(ValueError, match="scope='micro'"):
        router.routing(logits)


@pytest.mark.parametrize("first,then", [(0.01, 0.1), (0.0, 1.0)])
def test_a_coefficient_changed_at_run_time_applies_as_unpatched(megatron_world, first, then):
    """Megatron reads moe_aux_loss_coeff at every forward (a schedule; its own router test builds
    with 0, then sets 1): micro scope must follow, micro-batch by micro-batch."""
    logits, padding, weight = random_case(9, 2, 8, 0, seed=5)

    def two_coefficients():
        router = build_router(num_experts=8, topk=2, moe_aux_loss_coeff=first)
        results = [route(router, logits, padding, weight, 1.0)]
        router.config.moe_aux_loss_coeff = then
        results.append(route(router, logits, padding, weight, 1.0))
        return results

    want = two_coefficients()
    moe_lbl.patch_megatron(scope="micro")
    got = two_coefficients()
    assert not torch.allclose(want[0].grad, want[1].grad)  # the change matters to the gradient
    for g, w in zip(got, want):
        torch.testing.assert_close(g.grad, w.grad, rtol=1e-6, atol=1e-9)
        for name in g.tracker.keys() | w.tracker.keys():  # an entry a run never wrote reads as zero
            zero = torch.zeros(1)
            torch.testing.assert_close(g.tracker.get(name, zero), w.tracker.get(name, zero), rtol=1e-6, atol=0)


def test_fp64_routing_keeps_the_loss_in_fp64(megatron_world, megatron_features):
    """With moe_router_dtype='fp64' Megatron's sigmoid scores, and so its aux loss, are fp64 (its
    softmax scores are fp32 whatever the logits): so is the patch's loss (an fp32 score sum or
    gradient would be off by an fp32 rounding, about 1e-7)."""
    if not hasattr(build_router().config, "moe_router_dtype"):
        pytest.skip(f"megatron-core {megatron_features.version} has no moe_router_dtype")
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "compute_routing_scores_for_aux_loss"):
        pytest.skip(f"megatron-core {megatron_features.version} computes aux scores inside its routing")
    _, scores = moe_utils.compute_routing_scores_for_aux_loss(torch.zeros(2, 4, dtype=torch.float64), 1, "sigmoid")
    if scores.dtype != torch.float64:
        pytest.skip(f"megatron-core {megatron_features.version} computes sigmoid aux scores in {scores.dtype}")
    logits, padding, weight = random_case(13, 3, 8, 0, seed=11)
    logits, weight = logits.double(), weight.double()
    kwargs = dict(num_experts=8, topk=2, moe_aux_loss_coeff=0.3, moe_router_dtype="fp64",
                  moe_router_score_function="sigmoid")
    want = route(build_router(**kwargs), logits, padding, weight, loss_scale=0.5)
    moe_lbl.patch_megatron(scope="micro")
    got = route(build_router(**kwargs), logits, padding, weight, loss_scale=0.5)
    assert got.grad.dtype == want.grad.dtype == torch.float64
    torch.testing.assert_close(got.grad, want.grad, rtol=1e-12, atol=1e-15)
    # The tracker stores fp32: both fp64 values round to the same one.
    torch.testing.assert_close(got.tracker["load_balancing_loss"], want.tracker["load_balancing_loss"], rtol=0, atol=0)


def test_repeated_mtp_router_logs_and_weighs_as_megatron(megatron_world, megatron_features):
    """A repeated MTP layer's router (0.17+) logs after the decoder layers and weighs its loss
    1/mtp_num_layers; without that, the gradient and the logged value are mtp_num_layers times
    Megatron's and land in the decoder's row."""
    import inspect

    from megatron.core.transformer.moe.router import TopKRouter

    if "is_mtp_layer" not in inspect.signature(TopKRouter.__init__).parameters:
        pytest.skip(f"megatron-core {megatron_features.version} has no MTP routers")
    logits, padding, weight = random_case(7, 2, 8, 3 if megatron_features.padding_mask else 0, seed=11)
    kwargs = dict(is_mtp_layer=True, mtp_num_layers=3, mtp_use_repeated_layer=True, moe_aux_loss_coeff=0.2)
    want = route(build_router(**kwargs), logits, padding, weight, loss_scale=1.0)
    moe_lbl.patch_megatron(scope="micro")
    got = route(build_router(**kwargs), logits, padding, weight, loss_scale=1.0)
    torch.testing.assert_close(got.grad, want.grad, rtol=1e-6, atol=1e-9)
    lbl = want.tracker["load_balancing_loss"]
    assert lbl.shape == (4,) and lbl[1] > 0 and lbl[0] == 0  # layer 1 of the MTP block: row 1 + num_layers
    torch.testing.assert_close(got.tracker["load_balancing_loss"], lbl, rtol=1e-6, atol=0)


def test_balancing_scores_are_megatrons_for_each_score_function(megatron_world):
    """moe_lbl's balancing scores (record_routing, the demo's analysis) against Megatron's
    compute_routing_scores_for_aux_loss for every score function it has (sqrtsoftplus: 0.17+)."""
    from megatron.core.transformer.moe import moe_utils

    from moe_lbl.scores import SCORE_FUNCTIONS, balancing_scores

    if not hasattr(moe_utils, "compute_routing_scores_for_aux_loss"):
        pytest.skip("compute_routing_scores_for_aux_loss is 0.14+")
    logits = torch.randn(10, 8, generator=torch.Generator().manual_seed(2))
    for score_function in SCORE_FUNCTIONS:
        try:
            _, want = moe_utils.compute_routing_scores_for_aux_loss(logits, 2, score_function)
        except ValueError:
            continue  # a score function this version does not have
        torch.testing.assert_close(balancing_scores(logits, score_function), want, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="unknown score function 'relu': choose from softmax, sigmoid"):
        balancing_scores(logits, "relu")


def test_quantile_balancing_is_refused_with_a_loss(megatron_world, megatron_features):
    """quantile_balancing (0.19+) balances by its bias and Megatron asserts no aux loss is on; an
    explicit coeff would enable one and fail inside Megatron's router build with its own message."""
    from megatron.core.transformer.moe.router import TopKRouter

    if "quantile_balancing" not in TopKRouter.__dict__:
        pytest.skip(f"megatron-core {megatron_features.version} has no quantile_balancing routing")
    kwargs = dict(moe_router_load_balancing_type="quantile_balancing", moe_aux_loss_coeff=0.0)
    moe_lbl.patch_megatron(scope="micro")
    build_router(**kwargs)  # no loss: Megatron's routing as it is
    moe_lbl.patch_megatron(scope="micro", coeff=0.01)
    with pytest.raises(ValueError, match="quantile_balancing routing balances tokens by itself"):
        build_router(**kwargs)


def test_megatron_log_shows_max_vio_beside_the_losses(megatron_world, megatron_features):
    """With the patch on, the tracker's report (what Megatron's training log, TensorBoard and wandb
    writers print, 0.18+) carries the per-layer-averaged MaxVio of the micro-batches and of the
    global batch; unpatched it has neither."""
    if not megatron_features.metrics_tracker:
        pytest.skip(f"megatron-core {megatron_features.version} logs without moe_logging's metrics tracker")
    from megatron.core.transformer.moe.moe_logging import MoEMetricsTracker

    moe_lbl.patch_megatron(scope="global")
    router = build_router(num_experts=8, topk=2)
    for seed in (1, 2):  # two micro-batches of one step
        logits, _, weight = random_case(9, 2, 8, 0, seed=seed)
        route(router, logits, None, weight, loss_scale=0.5)
    balancer_of(router).end_step()
    want = moe_lbl.balance_metrics(router)[0]
    scalars = {}

    class Writer:
        def add_scalar(self, name, value, iteration):
            scalars[name] = float(value)

    def report():
        return MoEMetricsTracker().report(loss_scale=0.5, iteration=1, writer=Writer(), num_layers=1,
                                          track_names=["load_balancing_loss"], total_loss_dict={})

    log = report()
    assert 0 < want.global_max_vio < want.micro_max_vio
    assert scalars["micro_max_vio"] == pytest.approx(want.micro_max_vio, rel=1e-6)
    assert scalars["global_max_vio"] == pytest.approx(want.global_max_vio, rel=1e-6)
    assert "micro_max_vio:" in log and "global_max_vio:" in log
    moe_lbl.unpatch_megatron()
    scalars.clear()
    assert "max_vio" not in report() and not scalars
