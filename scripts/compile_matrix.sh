#!/usr/bin/env bash
# Compile every kernel (router and balancing step) for sm_80/90/100 with the oldest Triton the kernels support (3.6,
# what the GPU machines run), installed side by side (pip --target) over the main environment;
# the suite already compiles them with the Triton it installs.
set -euo pipefail
cd "$(dirname "$0")/.."
target=".matrix/triton-3.6.0"
if [ ! -d "$target" ]; then
  .venv/bin/python -m pip install -q --no-deps --target "$target.tmp" "triton==3.6.0"
  mv "$target.tmp" "$target"
fi
echo "== triton 3.6.0: compile every kernel for sm_80, sm_90, sm_100"
TRITON_CACHE_DIR="$(mktemp -d)" PYTHONPATH="$PWD/$target" env -u TRITON_INTERPRET \
  .venv/bin/python tests/kernels/test_compile.py
