#!/usr/bin/env bash
# Run benchmarks/peers.py on the working tree and on an earlier commit, alternating, so that a code change
# is measured side by side on the same machine and load.
# Usage: bash benchmarks/compare_commits.sh COMMIT PAIRS OUT_PREFIX [peers.py options ...]
# Each of the PAIRS iterations runs the working tree's driver into OUT_PREFIX_new_<i> and then COMMIT's driver,
# with COMMIT's lightning_fastif first on PYTHONPATH, into OUT_PREFIX_old_<i>. COMMIT is checked out in a
# temporary git worktree, which is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 3 ]; then
    echo "usage: bash benchmarks/compare_commits.sh COMMIT PAIRS OUT_PREFIX [peers.py options ...]" >&2
    exit 2
fi
commit=$1 pairs=$2 prefix=$3
shift 3
root=$(pwd)
case "$prefix" in
    /*) ;;
    *) prefix="$root/$prefix" ;;
esac
mkdir -p "$(dirname "$prefix")"
worktree=$(mktemp -d)
git worktree add --quiet --detach "$worktree" "$commit"
trap 'git worktree remove --force "$worktree"' EXIT
. .venv/bin/activate
export WANDB_MODE=${WANDB_MODE:-offline} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
echo "load before: $(uptime)"
for i in $(seq 1 "$pairs"); do
    python benchmarks/peers.py "$@" --out-dir "${prefix}_new_$i" > "${prefix}_new_$i.log" 2>&1
    (cd "$worktree" && PYTHONPATH="$worktree" python benchmarks/peers.py "$@" --out-dir "${prefix}_old_$i") \
        > "${prefix}_old_$i.log" 2>&1
done
echo "load after: $(uptime)"
