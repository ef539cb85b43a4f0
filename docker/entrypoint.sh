#!/usr/bin/env bash
# The image's entry point.
#
#   docker run IMAGE [--ds_config ds_configs/zero2.json] [--section.key=value ...]
#       -> deepspeed launch/pretrain.py ARGS...     (no arguments, or a first one starting with -)
#   docker run IMAGE alum-ds export runs/default out   |   deepspeed ...   |   bash   |   ...
#       -> that command, unchanged
#
# ALUM_LAUNCHER_ARGS holds flags for the deepspeed launcher itself ("--num_gpus 4 --master_port
# 29600"). `docker stop` (SIGTERM) reaches the training ranks once, through this script: they
# finish the step, save a checkpoint and exit 75; run the same command again to resume. Give them
# time to save: docker stop -t 300.
set -euo pipefail

home=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if (( $# > 0 )) && [[ $1 != -* ]]; then
    exec "$@"
fi

# shellcheck source=launch/slurm/env.sh
source "$home/launch/slurm/env.sh"  # alum_signal_ranks
read -r -a launcher_args <<< "${ALUM_LAUNCHER_ARGS:-}"

deepspeed "${launcher_args[@]}" "$home/launch/pretrain.py" "$@" &
child=$!
# DeepSpeed's runner has no SIGTERM handler and its launch.py gives the ranks 30 s: signal the
# ranks alone (a second SIGTERM makes the trainer exit without saving).
trap 'echo "alum_ds: SIGTERM: asked $(alum_signal_ranks "$child" TERM) rank(s) to save and exit" >&2' TERM
while kill -0 "$child" 2>/dev/null; do
    wait "$child" || true  # returns early when the trap runs
done
rc=0
wait "$child" || rc=$?
exit "$rc"
