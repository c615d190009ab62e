#!/usr/bin/env bash
# The GPU suite: `moe-lbl selftest` on a fresh GPU machine without network (its kernel matrix,
# the patched router with kernels="auto", the CUDA-graph replay, the headline microbenchmark with
# first calls compiling into an empty cache), then the throughput benchmark with one
# data-parallel rank; under 8 minutes. Everything lands in one folder:
#   bash benchmarks/gpu_suite.sh [OUT_DIR]
#
# Needs python, torch, triton and pytest on the machine; other packages come as wheels in .whl/
# (never from the network), built where a registry is reachable:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl megatron-core==0.16.1
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="$(realpath -m "${1:-${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%d-%H%M%S)}}")"
mkdir -p "$OUT"
WORK="$(mktemp -d)"

# The project as installed (kernels/ and patches/ inside moe_lbl/), without build tools.
cp -r moe_lbl benchmarks tests pyproject.toml "$WORK/"
cp -r kernels "$WORK/moe_lbl/kernels"
cp -r patches "$WORK/moe_lbl/patches"
if compgen -G ".whl/*.whl" >/dev/null; then
  python -m pip install -q --no-index --no-deps --target "$WORK/site" .whl/*.whl
fi
export PYTHONPATH="$WORK:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_DIR="$WORK/triton-cache"  # empty: first calls include compiling
cd "$WORK"

status=0
step() {  # step NAME TIMEOUT_S COMMAND...: run, log to $OUT/NAME.log, remember a failure
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" | tee "$OUT/$name.log"
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name exit $rc" | tee -a "$OUT/$name.log"
  [ "$rc" -eq 0 ] || status=1
}

{ date -u; nvidia-smi; python -c "import moe_lbl.cli as c; print('\n'.join(c.info_lines()))"; } > "$OUT/environment.txt" 2>&1
step selftest 360 python -m moe_lbl.cli selftest --out "$OUT"
step throughput 90 python -m benchmarks.throughput --ranks 1 --hidden-size 512 --layers 4 --experts 64 \
  --topk 4 --seq-length 1024 --micro-batch-size 2 --micro-batches 4 --steps 10 --repeats 3 --out "$OUT"
echo "results in $OUT (exit $status)"
exit $status
