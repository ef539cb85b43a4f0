"""Loaders that never keep the trainer waiting: micro-batches produced ahead, in a thread
(:class:`Prefetcher`) or in DataLoader worker processes (:class:`WorkerLoader`).

Both wrap a :class:`TrainStream` and keep its API (``next_for_rank``, ``state``, ``state_dict``,
``load_state_dict``, ``epoch``, ``seqs``), so ``stream = Prefetcher(TrainStream(...))`` is the
whole change in a trainer. The batches are exactly those of calling ``next_for_rank`` serially:
micro-step ``k`` of rank ``r`` is ``batch_at(consumed + k * world * micro_batch + r *
micro_batch)``, a pure function of the position. ``state.consumed`` counts the batches the
trainer has *taken*, never those produced ahead, so a checkpoint resumes exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import count
from typing import Any

import numpy as np
import torch

from alum_ds.config import MaskingConfig
from alum_ds.data.progress import background
from alum_ds.data.stream import StreamState, TrainStream

Batch = tuple[np.ndarray, np.ndarray]


def rank_positions(start: int, *, rank: int, world: int, micro_batch: int) -> Iterator[int]:
    """Global position of this rank's part of each micro-step from ``start`` on."""
    for k in count():
        yield start + k * world * micro_batch + rank * micro_batch


class _Ahead:
    """The shared part: TrainStream's API over an iterator of batches made ahead."""

    def __init__(self, stream: TrainStream) -> None:
        self.stream = stream
        self._it: Any = None
        self._key: tuple[int, int, int, int] | None = None

    # TrainStream's API -------------------------------------------------------------------
    @property
    def seqs(self) -> Any:
        return self.stream.seqs

    @property
    def state(self) -> StreamState:
        return self.stream.state

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    def batch_at(self, start: int, count: int) -> Batch:
        return self.stream.batch_at(start, count)

    def state_dict(self) -> dict[str, int]:
        return self.stream.state_dict()

    def load_state_dict(self, d: dict[str, int]) -> None:
        self._stop()
        self.stream.load_state_dict(d)

    def next_for_rank(self, *, rank: int, world: int, micro_batch: int) -> Batch:
        """This rank's part of the next micro-step (made ahead); advances the consumed count."""
        key = (self.stream.state.consumed, rank, world, micro_batch)
        if self._key != key:
            # First call, other arguments, or the count was moved from outside: start again
            # from the count, so what is returned never depends on what was made ahead.
            self._stop()
            self._it = self._start(self.stream.state.consumed, rank, world, micro_batch)
        batch = next(self._it)
        self.stream.state.consumed += world * micro_batch
        self._key = (self.stream.state.consumed, rank, world, micro_batch)
        return batch

    def close(self) -> None:
        self._stop()

    def __enter__(self) -> _Ahead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # for subclasses ---------------------------------------------------------------------
    def _start(self, start: int, rank: int, world: int, micro_batch: int) -> Iterator[Batch]:
        raise NotImplementedError

    def _stop(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()
        self._it, self._key = None, None


class Prefetcher(_Ahead):
    """A daemon thread makes this rank's next ``depth`` micro-batches while the trainer computes
    (numpy releases the GIL in the heavy parts of packing and masking)."""

    def __init__(self, stream: TrainStream, *, depth: int = 4) -> None:
        super().__init__(stream)
        self.depth = depth

    def _start(self, start: int, rank: int, world: int, micro_batch: int) -> Iterator[Batch]:
        s = self.stream
        pos = rank_positions(start, rank=rank, world=world, micro_batch=micro_batch)
        return background((s.batch_at(p, micro_batch) for p in pos), depth=self.depth)


class StreamDataset(torch.utils.data.IterableDataset):
    """One rank's micro-batches from ``start`` on, for a ``DataLoader(batch_size=None)``.

    Worker ``w`` of ``W`` makes micro-steps ``w, w + W, w + 2W, ...``: disjoint parts whose
    round-robin merge (the DataLoader's order) is the serial order."""

    def __init__(self, data_dir: str, *, seq_len: int, seed: int, masking: MaskingConfig,
                 rank: int, world: int, micro_batch: int, start: int = 0) -> None:
        super().__init__()
        self.args = dict(data_dir=data_dir, seq_len=seq_len, seed=seed, masking=masking)
        self.rank, self.world, self.micro_batch, self.start = rank, world, micro_batch, start

    def worker_positions(self, worker: int, workers: int) -> Iterator[int]:
        """Start positions of worker ``worker``'s micro-batches (of ``workers``)."""
        step = self.world * self.micro_batch
        pos = self.start + self.rank * self.micro_batch + worker * step
        while True:
            yield pos
            pos += workers * step

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # Opened in the worker: memory maps are per process.
        stream = TrainStream(self.args["data_dir"], seq_len=self.args["seq_len"],
                             seed=self.args["seed"], masking=self.args["masking"])
        for p in self.worker_positions(worker, workers):
            yield stream.batch_at(p, self.micro_batch)


def _keep_numpy(batch: Batch) -> Batch:
    return batch


class WorkerLoader(_Ahead):
    """Micro-batches made in ``num_workers`` DataLoader processes (for when one thread cannot
    keep up, e.g. many GPUs per node with long sequences)."""

    def __init__(self, stream: TrainStream, *, num_workers: int = 2, prefetch_factor: int = 2) -> None:
        super().__init__(stream)
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor

    def _start(self, start: int, rank: int, world: int, micro_batch: int) -> Iterator[Batch]:
        s = self.stream
        ds = StreamDataset(str(s.data_dir), seq_len=s.seq_len, seed=s.seed, masking=s.masking,
                           rank=rank, world=world, micro_batch=micro_batch, start=start)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=None, num_workers=self.num_workers, collate_fn=_keep_numpy,
            prefetch_factor=self.prefetch_factor if self.num_workers else None)
        return _LoaderIter(iter(loader))


class _LoaderIter:
    def __init__(self, it: Any) -> None:
        self.it = it

    def __iter__(self) -> _LoaderIter:
        return self

    def __next__(self) -> Batch:
        return next(self.it)

    def close(self) -> None:
        # Otherwise the worker processes end only when the iterator is garbage collected.
        shutdown = getattr(self.it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self.it = None
