"""Prepared folders in object storage, against a real S3 API server on 127.0.0.1 (moto's
standalone server, started here) reached through s3fs: prepare to it, verify it, train from it on
2 ranks and resume from it while it is down, and break it (an object overwritten, the server
stopped past the retry budget, a mirror damaged on the node)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from alum_ds.config import DataConfig
from alum_ds.data import remote
from alum_ds.data.shards import DataError
from tests._data_helpers import _one_line
from tests.conftest import ROOT, deepspeed_cmd, free_port, run

BUCKET = "alum-data"


class S3:
    """moto's threaded server; ``stop`` and ``start`` again keep its objects (one backend)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = int(free_port())
        self.env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}", "AWS_ACCESS_KEY_ID": "test",
                    "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
        self._make = lambda: ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server = self._make()

    def start(self) -> None:
        self.server = self._make()
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], region_name="us-east-1")


@pytest.fixture(scope="module")
def s3():
    server = S3()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    server.start()
    server.client().create_bucket(Bucket=BUCKET)
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def prepared(s3, corpus: Path, tmp_path_factory) -> str:
    """``alum-ds prepare CORPUS --out s3://...`` (the command's own process: its files, the
    manifest last, then its summary line)."""
    url = f"s3://{BUCKET}/corpus"
    cache = tmp_path_factory.mktemp("prepare_cache")
    r = run([sys.executable, "-m", "alum_ds.cli", "prepare", str(corpus), "--out", url,
             "--vocab-size", "512", "--quiet"], ROOT, {**s3.env, "ALUM_DS_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"uploaded 7 files to {url} (the manifest last)" in r.stderr
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=BUCKET, Prefix="corpus/")["Contents"]]
    assert {"corpus/manifest.json", "corpus/tokenizer/tokenizer.json",
            "corpus/train-00000.bin"} <= set(keys), keys
    return url


def _data(cache: Path, **kw) -> DataConfig:
    return DataConfig(cache_dir=str(cache), **kw)


def test_verify_fetches_a_url_and_names_an_overwritten_object_after_one_refetch(
        s3, prepared: str, tmp_path: Path, caplog) -> None:
    """``prepare --verify URL`` fetches into the node cache and checks it; an object whose bytes
    changed in the store is fetched twice, never renamed into the mirror, then refused naming it."""
    r = run([sys.executable, "-m", "alum_ds.cli", "prepare", "--verify", prepared], ROOT,
            {"ALUM_DS_CACHE": str(tmp_path / "v")})
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout)
    assert summary["train"]["tokens"] > 0 and summary["dir"].startswith(str(tmp_path / "v" / "remote"))

    c = s3.client()
    good = c.get_object(Bucket=BUCKET, Key="corpus/train-00000.bin")["Body"].read()
    c.put_object(Bucket=BUCKET, Key="corpus/train-00000.bin", Body=good[::-1])
    try:
        cache = tmp_path / "node"
        remote.fetch_metadata(prepared, cache, 5)
        caplog.set_level(logging.INFO, logger="werkzeug")
        caplog.clear()  # the server logs every request it answers, this test's own too
        with pytest.raises(DataError) as e:
            remote.fetch_shards(prepared, cache, retry_s=5, progress=False)
        _one_line(e, f"object {prepared}/train-00000.bin fails its sha256 check", "two fetches")
        gets = [m for m in caplog.messages if "GET /alum-data/corpus/train-00000.bin" in m]
        assert len(gets) == 2, gets
        assert not (remote.mirror_dir(prepared, cache) / "train-00000.bin").exists()
        assert not list(remote.mirror_dir(prepared, cache).glob(".*.part"))  # nothing half-kept
    finally:
        c.put_object(Bucket=BUCKET, Key="corpus/train-00000.bin", Body=good)


