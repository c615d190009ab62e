"""Megatron's own training loop (megatron.training.pretrain, unmodified) under the launcher.

examples/pretrain_gpt_moe.py on 2 gloo ranks on CPU (tests/helpers/cpu_training shims CUDA away),
mock data, 2 layers of 8 experts top-2, 2 micro-batches per rank per step, 4 steps; Megatron's
TensorBoard scalars are recorded at full precision.
- without moe-lbl and with --scope micro: the same lm loss, load-balancing loss and grad norm
  (a micro scope that drifted from Megatron's aux loss, or a patch that changed the model's
  numerics, would fail);
- with --scope global: the logged load-balancing loss is the float64 global-batch formula
  (buffered counts over both ranks and the step's micro-batches) of the routing each rank
  recorded, and not the micro one; MaxVio of micro-batches and global batch reach the log;
- a failing script's exit code reaches torchrun through the launcher.
"""

import importlib.util
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import NamedTuple

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIMS = os.path.join(REPO, "tests", "helpers", "cpu_training")
NUM_LAYERS, NUM_EXPERTS, TOPK, COEFF, ITERATIONS, MICRO_BATCHES = 2, 8, 2, 1e-2, 4, 2
FLAGS = f"""
--num-layers {NUM_LAYERS} --hidden-size 32 --num-attention-heads 4 --ffn-hidden-size 64
--num-experts {NUM_EXPERTS} --moe-router-topk {TOPK} --moe-ffn-hidden-size 32 --moe-aux-loss-coeff {COEFF}
--moe-router-load-balancing-type aux_loss --seq-length 32 --max-position-embeddings 32
--micro-batch-size 2 --global-batch-size {2 * 2 * MICRO_BATCHES} --train-iters {ITERATIONS}
--lr 1e-3 --lr-decay-style constant --log-interval 1 --eval-iters 0 --eval-interval 1000
--mock-data --tokenizer-type NullTokenizer --vocab-size 128 --split 100,0,0 --seed 1234
--transformer-impl local --distributed-backend gloo --no-gradient-accumulation-fusion
--use-cpu-initialization --no-masked-softmax-fusion --no-bias-gelu-fusion --no-bias-dropout-fusion
--no-rope-fusion --no-persist-layer-norm --moe-token-dispatcher-type allgather --disable-bias-linear
--clip-grad 0 --rerun-mode disabled --attention-dropout 0 --hidden-dropout 0
""".split()

pytestmark = [pytest.mark.cpu_harness, pytest.mark.skipif(
    importlib.util.find_spec("megatron.training") is None, reason="megatron.training ships with Megatron-Core 0.17+")]


def pretrain(out, launcher=None, extra=()):
    """torchrun of the example (through moe_lbl.run with `launcher` options); records in `out`."""
    os.makedirs(out, exist_ok=True)
    through = [] if launcher is None else ["-m", "moe_lbl.run", *launcher, "--"]
    env = {**os.environ, "PYTHONPATH": SHIMS, "MOELBL_TEST_CPU_TRAINING": "1", "OMP_NUM_THREADS": "1",
           "MOELBL_TEST_ROUTING_RECORD": out}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *through,
         "examples/pretrain_gpt_moe.py", *FLAGS, "--tensorboard-dir", out, *extra],
        capture_output=True, text=True, timeout=600, cwd=REPO, env=env)


def scalars(out):
    """{tag: [value per iteration]} of what Megatron wrote to its TensorBoard writer."""
    table = {}
    with open(os.path.join(out, "scalars.jsonl")) as f:
        for line in f:
            entry = json.loads(line)
            table.setdefault(entry["tag"], {})[entry["step"]] = entry["value"]
    return {tag: [steps[i] for i in sorted(steps)] for tag, steps in table.items()}


