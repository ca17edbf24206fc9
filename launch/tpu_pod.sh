#!/usr/bin/env bash
# Trains asd_jax on a Cloud TPU VM pod slice: create the slice, install the project on every
# worker, run the same training command on all workers at once. See launch/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --name=NAME --zone=ZONE --config=CONFIG --workdir=gs://BUCKET/RUN
                         [options] [-- EXTRA_TRAIN_FLAGS...]

Creates a TPU VM pod slice (unless --skip_create), installs this project on every worker
(unless --skip_install) and runs, on all workers (gcloud ... ssh --worker=all),
  python3 -m asd_jax.train --config=CONFIG --workdir=WORKDIR [EXTRA_TRAIN_FLAGS...]
The run resumes from the latest checkpoint in WORKDIR, so rerunning the same command (with
--skip_create --skip_install) continues a preempted run.

Required:
  --name=NAME               TPU VM (slice) name
  --zone=ZONE               e.g. us-east5-a
  --config=CONFIG           e.g. configs/asd.py or configs/asd.py:tiny (relative to the repo)
  --workdir=DIR             checkpoints and metrics; use a gs:// bucket every worker can reach

Options:
  --project=PROJECT         GCP project (default: gcloud's configured one)
  --accelerator_type=TYPE   slice type (default v5p-64)
  --version=RUNTIME         TPU VM software version (default v2-alpha-tpuv5)
  --spot                    create a Spot slice (cheap, preemptible; the run resumes)
  --skip_create             the slice already exists
  --skip_install            the project is already installed on every worker
  --install=copy|git        copy: send this checkout (tracked and untracked, non-ignored files);
                            git: clone --repo at --ref on every worker (default copy)
  --repo=URL --ref=REF      for --install=git (ref default main)
  --jax_spec=SPEC           pip requirement for JAX on TPU (default 'jax[tpu]')
  --remote_dir=DIR          project directory on the workers (default asd_jax, under $HOME)
  --python=PYTHON           interpreter on the workers (default python3)
  --detach                  run training under nohup (log: REMOTE_DIR/train.log on each worker)
                            so that it survives the ssh session
  --delete                  delete the slice when training ends
  --max_restarts=N          run the trainer again, up to N times (default 3), when it exits
                            with 75: stopped early by SIGTERM after saving (asd_jax.cli)
  --dry_run                 print every command instead of running it (same as DRY_RUN=1)
  -h, --help                this text
EOF
}

die() { echo "tpu_pod.sh: $*" >&2; echo "Run launch/tpu_pod.sh --help for usage." >&2; exit 2; }

NAME="" ZONE="" CONFIG="" WORKDIR="" PROJECT=""
ACCELERATOR_TYPE="v5p-64" VERSION="v2-alpha-tpuv5" SPOT=0 SKIP_CREATE=0 SKIP_INSTALL=0
INSTALL="copy" REPO_URL="" REF="main" JAX_SPEC="jax[tpu]" REMOTE_DIR="asd_jax" PYTHON="python3"
DETACH=0 DELETE=0 DRY_RUN="${DRY_RUN:-0}" MAX_RESTARTS=3
EXIT_PREEMPTED=75  # asd_jax.cli.EXIT_PREEMPTED: stopped early by SIGTERM after saving
EXTRA=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --accelerator_type=*) ACCELERATOR_TYPE="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --skip_create) SKIP_CREATE=1 ;;
    --skip_install) SKIP_INSTALL=1 ;;
    --install=*) INSTALL="${1#*=}" ;;
    --repo=*) REPO_URL="${1#*=}" ;;
    --ref=*) REF="${1#*=}" ;;
    --jax_spec=*) JAX_SPEC="${1#*=}" ;;
    --remote_dir=*) REMOTE_DIR="${1#*=}" ;;
    --python=*) PYTHON="${1#*=}" ;;
    --detach) DETACH=1 ;;
    --max_restarts=*) MAX_RESTARTS="${1#*=}" ;;
    --delete) DELETE=1 ;;
    --dry_run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (training flags go after --)" ;;
  esac
  shift
done

