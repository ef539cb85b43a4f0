# shellcheck shell=bash
# What a multi-node alum_ds job derives from Slurm. Sourced, never run: by pretrain.sbatch on the
# first node (where scontrol exists) and by task.sh, the one task per node that starts DeepSpeed's
# launcher. A value already in the environment wins over the derived one, so each can be set by
# hand (MASTER_ADDR=ib0-address, ALUM_GPUS_PER_NODE=4, ...). tests/test_cluster.py runs these
# functions with fake SLURM_* variables and a fake scontrol.

# MASTER_ADDR (the allocation's first host), MASTER_PORT (from the job id: the same on every node,
# different for two jobs sharing a node, below Linux's ephemeral range), ALUM_HOSTS (all hosts,
# space separated), ALUM_NNODES, ALUM_GPUS_PER_NODE.
alum_slurm_job_env() {
    if [[ -z ${ALUM_HOSTS:-} ]]; then
        if [[ -z ${SLURM_JOB_NODELIST:-} ]]; then
            echo "alum_ds: not inside a Slurm allocation (SLURM_JOB_NODELIST is unset)" >&2
            return 1
        fi
        local listed
        listed=$(scontrol show hostnames "$SLURM_JOB_NODELIST") || {
            echo "alum_ds: scontrol show hostnames $SLURM_JOB_NODELIST failed" >&2
            return 1
        }
        local -a names
        read -r -d '' -a names <<< "$listed" || true
        ALUM_HOSTS="${names[*]}"
    fi
    local -a hosts
    read -r -a hosts <<< "$ALUM_HOSTS"
    if (( ${#hosts[@]} == 0 )); then
        echo "alum_ds: no hosts in the allocation" >&2
        return 1
    fi
    export ALUM_HOSTS
    export MASTER_ADDR=${MASTER_ADDR:-${hosts[0]}}
    export MASTER_PORT=${MASTER_PORT:-$(( 10000 + ${SLURM_JOB_ID:-0} % 20000 ))}
    export ALUM_NNODES=${ALUM_NNODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-${#hosts[@]}}}}
    if (( ALUM_NNODES != ${#hosts[@]} )); then
        echo "alum_ds: $ALUM_NNODES nodes requested but the allocation lists ${#hosts[@]}" >&2
        return 1
    fi
    export ALUM_GPUS_PER_NODE=${ALUM_GPUS_PER_NODE:-$(alum_gpus_per_node)}
}

# Ranks per node: the GPUs Slurm gave this node, else the visible CUDA devices, else 1 (CPU).
alum_gpus_per_node() {
    local n=${SLURM_GPUS_ON_NODE:-}
    if [[ -z $n && -n ${SLURM_GPUS_PER_NODE:-} ]]; then
        n=${SLURM_GPUS_PER_NODE##*:}  # "a100:4" -> 4
    fi
    if [[ -z $n && -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        local -a ids
        IFS=, read -r -a ids <<< "$CUDA_VISIBLE_DEVICES"
        n=${#ids[@]}
    fi
    n=${n%%(*}  # "4(IDX:0-3)" -> 4
    if ! [[ $n =~ ^[0-9]+$ ]] || (( n < 1 )); then
        n=1
    fi
    echo "$n"
}

# DeepSpeed hostfile ("host slots=G" per node) for the runner's --no_ssh mode, where it only
# numbers the ranks: rank = node_rank * G + local rank.
alum_write_hostfile() {
    local path=$1 host
    : > "$path"
    for host in $ALUM_HOSTS; do
        echo "$host slots=$ALUM_GPUS_PER_NODE" >> "$path"
    done
}

# Processes below PID $1 (children, grandchildren, ...), one per line.
alum_descendants() {
    local -a queue=("$1")
    local f line rest ppid pid parent
    while (( ${#queue[@]} )); do
        parent=${queue[0]}
        queue=("${queue[@]:1}")
        for f in /proc/[0-9]*/stat; do
            { read -r line < "$f"; } 2>/dev/null || continue
            rest=${line##*) }  # fields after "(command name)": state ppid ...
            read -r _ ppid _ <<< "$rest"
            if [[ $ppid == "$parent" ]]; then
                pid=${f#/proc/}
                pid=${pid%/stat}
                echo "$pid"
                queue+=("$pid")
            fi
        done
    done
}

# Send signal $2 to the training ranks below PID $1, and to nothing else: DeepSpeed's launch.py,
# if signalled, forwards SIGTERM and kills the ranks 30 s later, and the trainer exits at once on
# a second signal; a rank signalled alone finishes its step, saves a checkpoint and exits 75.
# Ranks are recognised by the --local_rank= argument the launcher gives them.
alum_signal_ranks() {
    local pid cmd n=0
    for pid in $(alum_descendants "$1"); do
        cmd=$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null) || continue
        if [[ $cmd == *" --local_rank="* ]]; then
            kill -s "$2" "$pid" 2>/dev/null && n=$((n + 1))
        fi
    done
    echo "$n"
}
