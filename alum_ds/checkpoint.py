"""Sharded checkpoints under ``RUN/checkpoints/<tag>``: crash-safe ``latest``, retention, resume
planning (also on another number of ranks, through DeepSpeed universal checkpoints).

A checkpoint is DeepSpeed's shards plus ``alum_state.json`` (step, world size, ZeRO stage, data
stream position, config and its hash; JSON, never pickle). Saving runs in this order: every rank
writes its shards; barrier; rank 0 writes ``alum_state.json`` (the completion marker), then moves
``latest`` atomically, then prunes. A kill at any point leaves ``latest`` naming the previous
complete checkpoint; a folder without ``alum_state.json`` is a leftover of an interrupted save:
it is never loaded, and it is removed by the next save (of any step).

Resuming reads only JSON before the engine exists, so a checkpoint from another config, model
shape or ZeRO layout is refused before anything is built, and a change of world size is known in
time to ask DeepSpeed for a universal-checkpoint load (``"checkpoint": {"load_universal": true}``
must be in the dict given to ``deepspeed.initialize``). DeepSpeed checkpoints are pickles:
loading one runs code, so resume only from your own runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alum_ds import distributed as D
from alum_ds.config import ConfigError, RunConfig, config_from_dict

TAG_RE = re.compile(r"^step(\d{8})$")
STATE_FILE = "alum_state.json"
STATE_VERSION = 1
UNIVERSAL_DIR = "universal"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def root_of(path: Path) -> Path | None:
    """The checkpoint root that ``path`` names: a run folder's checkpoints/, or that folder itself
    (DeepSpeed's save folder, holding ``latest``); None for anything else."""
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    return path if (path / "latest").is_file() else None


def read_latest(ckpt_root: Path) -> str | None:
    p = ckpt_root / "latest"
    if not p.is_file():
        return None
    tag = p.read_text().strip()
    return tag if (ckpt_root / tag).is_dir() else None


def read_state(tag_dir: Path) -> dict[str, Any] | None:
    """A checkpoint's ``alum_state.json``, or None if the checkpoint is incomplete."""
    p = tag_dir / STATE_FILE
    if not p.is_file():
        return None
    try:
        state = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"checkpoint {tag_dir}: {STATE_FILE} is not valid JSON") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ConfigError(f"checkpoint {tag_dir}: {STATE_FILE} has an unknown format")
    return state


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_latest(ckpt_root: Path, tag: str) -> None:
    _atomic_write(ckpt_root / "latest", tag)


def save(engine: Any, run_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Save on every rank; complete the checkpoint and move ``latest`` only once all ranks have
    written; prune. ``state`` is this run's JSON state (see ``STATE_FILE``)."""
    root = checkpoint_dir(run_dir)
    tag = tag_for(step)
    path = root / tag
    if read_latest(root) == tag:
        return path  # already saved (a resumed run that ends where it started)
    if D.rank() == 0 and path.exists():
        shutil.rmtree(path)  # a leftover of an interrupted save, or of an abandoned later run
    D.barrier()
    # universal_checkpoint_info lets ds_to_universal convert this checkpoint for another world size.
    engine.save_checkpoint(str(root), tag=tag, save_latest=False,
                           client_state={"universal_checkpoint_info": {"universal_checkpoint_version": 0.4}})
    D.barrier()
    if D.rank() == 0:
        _atomic_write(path / STATE_FILE, json.dumps({"version": STATE_VERSION, **state}, indent=1))
        _write_latest(root, tag)
        prune(root, keep)
    D.barrier()
    return path


def prune(root: Path, keep: int) -> None:
    """Remove leftovers of interrupted saves and all but the ``keep`` newest complete checkpoints;
    never the one ``latest`` names. Call only while no save is in progress."""
    latest = read_latest(root)
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name))
    complete = [t for t in tags if (root / t / STATE_FILE).is_file()]
    doomed = [t for t in tags if t not in complete] + (complete[:-keep] if keep > 0 else [])
    for tag in doomed:
        if tag != latest:
            shutil.rmtree(root / tag, ignore_errors=True)


