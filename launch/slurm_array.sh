#!/usr/bin/env bash
# One experiment point per SLURM array task (GPU nodes), then the aggregation.
#   sbatch --array=0-$((N-1)) launch/slurm_array.sh       # N = points (--list prints them)
#   sbatch --dependency=afterok:JOBID launch/slurm_array.sh --aggregate
# Each task runs `python -m twotower_jax.experiment --point=$SLURM_ARRAY_TASK_ID`: it trains
# and analyses that point into $WORKDIR/<point>/ (rerunning a task resumes it); the last
# line aggregates once every point is done. WORKDIR must be on storage every node sees.
# Environment (defaults in brackets):
#   EXPERIMENT   experiment config [configs/experiments/preference.py:paper]
#   WORKDIR      experiment directory, shared by all tasks [runs/FILE_SCALE, e.g.
#                runs/preference_paper]
#   TWOTOWER_TREEBANK  UD English EWT folder for word classes (docs/EXPERIMENTS.md)
# The venv (launch/env.sh) is built by the first task on a node that lacks it, under a lock;
# for GPUs add jax[cuda12] to it once (INSTALL_CUDA=1 bash launch/gpu.sh --dry-run).
# preference.py:paper has 12 points (0-11); its base models fit one 80 GB GPU each with
# --config.overrides.train.grad_accum_steps=40 (docs/SCALING.md).
#SBATCH --job-name=twotower-experiment
#SBATCH --array=0-11
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=2-00:00:00
#SBATCH --output=twotower-%x-%A_%a.log
set -euo pipefail
# sbatch runs a copy of this file from its spool folder: find the checkout from where the
# job was submitted (the repository root) or, run by hand, from this file's place.
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
if command -v flock >/dev/null 2>&1; then
  lock="${TWOTOWER_VENV:-$PWD/.venv}/.setup.lock"
  mkdir -p "$(dirname "$lock")"
  exec 9>"$lock"
  flock 9  # tasks starting together build the venv once
  source launch/env.sh
  flock -u 9
else
  source launch/env.sh
fi
EXPERIMENT="${EXPERIMENT:-configs/experiments/preference.py:paper}"
name="$(basename "${EXPERIMENT%%:*}" .py)"
arg="${EXPERIMENT#*:}"
if [[ "$EXPERIMENT" == *:* && "$arg" != */* ]]; then name+="_$arg"; fi  # preference_paper
WORKDIR="${WORKDIR:-runs/$name}"
if [[ "${1:-}" == "--aggregate" ]]; then
  shift
  exec python -m twotower_jax.experiment --config="$EXPERIMENT" --workdir="$WORKDIR" --aggregate "$@"
fi
if [[ -z "${SLURM_ARRAY_TASK_ID:-}" ]]; then
  echo "error: SLURM_ARRAY_TASK_ID is not set; submit with sbatch --array=0-(points-1), or pass" \
       "--aggregate" >&2
  exit 2
fi
exec python -m twotower_jax.experiment --config="$EXPERIMENT" --workdir="$WORKDIR" \
    --point="$SLURM_ARRAY_TASK_ID" "$@"
