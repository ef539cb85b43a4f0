#!/usr/bin/env bash
# One Slurm task per node (started by pretrain.sbatch through srun, on the host or inside the
# container): runs DeepSpeed's launcher for this node's ranks without ssh,
#
#   deepspeed --hostfile=H --no_ssh --node_rank=$SLURM_NODEID --num_nodes=N --num_gpus=G \
#       --master_addr=$MASTER_ADDR --master_port=$MASTER_PORT launch/pretrain.py ARGS...
#
# and exits with the launcher's status (75: stopped after saving a checkpoint; rerun to resume).
# While it runs, the file named by ALUM_STOP_FILE appearing (pretrain.sbatch creates it when Slurm
# warns of the time limit) sends SIGTERM to this node's ranks only: each finishes its step, saves
# and exits 75. ALUM_RANK_LOG_DIR=DIR writes one log per rank there (--enable_each_rank_log).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
# shellcheck source=launch/slurm/env.sh
source "$here/env.sh"

if [[ -z ${MASTER_ADDR:-} || -z ${ALUM_HOSTS:-} ]]; then
    alum_slurm_job_env
fi
: "${ALUM_NNODES:?}" "${ALUM_GPUS_PER_NODE:?}" "${MASTER_PORT:?}"
node_rank=${SLURM_NODEID:-${ALUM_NODE_RANK:-}}
if [[ -z $node_rank ]]; then
    echo "alum_ds: SLURM_NODEID is unset: run this script through srun (one task per node)" >&2
    exit 2
fi

if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    expected=$(seq -s, 0 $((ALUM_GPUS_PER_NODE - 1)))
    if [[ $CUDA_VISIBLE_DEVICES != "$expected" ]]; then
        # DeepSpeed's launcher sets CUDA_VISIBLE_DEVICES=0..G-1 for the ranks it starts.
        echo "alum_ds: warning: node $node_rank: CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES, but the" \
             "launcher will use devices $expected; allocate whole nodes or constrain devices" \
             "with cgroups (ConstrainDevices=yes)" >&2
    fi
fi

hostfile=$(mktemp "${TMPDIR:-/tmp}/alum_ds-hostfile.XXXXXX")
trap 'rm -f "$hostfile"' EXIT
alum_write_hostfile "$hostfile"

launcher=(deepspeed "--hostfile=$hostfile" --no_ssh "--node_rank=$node_rank"
          "--num_nodes=$ALUM_NNODES" "--num_gpus=$ALUM_GPUS_PER_NODE"
          "--master_addr=$MASTER_ADDR" "--master_port=$MASTER_PORT")
if [[ -n ${ALUM_RANK_LOG_DIR:-} ]]; then
    launcher+=("--enable_each_rank_log=$ALUM_RANK_LOG_DIR")
fi

echo "alum_ds: node $node_rank/$ALUM_NNODES on $(hostname), $ALUM_GPUS_PER_NODE rank(s)," \
     "master $MASTER_ADDR:$MASTER_PORT" >&2
"${launcher[@]}" "$root/launch/pretrain.py" "$@" &
child=$!

# Only the stop file stops the ranks gracefully: a SIGTERM that Slurm sends to the whole step
# (scancel, preemption) also reaches DeepSpeed's launcher, which kills the ranks within 30 s.
if [[ -n ${ALUM_STOP_FILE:-} ]]; then
    while kill -0 "$child" 2>/dev/null; do
        if [[ -e $ALUM_STOP_FILE ]]; then
            n=$(alum_signal_ranks "$child" TERM)
            if (( n > 0 )); then  # else the ranks are not started yet: try again
                echo "alum_ds: node $node_rank: stop requested, asked $n rank(s) to save and exit" >&2
                break
            fi
        fi
        sleep "${ALUM_STOP_POLL_S:-2}"
    done
fi
rc=0
wait "$child" || rc=$?
exit "$rc"
