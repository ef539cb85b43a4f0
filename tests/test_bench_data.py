"""Pins ``bench/bench_data.py`` and ``bench/bench_remote.py``: the data benchmarks still run in quick
mode and write their figures (saved, never asserted as timings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def _load(name: str, monkeypatch: pytest.MonkeyPatch):
    """``bench/NAME.py`` as a module, importing its neighbours as running the script would."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    monkeypatch.syspath_prepend(str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_quick_writes_its_figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _load("bench_data", monkeypatch)
    out = tmp_path / "data.json"
    bench.main(["--quick", "--out", str(out)])
    res = json.loads(out.read_text())
    for key in ("machine", "corpus_mb", "prepare", "baseline", "prepare_vs_baseline", "stream"):
        assert key in res, key
    assert res["prepare"]["tokens"] == res["baseline"]["tokens"] > 0
    assert res["prepare"]["tokens_per_s_median"] > 0 and res["stream"]["tokens_per_s_median"] > 0


def test_bench_remote_quick_writes_its_figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``bench/bench_remote.py --quick``: its own S3 server on 127.0.0.1, a fetch, a stream."""
    bench = _load("bench_remote", monkeypatch)
    out = tmp_path / "remote.json"
    bench.main(["--quick", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["shard_files"] >= 4 and res["folder_mib"] > 0
    for key in ("cold_fetch", "warm_fetch", "local_hash", "stream_mirror", "stream_local"):
        assert res["median"][key] > 0, key
