"""Pins ``alum_ds.data.encoding``: the backend set up for prepare (special-token text stays text, no
truncation), the word-cache worker pool giving the in-thread and Rust shards, no worker left behind,
worker failures as errors, and the default worker count."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from alum_ds.data import prepare as P
from alum_ds.data.corpus import embedded_documents
from alum_ds.data.shards import open_split
from tests._data_helpers import (
    _REAL_WRITE_SHARD,
    SEED,
    TRICKY,
    _Interrupt,
    _lines_corpus,
    _manifest_without_timing,
    _prepare,
    _shard_bytes,
    _write_corpus,
)


def test_literal_special_token_text_is_plain_text(tmp_path: Path) -> None:
    # Web text holds "<s>" (HTML strike-through) and the like: it must not become <s>, </s>
    # or <mask> ids inside a sequence body.
    docs = embedded_documents()[:40] + ["struck <s>out</s> text, a <mask> and <pad> here"]
    out = tmp_path / "data"
    m = _prepare([_write_corpus(tmp_path / "c.txt", docs)], out, val_fraction=0.0)
    special = m["tokenizer"]["special_ids"]
    for shard in open_split(out, "train"):
        assert not np.isin(np.asarray(shard.tokens), special).any()


def test_prepare_ignores_tokenizer_truncation(data_dir: Path, tmp_path: Path) -> None:
    # A tokenizer.json made for model inputs may truncate (or pad): documents must stay whole.
    tok_dir = tmp_path / "tok"
    shutil.copytree(data_dir / "tokenizer", tok_dir)
    j = json.loads((tok_dir / "tokenizer.json").read_text())
    j["truncation"] = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}
    (tok_dir / "tokenizer.json").write_text(json.dumps(j))
    docs = embedded_documents()[:10]
    whole = P.prepare(documents=docs, out_dir=tmp_path / "a", tokenizer=str(data_dir / "tokenizer"),
                      progress=False)
    cut = P.prepare(documents=docs, out_dir=tmp_path / "b", tokenizer=str(tok_dir), progress=False)
    for split in ("train", "validation"):
        assert [e["tokens"] for e in cut["splits"][split]] == [e["tokens"] for e in whole["splits"][split]]
        assert [e["sha256"] for e in cut["splits"][split]] == [e["sha256"] for e in whole["splits"][split]]


def _encode_workers_alive() -> list:
    import psutil

    return [c for c in psutil.Process().children(recursive=True)
            if c.is_running() and c.status() != psutil.STATUS_ZOMBIE
            and any("alum_ds.data.encoding" in a for a in c.cmdline())]


def _pids(pool: object) -> list[int]:
    """An encoding pool's worker process ids; empty before they start."""
    return [w.proc.pid for w in pool._workers]


