"""Patch lifecycle on Megatron-Core: recompute, per-step reset, patch/unpatch, bad input."""

import re

import pytest
import torch

import moe_lbl
from moe_lbl.demo.tiny_gpt import (
    TinyGPT,
    build_gpt,
    build_router,
    forward_loss,
    synthetic_batches,
    train_step,
    wrap_ddp,
)
from moe_lbl.patches import megatron as patch_module
from moe_lbl.patches.megatron import compatibility


def one_micro_batch(spec, seed=0):
    return synthetic_batches(seed, 0, 1, 2, spec.seq_length, spec.vocab_size)[0]


@pytest.mark.parametrize("recompute", [
    dict(recompute_granularity="selective", recompute_modules=["moe"]),
    dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
], ids=["selective-moe", "full"])
def test_counts_are_not_doubled_under_recompute(megatron_world, recompute):
    moe_lbl.patch_megatron(scope="global")
    spec = TinyGPT()
    batch = one_micro_batch(spec)
    buffers = []
    for overrides in ({}, recompute):
        model, _ = build_gpt(TinyGPT(overrides=overrides))
        forward_loss(model, batch).backward()
        balancers = [b for _, b in moe_lbl.iter_balancers(model)]
        assert len(balancers) == spec.num_layers
        buffers.append([b.buffered_counts.clone() for b in balancers])
        assert all(int(b.state.backward_counters[0]) == 1 for b in balancers)  # one back-propagated micro-batch
    num_tokens = batch.tokens.numel()
    for plain, recomputed in zip(*buffers):
        assert torch.equal(plain, recomputed)
        assert int(recomputed[-1]) == num_tokens and int(recomputed[:-1].sum()) == spec.topk * num_tokens


