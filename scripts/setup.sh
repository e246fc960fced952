#!/usr/bin/env bash
# Create .venv and install the package with its development and model extras.
# The CPU build of torch is installed first, because a bare `torch` requirement
# with no torch installed pulls a CUDA build of several GB. Users who want CUDA
# install their torch build first and then run this script.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
fi
python -m pip install --quiet -e ".[dev]"
