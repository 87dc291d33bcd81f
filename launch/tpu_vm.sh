#!/usr/bin/env bash
# Cloud TPU VM launcher: one host or a whole pod slice (every ssh step runs on all
# workers with --worker=all; JAX joins the workers into one run by itself).
#
#   bash launch/tpu_vm.sh [--dry-run] create | setup | prepare OUT [ARGS ...] |
#            train [--config.KEY=V ...] | analyze [ARGS ...] | ssh [COMMAND ...] | status | delete
#   bash launch/tpu_vm.sh preflight [--config.KEY=V ...]
#
# --dry-run prints the exact gcloud commands instead of running them; with train it then
# runs the pre-flight. preflight: on this machine's CPU, no TPU needed and nothing
# written, lower CONFIG's train step for ACCELERATOR_TYPE and print its per-device memory
# estimate, FLOPs per step and expected step time at DRY_RUN_MFU (main --dry_run).
# prepare: on worker 0, tokenise CONFIG's corpus into shards at OUT (e.g. gs://BUCKET/data);
# train from them with --config.data.prepared=OUT (docs/SCALING.md, "Prepared data").
# Environment (defaults in brackets):
#   TPU_NAME         TPU VM name [twotower]
#   ZONE             zone [us-central2-b]
#   PROJECT          GCP project [gcloud's default]
#   ACCELERATOR_TYPE slice type, e.g. v4-8 (one host), v4-32 (4 hosts), v5litepod-16 [v4-8]
#   RUNTIME_VERSION  TPU VM image [by ACCELERATOR_TYPE: v5litepod-* v2-alpha-tpuv5-lite,
#                    v5p-* v2-alpha-tpuv5, v6e-* v2-alpha-tpuv6e, else tpu-ubuntu2204-base]
#   SPOT             1 = create a Spot (preemptible) VM [0]
#   QUEUED           1 = create (and delete) it through a queued resource, QUEUED_ID [0]
#   QUEUED_ID        the queued resource's name [$TPU_NAME-qr]
#   REPO_URL         git URL cloned on every worker [this checkout's origin]
#   BRANCH           branch or commit to check out [main]
#   REMOTE_DIR       checkout directory on the workers [twotower_jax]
#   WORKDIR          run directory; all hosts must see one directory for Orbax: give
#                    gs://BUCKET/PATH (read and written directly) [runs/$TPU_NAME]
#   GCSFUSE          1 = mount a gs:// WORKDIR with gcsfuse on every worker instead [0]
#   CONFIG           config file [configs/tpu_pod.py]
#   BACKGROUND       1 = train detached with nohup, log in ~/twotower_train.log [0]
#   WORKER           worker for ssh [0]
#   ANALYZE_PLATFORMS JAX platform of the (single-process) analysis on worker 0 [cpu]
#   DRY_RUN_MFU      MFU of the pre-flight's expected step time [0.45]
#   PREFLIGHT        0 = --dry-run train prints the gcloud commands only [1]
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
CMD="${1:-}"
[[ $# -gt 0 ]] && shift

TPU_NAME="${TPU_NAME:-twotower}"
ZONE="${ZONE:-us-central2-b}"
PROJECT="${PROJECT:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
case "$ACCELERATOR_TYPE" in  # each TPU generation boots its own image
  v5litepod-*|v5e-*) default_image=v2-alpha-tpuv5-lite ;;
  v5p-*) default_image=v2-alpha-tpuv5 ;;
  v6e-*) default_image=v2-alpha-tpuv6e ;;
  *) default_image=tpu-ubuntu2204-base ;;
esac
RUNTIME_VERSION="${RUNTIME_VERSION:-$default_image}"
SPOT="${SPOT:-0}"
QUEUED="${QUEUED:-0}"
QUEUED_ID="${QUEUED_ID:-$TPU_NAME-qr}"
GCSFUSE="${GCSFUSE:-0}"
REPO_URL="${REPO_URL:-$(git -C "$(dirname "$0")" remote get-url origin 2>/dev/null || true)}"
BRANCH="${BRANCH:-main}"
REMOTE_DIR="${REMOTE_DIR:-twotower_jax}"
WORKDIR="${WORKDIR:-runs/$TPU_NAME}"
CONFIG="${CONFIG:-configs/tpu_pod.py}"
BACKGROUND="${BACKGROUND:-0}"
WORKER="${WORKER:-0}"
ANALYZE_PLATFORMS="${ANALYZE_PLATFORMS:-cpu}"

usage() { sed -n '2,36p' "$0" | sed 's/^# \{0,1\}//'; }

