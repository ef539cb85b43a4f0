"""Start one rank per core group on CPU-only machines under the plain ``deepspeed`` command.

DeepSpeed's launcher counts CPU "devices" as NUMA nodes, so on an ordinary one-socket machine it
starts a single rank and leaves the other cores to intra-op threads. The product promise is that
``deepspeed launch/pretrain.py ...`` uses every local device; on the CPU this process therefore
re-launches itself through DeepSpeed's runner with ``--num_gpus N`` when, and only when, the user
did not choose the number of ranks (``--num_gpus``, ``--include``, ``--hostfile`` ... or
``LOCAL_SIZE``). ``ALUM_DS_CPU_RANKS`` sets N (1 disables this).
"""

from __future__ import annotations

import os
import sys

_EXPLICIT = ("--num_gpus", "--num_nodes", "--include", "--exclude", "-i", "-e", "-H",
             "--hostfile", "--master_addr", "--no_ssh", "--node_rank")


def cpu_ranks() -> int:
    env = os.environ.get("ALUM_DS_CPU_RANKS")
    if env:
        return max(1, int(env))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return 2 if (cores or 1) >= 2 else 1


def _runner_process():
    """The ``deepspeed`` runner process that started this rank, if any."""
    import psutil

    p = psutil.Process().parent()
    if p is None or "deepspeed.launcher.launch" not in " ".join(p.cmdline()):
        return None
    return p.parent()


def maybe_respawn_cpu_ranks() -> None:
    """Replace this process by a multi-rank launch if the conditions above hold."""
    if os.environ.get("ALUM_DS_RESPAWNED") or os.environ.get("WORLD_SIZE") != "1":
        return
    n = cpu_ranks()
    if n <= 1:
        return
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    try:
        runner = _runner_process()
        if runner is None:
            return
        runner_args = runner.cmdline()
        if any(a.split("=")[0] in _EXPLICIT for a in runner_args):
            return
        if "LOCAL_SIZE" in runner.environ():
            return
    except Exception:  # noqa: BLE001 - process inspection can fail in sandboxes; then do nothing
        return
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "CROSS_RANK",
                        "CROSS_SIZE", "MASTER_ADDR")}
    env["ALUM_DS_RESPAWNED"] = "1"
    port = os.environ.get("MASTER_PORT", "29500")
    cmd = [sys.executable, "-u", "-c", "from deepspeed.launcher.runner import main; main()",
           f"--num_gpus={n}", f"--master_port={port}", sys.argv[0], *args]
    print(f"alum_ds: CPU-only machine, starting {n} ranks (set ALUM_DS_CPU_RANKS to change)",
          file=sys.stderr, flush=True)
    os.execve(sys.executable, cmd, env)
