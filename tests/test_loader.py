"""Pins ``alum_ds.data.loader``: the loaders that make batches ahead (a thread, DataLoader workers)
give the serial stream's batches, resume exactly and pass errors on."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from alum_ds.config import MaskingConfig
from alum_ds.data.shards import DataError
from tests._data_helpers import SEED, SEQ_LEN, _stream


@pytest.mark.parametrize("world,rank", [(1, 0), (3, 2)])
def test_prefetcher_yields_the_serial_batches_and_resumes(data_dir: Path, world: int, rank: int) -> None:
    from alum_ds.data.loader import Prefetcher

    micro, k = 5, 7
    serial = _stream(data_dir)
    steps = len(serial.seqs) // (world * micro) + 3  # into the second epoch
    want = [serial.next_for_rank(rank=rank, world=world, micro_batch=micro) for _ in range(steps)]
    with Prefetcher(_stream(data_dir), depth=3) as pf:
        for i in range(k):
            got = pf.next_for_rank(rank=rank, world=world, micro_batch=micro)
            np.testing.assert_array_equal(got[0], want[i][0])
            np.testing.assert_array_equal(got[1], want[i][1])
        state = json.loads(json.dumps(pf.state_dict()))
        assert state["consumed"] == pf.state.consumed == k * world * micro  # taken, not made
        rest = [pf.next_for_rank(rank=rank, world=world, micro_batch=micro) for _ in range(steps - k)]
    assert pf.epoch == serial.epoch == 1
    for got, exp in zip(rest, want[k:]):
        np.testing.assert_array_equal(got[0], exp[0])
    with Prefetcher(_stream(data_dir)) as resumed:
        resumed.load_state_dict(state)
        for exp in want[k : k + 3]:
            np.testing.assert_array_equal(resumed.next_for_rank(rank=rank, world=world, micro_batch=micro)[1],
                                          exp[1])
        resumed.load_state_dict({"consumed": 0})  # moving back restarts the producer
        np.testing.assert_array_equal(resumed.next_for_rank(rank=rank, world=world, micro_batch=micro)[0],
                                      want[0][0])


def test_prefetcher_passes_errors_on(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from alum_ds.data.loader import Prefetcher

    s = _stream(data_dir)
    monkeypatch.setattr(s, "batch_at", lambda *a: (_ for _ in ()).throw(DataError("boom")))
    with Prefetcher(s) as pf, pytest.raises(DataError, match="boom"):
        pf.next_for_rank(rank=0, world=1, micro_batch=2)
    assert s.state.consumed == 0


def test_workers_partition_the_serial_order(data_dir: Path) -> None:
    from alum_ds.data.loader import StreamDataset, WorkerLoader

    micro, world, rank, start = 4, 2, 1, 24
    ds = StreamDataset(str(data_dir), seq_len=SEQ_LEN, seed=SEED, masking=MaskingConfig(), rank=rank,
                       world=world, micro_batch=micro, start=start)
    serial = [start + k * world * micro + rank * micro for k in range(30)]
    for workers in (1, 2, 3):
        parts = [list(itertools.islice(ds.worker_positions(w, workers), 30 // workers))
                 for w in range(workers)]
        flat = [p for part in parts for p in part]
        assert len(set(flat)) == len(flat)  # disjoint
        merged = [parts[k % workers][k // workers] for k in range(30)]  # the DataLoader's order
        assert merged == serial
    s = _stream(data_dir)
    s.load_state_dict({"consumed": start})
    with WorkerLoader(_stream(data_dir), num_workers=2) as wl:
        wl.load_state_dict({"consumed": start})
        for _ in range(5):
            a = wl.next_for_rank(rank=rank, world=world, micro_batch=micro)
            b = s.next_for_rank(rank=rank, world=world, micro_batch=micro)
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1], b[1])
        assert wl.state.consumed == s.state.consumed
