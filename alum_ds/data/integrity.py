"""Training-time integrity of prepared folders: every shard byte hashed once per node before use.

``verify_for_training`` checks, for each folder a run reads: the tokenizer file against the
manifest's fingerprint (a foreign tokenizer of the same size would otherwise train and be
exported), each shard's ``.bin`` and ``.idx`` against the manifest's sha256, and every token id
against the vocabulary (an id past the embedding table is a refusal, not an ``IndexError`` deep
in the step). Hashing 100 GB takes minutes, so a verified file is recorded in a small JSON file
in the node-local cache folder, keyed by its absolute path, size, modification time and inode;
a rerun that finds the same file unchanged reads its record instead of the bytes. A file that is
replaced or touched (new mtime or inode) is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from alum_ds.data import shards as S

RECORD = "verified-shards.json"
RECORD_FORMAT = "alum_ds.verified-shards"
CHUNK = 1 << 24  # 16 MiB: large enough for hashlib's throughput, small for memory


def _stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def hash_and_max(path: Path, dtype: np.dtype | None) -> tuple[str, int]:
    """sha256 of ``path`` and, for a token file (``dtype`` given), its largest id (-1 if empty),
    in one pass over the bytes."""
    h = hashlib.sha256()
    top = -1
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if dtype is not None and len(chunk) >= dtype.itemsize:
                top = max(top, int(np.frombuffer(chunk, dtype=dtype,
                                                 count=len(chunk) // dtype.itemsize).max()))
    return h.hexdigest(), top


class VerifiedRecord:
    """The verified-file record of one node (a JSON file, replaced atomically)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.files: dict[str, dict[str, Any]] = {}
        if path is not None and path.is_file():
            try:
                doc = json.loads(path.read_text())
                if isinstance(doc, dict) and doc.get("format") == RECORD_FORMAT:
                    self.files = {k: v for k, v in doc.get("files", {}).items() if isinstance(v, dict)}
            except (OSError, ValueError):
                self.files = {}  # a damaged record only costs a rehash

    def known(self, path: Path) -> dict[str, Any] | None:
        rec = self.files.get(str(path))
        if rec is None or any(rec.get(k) != v for k, v in _stamp(path).items()):
            return None
        return rec

    def add(self, path: Path, sha256: str, top: int) -> None:
        self.files[str(path)] = {**_stamp(path), "sha256": sha256, "max_id": top}

    def save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Re-read first: another run on this node may have recorded other folders meanwhile.
            merged = {**VerifiedRecord(self.path).files, **self.files}
            S.atomic_write_bytes(self.path, json.dumps(
                {"format": RECORD_FORMAT, "files": merged}, indent=0).encode())
        except OSError:
            pass  # a read-only cache folder: the next run hashes again, nothing is wrong


def _shard_files(d: Path, m: dict[str, Any]) -> Iterable[tuple[Path, str, bool]]:
    """(path, expected sha256, is a token file) for every shard file of every split."""
    mpath = d / S.MANIFEST
    for entries in m.get("splits", {}).values():
        for e in entries:
            yield S._safe_path(d, e["name"] + ".bin", mpath), e["sha256"], True
            yield S._safe_path(d, e["name"] + ".idx", mpath), e["index_sha256"], False


def hash_workers() -> int:
    """Threads hashing shard files at once: hashlib and numpy release the GIL on large buffers,
    so files hash in parallel on a node's cores (at most 8: past that the disk is the limit)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus))


def verify_for_training(data_dirs: Iterable[str | Path], record_dir: str | Path | None,
                        *, progress: bool = True, workers: int = 0) -> dict[str, float]:
    """Refuse (``DataError``, one line naming the file) any folder whose tokenizer, shard bytes
    or token ids do not match its manifest; return what was hashed and read from the record."""
    record = VerifiedRecord(Path(record_dir) / RECORD if record_dir else None)
    t0 = time.monotonic()
    checks: list[tuple[Path, str, int, Path]] = []  # (file, sha256, vocabulary or -1, folder)
    dtypes: dict[Path, np.dtype] = {}
    for data_dir in data_dirs:
        d = Path(data_dir).resolve()
        m = S.read_manifest(d)
        tok = m["tokenizer"]
        tok_json = S._safe_path(d, tok.get("dir", "tokenizer"), d / S.MANIFEST) / "tokenizer.json"
        if not tok_json.is_file():
            raise S.DataError(f"{tok_json} is missing; rerun `alum-ds prepare` for {d}")
        if S.sha256_file(tok_json)[:16] != tok.get("fingerprint"):
            raise S.DataError(
                f"{tok_json} is not the tokenizer these shards were prepared with (its sha256 "
                f"differs from the manifest's fingerprint): restore it or rerun `alum-ds "
                f"prepare` for {d}")
        dtypes[d] = np.dtype(m["dtype"])
        for path, want, is_tokens in _shard_files(d, m):
            if not path.is_file():
                raise S.DataError(f"shard file {path} is missing: rerun `alum-ds prepare` for {d}")
            checks.append((path, want, int(tok["vocab_size"]) if is_tokens else -1, d))
    todo = [c for c in checks if record.known(c[0]) is None]
    done: dict[Path, tuple[str, int]] = {}
    hashed = sum(c[0].stat().st_size for c in todo)
    seen, last_line = 0, t0

    def one(c: tuple[Path, str, int, Path]) -> tuple[Path, str, int]:
        got, top = hash_and_max(c[0], dtypes[c[3]] if c[2] >= 0 else None)
        return c[0], got, top

    try:
        with ThreadPoolExecutor(max_workers=workers or hash_workers()) as pool:
            for path, got, top in pool.map(one, todo):
                done[path] = (got, top)
                seen += path.stat().st_size
                now = time.monotonic()
                if progress and now - last_line > 10:
                    last_line = now
                    print(f"alum_ds: verifying shards: {seen / 2**30:,.2f} of {hashed / 2**30:,.2f} "
                          f"GiB hashed ({seen / 2**20 / (now - t0):,.0f} MiB/s)",
                          file=sys.stderr, flush=True)
        for path, want, vocab, d in checks:  # in manifest order: the first bad file is named
            rec = record.known(path)
            got, top = done[path] if rec is None else (rec["sha256"], int(rec["max_id"]))
            if got != want:
                raise S.DataError(
                    f"shard file {path} fails its sha256 check (its bytes changed after "
                    f"prepare): rerun `alum-ds prepare` for {d}")
            if vocab >= 0 and top >= vocab:
                raise S.DataError(
                    f"shard file {path} holds token id {top}, the vocabulary has {vocab} ids "
                    f"(0-{vocab - 1}): the shard does not belong to this tokenizer; rerun "
                    f"`alum-ds prepare` for {d}")
            if rec is None:
                record.add(path, got, top)
    finally:
        record.save()  # what passed stays recorded, even when a later file fails
    return {"hashed_bytes": hashed, "cached_bytes": sum(c[0].stat().st_size for c in checks) - hashed,
            "seconds": time.monotonic() - t0}


def describe(result: dict[str, float]) -> str:
    gib = result["hashed_bytes"] / 2**30
    cached = result["cached_bytes"] / 2**30
    return (f"shards verified: {gib:,.3f} GiB hashed in {result['seconds']:.1f} s, "
            f"{cached:,.3f} GiB unchanged since an earlier verification on this node")


__all__ = ["verify_for_training", "describe", "hash_and_max", "RECORD", "VerifiedRecord"]
