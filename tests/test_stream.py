"""Pins ``alum_ds.data.stream``: FULL-SENTENCES packing across shard boundaries, the ranks'
partition of every epoch, seeded epoch orders, and resuming the stream from its state."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from alum_ds.data import prepare as P
from alum_ds.data.corpus import embedded_documents
from alum_ds.data.shards import DataError
from alum_ds.data.stream import PackedSequences
from tests._data_helpers import SEED, SEQ_LEN, _one_line, _prepare, _stream, _unmask, _write_corpus


def test_round_trip_across_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # One document per line: more documents than one encoding batch (1024), and a tiny shard
    # size, so the train split spans several shards and sequences cross shard boundaries.
    lines = [ln.strip() for d in embedded_documents()[:40] for ln in d.splitlines() if ln.strip()]
    assert len(lines) > 1024
    src = _write_corpus(tmp_path / "lines.txt", lines)
    monkeypatch.setattr(P, "SHARD_TOKENS", 2000)
    out = tmp_path / "data"
    m = _prepare([src], out, val_fraction=0.0)
    assert len(m["splits"]["train"]) >= 2
    assert m["source"]["documents"] == len(lines)

    docs = list(P.read_documents([src]))
    assert docs == lines
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    eos, bos = m["tokenizer"]["eos_id"], m["tokenizer"]["bos_id"]
    expected = np.concatenate([np.asarray(ids + [eos], dtype=np.int64)
                               for ids in tok(docs, add_special_tokens=False)["input_ids"]])

    seqs = PackedSequences(out, "train", SEQ_LEN)
    body = SEQ_LEN - 2
    assert seqs.stream_tokens == expected.size
    assert len(seqs) == expected.size // body and expected.size - len(seqs) * body < body
    got = seqs.get(np.arange(len(seqs)))
    assert got.shape == (len(seqs), SEQ_LEN)
    assert (got[:, 0] == bos).all() and (got[:, -1] == eos).all()
    np.testing.assert_array_equal(got[:, 1:-1].reshape(-1), expected[: len(seqs) * body])
    # Random access in any order gives the same rows.
    ids = np.random.default_rng(0).permutation(len(seqs))[:50]
    np.testing.assert_array_equal(seqs.get(ids), got[ids])


def test_corpus_shorter_than_one_sequence(tmp_path: Path) -> None:
    src = _write_corpus(tmp_path / "tiny.txt", ["a tiny corpus", "of two documents"])
    out = tmp_path / "data"
    _prepare([src], out, val_fraction=0.0)
    with pytest.raises(DataError) as e:
        PackedSequences(out, "train", SEQ_LEN)
    _one_line(e, out, "seq_len")


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_partition_each_epoch(data_dir: Path, world: int) -> None:
    micro = 5
    ranks = [_stream(data_dir) for _ in range(world)]
    n = len(ranks[0].seqs)
    per_step = world * micro
    steps = -(-n // per_step)  # the last step may run into the next epoch
    seen: list[list[np.ndarray]] = [[] for _ in range(world)]
    for step in range(steps):
        for r, s in enumerate(ranks):
            inputs, labels = s.next_for_rank(rank=r, world=world, micro_batch=micro)
            pos = step * per_step + r * micro + np.arange(micro, dtype=np.int64)
            epochs, ids, _ = s.at(pos)
            # What the rank got is exactly the sequences at its global positions.
            np.testing.assert_array_equal(_unmask(inputs, labels), s.seqs.get(ids))
            bi, bl = s.batch_at(int(pos[0]), micro)
            np.testing.assert_array_equal(inputs, bi)
            np.testing.assert_array_equal(labels, bl)
            seen[r].append(ids[epochs == 0])
    for s in ranks:
        assert s.state.consumed == steps * per_step
    sets = [np.concatenate(x) for x in seen]
    for r in range(world):
        assert np.unique(sets[r]).size == sets[r].size
        for q in range(r + 1, world):
            assert np.intersect1d(sets[r], sets[q]).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate(sets)), np.arange(n))


def test_epoch_orders_differ_and_repeat(data_dir: Path) -> None:
    a, b = _stream(data_dir), _stream(data_dir)
    n = len(a.seqs)
    e0, e1 = a.order(0).copy(), a.order(1).copy()
    assert not np.array_equal(e0, e1)
    np.testing.assert_array_equal(np.sort(e1), np.arange(n))
    np.testing.assert_array_equal(b.order(1), e1)
    np.testing.assert_array_equal(b.order(0), e0)
    assert not np.array_equal(_stream(data_dir, seed=SEED + 1).order(0), e0)


def test_resume_yields_the_same_batches(data_dir: Path) -> None:
    micro = 6
    a = _stream(data_dir)
    n = len(a.seqs)
    steps_before = n // micro - 2  # the batches after the resume cross into epoch 1
    for _ in range(steps_before):
        a.next_for_rank(rank=0, world=1, micro_batch=micro)
    state = json.loads(json.dumps(a.state_dict()))  # as a checkpoint would store it
    b = _stream(data_dir)
    b.load_state_dict(state)
    assert b.state.consumed == a.state.consumed and b.epoch == a.epoch == 0
    for _ in range(5):
        ia, la = a.next_for_rank(rank=0, world=1, micro_batch=micro)
        ib, lb = b.next_for_rank(rank=0, world=1, micro_batch=micro)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(la, lb)
    assert a.epoch == b.epoch == 1


def test_resume_two_ranks_on_one(data_dir: Path) -> None:
    micro, world = 4, 2
    ranks = [_stream(data_dir) for _ in range(world)]
    for _ in range(7):
        for r, s in enumerate(ranks):
            s.next_for_rank(rank=r, world=world, micro_batch=micro)
    state = ranks[0].state_dict()
    assert state == ranks[1].state_dict()
    resumed = [_stream(data_dir) for _ in range(world)]
    single = _stream(data_dir)
    for s in [*resumed, single]:
        s.load_state_dict(state)
    for _ in range(3):
        parts = [s.next_for_rank(rank=r, world=world, micro_batch=micro) for r, s in enumerate(resumed)]
        inputs, labels = single.next_for_rank(rank=0, world=1, micro_batch=world * micro)
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), inputs)
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), labels)
    assert single.state.consumed == resumed[0].state.consumed == resumed[1].state.consumed


def test_resume_refuses_other_data(data_dir: Path) -> None:
    s = _stream(data_dir)
    with pytest.raises(DataError) as e:
        s.load_state_dict({"consumed": 3, "num_sequences": len(s.seqs) + 1})
    _one_line(e, len(s.seqs) + 1)
