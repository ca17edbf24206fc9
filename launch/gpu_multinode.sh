#!/usr/bin/env bash
# Trains asd_jax on a SLURM GPU cluster: one process per GPU on every node, joined by
# jax.distributed. Submits a batch job (sbatch), or runs srun directly inside an allocation.
# See launch/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/gpu_multinode.sh --nodes=N --config=CONFIG --workdir=DIR [options] [-- EXTRA_TRAIN_FLAGS...]

Submits a SLURM job of N nodes x G GPUs that starts one process per GPU (srun) running
  python -m asd_jax.train --config=CONFIG --workdir=DIR [EXTRA_TRAIN_FLAGS...]
with JAX_COORDINATOR_ADDRESS (the first node), JAX_NUM_PROCESSES, JAX_PROCESS_ID and
JAX_LOCAL_DEVICE_IDS set per process, so that jax.distributed.initialize() joins them. The run
resumes from the latest checkpoint in DIR: resubmitting continues a preempted or timed-out job.

Required:
  --nodes=N                 number of nodes
  --config=CONFIG           e.g. configs/asd.py (relative to the repository)
  --workdir=DIR             checkpoints and metrics, on a file system every node shares

Options:
  --gpus_per_node=G         GPUs (= processes) per node (default 8)
  --cpus_per_task=C         CPU cores per process (default 8)
  --partition=P  --account=A  --qos=Q
  --time=T                  wall-clock limit, e.g. 48:00:00
  --job_name=NAME           default asd_jax
  --log_dir=DIR             SLURM output files (default logs; %x-%j.out)
  --port=PORT               coordinator port (default 20000 + job id % 20000)
  --venv=DIR                a virtual environment to activate on the nodes
  --python=PYTHON           interpreter (default python)
  --max_restarts=N          run srun again, up to N times (default 3), when the trainer exits
                            with 75: stopped early by SIGTERM after saving (asd_jax.cli)
  --srun                    already inside an allocation (salloc / an sbatch script): run
                            srun now instead of submitting a job
  --dry_run                 print every command (and the batch script) instead of running it
                            (same as DRY_RUN=1)
  -h, --help                this text
EOF
}

die() { echo "gpu_multinode.sh: $*" >&2; echo "Run launch/gpu_multinode.sh --help for usage." >&2; exit 2; }

NODES="" CONFIG="" WORKDIR="" GPUS_PER_NODE=8 CPUS_PER_TASK=8 PARTITION="" ACCOUNT="" QOS=""
TIME="" JOB_NAME="asd_jax" LOG_DIR="logs" PORT="" VENV="" PYTHON="python" SRUN_NOW=0
MAX_RESTARTS=3 EXIT_PREEMPTED=75  # asd_jax.cli.EXIT_PREEMPTED
DRY_RUN="${DRY_RUN:-0}"
EXTRA=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes=*) NODES="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --gpus_per_node=*) GPUS_PER_NODE="${1#*=}" ;;
    --cpus_per_task=*) CPUS_PER_TASK="${1#*=}" ;;
    --partition=*) PARTITION="${1#*=}" ;;
    --account=*) ACCOUNT="${1#*=}" ;;
    --qos=*) QOS="${1#*=}" ;;
    --time=*) TIME="${1#*=}" ;;
    --job_name=*) JOB_NAME="${1#*=}" ;;
    --log_dir=*) LOG_DIR="${1#*=}" ;;
    --port=*) PORT="${1#*=}" ;;
    --venv=*) VENV="${1#*=}" ;;
    --python=*) PYTHON="${1#*=}" ;;
    --max_restarts=*) MAX_RESTARTS="${1#*=}" ;;
    --srun) SRUN_NOW=1 ;;
    --dry_run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (training flags go after --)" ;;
  esac
  shift
done

