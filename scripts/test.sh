#!/usr/bin/env bash
# Set up from scratch, lint, run the whole suite on megatron-core 0.16.1 (with Triton 3.9), compile
# every kernel again with Triton 3.6, then the patch tests on Megatron-Core 0.12 to 0.15 (the
# version matrix). This is what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q
bash scripts/compile_matrix.sh
bash scripts/version_matrix.sh
