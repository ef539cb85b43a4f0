"""Pins ``bench/bench_data.py``: the data benchmark still runs in quick mode and writes its figures
(saved, never asserted as timings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_bench_quick_writes_its_figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "bench" / "bench_data.py"
    monkeypatch.syspath_prepend(str(path.parent))  # as running the script would: bench/_common.py
    spec = importlib.util.spec_from_file_location("bench_data", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "data.json"
    bench.main(["--quick", "--out", str(out)])
    res = json.loads(out.read_text())
    for key in ("machine", "corpus_mb", "prepare", "baseline", "prepare_vs_baseline", "stream"):
        assert key in res, key
    assert res["prepare"]["tokens"] == res["baseline"]["tokens"] > 0
    assert res["prepare"]["tokens_per_s_median"] > 0 and res["stream"]["tokens_per_s_median"] > 0


def test_bench_remote_quick_writes_its_figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``bench/bench_remote.py --quick``: its own S3 server on 127.0.0.1, a fetch, a stream."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "bench" / "bench_remote.py"
    monkeypatch.syspath_prepend(str(path.parent))
    spec = importlib.util.spec_from_file_location("bench_remote", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "remote.json"
    bench.main(["--quick", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["shard_files"] >= 4 and res["folder_mib"] > 0
    for key in ("cold_fetch", "warm_fetch", "local_hash", "stream_mirror", "stream_local"):
        assert res["median"][key] > 0, key
