#!/usr/bin/env bash
# A multi-process run on this machine: N processes (CPU, gloo collectives), each with
# fake CPU devices, joined by jax.distributed into one mesh; the same code path as a
# TPU pod slice. Logs: WORKDIR.logs/process_<i>.log.
#   bash launch/multiprocess_local.sh [WORKDIR] [--config.KEY=VALUE ...]
# Environment (defaults in brackets):
#   NUM_PROCESSES        processes [2]
#   DEVICES_PER_PROCESS  fake CPU devices in each [4]
#   PORT                 coordinator port on localhost [12355]
#   CONFIG               config file [configs/default.py]
#   STEPS                train.steps (override with --config.train.steps too) [20]
source "$(dirname "$0")/env.sh"
WORKDIR="${1:-runs/multiprocess}"
[[ $# -gt 0 ]] && shift
NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-4}"
PORT="${PORT:-12355}"
CONFIG="${CONFIG:-configs/default.py}"
STEPS="${STEPS:-20}"
LOGS="$WORKDIR.logs"
mkdir -p "$LOGS"

pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS" \
    python -m twotower_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
      --coordinator_address="localhost:$PORT" --num_processes="$NUM_PROCESSES" \
      --process_id="$i" --config.train.steps="$STEPS" \
      --config.train.eval_every="$STEPS" --config.train.checkpoint_every="$STEPS" "$@" \
      > "$LOGS/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for ((i = 0; i < NUM_PROCESSES; i++)); do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; see $LOGS/process_$i.log" >&2
    status=1
  fi
done
tail -n 5 "$LOGS/process_0.log"
exit $status