@pytest.mark.parametrize("reentrant", [False, True])
def test_torch_checkpointing_registers_each_micro_batch_once(megatron_world, reentrant):
    """torch.utils.checkpoint recomputes the router in backward: non-reentrant checkpointing had
    registered the micro-batch in forward already (registered twice, the second micro-batch's
    gradient was about 6% off); reentrant checkpointing registers it only then."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from torch.utils.checkpoint import checkpoint

    from moe_lbl.patches.megatron.layer import balancer_of

    g = torch.Generator().manual_seed(4)
    logits = [torch.randn(10, 2, 8, generator=g) for _ in range(2)]
    weight = torch.randn(20, 8, generator=g)

    def run(checkpointed):
        moe_lbl.patch_megatron(scope="global")
        router = build_router(num_experts=8, topk=2, moe_aux_loss_coeff=0.1)
        grads = []
        for x in logits:
            x = x.clone().requires_grad_()
            MoEAuxLossAutoScaler.set_loss_scale(torch.tensor([1.0]))
            if checkpointed:
                probs, _ = checkpoint(router.routing, x, use_reentrant=reentrant)
            else:
                probs, _ = router.routing(x)
            (probs * weight).sum().backward()
            grads.append(x.grad)
        balancer = balancer_of(router)
        state = balancer.state
        result = grads, balancer.buffered_counts.clone(), state.loads.clone(), int(state.backward_counters[0])
        moe_lbl.unpatch_megatron()
        return result

    plain, checkpointed = run(False), run(True)
    for a, b in zip(plain[0], checkpointed[0]):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)
    assert torch.equal(checkpointed[1], plain[1]) and torch.equal(checkpointed[2], plain[2])
    assert checkpointed[3] == plain[3] == 2  # each micro-batch back-propagated, and counted, once


def test_end_step_closes_the_step_of_a_loop_without_finalize_model_grads(megatron_world):
    moe_lbl.patch_megatron(scope="global")
    spec = TinyGPT()
    model, _ = build_gpt(spec)
    for step in range(2):
        forward_loss(model, one_micro_batch(spec, seed=step)).backward()
        balancers = [b for _, b in moe_lbl.iter_balancers(model)]
        assert all(int(b.buffered_counts[-1]) == one_micro_batch(spec).tokens.numel() for b in balancers)
        moe_lbl.end_step(model)
        assert all(not b.buffered_counts.any() and int(b.state.last[-1]) == 1 for b in balancers)


@pytest.mark.parametrize("balancing_type", ["aux_loss", "global_aux_loss"])
def test_buffer_is_emptied_by_finalize_model_grads(megatron_world, megatron_features, balancing_type):
    if balancing_type == "global_aux_loss" and not megatron_features.global_aux_loss:
        pytest.skip(f"megatron-core {megatron_features.version} has no global_aux_loss type")
    moe_lbl.patch_megatron(scope="global")
    spec = TinyGPT(load_balancing_type=balancing_type)
    model, config = build_gpt(spec)
    ddp = wrap_ddp(model, config)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    train_step(ddp, optimizer, synthetic_batches(0, 0, 2, 2, spec.seq_length, spec.vocab_size))
    balancers = [b for _, b in moe_lbl.iter_balancers(ddp)]
    assert all(not b.buffered_counts.any() and int(b.state.last[-1]) == 2 for b in balancers)
    # The next step starts from zero: after one micro-batch the buffer holds just its counts.
    batch = one_micro_batch(spec, seed=1)
    forward_loss(ddp, batch).backward()
    for b in balancers:
        assert int(b.buffered_counts[-1]) == batch.tokens.numel()
        assert torch.equal(b.buffered_counts[:-1], b.state.loads)


def patched_objects():
    """Every attribute the patch replaces on this Megatron-Core, as it is now."""
    return {(id(owner), name): owner.__dict__[name] for owner, name, _ in patch_module.replacements()}


def test_patch_unpatch_round_trip(megatron_world):
    originals = patched_objects()
    assert not moe_lbl.is_patched()
    options = moe_lbl.patch_megatron(scope="global")
    patched = patched_objects()
    assert moe_lbl.is_patched() and all(patched[k] is not originals[k] for k in originals)
    assert moe_lbl.patch_megatron(scope="global") == options and patched_objects() == patched  # idempotent
    router = build_router()
    router.routing(torch.randn(4, 1, 8))
    assert hasattr(router, "_moe_lbl_layer")
    moe_lbl.unpatch_megatron()
    assert not moe_lbl.is_patched() and patched_objects() == originals
    assert not hasattr(router, "_moe_lbl_layer")
    moe_lbl.unpatch_megatron()  # a no-op when not patched
    moe_lbl.patch_megatron(scope="micro", coeff=0.1)
    assert patched_objects() == patched
    moe_lbl.patch_megatron(scope="global", async_sync=False)  # new options re-apply
    assert patch_module.patch_options().async_sync is False and patched_objects() == patched


@pytest.mark.parametrize("kwargs,error", [
    (dict(scope="sequence"), "unknown scope 'sequence'"),
    (dict(coeff=-0.01), "coeff must be a finite number >= 0"),
    (dict(micro_coeff=-1), "micro_coeff must be a finite number >= 0"),
    (dict(scope="micro", micro_coeff=0.01), "with scope='micro' set coeff instead"),
    (dict(scoep="micro"), r"unknown options \['scoep'\]: it takes scope, coeff, micro_coeff, buffer, async_sync, "
                          "kernels and config"),
])
def test_invalid_arguments_patch_nothing(megatron_world, kwargs, error):
    originals = patched_objects()
    with pytest.raises((ValueError, TypeError), match=error):
        moe_lbl.patch_megatron(**kwargs)
    assert not moe_lbl.is_patched() and patched_objects() == originals


def test_unsupported_version_patches_nothing(megatron_world, monkeypatch):
    moe_lbl.patch_megatron(scope="micro")
    before = patched_objects()
    old = patch_module.MegatronInstall("0.11.0", "/checkout/megatron/core", distribution="0.19.2")
    monkeypatch.setattr(compatibility, "megatron_core_install", lambda: old)
    refused = (r"megatron-core 0.11.0 \(imported from /checkout/megatron/core; the installed distribution "
               r"megatron-core 0.19.2 is not the one that runs\) is not supported.*"
               + re.escape(patch_module.SUPPORTED_MEGATRON))
    with pytest.raises(patch_module.UnsupportedMegatronVersion, match=refused):
        moe_lbl.patch_megatron(scope="global")
    monkeypatch.setattr(compatibility, "megatron_core_install", lambda: None)
    with pytest.raises(patch_module.UnsupportedMegatronVersion, match="megatron-core is not installed"):
        moe_lbl.patch_megatron(scope="global")
    monkeypatch.undo()
    assert patch_module.patch_options().scope == "micro" and patched_objects() == before


def test_a_patch_by_another_copy_of_the_module_is_refused(megatron_world):
    from megatron.core.transformer.moe.router import TopKRouter

    originals = patched_objects()
    TopKRouter._moe_lbl_patch = "patched elsewhere"  # as a reloaded copy would leave it
    try:
        with pytest.raises(RuntimeError, match="another copy of moe_lbl.patches.megatron"):
            moe_lbl.patch_megatron()
        assert not moe_lbl.is_patched() and patched_objects() == originals
    finally:
        delattr(TopKRouter, "_moe_lbl_patch")


def test_sinkhorn_with_global_scope_is_refused(megatron_world):
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=1, num_moe_experts=8,
                               moe_router_topk=2, moe_router_load_balancing_type="sinkhorn",
                               moe_aux_loss_coeff=0.0, add_bias_linear=False)
    with pytest.raises(ValueError, match="sinkhorn routing"):
        moe_lbl.patch_megatron(scope="global", config=config)
    assert not moe_lbl.is_patched()
    moe_lbl.patch_megatron(scope="global")  # without config: refused at the router's first forward
    router = build_router(moe_router_load_balancing_type="sinkhorn", moe_aux_loss_coeff=0.0)
    with pytest.raises(ValueError, match="sinkhorn routing"):
        router.routing(torch.randn(4, 1, 8))