def _recording_pools(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the pid of every encoding worker started."""
    from alum_ds.data import encoding as E

    pids: list[int] = []
    real = E.EncoderPool._start

    def start(self: E.EncoderPool) -> None:
        real(self)
        pids.extend(_pids(self))

    monkeypatch.setattr(E.EncoderPool, "_start", start)
    return pids


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_worker_pool_gives_the_in_thread_and_rust_shards(data_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from alum_ds.data.tokenizer import WordCacheEncoder

    monkeypatch.setattr(P, "SHARD_TOKENS", 4000)
    monkeypatch.setattr(P, "ENCODE_CHARS", 2000)  # dozens of batches: several rounds per worker
    docs = TRICKY + embedded_documents()[:60] + TRICKY[::-1]

    def run(out: Path, **kw: object) -> None:
        P.prepare(documents=docs, out_dir=out, tokenizer=str(data_dir / "tokenizer"), seed=SEED,
                  progress=False, **kw)

    pids = _recording_pools(monkeypatch)
    run(tmp_path / "pool", encode_workers=2)  # two workers even on a one-core machine
    assert len(pids) == 2
    run(tmp_path / "thread", encode_workers=0)
    assert len(pids) == 2
    monkeypatch.setattr(WordCacheEncoder, "supports", staticmethod(lambda backend: False))
    run(tmp_path / "rust", encode_workers=2)  # the Rust path ignores the worker count
    assert len(pids) == 2
    pool = _shard_bytes(tmp_path / "pool")
    assert len(pool) > 6
    assert pool == _shard_bytes(tmp_path / "thread") == _shard_bytes(tmp_path / "rust")
    assert (_manifest_without_timing(tmp_path / "pool") == _manifest_without_timing(tmp_path / "thread")
            == _manifest_without_timing(tmp_path / "rust"))


def test_no_encoding_worker_remains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from alum_ds.data import sources

    monkeypatch.setattr(P, "SHARD_TOKENS", 3000)
    monkeypatch.setattr(P, "ENCODE_CHARS", 1000)
    monkeypatch.setattr(sources, "BLOCK_BYTES", 4096)
    src = _lines_corpus(tmp_path)
    pids = _recording_pools(monkeypatch)
    whole = tmp_path / "whole"
    _prepare([src], whole, encode_workers=2)
    assert len(pids) == 2 and all(map(_gone, pids)) and not _encode_workers_alive()
    # Ctrl-C (a KeyboardInterrupt in the main thread) while shards are written, then an error.
    for exc in (KeyboardInterrupt, _Interrupt):
        pids.clear()

        def write(out: Path, name: str, tokens: np.ndarray, offsets: np.ndarray, exc: type = exc) -> dict:
            if name == "train-00002":
                raise exc(name)
            return _REAL_WRITE_SHARD(out, name, tokens, offsets)

        from alum_ds.data import shards

        monkeypatch.setattr(shards, "write_shard", write)
        with pytest.raises(exc):
            _prepare([src], tmp_path / "data", encode_workers=2, fresh=True)
        assert len(pids) == 2 and all(map(_gone, pids)) and not _encode_workers_alive(), exc
    # The interrupted prepare continues, with workers, to the same shards.
    monkeypatch.setattr(shards, "write_shard", _REAL_WRITE_SHARD)
    _prepare([src], tmp_path / "data", encode_workers=2)
    assert _shard_bytes(tmp_path / "data") == _shard_bytes(whole)
    assert not _encode_workers_alive()


def test_encoding_worker_failures_are_errors(data_dir: Path) -> None:
    import os
    import signal

    from tokenizers import Tokenizer

    from alum_ds.data.encoding import EncoderPool, EncodeWorkerError, encoding_backend
    from alum_ds.data.tokenizer import WordCacheEncoder

    backend = encoding_backend(Tokenizer.from_file(str(data_dir / "tokenizer" / "tokenizer.json")))
    enc = WordCacheEncoder(backend, np.dtype(np.uint16))
    docs = embedded_documents()[:6]
    want = enc.encode_batch(docs)
    # An exception inside a worker (a document that is no text) names itself, with its traceback.
    with pytest.raises(EncodeWorkerError, match=r"worker \d \(pid \d+\) failed: AttributeError") as e:
        with EncoderPool(enc, 2) as pool:
            got = list(pool.map([(0, docs), (1, docs), (2, docs), (3, [None]), (4, docs)]))
    assert "Traceback" in str(e.value)
    assert not _encode_workers_alive()
    # A worker killed (as by the kernel for memory) is an error, not a hang.
    with pytest.raises(EncodeWorkerError, match="ended unexpectedly .killed by signal 9"):
        with EncoderPool(enc, 2) as pool:
            it = pool.map((i, docs) for i in range(50))
            got = [next(it), next(it)]
            os.kill(_pids(pool)[1], signal.SIGKILL)
            got += list(it)
    assert not _encode_workers_alive()
    # And the pool's results are the encoder's, in order.
    with EncoderPool(enc, 3, in_flight=4) as pool:
        got = list(pool.map((i, [] if i == 5 else docs) for i in range(12)))
    assert [t for t, _ in got] == list(range(12))
    for t, (flat, lengths) in got:
        if t == 5:
            assert flat.size == 0 and lengths == []
        else:
            assert lengths == want[1] and flat.tobytes() == want[0].tobytes()
    assert not _encode_workers_alive()


def test_default_worker_count(monkeypatch: pytest.MonkeyPatch) -> None:
    from alum_ds.data import encoding as E

    monkeypatch.delenv(E.WORKERS_ENV, raising=False)
    assert E.default_workers(1) == 0 and E.default_workers(2) == 2 and E.default_workers(64) == 64
    monkeypatch.setenv(E.WORKERS_ENV, "3")
    assert E.default_workers(1) == 3
    monkeypatch.setenv(E.WORKERS_ENV, "x")
    with pytest.raises(ValueError, match=E.WORKERS_ENV):
        E.default_workers()
