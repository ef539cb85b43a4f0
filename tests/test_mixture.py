"""Mixtures of prepared folders (alum_ds.data.mixture): the schedule's proportions over prefixes
and windows (property tests, and an exhaustive check over whole periods), O(1) lookup at any
position, per-source streams and epochs, resume by the counter alone, and the refusals."""

from __future__ import annotations

import itertools
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alum_ds.config import ConfigError, DataConfig, MaskingConfig, load_config
from alum_ds.data import mixture as M
from alum_ds.data.shards import DataError
from alum_ds.data.stream import TrainStream

SEQ = 32


def _prefix_deviation(counts: np.ndarray) -> np.ndarray:
    """``D[n, s] = C_s(n) - n w_s`` for n = 0..P over one period (exact in float64 at these sizes)."""
    sched = M.chairman_schedule(counts)
    P, k = len(sched), len(counts)
    onehot = np.zeros((P, k))
    onehot[np.arange(P), sched] = 1
    C = np.vstack([np.zeros(k), np.cumsum(onehot, axis=0)])
    return C - np.arange(P + 1)[:, None] * (counts / P)[None, :]


weights_st = st.lists(st.integers(1, 300), min_size=2, max_size=12)


@settings(max_examples=150, deadline=None)
@given(weights_st)
def test_every_prefix_and_every_window_of_a_whole_period(w: list[int]) -> None:
    """Exhaustive over one period (the schedule repeats, so this covers every n and window):
    prefixes within 1 - 1/(2k-2), windows within 2 - 1/(k-1) (1 with two sources), and each
    source exactly its share per period."""
    counts = np.array(w, dtype=np.int64)
    k = len(w)
    D = _prefix_deviation(counts)
    assert np.allclose(D[-1], 0)
    assert np.abs(D).max() <= 1 - 1 / (2 * k - 2) + 1e-9, (w, np.abs(D).max())
    window = (D.max(axis=0) - D.min(axis=0)).max()  # the worst count - N w over all windows
    assert window <= 2 - 1 / (k - 1) + 1e-9, (w, window)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.fractions(min_value=Fraction(1, 20), max_value=50, max_denominator=20),
                min_size=2, max_size=10),
       st.integers(0, 10**15), st.integers(1, 10**7), st.integers(0, 10**15))
def test_windows_anywhere_from_counts_at(weights: list[Fraction], start: int, n: int,
                                         prefix: int) -> None:
    """Random real weights, windows anywhere up to 10^15: the O(k log P) counts give each
    source's share of the window within 2 - 1/(k-1) of N x share, every prefix within
    1 - 1/(2k-2), both against the (possibly rounded) shares of the schedule."""
    counts, exact = M.integer_shares(weights)
    sch = M.Schedule(counts)
    share = counts / sch.period
    k = len(weights)
    if exact:
        total = sum(weights)
        assert all(Fraction(int(c), sch.period) == w / total for c, w in zip(counts, weights))
    got = sch.counts_at(start + n) - sch.counts_at(start)
    assert got.sum() == n
    assert np.abs(got - n * share).max() <= 2 - 1 / (k - 1) + 1e-6
    c = sch.counts_at(prefix)
    # (prefix * share loses float precision at 10^15; compare in exact integers)
    dev = [abs(Fraction(int(ci) * sch.period - prefix * int(wi), sch.period)) for ci, wi in zip(c, counts)]
    assert max(dev) <= 1 - Fraction(1, 2 * k - 2)


@settings(max_examples=60, deadline=None)
@given(weights_st, st.integers(0, 10**12), st.integers(1, 2000))
def test_locate_agrees_with_counting(w: list[int], start: int, n: int) -> None:
    """The index a position has within its source is the number of earlier positions of that
    source; a window's sources counted one by one equal the counts' difference."""
    sch = M.Schedule(np.array(w))
    src, local = sch.locate(np.arange(start, start + n))
    before = sch.counts_at(start)
    for s in range(len(w)):
        mine = local[src == s]
        assert np.array_equal(mine, before[s] + np.arange(mine.size))
    assert np.array_equal(np.bincount(src, minlength=len(w)), sch.counts_at(start + n) - before)


