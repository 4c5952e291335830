#!/usr/bin/env bash
# One Prefect process worker per GPU, in the foreground (docs/deploy.md, "One GPU box").
#
#   export PREFECT_API_URL=http://prefect-host:4200/api
#   export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... AWS_ENDPOINT_URL=...   # the shared store, if S3
#   deploy/start-gpu-workers.sh
#
# Each worker gets its own CUDA_VISIBLE_DEVICES and `--limit 1` (one flow run per GPU at a time) and polls
# the pool/queue that deploy/prefect.yaml's deployments target. Each flow run is a subprocess of its worker
# and inherits this environment (store credentials, TOSS_PROJECT_DIR, TOSS_CACHE_DIR, HF_HOME...).
# Ctrl-C / SIGTERM stops every worker; if one worker exits, the others are stopped too and the script
# exits non-zero, so a supervisor (systemd, `restart:` in compose) restarts the set.
#
# Settings (environment):
#   TOSS_GPUS         GPU ids, e.g. "0 1 3" (default: CUDA_VISIBLE_DEVICES, else every GPU nvidia-smi lists)
#   TOSS_POOL         work pool (default gpu)          TOSS_QUEUE  work queue (default toss)
#   TOSS_WORKER_NAME  name prefix (default hostname)   PREFECT     prefect executable (default: prefect on PATH)
#   TOSS_PROJECT_DIR  this repository on this machine (default: the folder above this script); the
#                     deployments' pull step changes into it before loading flows/toss.py
#   DRY_RUN=1         print the worker commands, start nothing
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export TOSS_PROJECT_DIR="${TOSS_PROJECT_DIR:-$here}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
pool="${TOSS_POOL:-gpu}"
queue="${TOSS_QUEUE:-toss}"
name="${TOSS_WORKER_NAME:-$(hostname)}"
prefect="${PREFECT:-prefect}"

gpus="${TOSS_GPUS:-}"
if [[ -z "${gpus// /}" ]]; then
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    gpus="${CUDA_VISIBLE_DEVICES//,/ }"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    gpus="$(nvidia-smi --query-gpu=index --format=csv,noheader | tr '\n' ' ')"
  fi
fi
if [[ -z "${gpus// /}" ]]; then
  echo "start-gpu-workers: no GPU found (set TOSS_GPUS, or start a CPU worker: toss worker --cpu)" >&2
  exit 1
fi

if [[ -z "${DRY_RUN:-}" && -z "${PREFECT_API_URL:-}" ]]; then
  echo "start-gpu-workers: warning: PREFECT_API_URL is not set; the workers use the Prefect profile's" >&2
fi

pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 0' INT TERM

for gpu in $gpus; do
  cmd=("$prefect" worker start --pool "$pool" --work-queue "$queue" --type process --limit 1
       --name "$name-gpu$gpu")
  if [[ -n "${DRY_RUN:-}" ]]; then
    echo "CUDA_VISIBLE_DEVICES=$gpu TOSS_PROJECT_DIR=$TOSS_PROJECT_DIR ${cmd[*]}"
    continue
  fi
  CUDA_VISIBLE_DEVICES="$gpu" "${cmd[@]}" &
  pids+=("$!")
  echo "start-gpu-workers: worker $name-gpu$gpu (pid $!) on GPU $gpu, pool $pool, queue $queue" >&2
done
[[ -n "${DRY_RUN:-}" ]] && exit 0

# One worker ended (crash, or its own shutdown): stop the rest, report failure.
status=0
wait -n || status=$?
echo "start-gpu-workers: a worker exited (status $status); stopping the others" >&2
stop_all
exit $(( status == 0 ? 1 : status ))
