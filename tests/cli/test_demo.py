"""The tiny Megatron-Core GPT-MoE trains under the patch with 2 data-parallel gloo ranks."""

import math
import os
import subprocess
import sys

import pytest

from moe_lbl.demo.compare import BALANCES, DemoOptions, _train_rank, silence_known_notices
from moe_lbl.demo.tiny_gpt import spawn

pytestmark = pytest.mark.cpu_harness


def test_training_with_dp2_reduces_loss_and_reports_balance(tmp_path):
    # out: tests write only in their temporary folders, never over a user's moe-lbl-demo/ results.
    options = DemoOptions(steps=8, micro_batches=2, seq_length=32, num_experts=8, eval_batches=1, out=str(tmp_path))
    ranks = spawn(_train_rank, 2, options, "global", 0)
    for result in ranks:
        assert len(result.losses) == options.steps
        assert result.losses[-1] < result.losses[0] - 0.1
        for value in result.balancing_losses:
            assert 0.9 < value < 2.0  # N_E sum f P is 1 when perfectly balanced
        for vio in result.micro_max_vio + result.global_max_vio:
            assert math.isfinite(vio) and vio >= 0
    # Reduced values are identical on every rank; rank 0 evaluated every domain.
    assert ranks[0].balancing_losses == pytest.approx(ranks[1].balancing_losses)
    assert ranks[0].global_max_vio == ranks[1].global_max_vio
    assert set(ranks[0].val_loss) == set(options.domains) and not ranks[1].val_loss
    assert all(0 < f <= 1 for f in ranks[0].max_frequency.values())
    assert sorted(os.listdir(tmp_path)) == ["routing_global_seed0.json"]


def test_two_step_demo_writes_the_three_balances_trend_heatmaps_and_wandb_runs(tmp_path):
    result = moe_lbl("demo", "--steps", "2", "--seeds", "0", "1", "--micro-batches", "2", "--seq-length", "16",
                     "--experts", "4",
                     "--out", str(tmp_path), env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    for notice in ("Apex is not installed", "absl.logging is not installed", "GPTModel IS DEPRECATED"):
        assert notice not in result.stderr  # known upstream notices are not shown
    header = result.stdout.splitlines()[[i for i, line in enumerate(result.stdout.splitlines())
                                         if line.lstrip().startswith("micro")][-1]].split()
    assert header == ["micro", "global-no-buffer", "global"]
    sizes = next(line for line in result.stdout.splitlines() if line.startswith("balance tokens")).split()[2:]
    assert sizes == ["32", "64", "128"]  # 2 x 16 tokens a micro-batch; x 2 ranks; x 2 micro-batches
    for line in ("val loss", "loss code", "loss arithmetic", "MaxVio micro", "MaxVio global", "max freq",
                 "top-k score", "divergence", "s/step (CPU)", "global-no-buffer - micro, val loss, per seed: ",
                 "global - micro, divergence, per seed: ", "It is not the method's cost"):
        assert line in result.stdout
    assert (tmp_path / "summary.txt").read_text().startswith(" ")
    assert (tmp_path / "balance_trend.png").stat().st_size > 10000
    for scope in ("micro", "global-no-buffer", "global"):
        assert (tmp_path / f"expert_frequency_{scope}.png").stat().st_size > 1000
        assert (tmp_path / f"routing_{scope}_seed1.json").exists()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 6
    analyzed = moe_lbl("analyze", str(tmp_path / "routing_global_seed0.json"))
    assert analyzed.returncode == 0 and "max frequency" in analyzed.stdout and "domain divergence" in analyzed.stdout
    for domain in ("code", "english", "arithmetic", "data"):
        assert domain in analyzed.stdout
    bad = moe_lbl("analyze", str(tmp_path / "summary.txt"))
    assert bad.returncode == 2 and "summary.txt" in bad.stderr


def test_balance_batch_sizes_follow_the_scope_and_the_buffer():
    options = DemoOptions(ranks=2, micro_batches=4, micro_batch_size=2, seq_length=64)
    assert {name: balance.tokens(options) for name, balance in BALANCES.items()} == {
        "micro": 128, "global-no-buffer": 256, "global": 1024}
    assert DemoOptions().scopes == ("micro", "global-no-buffer", "global")


def test_only_the_known_notices_are_silenced():
    import logging
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        silence_known_notices()
        warnings.warn("Apex is not installed, so ...", UserWarning, stacklevel=1)
        warnings.warn("moe-lbl: something of our own", UserWarning, stacklevel=1)
        warnings.warn("a new upstream notice", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["moe-lbl: something of our own", "a new upstream notice"]
    logger = logging.getLogger("megatron.core.models.gpt.gpt_model")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        logger.warning("GPTModel IS DEPRECATED. GPTModel is only accepting critical bug fixes")
        logger.warning("another GPTModel warning")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["another GPTModel warning"]


def moe_lbl(*args, env=None):
    return subprocess.run([sys.executable, "-m", "moe_lbl.cli", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


def test_info_names_versions_and_support():
    result = moe_lbl("info")
    assert result.returncode == 0, result.stderr
    from moe_lbl.patches.megatron import megatron_core_version

    for expected in ("torch", "triton", f"megatron-core      {megatron_core_version()}", "patch supported    yes",
                     "TopKRouter._apply_aux_loss", "moe-lbl demo"):
        assert expected in result.stdout


@pytest.mark.parametrize("args,error", [
    (["--steps", "0"], "steps must be >= 1"),
    (["--ranks", "100000"], "must not exceed this machine's"),
    (["--topk", "17"], "topk (17) must not exceed num_experts (16)"),
    (["--domains", "code", "klingon"], "unknown domains ['klingon']"),
    (["--coeff", "-1"], "coeff must be a finite number >= 0, got -1.0"),
    (["--coeff", "nan"], "coeff must be a finite number >= 0, got nan"),
])
def test_demo_rejects_bad_arguments(args, error):
    result = moe_lbl("demo", *args)
    assert result.returncode == 2 and error in result.stderr


@pytest.mark.parametrize("record,error", [
    ({"format": "moe-lbl routing record", "version": 1, "entries": []}, "holds no routing entries"),
    ({"format": "moe-lbl routing record", "version": 1,
      "entries": [{"domain": "code", "layer": 1, "counts": "12", "tokens": 4, "score_sum": 1.0}]},
     "entry 0: counts must be a non-empty list of integers >= 0"),
    ({"format": "moe-lbl routing record", "version": 1,
      "entries": [{"domain": "code", "layer": 1, "counts": [1, 2], "tokens": 3, "score_sum": 1.0},
                  {"domain": "data", "layer": 1, "counts": [1, 2, 0], "tokens": 3, "score_sum": 1.0}]},
     "entry 1 counts 3 experts where earlier entries count 2"),
    ({"format": "moe-lbl routing record", "version": 1, "entries": [{"domain": "code"}]},
     "entry 0 must have domain, layer, counts, tokens and score_sum"),
])
def test_analyze_names_what_is_wrong_with_a_record(tmp_path, record, error):
    import json

    path = tmp_path / "record.json"
    path.write_text(json.dumps(record))
    result = moe_lbl("analyze", str(path))
    assert result.returncode == 2 and error in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1  # one line, no traceback


def test_demo_without_its_extra_names_the_fix(monkeypatch, capsys):
    import importlib.util

    from moe_lbl.cli import main

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name in ("matplotlib", "wandb") else find_spec(name, *args))
    assert main(["demo", "--steps", "1"]) == 2
    error = capsys.readouterr().err
    assert "matplotlib and wandb not installed" in error and "pip install 'moe-lbl[demo]'" in error
