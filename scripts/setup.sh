#!/usr/bin/env bash
# Create .venv and install the package with its development and model extras.
# torch is installed first, pinned, because a bare `torch` requirement with no
# torch installed pulls the newest build, a CUDA build of several GB on Linux.
# Users who want CUDA install their torch build first and then run this script.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
    # TORCH_INDEX_URL, when set, is the package index to take torch from (for example PyTorch's CPU
    # wheel index). Unset, pip uses its configured sources.
    python -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
python -m pip install --quiet -e ".[dev]"
