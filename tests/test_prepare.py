"""Pins ``alum_ds.data.prepare`` and the ``alum-ds prepare`` CLI: splits, determinism, streaming and
in-memory paths giving the same shards, resuming an interrupted prepare, and the CLI's exit codes,
verify mode and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from alum_ds.cli import main
from alum_ds.data import prepare as P
from alum_ds.data.corpus import embedded_documents
from alum_ds.data.shards import MANIFEST, DataError, read_manifest, verify_folder
from alum_ds.data.stream import PackedSequences
from tests._data_helpers import (
    _REAL_WRITE_SHARD,
    SEED,
    SEQ_LEN,
    VOCAB,
    _Interrupt,
    _lines_corpus,
    _manifest_without_timing,
    _one_line,
    _prepare,
    _shard_bytes,
    _stderr_line,
)


def test_splits_hold_every_document(data_dir: Path) -> None:
    m = read_manifest(data_dir)
    per_split = {s: sum(e["documents"] for e in m["splits"][s]) for s in ("train", "validation")}
    assert per_split["validation"] > 0 and per_split["train"] > per_split["validation"]
    assert sum(per_split.values()) == m["source"]["documents"]
    for split in ("train", "validation"):
        got = PackedSequences(data_dir, split, SEQ_LEN).get(np.arange(1))
        assert got[0, 0] == m["tokenizer"]["bos_id"] and got[0, -1] == m["tokenizer"]["eos_id"]


def test_prepare_is_deterministic(corpus: Path, data_dir: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    _prepare([corpus], again)
    files = sorted(p.relative_to(data_dir) for p in data_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert not [f for f in files if f.name.endswith(".tmp")]
    for f in files:
        if f.name != MANIFEST:
            assert (data_dir / f).read_bytes() == (again / f).read_bytes(), f
    assert _manifest_without_timing(data_dir) == _manifest_without_timing(again)
    # Preparing over an existing folder gives the same folder again.
    _prepare([corpus], again)
    assert _manifest_without_timing(data_dir) == _manifest_without_timing(again)


@pytest.mark.parametrize("text", ["", "\n\n  \n\n\t\n"])
def test_empty_corpus(tmp_path: Path, text: str) -> None:
    src = tmp_path / "empty.txt"
    src.write_text(text)
    with pytest.raises(DataError) as e:
        _prepare([src], tmp_path / "data")
    _one_line(e, src, "empty")
    assert not (tmp_path / "data" / MANIFEST).exists()


def test_training_documents_follow_the_split_rule(docs40: list[str]) -> None:
    from alum_ds.data.sources import Corpus, DocumentList

    corpus = Corpus([DocumentList(docs40)])
    val = [P._is_validation(i, SEED, 0.05) for i in range(len(docs40))]
    assert any(val)
    assert list(P.training_documents(corpus, seed=SEED, val_fraction=0.05)) == [
        d for d, v in zip(docs40, val) if not v]
    # No document hashes to validation: the last one is held out.
    three = Corpus([DocumentList(docs40[:3])])
    assert list(P.training_documents(three, seed=1, val_fraction=1e-9)) == docs40[:2]
    limited = list(P.training_documents(corpus, seed=SEED, val_fraction=0.05, limit_bytes=5000))
    assert 0 < len(limited) < len(docs40) and sum(len(d.encode()) for d in limited[:-1]) < 5000


def test_streaming_prepare_matches_in_memory(docs40: list[str], reference: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from alum_ds.data import sources

    monkeypatch.setattr(P, "SHARD_TOKENS", 5000)
    monkeypatch.setattr(P, "ENCODE_CHARS", 300)
    monkeypatch.setattr(sources, "BLOCK_BYTES", 256)
    # The same documents split over a text file with Windows line ends and a JSON lines file.
    (tmp_path / "a.txt").write_bytes("\r\n\r\n".join(d.replace("\n", "\r\n") for d in docs40[:25]).encode())
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs40[25:]))
    out = tmp_path / "streamed"
    m = _prepare([tmp_path / "a.txt", tmp_path / "b.jsonl"], out, seed=SEED)
    assert m["source"]["documents"] == len(docs40)
    assert len(m["splits"]["train"]) >= 3
    assert _shard_bytes(out) == _shard_bytes(reference)
    # A bounded tokenizer sample: deterministic, and not the whole corpus's tokenizer.
    a, b = tmp_path / "sample-a", tmp_path / "sample-b"
    for d in (a, b):
        _prepare([tmp_path / "a.txt", tmp_path / "b.jsonl"], d, seed=SEED, tokenizer_sample_bytes=20_000)
    assert _shard_bytes(a) == _shard_bytes(b)
    tok_json = Path("tokenizer") / "tokenizer.json"
    assert (a / tok_json).read_bytes() != (out / tok_json).read_bytes()


def _interrupting(monkeypatch: pytest.MonkeyPatch, after: int) -> list[str]:
    """Make shard writes fail after ``after`` of them; return the names written."""
    from alum_ds.data import shards

    real, written = _REAL_WRITE_SHARD, []

    def write(out: Path, name: str, tokens: np.ndarray, offsets: np.ndarray) -> dict:
        if after and len(written) >= after:
            raise _Interrupt(name)
        written.append(name)
        return real(out, name, tokens, offsets)

    monkeypatch.setattr(shards, "write_shard", write)
    return written


def test_interrupted_prepare_continues(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from alum_ds.data import sources

    monkeypatch.setattr(P, "SHARD_TOKENS", 3000)
    monkeypatch.setattr(sources, "BLOCK_BYTES", 4096)  # cuts fall inside chunks
    src = _lines_corpus(tmp_path)
    whole = tmp_path / "whole"
    _prepare([src], whole)

    out = tmp_path / "data"
    written = _interrupting(monkeypatch, after=3)
    with pytest.raises(_Interrupt):
        _prepare([src], out)
    assert not (out / MANIFEST).exists()
    progress = json.loads((out / P.PROGRESS).read_text())
    assert len(progress["cuts"]) == 1 and progress["cuts"][0]["skip"] > 0
    kept = [n for n in written if n.endswith("-00000")]
    assert "train-00000" in kept
    stamps = {n: (out / f"{n}.bin").stat().st_mtime_ns for n in kept}

    written = _interrupting(monkeypatch, after=0)
    m = _prepare([src], out)
    assert not set(kept) & set(written)  # reused, not rewritten
    assert {n: (out / f"{n}.bin").stat().st_mtime_ns for n in kept} == stamps
    assert len(m["splits"]["train"]) >= 4
    assert _shard_bytes(out) == _shard_bytes(whole)
    assert _manifest_without_timing(out) == _manifest_without_timing(whole)
    verify_folder(out)

    # Finished: a rerun verifies and writes nothing.
    written.clear()
    _prepare([src], out)
    assert written == []
    # A damaged kept shard is found, and the run continues from before it.
    victim = out / "train-00001.bin"
    data = bytearray(victim.read_bytes())
    data[0] ^= 1
    victim.write_bytes(bytes(data))
    _prepare([src], out)
    assert "train-00001" in written and "train-00000" not in written
    assert _shard_bytes(out) == _shard_bytes(whole)
    # Other options: start afresh.
    written.clear()
    _prepare([src], out, seed=SEED + 1)
    assert "train-00000" in written


def test_interrupted_in_memory_and_parquet_prepares_continue(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from alum_ds.data import sources

    monkeypatch.setattr(P, "SHARD_TOKENS", 3000)
    monkeypatch.setattr(sources, "ROWS_PER_CHUNK", 64)
    lines = [ln.strip() for d in embedded_documents()[:30] for ln in d.splitlines() if ln.strip()]
    pq.write_table(pa.table({"text": lines}), tmp_path / "c.parquet", row_group_size=100)
    runs = {"list": lambda out: P.prepare(documents=lines, out_dir=out, vocab_size=VOCAB, progress=False),
            "parquet": lambda out: _prepare([tmp_path / "c.parquet"], out)}
    for name, run in runs.items():
        whole, out = tmp_path / f"{name}-whole", tmp_path / name
        _interrupting(monkeypatch, after=0)
        run(whole)
        _interrupting(monkeypatch, after=5)
        with pytest.raises(_Interrupt):
            run(out)
        written = _interrupting(monkeypatch, after=0)
        run(out)
        assert "train-00000" not in written and written, name
        assert _shard_bytes(out) == _shard_bytes(whole), name


def test_cli_prepare_missing_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.txt"
    assert main(["prepare", str(missing), "--out", str(tmp_path / "out")]) != 0
    assert str(missing) in _stderr_line(capsys)
    assert main(["prepare", str(missing)]) != 0  # no --out
    _stderr_line(capsys)


def test_cli_prepare_refuses_a_bad_worker_count_before_any_work(
        corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["prepare", str(corpus), "--out", str(out), "--workers", "-1"]) == 2
    monkeypatch.setenv("ALUM_DS_PREPARE_WORKERS", "many")
    assert main(["prepare", str(corpus), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--workers -1" in err and "ALUM_DS_PREPARE_WORKERS='many'" in err
    assert "Traceback" not in err and not out.exists()


def test_cli_prepare_and_verify(corpus: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "data"
    assert main(["prepare", str(corpus), "--out", str(out), "--vocab-size", str(VOCAB)]) == 0
    capsys.readouterr()
    assert main(["prepare", "--verify", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["train"]["tokens"] > 0 and summary["validation"]["documents"] > 0
    victim = out / "train-00000.bin"
    data = bytearray(victim.read_bytes())
    data[10] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert main(["prepare", "--verify", str(out)]) != 0
    assert str(victim) in _stderr_line(capsys)
    assert main(["prepare", "--verify", str(tmp_path / "nowhere")]) != 0
    _stderr_line(capsys)


def test_cli_prepare_parquet_options(docs40: list[str], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": docs40}), tmp_path / "c.parquet")
    out = tmp_path / "data"
    argv = ["prepare", str(tmp_path / "c.parquet"), "--out", str(out), "--vocab-size", str(VOCAB),
            "--text-field", "body", "--tokenizer-sample-bytes", "0", "--quiet"]
    assert main(argv) == 0
    assert capsys.readouterr().err == ""
    assert read_manifest(out)["source"]["documents"] == len(docs40)
    assert main(argv[:-1]) == 0  # done already: verified, not redone
    assert "already prepared" in capsys.readouterr().err
