#!/usr/bin/env bash
# The patch tests against every other supported Megatron-Core, each installed side by side
# (pip --target) over the main environment of scripts/setup.sh, which holds the newest release
# (0.19.2). 0.17+ wheels declare Requires-Python >= 3.12; their cp311 builds run on 3.11.
set -uo pipefail
cd "$(dirname "$0")/.."
VERSIONS="${MATRIX_VERSIONS:-0.12.3 0.13.1 0.14.0 0.15.3 0.16.1 0.17.1 0.18.2}"
TESTS="tests/megatron/test_patch_mechanics.py tests/megatron/test_patch_router.py tests/megatron/test_patch_lifecycle.py tests/megatron/test_patch_dp.py tests/megatron/test_fused_seq_aux_loss.py"
# The graph replay tests need padding masks (0.16+); 0.16.1 has the aux-loss tracker of before
# 0.18 (0.19.2, in the main suite, the metrics tracker). About a minute.
GRAPH_VERSIONS="${MATRIX_GRAPH_VERSIONS:-0.16.1}"
status=0
for version in $VERSIONS; do
  target=".matrix/megatron-core-$version"
  if [ ! -d "$target" ]; then
    .venv/bin/python -m pip install -q --no-deps --ignore-requires-python --target "$target.tmp" "megatron-core==$version" \
      && mv "$target.tmp" "$target" || { echo "== megatron-core $version: install failed"; status=1; continue; }
  fi
  echo "== megatron-core $version"
  tests="$TESTS"
  case " $GRAPH_VERSIONS " in *" $version "*) tests="$tests tests/megatron/test_graphs.py" ;; esac
  PYTHONPATH="$PWD/$target" .venv/bin/python -m pytest -q -p no:cacheprovider $tests || status=1
done
exit $status
