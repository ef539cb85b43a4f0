"""Weighted mixtures of prepared folders (``data.sources``): a deterministic schedule of sources.

A source's weight is its share of the training sequences. The shares are made integers ``W_s``
over a period ``P = sum(W_s)``: exactly the given shares when their common denominator is at most
``PERIOD_MAX`` (decimal or ``a/b`` weights such as 0.7/0.3 or 5:3:2), else the nearest such
integers (largest remainders), which the run states. Position ``n`` of the mixture's stream
belongs to source ``schedule[n % P]``: one period, built once, is the whole schedule.

The period is Tijdeman's chairman assignment (R. Tijdeman, "The chairman assignment problem",
Discrete Mathematics 32, 1980): at each position, among the sources that are at least
``1/(2k-2)`` of a sequence behind their share, the one with the earliest deadline. For ``k``
sources it keeps every prefix within ``1 - 1/(2k-2)`` of its share: ``|C_s(n) - n w_s| <= 1 -
1/(2k-2)`` for every ``n`` (the period ends with every source at exactly ``W_s``, so the bound
holds past the first period too). A window ``[a, b)`` counts ``C_s(b) - C_s(a)``, so every
window of ``N`` sequences is within ``2 - 1/(k-1)`` of ``N w_s``; with two sources within 1.
Within 1 on every window is not possible for three or more sources in general: no schedule of
shares 1/11, 2/11, 8/11 with period 11 has it (tests/test_mixture.py searches them all).

Each source keeps its own stream (``TrainStream``: its seeded permutation per epoch, its masks):
the ``i``-th sequence the schedule gives source ``s`` is position ``i`` of that source's stream,
so a small source repeats (a new epoch, a new order) while a large one goes on. The state is the
global count of sequences consumed; the per-source counts follow from it in ``O(k log P)``, so
resuming at any step, on any number of ranks, costs the same.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from alum_ds.config import DataConfig, MaskingConfig, cache_dir
from alum_ds.data.remote import local_dir
from alum_ds.data.shards import DataError, read_manifest
from alum_ds.data.stream import StreamState, TrainStream, _distinct, check_splits

PERIOD_MAX = 1 << 16
"""The longest schedule period: shares are exact to 1/65,536 at worst (building it: ~0.2 s)."""


@dataclass(frozen=True)
class Source:
    name: str
    dir: Path
    weight: Fraction
    given: str = ""
    """The folder as configured: ``dir`` itself, or the URL ``dir`` mirrors."""

    @property
    def label(self) -> str:
        return self.given if self.given and self.given != str(self.dir) else str(self.dir)


def sources_of(data: DataConfig) -> list[Source]:
    """The configured sources, each named by its folder's last component (made unique); a URL's
    folder is its node-local mirror."""
    out: list[Source] = []
    seen: dict[str, int] = {}
    cache = cache_dir(data.cache_dir)
    for entry in data.sources:
        d, _, w = entry.rpartition(":")
        base = Path(d.rstrip("/")).name or d
        seen[base] = seen.get(base, 0) + 1
        name = base if seen[base] == 1 else f"{base}-{seen[base]}"
        out.append(Source(name, local_dir(d, cache), Fraction(w), d))
    return out


def integer_shares(weights: list[Fraction], period_max: int = PERIOD_MAX) -> tuple[np.ndarray, bool]:
    """``(W, exact)``: integers whose ratios are the normalised weights (``exact``), or, where
    that needs a period above ``period_max``, the largest-remainder apportionment of it."""
    total = sum(weights)
    shares = [w / total for w in weights]
    period = math.lcm(*(s.denominator for s in shares))
    if period <= period_max:
        return np.array([int(s * period) for s in shares], dtype=np.int64), True
    quota = [s * period_max for s in shares]
    counts = [int(q) for q in quota]
    by_remainder = sorted(range(len(quota)), key=lambda i: (quota[i] - counts[i], -i), reverse=True)
    for i in by_remainder[: period_max - sum(counts)]:
        counts[i] += 1
    if min(counts) == 0:
        raise ValueError(f"share {float(shares[counts.index(0)]):.3g} is below 1/{period_max}")
    return np.array(counts, dtype=np.int64), False


def chairman_schedule(counts: np.ndarray) -> np.ndarray:
    """One period of Tijdeman's assignment for integer shares ``counts``: ``[sum(counts)]``
    source indices, source ``s`` exactly ``counts[s]`` times. Exact integer arithmetic."""
    W = [int(c) for c in counts]
    P, k = sum(W), len(W)
    if k == 1:
        return np.zeros(P, dtype=np.int32)
    m = 2 * k - 2  # the rule's margin is 1/m of a sequence
    C = [0] * k
    # Release: the first time t with t w_s - C_s >= 1/m, an integer ceiling. Deadline: (C_s + 1 -
    # 1/m) / w_s, compared as (m (C_s + 1) - 1) / W_s: a double holds these quotients exactly
    # enough (two distinct ones, below 2m, differ by at least 1/P^2 >= 2^-32, far above the
    # rounding of a division), so heap order is the exact order; ties go to the lower index.
    waiting = [(-(-P // (m * W[s])), s) for s in range(k)]
    heapq.heapify(waiting)
    ready: list[tuple[float, int]] = []
    push, pop = heapq.heappush, heapq.heappop
    out = np.empty(P, dtype=np.int32)
    for n in range(P):
        t = n + 1
        while waiting and waiting[0][0] <= t:
            s = pop(waiting)[1]
            push(ready, ((m * (C[s] + 1) - 1) / W[s], s))
        if not ready:  # Tijdeman's theorem: never (kept as a check of this implementation)
            raise AssertionError(f"no source eligible at position {n} of {P}")
        s = pop(ready)[1]
        out[n] = s
        c = C[s] = C[s] + 1
        push(waiting, (-(-(m * c + 1) * P // (m * W[s])), s))
    if C != W:  # the period ends with every source at its share (checked: the bound needs it)
        raise AssertionError(f"the schedule gave {C}, not {W}")
    return out


class Schedule:
    """Which source each global position belongs to, and its index within that source."""

    def __init__(self, counts: np.ndarray) -> None:
        self.counts = np.asarray(counts, dtype=np.int64)
        self.period = int(self.counts.sum())
        self.source = chairman_schedule(self.counts)
        order = np.argsort(self.source, kind="stable")
        first = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self.rank = np.empty(self.period, dtype=np.int64)
        self.rank[order] = np.arange(self.period) - first[self.source[order]]
        self._where = [order[first[s]: first[s] + self.counts[s]] for s in range(self.counts.size)]
        self._per_period = self.counts[self.source]

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, index within the source) of each global position; O(1) each."""
        q, r = np.divmod(np.asarray(positions, dtype=np.int64), self.period)
        q *= self._per_period[r]
        q += self.rank[r]
        return self.source[r], q

    def counts_at(self, n: int) -> np.ndarray:
        """Sequences each source has given among the first ``n`` positions; O(k log P)."""
        q, r = divmod(int(n), self.period)
        return np.array([q * int(c) + int(np.searchsorted(w, r)) for c, w in zip(self.counts, self._where)],
                        dtype=np.int64)