[[ -n "$NODES" ]] || die "--nodes is required"
[[ -n "$CONFIG" ]] || die "--config is required"
[[ -n "$WORKDIR" ]] || die "--workdir is required"
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$NODES'"
[[ "$GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "--gpus_per_node must be a positive integer"
[[ -z "$PORT" || "$PORT" =~ ^[0-9]+$ ]] || die "--port must be a number"
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "--max_restarts must be an integer >= 0"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

show() {
  local out="+" arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=" $arg"; else out+=" ${arg@Q}"; fi
  done
  echo "$out"
}

# What every process runs: its rank and GPU come from srun's per-task variables. A task that
# SLURM already bound to a single GPU (CUDA_VISIBLE_DEVICES with one entry) uses that one.
TRAIN="$PYTHON -m asd_jax.train $(printf '%q ' --config="$CONFIG" --workdir="$WORKDIR" "${EXTRA[@]}")"
TRAIN="${TRAIN% }"
TASK='gpu=$SLURM_LOCALID; if [[ -n "${CUDA_VISIBLE_DEVICES:-}" && "$CUDA_VISIBLE_DEVICES" != *,* ]]; then gpu=0; fi; '
TASK+='export JAX_PROCESS_ID=$SLURM_PROCID JAX_LOCAL_DEVICE_IDS=$gpu; exec '"$TRAIN"
SRUN=(srun --nodes="$NODES" --ntasks-per-node="$GPUS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK"
      --kill-on-bad-exit=1 bash -c "$TASK")

# The lines that set up the environment and start srun (inside the allocation).
body() {
  echo "cd ${REPO_ROOT@Q}"
  [[ -n "$VENV" ]] && echo "source ${VENV@Q}/bin/activate"
  echo 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
  if [[ -n "$PORT" ]]; then
    echo "export JAX_COORDINATOR_ADDRESS=\"\${head_node}:$PORT\""
  else
    echo 'export JAX_COORDINATOR_ADDRESS="${head_node}:$((20000 + SLURM_JOB_ID % 20000))"'
  fi
  echo "export JAX_NUM_PROCESSES=$((NODES * GPUS_PER_NODE))"
  # Exit 75: every process saved a checkpoint on SIGTERM and stopped early; run them again.
  echo "n=0"
  echo "while true; do"
  echo "  rc=0; $(show "${SRUN[@]}" | sed 's/^+ //') || rc=\$?"
  echo "  if [[ \$rc -ne $EXIT_PREEMPTED || \$n -ge $MAX_RESTARTS ]]; then exit \$rc; fi"
  echo "  n=\$((n + 1))"
  echo "  echo \"gpu_multinode.sh: training stopped early (exit $EXIT_PREEMPTED, checkpoint saved);" \
       "restart \$n of $MAX_RESTARTS\" >&2"
  echo "done"
}

if [[ "$SRUN_NOW" == 1 ]]; then
  [[ "$DRY_RUN" == 1 || -n "${SLURM_JOB_ID:-}" ]] || die "--srun needs an allocation (salloc)"
  SCRIPT="set -euo pipefail"$'\n'"$(body)"
  echo "+ bash <<'EOF'"
  echo "$SCRIPT"
  echo "EOF"
  [[ "$DRY_RUN" == 1 ]] || exec bash -c "$SCRIPT"
  exit 0
fi

SBATCH_SCRIPT="#!/usr/bin/env bash
#SBATCH --job-name=$JOB_NAME
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=$GPUS_PER_NODE
#SBATCH --gpus-per-node=$GPUS_PER_NODE
#SBATCH --cpus-per-task=$CPUS_PER_TASK
#SBATCH --output=$LOG_DIR/%x-%j.out"
[[ -n "$PARTITION" ]] && SBATCH_SCRIPT+=$'\n'"#SBATCH --partition=$PARTITION"
[[ -n "$ACCOUNT" ]] && SBATCH_SCRIPT+=$'\n'"#SBATCH --account=$ACCOUNT"
[[ -n "$QOS" ]] && SBATCH_SCRIPT+=$'\n'"#SBATCH --qos=$QOS"
[[ -n "$TIME" ]] && SBATCH_SCRIPT+=$'\n'"#SBATCH --time=$TIME"
SBATCH_SCRIPT+=$'\n'"set -euo pipefail"$'\n'"$(body)"

show mkdir -p "$LOG_DIR"
echo "+ sbatch <<'EOF'"
echo "$SBATCH_SCRIPT"
echo "EOF"
if [[ "$DRY_RUN" != 1 ]]; then
  mkdir -p "$LOG_DIR"
  sbatch <<<"$SBATCH_SCRIPT"
fi
