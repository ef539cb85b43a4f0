"""The mixture schedule's cost (alum_ds.data.mixture): building it, and resuming deep into a run.

    python bench/bench_mixture.py [--sources 100] [--sequences 10000000] [--repeats 5]
                                  [--out bench/results/mixture.json]

``build``: the schedule of ``--sources`` sources with random integer weights (a period of 2^16,
the longest there is) and the source and within-source index of each of the first
``--sequences`` positions (what a run's micro-batches ask of it). ``resume_at_1e9``: a new
schedule of the same weights, the per-source counts at sequence 10^9 and the next global batch's
lookup, what a run resumed at step 10^9 / batch does. One process, one core (the work is one
thread); medians of ``--repeats``, printed and saved; nothing is asserted. The worst prefix and
window deviations of the built schedule are recorded beside the times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
from _common import machine

from alum_ds.data import mixture as M

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sources", type=int, default=100)
    ap.add_argument("--sequences", type=int, default=10_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "mixture.json"))
    a = ap.parse_args()
    weights = [Fraction(int(w)) for w in np.random.default_rng(0).integers(1, 10**6, a.sources)]
    times: dict[str, list[float]] = {"schedule": [], "lookup": [], "build": [], "resume_at_1e9": []}
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        counts, _ = M.integer_shares(weights)
        sch = M.Schedule(counts)
        t1 = time.perf_counter()
        for lo in range(0, a.sequences, 1 << 20):  # as a run asks: a block at a time
            sch.locate(np.arange(lo, min(lo + (1 << 20), a.sequences), dtype=np.int64))
        t2 = time.perf_counter()
        times["schedule"].append(t1 - t0)
        times["lookup"].append(t2 - t1)
        times["build"].append(t2 - t0)
        t0 = time.perf_counter()
        again = M.Schedule(M.integer_shares(weights)[0])
        again.counts_at(10**9)
        again.locate(np.arange(10**9, 10**9 + 4096, dtype=np.int64))
        times["resume_at_1e9"].append(time.perf_counter() - t0)
    D = np.zeros(0)
    src = sch.source
    k, P = len(counts), sch.period
    onehot = np.zeros((P, k), dtype=np.float64)
    onehot[np.arange(P), src] = 1
    D = np.vstack([np.zeros(k), np.cumsum(onehot, 0)]) - np.arange(P + 1)[:, None] * (counts / P)
    res = {"bench": "mixture", "machine": machine(), "load_avg": os.getloadavg(),
           "sources": a.sources, "sequences": a.sequences, "period": P, "repeats": a.repeats,
           "median_s": {k_: statistics.median(v) for k_, v in times.items()}, "runs_s": times,
           "worst_prefix_deviation": float(np.abs(D).max()),
           "prefix_bound": 1 - 1 / (2 * k - 2),
           "worst_window_deviation": float((D.max(0) - D.min(0)).max()),
           "window_bound": 2 - 1 / (k - 1)}
    for name, v in res["median_s"].items():
        print(f"{name:>14}: {v:.3f} s")
    print(f"worst deviation over every prefix {res['worst_prefix_deviation']:.4f} (bound "
          f"{res['prefix_bound']:.4f}), over every window {res['worst_window_deviation']:.4f} "
          f"(bound {res['window_bound']:.4f})")
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"saved {a.out}")


if __name__ == "__main__":
    main()