def source_seed(seed: int, index: int) -> int:
    """Source ``index``'s own seed (its epoch orders and masks), derived from ``data.seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def check_sources(data: DataConfig) -> list[Source]:
    """Refuse a mixture whose folders are missing, were prepared with different tokenizers (one
    line naming both folders) or have a training or validation split without one sequence (one
    line naming the folder: the run evaluates every source's validation split), before any
    process group."""
    srcs = sources_of(data)
    try:
        integer_shares([s.weight for s in srcs])
    except ValueError as e:
        raise DataError(f"data.sources: a source's {e} of the total weight, the finest share "
                        "the schedule gives: raise its weight or leave it out") from None
    first = None
    for s in srcs:
        tok = read_manifest(s.dir)["tokenizer"]
        if first is None:
            first = (s, tok)
            continue
        f, ftok = first
        if tok.get("fingerprint") != ftok.get("fingerprint") or tok["vocab_size"] != ftok["vocab_size"]:
            raise DataError(
                f"data.sources: {s.label} and {f.label} were prepared with different tokenizers "
                f"(fingerprints {tok.get('fingerprint')} and {ftok.get('fingerprint')}): prepare "
                f"every source with one (`alum-ds prepare INPUT --tokenizer {f.dir}/tokenizer "
                f"--out DIR`)")
    for s in srcs:
        try:
            check_splits(s.dir, data.seq_len)
        except DataError as e:
            raise DataError(f"data.sources: {e}") from None
    return srcs


class _Sizes:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


class MixtureStream:
    """The training stream of a mixture: the same interface as ``TrainStream``."""

    def __init__(self, sources: list[Source], *, seq_len: int, seed: int,
                 masking: MaskingConfig) -> None:
        self.sources = sources
        self.seq_len, self.seed, self.masking = seq_len, seed, masking
        self.counts, self.exact = integer_shares([s.weight for s in sources])
        self.schedule = Schedule(self.counts)
        self.shares = self.counts / self.schedule.period
        self.streams = [TrainStream(s.dir, seq_len=seq_len, seed=source_seed(seed, i), masking=masking)
                        for i, s in enumerate(sources)]
        self.sizes = np.array([len(t.seqs) for t in self.streams], dtype=np.int64)
        self.seqs = _Sizes(int(self.sizes.sum()))
        self.state = StreamState()
        first = self.streams[0]
        self.special, self.mask_id, self.vocab_size = first.special, first.mask_id, first.vocab_size

    def batch_at(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Masked ``(inputs, labels)`` for global positions ``[start, start + count)``."""
        src, local = self.schedule.locate(np.arange(start, start + count, dtype=np.int64))
        inputs = np.empty((count, self.seq_len), dtype=np.int64)
        labels = np.empty_like(inputs)
        for s in _distinct(src):
            sel = src == s
            inputs[sel], labels[sel] = self.streams[int(s)].batch_for(local[sel])
        return inputs, labels

    def next_for_rank(self, *, rank: int, world: int, micro_batch: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's part of the next micro-step; advances the global count for all ranks."""
        batch = self.batch_at(self.state.consumed + rank * micro_batch, micro_batch)
        self.state.consumed += world * micro_batch
        return batch

    def epochs_at(self, consumed: int) -> np.ndarray:
        return self.schedule.counts_at(consumed) // self.sizes

    @property
    def epoch(self) -> int:
        """Epochs every source has completed (the smallest source epoch)."""
        return int(self.epochs_at(self.state.consumed).min())

    def log_values(self) -> dict[str, int]:
        """Tokens and epoch of each source so far (``metrics.jsonl``, the progress line)."""
        seen = self.schedule.counts_at(self.state.consumed)
        out: dict[str, int] = {}
        for s, n, size in zip(self.sources, seen, self.sizes):
            out[f"tokens/{s.name}"] = int(n) * self.seq_len
            out[f"epoch/{s.name}"] = int(n // size)
        return out

    def new_epochs(self, since: int) -> list[str]:
        """A line per source that started a new epoch between ``since`` and now."""
        before, now = self.epochs_at(since), self.epochs_at(self.state.consumed)
        return [f"data source {s.name} starts epoch {int(e)} ({int(size):,} sequences per epoch)"
                for s, b, e, size in zip(self.sources, before, now, self.sizes) if e > b]

    def describe(self) -> str:
        parts = [f"{s.name} ({s.label}, share {share:.4f}, {int(n):,} sequences/epoch)"
                 for s, share, n in zip(self.sources, self.shares, self.sizes)]
        how = ("exact" if self.exact else
               f"the given weights rounded to multiples of 1/{self.schedule.period}")
        return (f"data mixture of {len(self.sources)} sources, shares {how} (schedule period "
                f"{self.schedule.period:,}): " + "; ".join(parts))

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.state.consumed, "seed": self.seed,
                "num_sequences": [int(n) for n in self.sizes],
                "mixture": {"sources": [s.name for s in self.sources],
                            "counts": [int(c) for c in self.counts]}}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        mine = self.state_dict()
        if d.get("mixture") != mine["mixture"] or d.get("num_sequences") != mine["num_sequences"]:
            raise DataError(
                f"the checkpoint's data mixture ({d.get('mixture')}, {d.get('num_sequences')} "
                f"sequences per source) is not this run's ({mine['mixture']}, "
                f"{mine['num_sequences']}): resume with the same data.sources and data.seq_len")
        self.state.consumed = int(d["consumed"])


def open_train_stream(data: DataConfig, data_dir: Path, *, seed: int,
                      masking: MaskingConfig) -> TrainStream | MixtureStream:
    """``data.dir``'s (or the embedded default's) stream, or the mixture of ``data.sources``."""
    if not data.sources:
        return TrainStream(data_dir, seq_len=data.seq_len, seed=seed, masking=masking)
    return MixtureStream(sources_of(data), seq_len=data.seq_len, seed=seed, masking=masking)


def mixture_unigram(stream: MixtureStream, *, seq_len: int, seed: int, masking: MaskingConfig,
                    max_sequences: int) -> tuple[float, list[float]]:
    """The unigram line of a mixture: the token frequencies of the mixture (each source's
    frequencies weighted by its share) scored on each source's evaluation targets; the
    mixture's line is the share-weighted mean."""
    from alum_ds.data.unigram import eval_targets, token_counts, unigram_cross_entropy

    freq = None
    for s, share in zip(stream.sources, stream.shares):
        c = token_counts(s.dir).astype(np.float64)
        f = share * c / max(c.sum(), 1.0)
        freq = f if freq is None else freq + f
    assert freq is not None
    # As counts: unigram_cross_entropy smooths add-one over a count scale; give it a large one.
    counts = freq * float(sum(token_counts(s.dir).sum() for s in stream.sources))
    lines = [unigram_cross_entropy(counts, eval_targets(s.dir, seq_len=seq_len, seed=seed,
                                                        masking=masking, max_sequences=max_sequences))
             for s in stream.sources]
    return float(np.dot(stream.shares, lines)), lines


__all__ = ["MixtureStream", "Schedule", "Source", "chairman_schedule", "check_sources",
           "integer_shares", "mixture_unigram", "open_train_stream", "sources_of", "PERIOD_MAX"]
