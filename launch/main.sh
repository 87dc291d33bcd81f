#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, train the default config on the
# embedded corpus, and print where the results are. Rerunning resumes.
#   bash launch/main.sh [WORKDIR] [--config.KEY=VALUE ...]
source "$(dirname "$0")/env.sh"
WORKDIR="${1:-runs/default}"
[[ $# -gt 0 ]] && shift
CONFIG="${CONFIG:-configs/default.py}"
python -m twotower_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
echo "results: $WORKDIR (config.json, metrics.jsonl, checkpoints/, tensorboard/)"
