"""Prepared folders in object storage: any fsspec URL (``s3://``, ``gs://``, ``az://``, ...) as
``data.dir``, as a mixture's source, as ``prepare --out`` or ``prepare --verify``.

A run reads a URL through a node-local mirror, ``CACHE/remote/NAME-HASH/``, laid out as a
prepared folder, so that everything downstream (the stream, the integrity check, evaluation,
export) reads local files. The manifest and the tokenizer are fetched while the run is planned;
the shards in a background thread of every rank from the moment the plan stands, so the
downloads overlap the engine's start. Each file is downloaded under a temporary name, hashed, and
renamed into place only when its sha256 is the manifest's: a name in the mirror is a verified
file, and the verified-shard record of ``alum_ds.data.integrity`` gets its hash, so the check
before step 1 does not read it twice. A mismatch is fetched once more, then refused naming the
object. Every store call is retried with exponential backoff for ``data.fetch_retry_s``, then
the run stops with one line, before its first step (nothing of it is written).

Every training sequence is a draw from a permutation of the whole split, so the first steps
read every training shard: the whole folder is fetched before step 1, and a bounded cache
(``data.cache_max_gb``) makes room by evicting other folders' mirrors that no run on the node
holds (least recently used first), never one in use. One process per node fetches a mirror at a
time (a file lock); the others wait for it and find the files in place.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from alum_ds.config import DataConfig, cache_dir
from alum_ds.data import shards as S
from alum_ds.data.integrity import RECORD, VerifiedRecord, hash_and_max

T = TypeVar("T")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# protocol -> (fsspec's package for it, the project's extra that pins it)
_CLIENTS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"),
            "az": ("adlfs", "azure"), "abfs": ("adlfs", "azure"), "abfss": ("adlfs", "azure")}
FETCH_THREADS = 8
# The store clients' credential failures (botocore, google-auth, azure-identity): not transient.
_CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError",
                      "ClientAuthenticationError", "CredentialUnavailableError"}
_held: dict[Path, Any] = {}  # mirror -> open file holding its shared in-use lock
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def is_url(spec: str | Path) -> bool:
    return isinstance(spec, str) and bool(_URL.match(spec))


def mirror_dir(url: str, cache: Path) -> Path:
    """The node-local mirror of ``url`` (a pure function of the URL and the cache folder)."""
    url = url.rstrip("/")
    name = re.sub(r"[^A-Za-z0-9._-]", "_", url.rsplit("/", 1)[-1])[:40] or "root"
    return Path(cache) / "remote" / f"{name}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


def local_dir(spec: str, cache: Path) -> Path:
    """Where a prepared folder given as ``data.dir`` or a source is read: itself, or its mirror."""
    return mirror_dir(spec, cache) if is_url(spec) else Path(spec)


def urls_of(data: DataConfig) -> list[str]:
    specs = [e.rpartition(":")[0] for e in data.sources] if data.sources else [data.dir]
    return [s for s in specs if is_url(s)]


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text[:300]}"


class Store:
    """One prepared folder in a store, every call retried for ``retry_s`` seconds."""

    def __init__(self, url: str, retry_s: float) -> None:
        import fsspec

        self.url, self.retry_s = url.rstrip("/"), retry_s
        protocol = self.url.split("://", 1)[0]
        try:
            # A client of its own: fsspec's instance cache would hand back one made under
            # another environment (endpoint, credentials) earlier in the process.
            self.fs, self.root = fsspec.core.url_to_fs(self.url, skip_instance_cache=True)
        except ImportError:
            client = _CLIENTS.get(protocol)
            how = (f"pip install {client[0]} (the project's {client[1]} extra: pip install -e "
                   f"\".[{client[1]}]\")" if client else f"install fsspec's package for {protocol}://")
            raise S.DataError(f"{self.url}: reading {protocol}:// needs its fsspec package: {how}") from None
        except ValueError as e:
            raise S.DataError(f"{self.url}: {e} (fsspec knows no such store)") from None

    def call(self, what: str, fn: Callable[[], T]) -> T:
        deadline, pause, said = time.monotonic() + self.retry_s, 0.5, False
        while True:
            try:
                return fn()
            except S.DataError:
                raise
            except FileNotFoundError:
                raise S.DataError(f"{what} is not in the store: was `alum-ds prepare ... --out "
                                  f"{self.url}` finished?") from None
            except PermissionError as e:
                raise S.DataError(f"{what}: access denied ({_one_line(e)})") from None
            except Exception as e:  # the store's transient faults come as many types
                if type(e).__name__ in _CREDENTIAL_ERRORS:
                    raise S.DataError(f"{what}: no usable credentials for the store "
                                      f"({_one_line(e)}): set them as its client reads them (for "
                                      "S3: the AWS_* variables or ~/.aws)") from None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise S.DataError(
                        f"cannot read {what}: the store failed for {self.retry_s:g} s "
                        f"(data.fetch_retry_s), last {_one_line(e)}; nothing was written, rerun "
                        "when the store is back") from None
                if not said:
                    print(f"alum_ds: {what}: {_one_line(e)}; retrying for up to {left:.0f} s",
                          file=sys.stderr, flush=True)
                    said = True
                time.sleep(min(pause, left))
                pause = min(2 * pause, 10.0)

    def get(self, name: str, dest: Path) -> Path:
        """``name`` downloaded beside ``dest`` under a temporary name (never ``dest`` itself)."""
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)  # a mirror file as any file this process writes
        try:
            self.call(f"{self.url}/{name}", lambda: self.fs.get_file(f"{self.root}/{name}", tmp))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return Path(tmp)

    def put(self, src: Path, name: str) -> None:
        self.call(f"{self.url}/{name}", lambda: self.fs.put_file(str(src), f"{self.root}/{name}"))

    def list(self, sub: str) -> list[str]:
        base = f"{self.root}/{sub}".rstrip("/")
        found = self.call(f"{self.url}/{sub}", lambda: self.fs.find(base))
        return sorted(str(p)[len(base) + 1:] for p in found)


@contextmanager
def _fetching(mirror: Path) -> Iterator[None]:
    """One fetcher of ``mirror`` per node at a time. A process that waited for one that failed
    fails with its error (it would only wait out the same retry budget again)."""
    start = time.time()
    marker = mirror / ".fetch-error"
    mirror.mkdir(parents=True, exist_ok=True)
    with open(mirror / ".fetch.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            if marker.is_file() and marker.stat().st_mtime >= start:
                raise S.DataError(marker.read_text().strip())
            try:
                yield
            except S.DataError as e:
                marker.write_text(str(e))
                raise
            marker.unlink(missing_ok=True)
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _hold(mirror: Path) -> None:
    """Mark ``mirror`` in use by this process (a shared lock kept for its life): never evicted."""
    if mirror not in _held:
        mirror.mkdir(parents=True, exist_ok=True)
        f = open(mirror / ".in-use", "a+")  # noqa: SIM115 - held open on purpose
        fcntl.flock(f, fcntl.LOCK_SH)
        _held[mirror] = f
    os.utime(_held[mirror].fileno())  # its time is the mirror's last use


def _fetch_verified(store: Store, name: str, dest: Path, want: str,
                    dtype: np.dtype | None) -> tuple[str, int]:
    """Fetch, hash, rename into place; a mismatch is fetched once more, then refused."""
    for _ in range(2):
        tmp = store.get(name, dest)
        got, top = hash_and_max(tmp, dtype)
        if got == want:
            os.replace(tmp, dest)
            return got, top
        tmp.unlink(missing_ok=True)
    raise S.DataError(f"object {store.url}/{name} fails its sha256 check against the manifest on "
                      f"two fetches (the store's copy changed after prepare): rerun `alum-ds "
                      f"prepare ... --out {store.url}`")


def fetch_metadata(url: str, cache: Path, retry_s: float) -> Path:
    """The manifest and the tokenizer of ``url`` into its mirror (the tokenizer checked against
    the manifest's fingerprint); return the mirror."""
    mirror = mirror_dir(url, cache)
    store = Store(url, retry_s)
    _hold(mirror)
    with _fetching(mirror):
        tmp = store.get(S.MANIFEST, mirror / S.MANIFEST)
        os.replace(tmp, mirror / S.MANIFEST)
        m = S.read_manifest(mirror)
        tok = m["tokenizer"]
        tok_dir = S._safe_path(mirror, tok.get("dir", "tokenizer"), mirror / S.MANIFEST)
        tok_json = tok_dir / "tokenizer.json"
        if tok_json.is_file() and S.sha256_file(tok_json)[:16] == tok.get("fingerprint"):
            return mirror
        rel = tok_dir.relative_to(mirror).as_posix()
        tok_dir.mkdir(parents=True, exist_ok=True)
        for name in store.list(rel):
            if name != "tokenizer.json":
                dest = S._safe_path(tok_dir, name, mirror / S.MANIFEST)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(store.get(f"{rel}/{name}", dest), dest)
        for _ in range(2):
            tmp = store.get(f"{rel}/tokenizer.json", tok_json)
            if S.sha256_file(tmp)[:16] == tok.get("fingerprint"):
                os.replace(tmp, tok_json)
                return mirror
            tmp.unlink(missing_ok=True)
        raise S.DataError(f"object {url}/{rel}/tokenizer.json is not the tokenizer the manifest names "
                          f"(fingerprint {tok.get('fingerprint')}) on two fetches: rerun `alum-ds "
                          f"prepare ... --out {url}`")


def _wanted(mirror: Path, m: dict[str, Any]) -> list[tuple[str, str, np.dtype | None, int]]:
    """(name in the folder, sha256, dtype of a token file, bytes) of every shard file."""
    out = []
    for entries in m["splits"].values():
        for e in entries:
            S._safe_path(mirror, e["name"] + ".bin", mirror / S.MANIFEST)  # refuses a name leaving it
            n_docs = int(e["documents"])
            out.append((e["name"] + ".bin", e["sha256"], np.dtype(m["dtype"]), int(e["bytes"])))
            out.append((e["name"] + ".idx", e["index_sha256"], None, 8 * (n_docs + 1)))
    return out


def _size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def _make_room(cache: Path, mine: list[Path], need: int, max_bytes: int) -> None:
    """Evict other mirrors no process holds, least recently used first, until ``need`` more
    bytes fit under ``max_bytes``; refuse if this run's mirrors alone do not fit."""
    ours = sum(_size(d) for d in mine) + need
    if ours > max_bytes:
        raise S.DataError(f"the remote data needs {ours / 1e9:.2f} GB of node cache, "
                          f"data.cache_max_gb is {max_bytes / 1e9:g}: every training shard is read "
                          "from the first steps on (a permutation of the whole split), so raise it")
    root = cache / "remote"
    others = [d for d in root.iterdir() if d.is_dir() and d not in mine] if root.is_dir() else []
    sizes = {d: _size(d) for d in others}
    total = ours + sum(sizes.values())

    def last_used(d: Path) -> float:
        p = d / ".in-use"
        return p.stat().st_mtime if p.exists() else 0.0

    for d in sorted(others, key=last_used):
        if total <= max_bytes:
            break
        with open(d / ".in-use", "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a run on this node reads it
            shutil.rmtree(d, ignore_errors=True)
            total -= sizes[d]
            print(f"alum_ds: evicted {d} from the node cache ({sizes[d] / 1e9:.2f} GB, "
                  "data.cache_max_gb)", file=sys.stderr, flush=True)


def fetch_shards(url: str, cache: Path, *, retry_s: float, max_gb: float = 0.0,
                 mine: list[Path] | None = None, progress: bool = True) -> dict[str, float]:
    """Every shard file of ``url`` into its mirror, verified (after ``fetch_metadata``); files
    already there and recorded as verified are kept. Returns bytes fetched and seconds."""
    mirror = mirror_dir(url, cache)
    store = Store(url, retry_s)
    t0 = time.monotonic()
    _hold(mirror)
    with _fetching(mirror):
        m = S.read_manifest(mirror)
        record = VerifiedRecord(cache / RECORD)
        todo = []
        for name, want, dtype, size in _wanted(mirror, m):
            path = mirror / name
            if path.is_file():
                rec = record.known(path)
                if rec is not None and rec.get("sha256") == want:
                    continue
                if rec is None:  # a file of an earlier fetch or of `prepare --out`
                    got, top = hash_and_max(path, dtype)
                    if got == want:
                        record.add(path, got, top)
                        continue
            todo.append((name, want, dtype, size))
        need = sum(t[3] for t in todo)
        if max_gb > 0:
            _make_room(cache, sorted(set(mine or []) | {mirror}), need, int(max_gb * 1e9))
        done, last = 0, t0
        lock = threading.Lock()

        def one(item: tuple[str, str, np.dtype | None, int]) -> None:
            nonlocal done, last
            name, want, dtype, size = item
            got, top = _fetch_verified(store, name, mirror / name, want, dtype)
            with lock:
                record.add(mirror / name, got, top)
                done += size
                now = time.monotonic()
                if progress and now - last > 10:
                    last = now
                    print(f"alum_ds: fetching {url}: {done / 2**20:,.1f} of {need / 2**20:,.1f} MiB "
                          f"({done / 2**20 / (now - t0):,.1f} MiB/s)", file=sys.stderr, flush=True)

        try:
            with ThreadPoolExecutor(max_workers=FETCH_THREADS) as pool:
                list(pool.map(one, todo))
        finally:
            record.save()
    return {"fetched_bytes": need, "seconds": time.monotonic() - t0}


def fetch_metadata_of(data: DataConfig) -> None:
    """The manifests and tokenizers of every URL of ``data`` (planning reads them)."""
    cache = cache_dir(data.cache_dir)
    for url in urls_of(data):
        fetch_metadata(url, cache, data.fetch_retry_s)


class Prefetch(threading.Thread):
    """The shards of every URL of ``data``, fetched in the background; ``wait`` re-raises what
    stopped it."""

    def __init__(self, data: DataConfig, *, progress: bool) -> None:
        super().__init__(name="alum_ds-prefetch", daemon=True)
        self.data, self.progress = data, progress
        self.error: BaseException | None = None
        self.result: dict[str, float] = {"fetched_bytes": 0, "seconds": 0.0}

    def run(self) -> None:
        cache = cache_dir(self.data.cache_dir)
        urls = urls_of(self.data)
        mine = [mirror_dir(u, cache) for u in urls]
        try:
            for url in urls:
                r = fetch_shards(url, cache, retry_s=self.data.fetch_retry_s,
                                 max_gb=self.data.cache_max_gb, mine=mine, progress=self.progress)
                self.result["fetched_bytes"] += r["fetched_bytes"]
                self.result["seconds"] += r["seconds"]
        except BaseException as e:  # handed to the main thread by wait()
            self.error = e

    def wait(self) -> dict[str, float]:
        self.join()
        if self.error is not None:
            raise self.error
        return self.result


def upload(local: Path, store: Store) -> int:
    """A prepared folder to ``store``, the manifest last (a half-written folder has none, so it is
    never taken as prepared); returns the files written."""
    files = [p for p in sorted(local.rglob("*")) if p.is_file() and not p.name.startswith(".")
             and p.name not in (S.MANIFEST, "progress.json") and not p.name.endswith(".tmp")]
    for p in files:
        store.put(p, p.relative_to(local).as_posix())
    store.put(local / S.MANIFEST, S.MANIFEST)
    return len(files) + 1


def fetch_all(url: str, data: DataConfig) -> Path:
    """Manifest, tokenizer and shards of ``url`` in its mirror, verified (``prepare --verify``)."""
    cache = cache_dir(data.cache_dir)
    fetch_metadata(url, cache, data.fetch_retry_s)
    fetch_shards(url, cache, retry_s=data.fetch_retry_s, max_gb=data.cache_max_gb)
    return mirror_dir(url, cache)


def describe(result: dict[str, float]) -> str:
    return (f"remote data: {result['fetched_bytes'] / 2**20:,.1f} MiB fetched and verified in "
            f"{result['seconds']:.1f} s")


__all__ = ["Prefetch", "Store", "describe", "fetch_all", "fetch_metadata", "fetch_metadata_of",
           "fetch_shards", "is_url", "local_dir", "mirror_dir", "upload", "urls_of"]