def test_two_sources_every_window_within_1() -> None:
    for a, b in [(1, 2), (7, 3), (1, 999), (500, 501), (13, 21)]:
        D = _prefix_deviation(np.array([a, b]))
        assert (D.max(axis=0) - D.min(axis=0)).max() <= 1 + 1e-12


def _window_ok(seq: list[int], w: list[int]) -> bool:
    P = len(seq)
    for s, ws in enumerate(w):
        c = np.concatenate([[0], np.cumsum(np.array(seq * 2) == s)])
        for n in range(1, P + 1):
            if np.abs((c[n:n + P] - c[:P]) * P - n * ws).max() > P:
                return False
    return True


def test_three_sources_cannot_all_stay_within_1_on_every_window() -> None:
    """Shares 1/11, 2/11, 8/11: not one of the 495 schedules of period 11 keeps every window
    within 1 of its share, so 'within 1 on every window' is not a bound any schedule can give;
    the chairman schedule's 2 - 1/(k-1) is what holds."""
    w = [1, 2, 8]
    arrangements = []
    for zero in range(11):
        rest = [i for i in range(11) if i != zero]
        for ones in itertools.combinations(rest, 2):
            seq = [2] * 11
            seq[zero] = 0
            for i in ones:
                seq[i] = 1
            arrangements.append(tuple(seq))
    assert len(set(arrangements)) == 495
    assert not any(_window_ok(list(p), w) for p in arrangements)
    D = _prefix_deviation(np.array(w))
    assert 1 < (D.max(axis=0) - D.min(axis=0)).max() <= 1.5


def test_integer_shares() -> None:
    assert M.integer_shares([Fraction("0.7"), Fraction("0.3")]) [0].tolist() == [7, 3]
    counts, exact = M.integer_shares([Fraction(5), Fraction(3), Fraction(2)])
    assert counts.tolist() == [5, 3, 2] and exact
    counts, exact = M.integer_shares([Fraction(1, 3), Fraction(2, 3)])
    assert counts.tolist() == [1, 2] and exact
    counts, exact = M.integer_shares([Fraction(1), Fraction(1, 70001)])  # needs a period > 2^16
    assert not exact and counts.sum() == M.PERIOD_MAX and counts[1] == 1
    with pytest.raises(ValueError, match="below 1/65536"):
        M.integer_shares([Fraction(1), Fraction(1, 200000)])
    # A rounded schedule keeps its bounds against the shares it gives.
    D = _prefix_deviation(M.integer_shares([Fraction(1), Fraction(1, 3001), Fraction(7, 11)])[0])
    assert np.abs(D).max() <= 1 - 1 / 4


def _sources(*pairs: tuple[Path, str]) -> DataConfig:
    return DataConfig(sources=[f"{d}:{w}" for d, w in pairs])


def test_each_source_keeps_its_own_stream_and_epochs(mix: dict[str, Path]) -> None:
    """The i-th sequence the schedule gives a source is position i of that source's own stream
    (its permutation, epochs and masks); the small source starts new epochs, each a new order
    of all of its sequences."""
    data = _sources((mix["big"], "3"), (mix["small"], "1"))
    s = M.open_train_stream(data, mix["big"], seed=5, masking=MaskingConfig())
    assert isinstance(s, M.MixtureStream)
    n_small = int(s.sizes[1])
    total = 4 * n_small * 3 + 8  # the small source's share (1/4) covers 3 epochs and a bit
    x, y = s.batch_at(0, total)
    src, local = s.schedule.locate(np.arange(total))
    for k, seed_index in ((0, 0), (1, 1)):
        own = TrainStream(data.sources[k].rpartition(":")[0], seq_len=SEQ,
                          seed=M.source_seed(5, seed_index), masking=MaskingConfig())
        ox, oy = own.batch_at(0, int((src == k).sum()))
        assert np.array_equal(x[src == k], ox) and np.array_equal(y[src == k], oy)
    small = local[src == 1]
    assert np.array_equal(small, np.arange(small.size))
    _, ids, _ = s.streams[1].at(small)
    for e in range(3):  # each epoch of the small source: all its sequences, in a new order
        epoch_ids = ids[e * n_small:(e + 1) * n_small]
        assert sorted(epoch_ids) == list(range(n_small))
    assert not np.array_equal(ids[:n_small], ids[n_small:2 * n_small])
    s.state.consumed = 4 * n_small - 4
    before = s.state.consumed
    s.state.consumed += 8
    assert s.new_epochs(before) == [f"data source small starts epoch 1 ({n_small:,} sequences per epoch)"]
    v = s.log_values()
    assert v["epoch/small"] == 1 and v[f"epoch/{s.sources[0].name}"] == 0
    assert v["tokens/small"] + v[f"tokens/{s.sources[0].name}"] == s.state.consumed * SEQ


