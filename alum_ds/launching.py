"""Start one rank per core group on CPU-only machines under the plain ``deepspeed`` command.

DeepSpeed's launcher counts CPU "devices" as NUMA nodes, so on an ordinary one-socket machine it
starts a single rank and leaves the other cores to intra-op threads. The product promise is that
``deepspeed launch/pretrain.py ...`` uses every local device; on the CPU this process therefore
re-launches itself through DeepSpeed's runner with ``--num_gpus N`` when, and only when, the user
did not choose the number of ranks. What the user typed is only on the runner's command line (the
runner passes the ranks a world size, not how it was chosen), so it is read there, from
/proc on Linux; anywhere that cannot be read, nothing is re-launched. ``ALUM_DS_CPU_RANKS`` sets
N (1 disables this).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_EXPLICIT = ("--num_gpus", "--num_nodes", "--include", "--exclude", "-i", "-e", "-H",
             "--hostfile", "--master_addr", "--no_ssh", "--node_rank")
_LAUNCH = "deepspeed.launcher.launch"


def cpu_ranks() -> int:
    env = os.environ.get("ALUM_DS_CPU_RANKS")
    if env:
        return max(1, int(env))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return 2 if (cores or 1) >= 2 else 1


def user_chose_ranks(runner_argv: list[str], runner_env: dict[str, str]) -> bool:
    """Whether the ``deepspeed`` runner's arguments or environment fix the number of ranks."""
    return any(a.split("=")[0] in _EXPLICIT for a in runner_argv) or "LOCAL_SIZE" in runner_env


def _proc(pid: int) -> tuple[int, list[str], dict[str, str]]:
    """(parent pid, argv, environment) of a process, from /proc (OSError where unreadable)."""
    base = Path("/proc") / str(pid)
    argv = base.joinpath("cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    env = dict(e.split("=", 1) for e in base.joinpath("environ").read_bytes().decode(errors="replace")
               .split("\0") if "=" in e)
    ppid = int(base.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
    return ppid, argv, env


def _runner() -> tuple[list[str], dict[str, str]] | None:
    """The argv and environment of the ``deepspeed`` runner that started this rank through its
    per-node launch process; None when this rank was not started that way or /proc is missing."""
    try:
        launch_pid, _, _ = _proc(os.getpid())
        runner_pid, launch_argv, _ = _proc(launch_pid)
        if not any(_LAUNCH in a for a in launch_argv):
            return None
        _, argv, env = _proc(runner_pid)
    except (OSError, ValueError, IndexError):  # no /proc (macOS), or a process already gone
        return None
    return argv, env


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
    runner = _runner()
    if runner is None or user_chose_ranks(*runner):
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
