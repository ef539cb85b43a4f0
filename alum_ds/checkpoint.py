"""Sharded checkpoints under ``RUN/checkpoints/<tag>``: crash-safe ``latest``, retention, resume
planning (also on another number of ranks, through DeepSpeed universal checkpoints).

A checkpoint is DeepSpeed's shards plus ``alum_state.json`` (step, world size, ZeRO stage, data
stream position, config and its hash; JSON, never pickle). Saving runs in this order: every rank
writes its shards; barrier; rank 0 writes ``alum_state.json`` (the completion marker), then moves
``latest`` atomically, then prunes. A kill at any point leaves ``latest`` naming the previous
complete checkpoint; a folder without ``alum_state.json`` is a leftover of an interrupted save:
it is never loaded, and it is removed by the next save (of any step).

Integrity: every rank hashes the files it wrote (sha256 and size; DeepSpeed names a rank's shards
``*zero_pp_rank_<r>_*``, the rest are rank 0's), the digests are gathered over the ranks (each
node hashes its own files, so node-local disks work too) and rank 0 records them under ``files``
in ``alum_state.json``. Loading checks them first (``verify``: each rank its own share), so a
flipped bit, a truncated or missing shard is found before DeepSpeed unpickles anything; the
trainer then resumes from the newest intact checkpoint. A save that cannot be written (a full
disk) is one collective error naming the folder and the bytes needed; the partial folder is
removed and ``latest`` is untouched.

Resuming reads only JSON before the engine exists, so a checkpoint from another config, model
shape or ZeRO layout is refused before anything is built, and a change of world size is known in
time to ask DeepSpeed for a universal-checkpoint load (``"checkpoint": {"load_universal": true}``
must be in the dict given to ``deepspeed.initialize``). DeepSpeed checkpoints are pickles:
loading one runs code, so resume only from your own runs.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from alum_ds import distributed as D
from alum_ds.config import ConfigError, RunConfig, config_from_dict
from alum_ds.data.shards import sha256_file

TAG_RE = re.compile(r"^step(\d{8})$")
STATE_FILE = "alum_state.json"
EXTRA_FILE = "alum_objective.safetensors"
"""The objective's own state beside the engine's (the ``alum.perturbation=table`` table):
replicated on every rank, written by rank 0, read by every rank on any number of ranks."""
STATE_VERSION = 1
UNIVERSAL_DIR = "universal"
DAMAGED_SUFFIX = ".damaged"
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written; the message is one line and names the folder."""


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


def _latest_text(ckpt_root: Path) -> str | None:
    """What ``latest`` says, or None where it is not a tag name (garbage bytes, a torn write)."""
    try:
        tag = (ckpt_root / "latest").read_bytes().decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return tag if TAG_RE.match(tag) else None


def read_latest(ckpt_root: Path) -> str | None:
    p = ckpt_root / "latest"
    if not p.is_file():
        return None
    tag = _latest_text(ckpt_root)
    return tag if tag is not None and (ckpt_root / tag).is_dir() else None