def test_a_store_down_is_retried_until_back_and_refused_past_the_budget(
        s3, prepared: str, tmp_path: Path, capsys, monkeypatch) -> None:
    """The server stopped: a fetch retries with backoff and goes on when it is back; past
    ``data.fetch_retry_s`` it stops with one line and leaves no file in the mirror. botocore's
    own retries are cut to one attempt (each Store makes its client afresh, from the
    environment), so that the retrying measured is ``Store.call``'s."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    cache = tmp_path / "node"
    remote.fetch_metadata(prepared, cache, 5)
    s3.stop()
    back = threading.Timer(3.0, s3.start)
    back.start()
    try:
        got = remote.fetch_shards(prepared, cache, retry_s=60, progress=False)
    finally:
        back.join()
    assert got["fetched_bytes"] > 0 and got["seconds"] >= 2.5  # it waited for the server
    assert "retrying for up to" in capsys.readouterr().err
    mirror = remote.mirror_dir(prepared, cache)
    assert (mirror / "train-00000.bin").is_file()

    other = tmp_path / "other"
    s3.stop()
    try:
        t0 = time.monotonic()
        with pytest.raises(DataError) as e:
            remote.fetch_metadata(prepared, other, 2)
        assert 2 <= time.monotonic() - t0 < 15
        _one_line(e, f"cannot read {prepared}/manifest.json", "data.fetch_retry_s")
        assert not (remote.mirror_dir(prepared, other) / "manifest.json").exists()
    finally:
        s3.start()


def test_a_damaged_mirror_is_fetched_again_and_the_cache_bound_evicts_unused_mirrors(
        s3, prepared: str, tmp_path: Path, capsys) -> None:
    """A mirror file changed on the node is fetched again (its record no longer matches). Under
    ``data.cache_max_gb`` another folder's mirror that no process holds is evicted, one that a
    process holds is not, and a folder larger than the bound is refused."""
    damaged = tmp_path / "damaged"
    mirror = remote.fetch_all(prepared, _data(damaged))
    (mirror / "train-00000.bin").write_bytes(b"\0" * 64)
    assert remote.fetch_all(prepared, _data(damaged)) == mirror
    assert (mirror / "train-00000.bin").stat().st_size > 64

    copy = f"s3://{BUCKET}/copy"
    c = s3.client()
    for o in c.list_objects_v2(Bucket=BUCKET, Prefix="corpus/")["Contents"]:
        c.copy_object(Bucket=BUCKET, Key="copy/" + o["Key"][len("corpus/"):],
                      CopySource={"Bucket": BUCKET, "Key": o["Key"]})
    size = sum(p.stat().st_size for p in mirror.rglob("*") if p.is_file())
    bound = 1.5 * size / 1e9  # one folder's mirror fits, two do not

    def fetch_in_child(url: str, cache: Path) -> str:  # a process that exits: it holds nothing after
        code = ("import sys; from alum_ds.data import remote; remote.fetch_all(sys.argv[1], "
                "remote.DataConfig(cache_dir=sys.argv[2], cache_max_gb=float(sys.argv[3])))")
        r = subprocess.run([sys.executable, "-c", code, url, str(cache), repr(bound)],
                           capture_output=True, text=True, timeout=300, env={**os.environ, **s3.env})
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stderr

    node = tmp_path / "node"
    fetch_in_child(prepared, node)
    capsys.readouterr()
    held = remote.fetch_all(copy, _data(node, cache_max_gb=bound))  # held by this process now
    assert "evicted" in capsys.readouterr().err
    assert not remote.mirror_dir(prepared, node).exists() and held.is_dir()
    assert "evicted" not in fetch_in_child(prepared, node)  # over the bound: the held one stays
    assert held.is_dir() and remote.mirror_dir(prepared, node).is_dir()
    with pytest.raises(DataError) as e:
        remote.fetch_all(prepared, _data(tmp_path / "small", cache_max_gb=size / 4e9))
    _one_line(e, "data.cache_max_gb", "raise it")


def test_an_unknown_store_or_a_missing_client_package_is_one_line() -> None:
    import importlib.util

    with pytest.raises(DataError) as e:
        remote.Store("nosuchstore://bucket/data", 1)
    _one_line(e, "nosuchstore://bucket/data", "fsspec knows no such store")
    if importlib.util.find_spec("gcsfs") is None:  # not in the dev extra: the hint names the extra
        with pytest.raises(DataError) as e:
            remote.Store("gs://bucket/data", 1)
        _one_line(e, "gs://bucket/data", "pip install gcsfs", '".[gcs]"')
    else:
        assert remote.Store("gs://bucket/data", 1).root == "bucket/data"


@pytest.mark.distributed
def test_two_ranks_train_from_s3_and_resume_from_it_while_it_is_down(
        s3, tmp_path_factory, tmp_path: Path, cache_dir: Path) -> None:
    """The embedded corpus uploaded to the server; a 2-rank run reads it from there, stops after
    step 4; the node cache is wiped and the server stopped; the resumed run retries (its own
    backoff: botocore's retries cut to one attempt) until the server is back (restarted when a
    rank says it is retrying), fetches and verifies everything again and finishes. Every step's
    loss is the shared launch's zero2 run's, which read the same folder from the disk."""
    from alum_ds.data.prepare import ensure_embedded
    from tests.test_distributed import QUICK, _losses, _stage

    ref, _ = _stage("zero2.json", tmp_path_factory, cache_dir)
    url = f"s3://{BUCKET}/embedded"
    remote.upload(ensure_embedded(cache_dir, vocab_size=2048, seed=1234), remote.Store(url, 30))
    node = tmp_path / "node"
    args = [str(ROOT / "launch" / "pretrain.py"), "--ds_config", str(ROOT / "ds_configs" / "zero2.json"),
            f"--run.dir={tmp_path / 'run'}", f"--data.dir={url}", f"--data.cache_dir={node}", *QUICK]
    r = run(deepspeed_cmd(f"--master_port={free_port()}", *args, "--run.stop_after=4"), ROOT, s3.env)
    first = r.stdout + r.stderr
    assert r.returncode == 0, first[-3000:]
    assert "remote data:" in first and f"data {url} (mirrored in {remote.mirror_dir(url, node)})" in first
    shutil.rmtree(node)
    s3.stop()
    # The server comes back once a rank says it is retrying (botocore's retries cut to one
    # attempt: the retrying is alum_ds's).
    env = {**os.environ, **s3.env, "AWS_MAX_ATTEMPTS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("ALUM_DS_RESPAWNED", None)
    proc = subprocess.Popen(deepspeed_cmd(f"--master_port={free_port()}", *args), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, back = [], False
    try:
        for line in proc.stdout:
            lines.append(line)
            if not back and "retrying for up to" in line:
                s3.start()
                back = True
        proc.wait(timeout=600)
    finally:
        if not back:
            s3.start()
        proc.kill()
    second = "".join(lines)
    assert back and proc.returncode == 0, second[-3000:]
    assert "resumed from" in second, second[-3000:]
    want, got = _losses(ref), _losses(tmp_path / "run")
    assert len(got) == len(want) == 8
    assert got == pytest.approx(want, rel=1e-4), (got, want)
    # Export after the node cache lost the mirror: its manifest and tokenizer are fetched again.
    from alum_ds.export import export

    shutil.rmtree(node)
    out = export(str(tmp_path / "run" / "checkpoints"), str(tmp_path / "export"))
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
