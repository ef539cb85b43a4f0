"""The first-use cost of training-time shard verification (alum_ds.data.integrity), per GiB.

    python bench/bench_integrity.py [--mib 512] [--repeats 5] [--out bench/results/integrity.json]

A prepared-format folder of ``--mib`` MiB of uint16 tokens (8 shards, random ids below a
50,265 vocabulary) is written to the temporary folder; then, ``--repeats`` times each, in turns:
``read``, reading every byte (the floor any check pays), ``sha256``, the hash alone, and
``verify_first_use``, ``verify_for_training`` with an empty record (hash + token-id check of
every shard file, on ``hash_workers()`` threads; ``verify_first_use_1_thread`` on one).
``verify_cached`` is the rerun that finds the record. The files stay in the
page cache after the first pass, so the figures are CPU cost, not disk reads (a cold read adds
the disk's own time per GiB). Medians, printed and saved; nothing is asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import machine

from alum_ds.data import integrity as I
from alum_ds.data import shards as S

ROOT = Path(__file__).resolve().parent.parent


def write_folder(d: Path, mib: int, shards: int = 8) -> int:
    rng = np.random.default_rng(0)
    per = mib * 2**20 // 2 // shards
    entries = []
    for i in range(shards):
        tokens = rng.integers(0, 50265, per, dtype=np.uint16)
        offsets = np.arange(0, per + 1, 512, dtype=np.int64)
        offsets[-1] = per
        entries.append(S.write_shard(d, f"train-{i:05d}", tokens, offsets))
    (d / "tokenizer").mkdir()
    tj = d / "tokenizer" / "tokenizer.json"
    tj.write_text(json.dumps({"model": {"vocab": {}}}))
    S.write_manifest(d, {"tokenizer": {"dir": "tokenizer", "fingerprint": S.sha256_file(tj)[:16],
                                       "vocab_size": 50265}, "dtype": "uint16",
                         "splits": {"train": entries}})
    return sum(p.stat().st_size for p in d.iterdir() if p.suffix in (".bin", ".idx"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "integrity.json"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "data"
        d.mkdir()
        nbytes = write_folder(d, a.mib)
        files = [p for p in sorted(d.iterdir()) if p.suffix in (".bin", ".idx")]

        def read() -> None:
            for p in files:
                with open(p, "rb") as f:
                    while f.read(1 << 24):
                        pass

        def sha() -> None:
            for p in files:
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 24):
                        h.update(chunk)

        def first_use() -> None:
            rec = Path(tmp) / "rec"
            (rec / I.RECORD).unlink(missing_ok=True)
            assert I.verify_for_training([d], rec, progress=False)["hashed_bytes"] == nbytes

        def first_use_1() -> None:
            rec = Path(tmp) / "rec"
            (rec / I.RECORD).unlink(missing_ok=True)
            I.verify_for_training([d], rec, progress=False, workers=1)

        def cached() -> None:
            assert I.verify_for_training([d], Path(tmp) / "rec", progress=False)["hashed_bytes"] == 0

        read()  # into the page cache
        times: dict[str, list[float]] = {"read": [], "sha256": [], "verify_first_use": [],
                                         "verify_first_use_1_thread": [], "verify_cached": []}
        for _ in range(a.repeats):
            for name, fn in (("read", read), ("sha256", sha), ("verify_first_use", first_use),
                             ("verify_first_use_1_thread", first_use_1),
                             ("verify_cached", cached)):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    gib = nbytes / 2**30
    res = {"bench": "integrity", "machine": machine(), "load_avg": os.getloadavg(),
           "bytes": nbytes, "shard_files": len(files), "repeats": a.repeats,
           "median_s": {k: statistics.median(v) for k, v in times.items()},
           "s_per_gib": {k: statistics.median(v) / gib for k, v in times.items() if k != "verify_cached"},
           "verify_cached_s_per_file": statistics.median(times["verify_cached"]) / len(files),
           "verify_over_sha256": statistics.median(
               [f / s for f, s in zip(times["verify_first_use"], times["sha256"])]),
           "runs_s": times}
    for k, v in res["s_per_gib"].items():
        print(f"{k:>18}: {v:.3f} s/GiB ({1 / v:,.2f} GiB/s)")
    print(f"verify_cached: {res['verify_cached_s_per_file'] * 1e6:,.0f} us per shard file; "
          f"first use / sha256 alone: {res['verify_over_sha256']:.3f}")
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"saved {a.out}")


if __name__ == "__main__":
    main()