def complete_tags(ckpt_root: Path) -> list[str]:
    """Tags of the complete checkpoints under ``ckpt_root``, newest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted((p.name for p in ckpt_root.iterdir()
                   if p.is_dir() and TAG_RE.match(p.name) and (p / STATE_FILE).is_file()), reverse=True)


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
    problem = _state_problem(state)
    if problem:
        raise ConfigError(f"checkpoint {tag_dir}: {STATE_FILE} is damaged ({problem}): resume from "
                          "another checkpoint (--resume) or use a new --run.dir")
    return state


def _state_problem(state: dict[str, Any]) -> str:
    """What makes a checkpoint's state unusable to the resume checks, or "" (they then index it
    without a KeyError or TypeError)."""
    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not (count(state.get("step")) and count(state.get("world_size")) and state["world_size"] >= 1):
        return "step and world_size must be counts"
    if state.get("zero_stage") not in (0, 1, 2, 3) or isinstance(state.get("zero_stage"), bool):
        return "zero_stage must be 0-3"
    config = state.get("config")
    if not isinstance(config, dict) or not all(isinstance(v, dict) for v in config.values()):
        return "config must be an object of sections"
    if not isinstance(state.get("config_hash"), str) or not isinstance(state.get("stream"), dict):
        return "config_hash and stream are missing"
    return ""


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_latest(ckpt_root: Path, tag: str) -> None:
    _atomic_write(ckpt_root / "latest", tag)


def file_digest(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def owner_of(name: str) -> int:
    """The rank that writes a checkpoint file (DeepSpeed's naming)."""
    m = _RANK_FILE.search(name)
    return int(m.group(1)) if m else 0


def hash_own_files(tag_dir: Path, rank: int) -> dict[str, dict[str, Any]]:
    return {f.name: {**file_digest(f), "rank": rank} for f in sorted(tag_dir.iterdir())
            if f.is_file() and f.name != STATE_FILE and owner_of(f.name) == rank}


def gather_json(obj: Any, device: torch.device) -> list[Any]:
    """Every rank's ``obj`` (JSON-serialisable), in rank order, on every rank: two all-reduces of
    a byte table (each rank fills its own row), so no object collective is needed."""
    world, rank = D.world(), D.rank()
    if world == 1:
        return [obj]
    data = json.dumps(obj).encode()
    n = int(D.all_reduce(torch.tensor([float(len(data))], device=device), "max").item())
    table = torch.zeros(world, n, dtype=torch.float32, device=device)
    table[rank, :len(data)] = torch.tensor(list(data), dtype=torch.float32, device=device)
    rows = D.all_reduce(table, "sum").to(torch.uint8).cpu()
    return [json.loads(bytes(r.tolist()).rstrip(b"\0")) for r in rows]


def checkpoint_bytes(tag_dir: Path) -> int:
    """The size of a complete checkpoint from its recorded files (0 if unknown)."""
    state = read_state(tag_dir) if tag_dir.is_dir() else None
    return sum(int(m.get("size", 0)) for m in (state or {}).get("files", {}).values())


def _write_failure(root: Path, tag: str, errors: list[str], written: int) -> CheckpointError:
    latest = read_latest(root)
    free = shutil.disk_usage(root).free if root.is_dir() else 0
    need = max(checkpoint_bytes(root / latest) if latest else 0, written)
    first = next(e for e in errors if e)
    full = "No space left" in first or "iostream error" in first or "failed writing" in first
    head = (f"no space left on the device of {root} while saving checkpoint {tag}" if full or free < need
            else f"could not write checkpoint {root / tag}: {first}")
    return CheckpointError(
        f"{head}: a checkpoint needs {'about ' if latest else 'at least '}{need:,} bytes there "
        f"({need / 2**30:.2f} GiB; the previous one is only removed after the next is complete), "
        f"{free:,} are free; free space (or move --run.dir, or lower checkpoint.keep) and rerun "
        f"to resume from {latest or 'the start'} (checkpoints/latest is unchanged)")


def _write_extra(path: Path, extra: dict[str, Any]) -> None:
    save_file({k: v.contiguous() for k, v in extra.items()}, str(path / (EXTRA_FILE + ".tmp")))
    os.replace(path / (EXTRA_FILE + ".tmp"), path / EXTRA_FILE)


def save(engine: Any, run_dir: Path, step: int, state: dict[str, Any], keep: int,
         extra: dict[str, Any] | None = None) -> Path:
    """Save on every rank; complete the checkpoint and move ``latest`` only once all ranks have
    written and hashed their files; prune. ``state`` is this run's JSON state (see
    ``STATE_FILE``); ``extra`` named tensors replicated on every rank (``EXTRA_FILE``, written by
    rank 0 before its files are hashed). A write that fails on any rank raises
    ``CheckpointError`` on every rank."""
    root = checkpoint_dir(run_dir)
    tag = tag_for(step)
    path = root / tag
    if read_latest(root) == tag:
        return path  # already saved (a resumed run that ends where it started)
    if D.rank() == 0 and path.exists():
        shutil.rmtree(path)  # a leftover of an interrupted save, or of an abandoned later run
    D.barrier()
    error, files = "", {}
    try:
        # universal_checkpoint_info lets ds_to_universal convert this checkpoint for another world size.
        info = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.4}}
        engine.save_checkpoint(str(root), tag=tag, save_latest=False, client_state=info)
        if extra and D.rank() == 0:
            _write_extra(path, extra)
        files = hash_own_files(path, D.rank())
    except (OSError, RuntimeError) as e:  # torch.save reports ENOSPC as a RuntimeError
        error = (os.strerror(errno.ENOSPC) if getattr(e, "errno", None) == errno.ENOSPC
                 else (str(e).strip().splitlines() or [type(e).__name__])[-1])
        D.barrier()  # the one that ends save_checkpoint, where the ranks that wrote are waiting
    # The gather is also the barrier after the ranks' writes.
    reports = gather_json({"error": error, "files": files}, engine.device)
    errors = [r["error"] for r in reports]
    if any(errors):
        written = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0
        D.barrier()
        if D.rank() == 0:
            shutil.rmtree(path, ignore_errors=True)
        D.barrier()
        raise _write_failure(root, tag, errors, written)
    done = ""
    if D.rank() == 0:
        record = {name: meta for r in reports for name, meta in r["files"].items()}
        try:
            _atomic_write(path / STATE_FILE, json.dumps({"version": STATE_VERSION, **state,
                                                         "files": record}, indent=1))
            _write_latest(root, tag)
        except OSError as e:
            done = os.strerror(e.errno) if e.errno else str(e)
            (path / STATE_FILE).unlink(missing_ok=True)
            shutil.rmtree(path, ignore_errors=True)
        else:
            prune(root, keep)
    failed = D.all_reduce(torch.tensor([1.0 if done else 0.0], device=engine.device), "max").item() > 0
    if failed:
        raise _write_failure(root, tag, [done or "rank 0 could not complete the checkpoint"],
                             sum(int(m["size"]) for r in reports for m in r["files"].values()))
    return path


