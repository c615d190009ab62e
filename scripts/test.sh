#!/usr/bin/env bash
# Set up from scratch, lint, run the whole suite on megatron-core 0.19.2 (with Triton 3.9), compile
# every kernel again with Triton 3.6, then the patch tests on every other minor release, 0.12 to
# 0.18 (the version matrix). This is what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q
bash scripts/compile_matrix.sh
bash scripts/version_matrix.sh
