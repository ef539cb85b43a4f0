"""The few collective operations the trainer needs, over deepspeed.comm."""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

import torch

# deepspeed is imported inside the functions that use it: the model-free modules that import this
# one (objective, for ZeRO-3 detection) stay importable, and fast to import, without it.


def timeout() -> timedelta:
    """How long a collective (and the rendezvous) may wait for a missing rank before failing:
    ``ALUM_DS_DIST_TIMEOUT_MIN`` minutes (else DeepSpeed's ``DEEPSPEED_TIMEOUT``, else 30). Long
    enough for a large checkpoint written to a slow shared file system between two barriers;
    short enough that a dead node ends a multi-node job instead of holding its GPUs for hours."""
    name = next((n for n in ("ALUM_DS_DIST_TIMEOUT_MIN", "DEEPSPEED_TIMEOUT") if os.environ.get(n)), "")
    value = os.environ[name] if name else "30"
    try:
        minutes = float(value)
    except ValueError:
        minutes = -1.0
    if not minutes > 0:
        raise ValueError(f"{name}={value!r}: expected a positive number of minutes")
    return timedelta(minutes=minutes)


def _single_process_env() -> None:
    """Without a launcher (``alum-ds train``) there is no rendezvous environment, and DeepSpeed
    would fall back to MPI discovery (mpi4py). Describe a one-rank world on a free local port."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def init() -> None:
    import deepspeed

    _single_process_env()
    deepspeed.init_distributed(dist_init_required=True, timeout=timeout())
    _unlink_cpu_shm_buffer()


def _unlink_cpu_shm_buffer() -> None:
    """On the CPU, DeepSpeed's shared-memory all-reduce (ranks all on one machine, a single rank
    too) creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> for every rank and
    never removes it: 66 MB of memory per rank per run, kept until reboot. Once every rank has
    mapped every buffer (init_distributed returned everywhere: the barrier), each rank removes its
    buffer's name; the mappings stay valid and nothing is left behind, even after a crash."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank()}")
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except OSError:  # not created (ranks on several machines) or not Linux
        pass


def shutdown() -> None:
    """Tear the process group down before the interpreter exits. Left to interpreter exit,
    finished ranks (once ours, once the HF Trainer's in bench_vs_hf) were seen aborting in
    teardown ("terminate called without an active exception", exit 250) after their work was
    done, which a launcher, Slurm or CI reads as a failed run. Not reproduced in 27 direct runs,
    so that this prevents it is a reasoned guess, not a measured one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def rank() -> int:
    import deepspeed.comm as dist

    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    import deepspeed.comm as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    import deepspeed.comm as dist

    if dist.is_initialized():
        dist.barrier()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    import deepspeed.comm as dist

    if dist.is_initialized() and world() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


def any_rank_fn(device: torch.device):
    """A function mapping a local flag to 'true on any rank' (one tiny all-reduce)."""

    def any_rank(flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        return bool(all_reduce(t, "max").item() > 0)

    return any_rank


def zero3_partitioned(module: torch.nn.Module) -> bool:
    """Whether ZeRO-3 has partitioned ``module``'s parameters (DeepSpeed tags each with ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def gathered(module: torch.nn.Module) -> Any:
    """A context in which ``module``'s parameters are whole on every rank (a no-op below ZeRO-3)."""
    from deepspeed import zero

    return zero.GatheredParameters(list(module.parameters()), enabled=zero3_partitioned(module))