def test_the_counter_is_the_whole_state_for_any_rank_layout(mix: dict[str, Path]) -> None:
    """Two ranks' micro-batches, one rank's, or a stream restored from a state dict at step k:
    the same sequences at the same global positions."""
    data = _sources((mix["big"], "0.6"), (mix["small"], "0.4"))

    def stream() -> M.MixtureStream:
        return M.open_train_stream(data, mix["big"], seed=9, masking=MaskingConfig())

    one, two = stream(), stream()
    a = [one.next_for_rank(rank=0, world=1, micro_batch=4)[0] for _ in range(6)]
    b = []
    for _ in range(3):
        parts = [two.batch_at(two.state.consumed + r * 4, 4)[0] for r in range(2)]
        two.state.consumed += 8
        b += parts
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    resumed = stream()
    resumed.load_state_dict(json.loads(json.dumps(one.state_dict())))
    assert np.array_equal(resumed.next_for_rank(rank=0, world=1, micro_batch=4)[0],
                          one.next_for_rank(rank=0, world=1, micro_batch=4)[0])
    far = stream()
    far.state.consumed = 10**12  # O(1) at any position
    x, _ = far.batch_at(10**12, 4)
    assert x.shape == (4, SEQ)
    other = M.open_train_stream(_sources((mix["big"], "0.5"), (mix["small"], "0.5")), mix["big"],
                                seed=9, masking=MaskingConfig())
    with pytest.raises(DataError, match="is not this run's"):
        other.load_state_dict(one.state_dict())


def test_sources_with_other_tokenizers_are_refused_by_name(mix: dict[str, Path], tmp_path: Path,
                                                           capsys, monkeypatch) -> None:
    data = _sources((mix["big"], "1"), (mix["foreign"], "1"))
    with pytest.raises(DataError) as e:
        M.check_sources(data)
    msg = str(e.value)
    assert "\n" not in msg and str(mix["big"]) in msg and str(mix["foreign"]) in msg
    assert "different tokenizers" in msg
    from alum_ds.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    run_dir = tmp_path / "run"
    assert main(["train", f"--run.dir={run_dir}",
                 f"--data.sources={mix['big']}:0.5,{mix['foreign']}:0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("alum-ds: error: data.sources: ") and "Traceback" not in "".join(err)
    assert not run_dir.exists()


def test_sources_from_toml_and_the_command_line(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text('[[data.sources]]\ndir = "data/wiki"\nweight = 0.7\n\n'
                    '[[data.sources]]\ndir = "s3://bucket/books"\nweight = 0.3\n')
    from_file = load_config(str(toml)).data.sources
    assert from_file == ["data/wiki:0.7", "s3://bucket/books:0.3"]
    assert load_config(None, ["--data.sources=data/wiki:0.7,s3://bucket/books:0.3"]).data.sources == from_file
    assert [s.name for s in M.sources_of(DataConfig(sources=["a/x:1", "b/x:2"]))] == ["x", "x-2"]
    for bad, words in ((["--data.sources=a:0"], "positive weight"),
                       (["--data.sources=a:1", "--data.dir=b"], "not both")):
        with pytest.raises(ConfigError, match=words):
            load_config(None, bad)
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text('[[data.sources]]\npath = "x"\n')
    with pytest.raises(ConfigError, match="dir and weight"):
        load_config(str(bad_toml))
    # One folder as data.dir: the config hash of runs made before mixtures existed.
    assert "sources" not in json.dumps(load_config(None, ["--data.dir=x"]).fingerprint())
