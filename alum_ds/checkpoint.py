"""Sharded checkpoints under ``RUN/checkpoints/<tag>``, a crash-safe ``latest``, retention.

DeepSpeed writes ``latest`` from rank 0 without waiting for the other ranks' shards, so a kill
during a save could point ``latest`` at a half-written checkpoint. Here DeepSpeed is told not to
write it; after a barrier (every rank has written its shards) rank 0 replaces ``latest``
atomically. A checkpoint folder that ``latest`` does not name is never loaded implicitly.
DeepSpeed checkpoints are pickles: loading one runs code, so resume only from your own runs.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from alum_ds import distributed as D

TAG_RE = re.compile(r"^step(\d{8})$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def read_latest(ckpt_root: Path) -> str | None:
    p = ckpt_root / "latest"
    if not p.is_file():
        return None
    tag = p.read_text().strip()
    return tag if (ckpt_root / tag).is_dir() else None


def _write_latest(ckpt_root: Path, tag: str) -> None:
    tmp = ckpt_root / "latest.tmp"
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt_root / "latest")


def save(engine: Any, run_dir: Path, step: int, client_state: dict[str, Any], keep: int) -> Path:
    """Save on every rank; move ``latest`` only once all ranks finished; prune old tags."""
    root = checkpoint_dir(run_dir)
    tag = tag_for(step)
    state = {
        **client_state,
        # Lets DeepSpeed's ds_to_universal convert this checkpoint for another world size.
        "universal_checkpoint_info": {"universal_checkpoint_version": 0.4},
    }
    engine.save_checkpoint(str(root), tag=tag, client_state=state, save_latest=False)
    D.barrier()
    if D.rank() == 0:
        _write_latest(root, tag)
        prune(root, keep)
    D.barrier()
    return root / tag


def prune(root: Path, keep: int) -> None:
    latest = read_latest(root)
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name))
    for tag in tags[:-keep] if keep > 0 else []:
        if tag != latest:
            shutil.rmtree(root / tag, ignore_errors=True)


def load(engine: Any, ckpt_root: Path, tag: str) -> dict[str, Any]:
    """Load engine, optimizer and scheduler state; return the client state."""
    path, client = engine.load_checkpoint(
        str(ckpt_root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise FileNotFoundError(f"checkpoint {ckpt_root / tag} could not be loaded")
    return client or {}
