#!/usr/bin/env bash
# Train on one local GPU (debugging and single-GPU runs) with configs/gpu.py.
#   bash launch/gpu.sh [WORKDIR] [--config.KEY=VALUE ...]
#   bash launch/gpu.sh --dry-run [--config.KEY=VALUE ...]
# --dry-run: pre-flight on this machine's CPU, no GPU needed and nothing written: lowers
# the train step for GPU_TARGET and prints its memory estimate, FLOPs per step and
# expected step time at DRY_RUN_MFU (python -m twotower_jax.main --dry_run; docs/SCALING.md).
# Environment (defaults in brackets):
#   CONFIG                        config file [configs/gpu.py]
#   GPU_TARGET                    --dry-run target: H100, H100x8, H200, A100 [H100]
#   DRY_RUN_MFU                   MFU of the dry run's expected step time [0.45]
#   CUDA_VISIBLE_DEVICES          which GPU(s) JAX may use [all]
#   XLA_PYTHON_CLIENT_PREALLOCATE false: allocate on demand, so nvidia-smi shows the real
#                                 use and other processes fit beside [false]
#   XLA_PYTHON_CLIENT_MEM_FRACTION share of GPU memory JAX may take when preallocating [.90]
#   XLA_DUMP_DIR                  if set, XLA writes the optimised HLO of every program there
#   DEBUG_NANS                    1 = stop at the first NaN (JAX_DEBUG_NANS; slow) [0]
#   INSTALL_CUDA                  1 = pip install jax[cuda12] (same jax version) when the
#                                 venv has no GPU backend [0]
source "$(dirname "$0")/env.sh"
CONFIG="${CONFIG:-configs/gpu.py}"
if [[ "${1:-}" == "--dry-run" ]]; then
  shift
  JAX_PLATFORMS=cpu exec python -m twotower_jax.main --config="$CONFIG" \
      --dry_run="${GPU_TARGET:-H100}" --dry_run_mfu="${DRY_RUN_MFU:-0.45}" "$@"
fi
WORKDIR="${1:-runs/gpu}"
[[ $# -gt 0 ]] && shift

export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-.90}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
# Overlap collectives/copies with compute; keep user-given flags.
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
if [[ -n "${XLA_DUMP_DIR:-}" ]]; then
  XLA_FLAGS+=" --xla_dump_to=$XLA_DUMP_DIR --xla_dump_hlo_as_text"
fi
export XLA_FLAGS
[[ "${DEBUG_NANS:-0}" == 1 ]] && export JAX_DEBUG_NANS=True

if ! python -c 'import jax, sys; sys.exit(0 if jax.default_backend() == "gpu" else 1)' 2>/dev/null; then
  if [[ "${INSTALL_CUDA:-0}" == 1 ]]; then
    python -m pip install -q "jax[cuda12]==$(python -c 'import jax; print(jax.__version__)')"
  else
    echo "error: JAX sees no GPU; rerun with INSTALL_CUDA=1 to install jax[cuda12], or check" \
         "nvidia-smi and CUDA_VISIBLE_DEVICES" >&2
    exit 2
  fi
fi
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null || true
python -m twotower_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
echo "results: $WORKDIR (config.json, metrics.jsonl, checkpoints/, tensorboard/)"