shq() {  # one argument, single-quoted when it needs quoting (readable, copy-pastable)
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

run() {  # prints (dry run) or runs one command
  if [[ "$DRY_RUN" == 1 ]]; then
    local sep=""
    for a in "$@"; do printf '%s' "$sep"; shq "$a"; sep=" "; done
    printf '\n'
  else
    "$@"
  fi
}

common=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && common+=(--project="$PROJECT")

# With GCSFUSE=1, gs://BUCKET/PATH -> mounted at ~/gcs/BUCKET on every worker; RUN_DIR is the
# local view. Orbax finalises a save by renaming its directory, which gcsfuse refuses on a
# flat bucket unless --rename-dir-limit covers the files of a step (a hierarchical-namespace
# bucket renames atomically). Without it the workdir is the gs:// URL itself.
MOUNT=""
RUN_DIR="$WORKDIR"
if [[ "$WORKDIR" == gs://* && "$GCSFUSE" == 1 ]]; then
  rest="${WORKDIR#gs://}"
  BUCKET="${rest%%/*}"
  SUBDIR="${rest#"$BUCKET"}"
  MOUNT="mkdir -p ~/gcs/$BUCKET && (mountpoint -q ~/gcs/$BUCKET || gcsfuse --implicit-dirs --rename-dir-limit=200000 $BUCKET ~/gcs/$BUCKET)"
  RUN_DIR="\$HOME/gcs/$BUCKET$SUBDIR"
fi

remote() {  # remote WORKERS SCRIPT: runs SCRIPT on the workers over gcloud ssh
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${common[@]}" --worker="$1" --command="$2"
}

q() { [[ $# -gt 0 ]] && printf '%q ' "$@"; return 0; }  # quotes user arguments for the remote shell

preflight() {  # the CPU dry run of CONFIG for ACCELERATOR_TYPE, here (local venv)
  (source "$(dirname "$0")/env.sh" &&
   JAX_PLATFORMS=cpu python -m twotower_jax.main --config="$CONFIG" \
       --dry_run="$ACCELERATOR_TYPE" --dry_run_mfu="${DRY_RUN_MFU:-0.45}" "$@")
}

case "$CMD" in
  create)
    if [[ "$QUEUED" == 1 ]]; then  # waits in the zone's queue until the capacity is there
      args=(gcloud compute tpus queued-resources create "$QUEUED_ID" "${common[@]}"
            --node-id="$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE"
            --runtime-version="$RUNTIME_VERSION")
    else
      args=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${common[@]}"
            --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
    fi
    [[ "$SPOT" == 1 ]] && args+=(--spot)
    run "${args[@]}"
    ;;
  setup)
    if [[ -z "$REPO_URL" ]]; then
      echo "error: REPO_URL is not set and this checkout has no origin; export REPO_URL=..." >&2
      exit 2
    fi
    script="set -euo pipefail; sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 python3.11-venv git"
    if [[ -n "$MOUNT" ]]; then
      script+="; curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo gpg --batch --yes --dearmor -o /usr/share/keyrings/cloud.google.gpg"
      script+="; echo \"deb [signed-by=/usr/share/keyrings/cloud.google.gpg] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list"
      script+="; sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse; $MOUNT"
    fi
    script+="; if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR fetch -q origin; else git clone -q $REPO_URL $REMOTE_DIR; fi"
    script+="; git -C $REMOTE_DIR checkout -q $BRANCH && (git -C $REMOTE_DIR pull -q --ff-only || true)"
    script+="; cd $REMOTE_DIR && source launch/env.sh"
    script+="; python -m pip install -q \"jax[tpu]==\$(python -c 'import jax; print(jax.__version__)')\""
    script+="; python -c 'import jax; print(jax.process_index(), jax.local_devices())'"
    remote all "$script"
    ;;
  train)
    train="python -m twotower_jax.main --config=$CONFIG --workdir=$RUN_DIR $(q "$@")"
    if [[ "$BACKGROUND" == 1 ]]; then
      train="nohup $train > ~/twotower_train.log 2>&1 &"
    fi
    script="cd $REMOTE_DIR && source launch/env.sh"
    [[ -n "$MOUNT" ]] && script="$MOUNT && $script"
    remote all "$script && $train"
    if [[ "$DRY_RUN" == 1 && "${PREFLIGHT:-1}" == 1 ]]; then
      echo "# pre-flight of $CONFIG on $ACCELERATOR_TYPE (this machine's CPU):"
      preflight "$@"
    fi
    ;;
  preflight)
    preflight "$@"
    ;;
  prepare)
    if [[ $# -lt 1 ]]; then
      echo "error: prepare needs the output folder, e.g. gs://BUCKET/data/NAME" >&2
      exit 2
    fi
    out="$1"; shift
    remote 0 "cd $REMOTE_DIR && source launch/env.sh && python -m twotower_jax.prepare --config=$CONFIG --out=$(q "$out")$(q "$@")"
    ;;
  analyze)
    script="cd $REMOTE_DIR && source launch/env.sh && JAX_PLATFORMS=$ANALYZE_PLATFORMS python -m twotower_jax.analyze --workdir=$RUN_DIR $(q "$@")"
    [[ -n "$MOUNT" ]] && script="$MOUNT && $script"
    remote 0 "$script"
    ;;
  ssh)
    args=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${common[@]}" --worker="$WORKER")
    [[ $# -gt 0 ]] && args+=(--command="$*")
    run "${args[@]}"
    ;;
  status)
    if [[ "$QUEUED" == 1 ]]; then
      run gcloud compute tpus queued-resources describe "$QUEUED_ID" "${common[@]}"
    else
      run gcloud compute tpus tpu-vm describe "$TPU_NAME" "${common[@]}"
    fi
    ;;
  delete)
    if [[ "$QUEUED" == 1 ]]; then  # --force deletes the TPU VM with its queued resource
      run gcloud compute tpus queued-resources delete "$QUEUED_ID" "${common[@]}" --force --quiet
    else
      run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${common[@]}" --quiet
    fi
    ;;
  ""|-h|--help|help)
    usage
    ;;
  *)
    echo "error: unknown command '$CMD'; use create, setup, prepare, train, preflight, analyze," \
         "ssh, status or delete" >&2
    exit 2
    ;;
esac
