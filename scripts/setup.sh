#!/usr/bin/env bash
# Create .venv and install moe-lbl with the demo's and the tests' extras. CPU machines get the pinned CPU
# torch first, so that nothing pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[demo,test]"
