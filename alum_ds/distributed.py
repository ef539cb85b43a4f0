"""The few collective operations the trainer needs, over deepspeed.comm."""

from __future__ import annotations

import os

import torch


def init() -> None:
    import deepspeed

    deepspeed.init_distributed(dist_init_required=True)


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