def load(engine: Any, ckpt_root: Path, tag: str) -> None:
    """Load engine, optimizer and scheduler state."""
    path, _ = engine.load_checkpoint(
        str(ckpt_root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise FileNotFoundError(f"checkpoint {ckpt_root / tag} could not be loaded")


@dataclass
class ResumePoint:
    """A complete checkpoint to resume from, known from its JSON state alone."""

    root: Path
    tag: str
    state: dict[str, Any]

    @property
    def path(self) -> Path:
        return self.root / self.tag

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def world_size(self) -> int:
        return int(self.state["world_size"])

    @property
    def zero_stage(self) -> int:
        return int(self.state["zero_stage"])


def _point(root: Path, tag: str, what: str) -> ResumePoint:
    state = read_state(root / tag)
    if state is None:
        raise ConfigError(f"{what}: checkpoint {root / tag} is incomplete (no {STATE_FILE}; an "
                          f"interrupted save or an older alum_ds): resume from another checkpoint")
    return ResumePoint(root, tag, state)


def find_resume(run_dir: Path, resume: str = "", *, option: str = "--resume") -> ResumePoint | None:
    """The checkpoint to resume from: ``resume`` (a checkpoint folder or a run folder), else the
    run folder's ``latest``; None for a fresh run. ``option`` names the setting in errors."""
    if resume:
        p = Path(resume)
        root = root_of(p)
        if root is not None:
            tag = read_latest(root)
            if tag is None:
                raise ConfigError(f"{option} {resume}: no valid 'latest' checkpoint in {root}")
            return _point(root, tag, f"{option} {resume}")
        if not p.is_dir():
            raise ConfigError(f"{option} {resume}: no such checkpoint folder")
        return _point(p.parent, p.name, f"{option} {resume}")
    root = checkpoint_dir(run_dir)
    if not (root / "latest").is_file():
        return None
    tag = (root / "latest").read_text().strip()
    if not (root / tag).is_dir():
        raise ConfigError(f"run folder {run_dir}: checkpoints/latest names {tag!r}, which is missing: "
                          f"pass --resume CHECKPOINT or use a new --run.dir")
    return _point(root, tag, f"run folder {run_dir}")


def _shape_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    model, data = cfg.get("model", {}), cfg.get("data", {})
    keys = {"model.arch": model.get("arch", "roberta"), "model.preset": model.get("preset"),
            "model.pretrained": model.get("pretrained"), "data.seq_len": data.get("seq_len")}
    if not data.get("dir"):
        keys["data.vocab_size"] = data.get("vocab_size")
    return keys


def check_resume(point: ResumePoint, cfg: RunConfig, *, world: int, zero_stage: int,
                 branch: bool = False, total_steps: int = 0) -> bool:
    """Refuse (ConfigError, one line) a checkpoint this run cannot continue (with ``branch``:
    start from, ``run.branch_from``, in a run of ``total_steps``); return whether it must be
    loaded as a universal checkpoint (saved with another world size)."""
    theirs, ours = _shape_keys(point.state.get("config", {})), _shape_keys(cfg.to_dict())
    if theirs != ours:
        diff = ", ".join(f"{k}={theirs.get(k)!r} (this run {ours.get(k)!r})"
                         for k in ours if theirs.get(k) != ours.get(k))
        raise ConfigError(f"checkpoint {point.path} holds another model shape: {diff}; "
                          f"use a new --run.dir")
    if branch:
        _check_branch(point, cfg, total_steps)
    elif point.state.get("config_hash") != cfg.fingerprint():
        raise ConfigError(
            f"checkpoint {point.path} was written with another config (hash "
            f"{point.state.get('config_hash')}, this run {cfg.fingerprint()}): use a new --run.dir"
        )
    if point.zero_stage != zero_stage and 0 in (point.zero_stage, zero_stage):
        raise ConfigError(f"checkpoint {point.path} was written under ZeRO-{point.zero_stage}; this "
                          f"run uses ZeRO-{zero_stage}: resume with the same stage")
    # ZeRO-0 keeps the whole optimizer state in the model file: any world size loads it.
    return point.zero_stage > 0 and (point.world_size != world or point.zero_stage != zero_stage)


def _check_branch(point: ResumePoint, cfg: RunConfig, total_steps: int) -> None:
    """A branch must compute what a run from scratch with ``cfg`` would: the checkpoint's run had
    the same settings but for ``alum``, and neither run had ALUM on before the checkpoint."""
    theirs = config_from_dict(point.state.get("config", {}))
    if theirs.fingerprint(without=("alum",)) != cfg.fingerprint(without=("alum",)):
        raise ConfigError(f"run.branch_from {point.path}: that run's settings differ from this run's "
                          "in more than the alum section; a branch may change only alum.*")
    # Equal settings but for alum: that run planned the same number of steps as this one.
    for who, alum in (("that run", theirs.alum), ("this run", cfg.alum)):
        if alum.enabled and alum.start_for(total_steps) < point.step:
            raise ConfigError(f"run.branch_from {point.path}: {who} has ALUM on from step "
                              f"{alum.start_for(total_steps)}, before the checkpoint's step "
                              f"{point.step}; a branch needs plain MLM up to its checkpoint "
                              f"(alum.start_step >= {point.step}, a later alum.start_fraction, "
                              "or alum.enabled=false)")


def convert_to_universal(point: ResumePoint, run_dir: Path) -> Path:
    """Convert ``point`` with DeepSpeed's ds_to_universal into RUN/checkpoints/universal/<tag>
    (rank 0 only; the caller makes the other ranks wait). Returns the universal root."""
    out_root = checkpoint_dir(run_dir) / UNIVERSAL_DIR
    out = out_root / point.tag
    shutil.rmtree(out_root, ignore_errors=True)
    out_root.mkdir(parents=True)
    workers = str(max(1, min(4, os.cpu_count() or 1)))
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
           "--input_folder", str(point.path), "--output_folder", str(out),
           "--num_extract_workers", workers, "--num_merge_workers", workers]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"ds_to_universal failed on {point.path}: {tail[0]}")
    _write_latest(out_root, point.tag)
    return out_root


def remove_universal(run_dir: Path) -> None:
    shutil.rmtree(checkpoint_dir(run_dir) / UNIVERSAL_DIR, ignore_errors=True)
