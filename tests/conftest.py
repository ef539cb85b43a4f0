"""Shared fixtures: the repository root and a per-session data cache."""

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


_port = [29600 + os.getpid() % 1000]


def free_port() -> str:
    _port[0] += 1
    return str(_port[0])