def verify(point: ResumePoint, rank: int = 0, world: int = 1) -> str:
    """'' if this rank's share of ``point``'s recorded files (all of them for ``world`` 1) is
    intact, else one line naming the first damaged file. A checkpoint without a record (written
    before checksums were kept) passes."""
    files = point.state.get("files")
    if not isinstance(files, dict):
        return ""
    for name, meta in sorted(files.items()):
        if int(meta.get("rank", 0)) % world != rank:
            continue
        f = point.path / name
        if not f.is_file():
            return f"{f} is missing"
        size = f.stat().st_size
        if size != meta.get("size"):
            return f"{f} has {size:,} bytes, {meta.get('size'):,} were written (truncated or replaced)"
        if file_digest(f)["sha256"] != meta.get("sha256"):
            return f"{f} does not match the sha256 recorded when it was written (damaged bytes)"
    return ""


def set_aside(root: Path, tags: list[str], good: str) -> list[str]:
    """Rename damaged checkpoints out of the way (``<tag>.damaged``, kept for inspection, never
    pruned) and point ``latest`` at ``good``; returns the new names. Rank 0 only."""
    out = []
    for tag in tags:
        dest = root / (tag + DAMAGED_SUFFIX)
        shutil.rmtree(dest, ignore_errors=True)
        (root / tag).rename(dest)
        out.append(str(dest))
    _write_latest(root, good)
    return out


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


def read_extra(tag_dir: Path) -> dict[str, Any]:
    """A checkpoint's ``EXTRA_FILE`` tensors (on the CPU); {} where it has none."""
    p = tag_dir / EXTRA_FILE
    if not p.is_file():
        return {}
    return load_file(str(p))


@dataclass
class ResumePoint:
    """A complete checkpoint to resume from, known from its JSON state alone."""

    root: Path
    tag: str
    state: dict[str, Any]
    note: str = ""
    """Why this checkpoint and not the one ``latest`` names (a damaged ``latest``)."""

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
    tag = _latest_text(root)
    if tag is None:
        tags = complete_tags(root)
        if not tags:
            raise ConfigError(f"run folder {run_dir}: checkpoints/latest is damaged (not a checkpoint "
                              "name) and no complete checkpoint is there: use a new --run.dir")
        point = _point(root, tags[0], f"run folder {run_dir}")
        point.note = (f"checkpoints/latest is damaged (not a checkpoint name): resuming from the "
                      f"newest complete checkpoint, {tags[0]}")
        return point
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
