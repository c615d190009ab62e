"""Smoke tests: the benchmarks run at tiny sizes, write their CSV schema, and account for every
requested provider, mode or path with a measurement or an explicit reason; the launch counts
(counts, not timings) stay within their budgets."""

import csv
import os

import pytest

from benchmarks import kernels, launches, throughput


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_kernel_benchmark_accounts_for_every_provider(tmp_path):
    assert kernels.main(["--preset", "tiny", "--out", str(tmp_path)]) == 0
    columns, rows = read_csv(tmp_path / "kernels.csv")
    assert columns == kernels.COLUMNS
    assert sorted((r["provider"], r["op"]) for r in rows) == sorted(
        (p, op) for p in kernels.PROVIDERS for op in kernels.OPS)
    for row in rows:
        assert row["status"] == "ok" or row["status"].startswith("unavailable: "), row
        if row["status"] == "ok":
            median, p20, p80 = float(row["median_ms"]), float(row["p20_ms"]), float(row["p80_ms"])
            assert 0 < p20 <= median <= p80
            assert float(row["gbps"]) > 0 and 0 < float(row["of_floor"])
            assert float(row["speedup_vs_eager"]) > 0
            assert float(row["first_call_s"]) > 0
        assert row["card"] and row["versions"] and row["timestamp"] and row["command"].startswith("python -m")
    assert {r["provider"] for r in rows if r["status"] == "ok"} >= {"eager", "compiled"}
    assert os.path.getsize(tmp_path / "kernels.png") > 1000


@pytest.mark.cpu_harness
def test_throughput_benchmark_accounts_for_every_mode(tmp_path):
    args = ["--ranks", "2", "--steps", "2", "--warmup", "1", "--repeats", "2", "--layers", "1",
            "--micro-batches", "2", "--seq-length", "16", "--out", str(tmp_path)]
    assert throughput.main(args) == 0
    columns, rows = read_csv(tmp_path / "throughput.csv")
    assert columns == throughput.COLUMNS
    assert [r["mode"] for r in rows] == list(throughput.MODES)
    for row in rows:
        assert row["status"] == "ok" and float(row["median_step_ms"]) > 0 and float(row["tokens_per_s"]) > 0
        assert float(row["ratio_min"]) <= float(row["ratio_to_micro"]) <= float(row["ratio_max"])
        assert int(row["tokens_per_step"]) == 2 * 2 * 2 * 16
        # moe-lbl's modes report balance; unpatched Megatron has no recorder.
        assert (row["micro_max_vio"] != "") == (row["mode"] != "megatron-global")
    assert float(rows[0]["ratio_to_micro"]) == 1.0


@pytest.mark.cpu_harness
def test_launch_benchmark_counts_every_path_within_the_kernel_budgets(tmp_path):
    assert launches.main(["--tokens", "32", "--repeats", "2", "--out", str(tmp_path)]) == 0
    columns, rows = read_csv(tmp_path / "launches.csv")
    assert columns == launches.COLUMNS
    assert sorted((r["config"], r["path"]) for r in rows) == sorted(
        (c.name, p) for c in launches.CONFIGS for p in launches.PATHS)
    by = {(r["config"], r["path"]): r for r in rows}
    for config in launches.CONFIGS:
        def kernels_of(path, config=config):
            return int(by[config.name, path]["kernels"])

        megatron_loss = kernels_of("megatron aux_loss") - kernels_of("megatron, no balancing loss")
        for scope in ("micro", "global"):
            assert kernels_of(f"moe-lbl {scope}, fused") - config.options_kernels <= 4, (config.name, scope)
            assert int(by[config.name, f"moe-lbl {scope}, fused"]["triton"]) == 4
            step_kernel = f"moe-lbl {scope}, megatron routing, step kernel"
            assert kernels_of(step_kernel) - kernels_of("megatron, no balancing loss") <= megatron_loss
        assert int(by[config.name, "moe-lbl global, fused"]["collectives"]) == 1
        assert int(by[config.name, "moe-lbl micro, fused"]["collectives"]) == 0
    text = (tmp_path / "launches.txt").read_text()
    assert "(budget 4): met" in text and "host time" in text


@pytest.mark.parametrize("module,args,error", [
    (kernels, ["--tokens", "0"], "must be >= 1"),
    (kernels, ["--providers", "fast"], "invalid choice"),
    (throughput, ["--ranks", "0"], "ranks must be >= 1"),
    (throughput, ["--topk", "9"], "topk (9) must not exceed num_experts (8)"),
    (launches, ["--repeats", "0"], "must be >= 1"),
])
def test_bad_arguments_exit_with_a_message(module, args, error, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(args + ["--out", "/nonexistent-never-written"])
    assert exit_info.value.code == 2
    assert error in capsys.readouterr().err