[[ -n "$NAME" ]] || die "--name is required"
[[ -n "$ZONE" ]] || die "--zone is required"
[[ -n "$CONFIG" ]] || die "--config is required"
[[ -n "$WORKDIR" ]] || die "--workdir is required"
[[ "$INSTALL" == copy || "$INSTALL" == git ]] || die "--install must be copy or git"
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "--max_restarts must be an integer >= 0"
[[ "$INSTALL" != git || -n "$REPO_URL" ]] || die "--install=git needs --repo=URL"
if [[ "$WORKDIR" != gs://* ]]; then
  echo "tpu_pod.sh: warning: --workdir=$WORKDIR is not a gs:// path; every worker must see the" \
       "same directory for checkpoints to work." >&2
fi

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Prints a command the way a shell would read it back; runs it unless dry-running.
show() {
  local out="+" arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=" $arg"; else out+=" ${arg@Q}"; fi
  done
  echo "$out"
}
run() {
  show "$@"
  if [[ "$DRY_RUN" != 1 ]]; then "$@"; fi
}

GCLOUD_FLAGS=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && GCLOUD_FLAGS+=(--project="$PROJECT")
on_all_workers() { run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=all --command="$1"; }

# 1. The slice.
if [[ "$SKIP_CREATE" != 1 ]]; then
  CREATE=(gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_FLAGS[@]}"
          --accelerator-type="$ACCELERATOR_TYPE" --version="$VERSION")
  [[ "$SPOT" == 1 ]] && CREATE+=(--spot)
  run "${CREATE[@]}"
fi

# 2. The project on every worker.
if [[ "$SKIP_INSTALL" != 1 ]]; then
  if [[ "$INSTALL" == copy ]]; then
    TARBALL="${TMPDIR:-/tmp}/asd_jax_src.tgz"
    # Tracked and untracked files that git does not ignore: the working tree as it is now.
    echo "+ (cd ${REPO_ROOT@Q} && git ls-files -co --exclude-standard -z | tar czf ${TARBALL@Q} --null -T -)"
    if [[ "$DRY_RUN" != 1 ]]; then
      (cd "$REPO_ROOT" && git ls-files -co --exclude-standard -z | tar czf "$TARBALL" --null -T -)
    fi
    run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:asd_jax_src.tgz" "${GCLOUD_FLAGS[@]}" --worker=all
    FETCH="rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar xzf asd_jax_src.tgz -C $REMOTE_DIR"
  else
    FETCH="rm -rf $REMOTE_DIR && git clone --depth=1 --branch=$(printf '%q' "$REF") $(printf '%q' "$REPO_URL") $REMOTE_DIR"
  fi
  on_all_workers "set -e; $FETCH && $PYTHON -m pip install -U $(printf '%q' "$JAX_SPEC") && $PYTHON -m pip install -e $REMOTE_DIR"
fi

# 3. Training, the same command on every worker. ASD_JAX_DISTRIBUTED=1 makes the trainer call
# jax.distributed.initialize(), which finds the other workers from the TPU metadata.
TRAIN="ASD_JAX_DISTRIBUTED=1 $PYTHON -m asd_jax.train $(printf '%q ' --config="$CONFIG" --workdir="$WORKDIR" "${EXTRA[@]}")"
TRAIN="${TRAIN% }"
# Exit 75: the trainer saved a checkpoint on SIGTERM and stopped early; run it again.
RETRY="n=0; while true; do $TRAIN; rc=\$?; if [ \$rc -ne $EXIT_PREEMPTED ] || [ \$n -ge $MAX_RESTARTS ]; then exit \$rc; fi; n=\$((n + 1)); echo \"tpu_pod.sh: training stopped early (exit $EXIT_PREEMPTED, checkpoint saved); restart \$n of $MAX_RESTARTS\" >&2; done"
if [[ "$DETACH" == 1 ]]; then
  on_all_workers "cd $REMOTE_DIR && nohup bash -c $(printf '%q' "$RETRY") > train.log 2>&1 < /dev/null &"
else
  on_all_workers "cd $REMOTE_DIR && $RETRY"
fi

# 4. Clean up.
if [[ "$DELETE" == 1 ]]; then
  if [[ "$DETACH" == 1 ]]; then
    echo "tpu_pod.sh: --delete ignored with --detach (training is still running)." >&2
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_FLAGS[@]}" --quiet
  fi
fi
