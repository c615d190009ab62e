import os
import sys
import tempfile

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter, which Triton reads when the
# kernels are defined: set it before anything imports moe_lbl.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    # The Megatron-Core harness runs on CPU with gloo (its shims refuse CUDA machines); there the
    # GPU variants of the kernel tests run instead.
    if torch.cuda.is_available():
        skip = pytest.mark.skip(reason="CPU harness (gloo and CPU shims); this machine has CUDA")
        for item in items:
            if "megatron_world" in getattr(item, "fixturenames", ()) or item.get_closest_marker("cpu_harness"):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def megatron_world():
    """A one-rank gloo world with Megatron's parallel state and the CPU shims, in this process."""
    from moe_lbl.demo.tiny_gpt import distributed

    with tempfile.TemporaryDirectory() as tmp:
        with distributed(0, 1, os.path.join(tmp, "init")):
            yield


@pytest.fixture(autouse=True)
def clean_state():
    """Every test starts unpatched, with an empty aux-loss tracker, no aux-loss scale and a fresh seed."""
    import moe_lbl

    moe_lbl.unpatch_megatron()
    torch.manual_seed(0)
    yield
    moe_lbl.unpatch_megatron()
    if "megatron.core.transformer.moe.moe_utils" in sys.modules:
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        from tests.helpers.megatron import clear_tracker

        clear_tracker()
        # A scale a test set would otherwise reach the next (a 0-d one even breaks its set_loss_scale).
        MoEAuxLossAutoScaler.main_loss_backward_scale = None


@pytest.fixture(scope="session")
def megatron_features():
    """What the installed Megatron-Core offers (padding masks, global_aux_loss, ...)."""
    from moe_lbl.patches.megatron import features

    return features()
