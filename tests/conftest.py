"""Shared fixtures: the repository root, a per-session data cache, and the data tests' corpora and
prepared folders (built once per session; no test writes to them: tests that damage a folder use a
copy)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("alum_cache")


def deepspeed_cmd(*args: str, num_gpus: int = 2) -> list[str]:
    """The real deepspeed launcher, started from this interpreter."""
    return [sys.executable, "-c", "from deepspeed.launcher.runner import main; main()",
            f"--num_gpus={num_gpus}", *args]


def run(cmd: list[str], cwd: Path, env_extra: dict[str, str] | None = None,
        timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    env.pop("ALUM_DS_RESPAWNED", None)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def free_port() -> str:
    """A port the kernel reports free now: several test sessions on one machine never share one."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


# The data tests' corpora and prepared folders. Imports stay inside the fixtures, so that test files
# that use none of them do not load the data path.


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from alum_ds.data.corpus import embedded_documents
    from tests._data_helpers import _write_corpus

    return _write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", embedded_documents()[:40])


@pytest.fixture(scope="session")
def data_dir(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared folder with train and validation splits; tests that damage it use a copy."""
    from tests._data_helpers import _prepare

    out = tmp_path_factory.mktemp("prepared") / "data"
    _prepare([corpus], out)
    return out


@pytest.fixture(scope="session")
def docs40() -> list[str]:
    """Documents without blank lines inside, so that a text file holds one paragraph each."""
    import re

    from alum_ds.data.corpus import embedded_documents

    return [re.sub(r"\n\s*\n", "\n", d) for d in embedded_documents()[:40]]


@pytest.fixture(scope="session")
def reference(docs40: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The in-memory path: ``prepare(documents=...)`` on a list, with a small shard size."""
    from alum_ds.data import prepare as P
    from tests._data_helpers import SEED, VOCAB

    out = tmp_path_factory.mktemp("ref") / "data"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(P, "SHARD_TOKENS", 5000)
        P.prepare(documents=docs40, out_dir=out, vocab_size=VOCAB, seed=SEED, progress=False)
    return out


@pytest.fixture(scope="session")
def mix(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Mixture sources: ``big`` (``data_dir``), ``small`` (a few documents prepared with big's
    tokenizer: a few dozen sequences of 32) and ``foreign`` (its own, smaller BPE)."""
    from alum_ds.data import prepare as P
    from alum_ds.data.corpus import embedded_documents

    docs = embedded_documents()
    base = tmp_path_factory.mktemp("mix")
    out = {"big": data_dir, "small": base / "small", "foreign": base / "foreign"}
    P.prepare(documents=[d[:1200] for d in docs[40:46]], out_dir=out["small"],
              tokenizer=str(data_dir / "tokenizer"), seed=1, progress=False)
    P.prepare(documents=[d[:2000] for d in docs[46:52]], out_dir=out["foreign"], vocab_size=300,
              seed=2, progress=False)
    return out
