#!/usr/bin/env bash
# Create one virtual environment per peer influence package under benchmarks/.venvs/<peer>.
# Each gets the CPU build of torch first (a bare `torch` requirement pulls a CUDA build of several GB),
# then the peer from PyPI, then numpy/scipy for the runner. The peers never enter .venv.
# Usage: bash benchmarks/peers/setup.sh [peer ...]   (default: dattri pydvl kronfluence captum)
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
peers=("$@")
if [ ${#peers[@]} -eq 0 ]; then
    peers=(dattri pydvl kronfluence captum)
fi
for peer in "${peers[@]}"; do
    venv="benchmarks/.venvs/$peer"
    echo "== $peer -> $venv"
    if [ ! -x "$venv/bin/python" ]; then
        "$PYTHON" -m venv "$venv"
    fi
    pip="$venv/bin/python -m pip"
    $pip install --quiet --upgrade pip
    $pip install --quiet "torch==$TORCH_VERSION"
    case "$peer" in
        kronfluence)
            # kronfluence's own requirements pull a newer CUDA torch plus torchvision, so its dependencies
            # are installed by hand against the pinned CPU torch.
            $pip install --quiet --no-deps kronfluence
            $pip install --quiet accelerate einops "numpy" opt_einsum safetensors tqdm scikit-learn transformers
            ;;
        *)
            $pip install --quiet "$peer" "torch==$TORCH_VERSION"
            ;;
    esac
    $pip install --quiet scipy
    "$venv/bin/python" -c "import importlib.metadata as m, torch; print('$peer', m.version('$peer'), 'torch', torch.__version__)"
done