def routing(out, rank):
    """[iteration][micro-batch][layer] -> (counts, score sums, tokens) of one rank, as recorded."""
    with open(os.path.join(out, f"rank{rank}.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == ITERATIONS * MICRO_BATCHES * NUM_LAYERS
    per_micro = [records[i:i + NUM_LAYERS] for i in range(0, len(records), NUM_LAYERS)]
    return [per_micro[i:i + MICRO_BATCHES] for i in range(0, len(per_micro), MICRO_BATCHES)]


def logged_lbl(records, scope):
    """What Megatron logs per iteration, in float64: the mean over layers, ranks and micro-batches
    of N_E sum_i f_i P_i, f from the global batch so far (buffered) or the micro-batch."""
    values = []
    for it in range(ITERATIONS):
        total = 0.0
        for layer in range(NUM_LAYERS):
            pooled = torch.zeros(NUM_EXPERTS + 1, dtype=torch.float64)
            for j in range(MICRO_BATCHES):
                batch = [records[r][it][j][layer] for r in records]
                pooled += sum(torch.tensor([*b["counts"], b["tokens"]], dtype=torch.float64) for b in batch)
                for b in batch:
                    own = torch.tensor([*b["counts"], b["tokens"]], dtype=torch.float64)
                    totals = pooled if scope == "global" else own
                    f = totals[:-1] / (TOPK * totals[-1])
                    total += NUM_EXPERTS * float((f * torch.tensor(b["score_sums"], dtype=torch.float64)).sum()) \
                        / b["tokens"]
        values.append(total / (NUM_LAYERS * len(records) * MICRO_BATCHES))
    return values


class Pretrained(NamedTuple):
    out: str  # the run's folder: TensorBoard scalars and routing records
    stdout: str  # Megatron's console log


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("pretrain")
    variants = {"megatron": None, "micro": ["--scope", "micro"], "global": ["--scope", "global"]}
    with ThreadPoolExecutor(len(variants)) as pool:
        results = dict(zip(variants, pool.map(lambda v: pretrain(str(base / v[0]), v[1]), variants.items())))
    for name, result in results.items():
        assert result.returncode == 0, f"{name}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return {name: Pretrained(str(base / name), result.stdout) for name, result in results.items()}


def test_micro_scope_reproduces_megatrons_own_run(runs):
    want, got = scalars(runs["megatron"].out), scalars(runs["micro"].out)
    assert "moe-lbl: patched megatron-core" in runs["micro"].stdout
    for tag in ("lm loss", "load_balancing_loss", "grad-norm"):
        assert len(want[tag]) == ITERATIONS, tag
        torch.testing.assert_close(torch.tensor(got[tag], dtype=torch.float64),
                                   torch.tensor(want[tag], dtype=torch.float64), rtol=1e-6, atol=0, msg=tag)
    assert want["lm loss"][-1] < want["lm loss"][0]


def test_global_scope_logs_the_global_batch_formula(runs):
    out = runs["global"].out
    records = {r: routing(out, r) for r in (0, 1)}
    logged = scalars(out)["load_balancing_loss"]
    global_formula, micro_formula = logged_lbl(records, "global"), logged_lbl(records, "micro")
    as64 = partial(torch.tensor, dtype=torch.float64)
    torch.testing.assert_close(as64(logged), as64(global_formula), rtol=1e-5, atol=0)
    # The two formulas differ by far more than the tolerance: the check above tells them apart.
    assert all(abs(g - m) > 1e-4 * m for g, m in zip(global_formula, micro_formula))
    # The micro run's log is Megatron's micro formula of its own routing.
    micro_records = {r: routing(runs["micro"].out, r) for r in (0, 1)}
    torch.testing.assert_close(as64(scalars(runs["micro"].out)["load_balancing_loss"]),
                               as64(logged_lbl(micro_records, "micro")), rtol=1e-5, atol=0)


def test_max_vio_reaches_megatrons_log_and_writers(runs):
    for name in ("micro", "global"):
        written = scalars(runs[name].out)
        for tag in ("micro_max_vio", "global_max_vio"):
            assert len(written[tag]) == ITERATIONS and all(v > 0 for v in written[tag]), (name, tag)
            assert f"{tag}:" in runs[name].stdout, (name, tag)
    assert "max_vio" not in runs["megatron"].stdout


def test_the_scripts_exit_code_is_the_launchers(tmp_path):
    # Megatron's argument parser rejects a value and exits with 2 in every rank.
    result = pretrain(str(tmp_path), ["--scope", "global"], extra=["--train-iters", "many"])
    assert result.returncode != 0
    assert "invalid int value: 'many'" in result.stderr
    assert "exitcode  : 2" in result.stderr
