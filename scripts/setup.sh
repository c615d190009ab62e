#!/usr/bin/env bash
# Create .venv and install moe-lbl with the demo's and the tests' extras. CPU machines get the pinned CPU
# torch first, so that nothing pulls a multi-GB CUDA build. Megatron-Core is the newest release moe-lbl
# supports (NEWEST_TESTED_MEGATRON, which patches/megatron/compatibility.py prints); its wheels declare
# Requires-Python >= 3.12, and their cp311 builds (the same sources) install on 3.11 with
# --ignore-requires-python; --no-deps, since pip would then also take dependencies built for 3.12 only
# (numpy): the next line installs Megatron-Core's dependencies for this Python.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
megatron=$(python3 patches/megatron/compatibility.py)
.venv/bin/python -m pip install -q --no-deps --ignore-requires-python "megatron-core==$megatron"
.venv/bin/python -m pip install -q -e ".[demo,test]"
