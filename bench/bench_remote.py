"""Data in object storage (alum_ds.data.remote) against the same folder on the local disk.

    python bench/bench_remote.py [--mb 64] [--repeats 3] [--quick] [--out bench/results/remote.json]

A corpus of ``--mb`` MB is prepared on the disk (shards of 1M tokens, so that a folder has files
to fetch side by side) and uploaded to a real S3 API server on 127.0.0.1 (moto's, from the dev
extra), then, per repeat:

- ``cold_fetch``: the folder fetched into an empty node cache and verified (manifest, tokenizer,
  every shard hashed against the manifest), as a run's planning and prefetch thread do;
- ``warm_fetch``: the same again with the mirror in place (its records match: no byte moves);
- ``local_hash``: the disk folder's own integrity check from an empty record (what a run on a
  local folder pays once per node), the reference for the fetch's cost;
- ``stream``: packed, masked tokens/s of the training stream over the mirror and over the disk
  folder, back to back (the ratio per repeat: the mirror is a local folder, so 1 within noise).

Steps never wait on the store: the whole folder is fetched before step 1 (every sequence is a
draw from a permutation of the whole split), so the fraction of step time spent waiting on data
is the stream's own batch time, the same from a mirror as from the disk. Medians are printed and
saved; nothing is asserted. The loopback server measures the client's and the hashing's cost, not
a real store's bandwidth.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import corpus_parser, machine
from bench_data import bench_stream, write_corpus


def _server() -> tuple[object, dict[str, str]]:
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1").create_bucket(
        Bucket="bench")
    return server, env


def main(argv: list[str] | None = None) -> dict:
    p = corpus_parser(__doc__, mb=64.0, out="remote.json")
    a = p.parse_args(argv)
    if a.quick:
        a.mb, a.repeats = 0.5, 1
    from alum_ds.config import DataConfig
    from alum_ds.data import integrity, remote
    from alum_ds.data import prepare as P

    saved = dict(os.environ)
    server, _ = _server()
    load_before = os.getloadavg()
    runs: dict[str, list[float]] = {"cold_fetch": [], "warm_fetch": [], "local_hash": [],
                                    "stream_mirror": [], "stream_local": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            files = write_corpus(work / "corpus", a.mb)
            local = work / "local"
            shard_tokens, P.SHARD_TOKENS = P.SHARD_TOKENS, 1 << 20  # several shards per split
            try:
                P.prepare_inputs([str(f) for f in files], str(local), vocab_size=2048 if a.quick else 8192,
                                 progress=False)
            finally:
                P.SHARD_TOKENS = shard_tokens
            size = sum(f.stat().st_size for f in local.rglob("*") if f.is_file())
            url = "s3://bench/local"
            t0 = time.perf_counter()
            remote.upload(local, remote.Store(url, 60))
            upload_s = time.perf_counter() - t0
            seq = 128
            for r in range(a.repeats):
                cache = work / f"cache{r}"
                data = DataConfig(cache_dir=str(cache))
                t0 = time.perf_counter()
                mirror = remote.fetch_all(url, data)
                runs["cold_fetch"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                remote.fetch_all(url, data)
                runs["warm_fetch"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                hashed = integrity.verify_for_training([local], work / f"record{r}", progress=False)
                runs["local_hash"].append(time.perf_counter() - t0)
                assert hashed["hashed_bytes"] > 0  # from an empty record: every byte read
                secs = 0.3 if a.quick else 3.0
                for where, d in (("stream_mirror", mirror), ("stream_local", local)):
                    got = bench_stream(d, seconds=secs, repeats=1, seq_len=seq, micro_batch=8)
                    runs[where].append(got["tokens_per_s_median"])
                shutil.rmtree(cache)
            shards = sum(len(v) for v in json.loads((local / "manifest.json").read_text())["splits"].values())
    finally:
        server.stop()
        os.environ.clear()
        os.environ.update(saved)
    med = {k: statistics.median(v) for k, v in runs.items()}
    res = {
        "bench": "remote", "machine": machine(), "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(), "quick": a.quick, "corpus_mb": a.mb,
        "folder_mib": size / 2**20, "shard_files": 2 * shards, "fetch_threads": remote.FETCH_THREADS,
        "upload_s": upload_s, "runs": runs, "median": med,
        "cold_fetch_mib_per_s": size / 2**20 / med["cold_fetch"],
        "cold_fetch_vs_local_hash": med["cold_fetch"] / med["local_hash"],
        "stream_mirror_vs_local_per_repeat": [m / d for m, d in zip(runs["stream_mirror"],
                                                                    runs["stream_local"])],
    }
    res["stream_mirror_vs_local_median"] = statistics.median(res["stream_mirror_vs_local_per_repeat"])
    # What a step waits on data: making its micro-batch (8 x 128) from the mirror's files.
    res["batch_ms_from_mirror"] = 8 * 128 / med["stream_mirror"] * 1e3
    print(f"folder {res['folder_mib']:.1f} MiB in {res['shard_files']} shard files")
    print(f"cold fetch from the loopback S3 server: {med['cold_fetch']:.2f} s "
          f"({res['cold_fetch_mib_per_s']:.0f} MiB/s, {res['cold_fetch_vs_local_hash']:.2f}x the "
          f"local folder's hash check {med['local_hash']:.2f} s); warm: {med['warm_fetch']:.3f} s")
    print(f"stream from the mirror: {med['stream_mirror'] / 1e6:.2f}M tokens/s, from the disk "
          f"folder {med['stream_local'] / 1e6:.2f}M (ratio {res['stream_mirror_vs_local_median']:.3f}); "
          f"a micro-batch of 8 x 128 from the mirror: {res['batch_ms_from_mirror']:.2f} ms")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"saved {out}", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
