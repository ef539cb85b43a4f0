"""Hugging Face Hub ids wherever a model or tokenizer folder is taken.

``ORG/NAME`` or ``NAME``, optionally ``@REVISION`` (a branch, tag or commit), is resolved with
``huggingface_hub.snapshot_download`` into the Hub's standard cache: huggingface_hub itself reads
HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE, HF_TOKEN and HF_ENDPOINT. A local folder of the same name
wins. Every failure (offline with nothing cached, a private or gated repo without a token, a repo
or revision that does not exist, an unreachable Hub) is a one-line ``HubError`` naming the option,
the id and the fix, raised before any process group or engine.

Several processes of one node (the ranks of a run) share the cache: resolution holds a
``filelock.FileLock`` in the cache (``HF_HUB_CACHE/.locks/alum_ds/<repo folder>.lock``), so the
first process downloads and the others wait for it, then find every file cached and download
nothing. The ranks of one launch on a node also resolve a branch or tag to the same commit: the
first writes it beside the lock and the others take that commit without asking the Hub, so a
branch moving between two ranks' look-ups cannot give them different weights.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from alum_ds.config import ConfigError

_REVISION = re.compile(r"^[^\s@]+$")
TOKENIZER_FILES = ["*.json", "*.txt", "*.model"]
"""What a tokenizer needs (tokenizer.json, vocab and merges, a SentencePiece model, configs)."""
WEIGHTS = ["*.safetensors"]
LEGACY_WEIGHTS = ["pytorch_model*.bin"]
"""Fetched only when a repository has no safetensors: never the TensorFlow, Flax, ONNX, ...
copies a model repository often also holds."""


class HubError(ConfigError):
    """A Hub id that cannot be resolved; the message is one line naming the option and the id."""


@dataclass(frozen=True)
class Folder:
    """Where a model or tokenizer option was read from."""

    spec: str
    """What the user wrote."""
    path: Path
    """The local folder to load (a snapshot folder in the cache for a Hub id)."""
    repo_id: str = ""
    """The Hub repository ('' for a local folder)."""
    revision: str = ""
    """The revision asked for ('main' when none was given)."""
    commit: str = ""
    """The commit the revision resolved to."""

    @property
    def from_hub(self) -> bool:
        return bool(self.repo_id)

    def describe(self) -> str:
        """For the run's banner: which of the two it was, and where it lies."""
        if not self.from_hub:
            return f"local folder {self.path}"
        return f"Hub {self.repo_id}@{self.commit[:12]} (revision {self.revision}; cache {self.path})"

    def record(self) -> dict[str, str]:
        """What ``config.resolved.json`` keeps so the run can be repeated."""
        if not self.from_hub:
            return {"spec": self.spec, "local_folder": str(self.path.resolve())}
        return {"spec": self.spec, "repo_id": self.repo_id, "revision": self.revision,
                "commit": self.commit, "snapshot": str(self.path)}


def parse_id(spec: str) -> tuple[str, str] | None:
    """(repo id, revision or '') when ``spec`` is spelled as a Hub id, else None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    name, at, revision = spec.partition("@")
    if at and not _REVISION.match(revision):
        return None
    if name.count("/") > 1 or name.startswith((".", "/", "~")):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name, revision


def hub_reachable() -> str:
    """'' when the Hub's host resolves (or the user asked for the cache alone), else why not.
    Checked first: the Hub client retries an unreachable host for half a minute before failing."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return ""
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, urlparse(constants.ENDPOINT).port or 443)
    except OSError as e:
        return f"{host} does not resolve ({e.strerror or e})"
    return ""


def resolve(spec: str, option: str, *, pinned: str = "", kind: str = "model folder",
            weights: bool = True) -> Folder:
    """The local folder for ``spec``: the folder itself when it exists, else the Hub id's
    snapshot, downloaded once per node (``pinned``: a commit to use instead of resolving the
    revision again, e.g. the one a resumed run recorded). A ``spec`` that is neither an existing
    folder nor spelled as a Hub id is returned as a local folder: the caller's own checks name
    what is wrong with it. ``weights`` False: the tokenizer's files alone."""
    if Path(spec).exists():
        return Folder(spec, Path(spec))
    parsed = parse_id(spec)
    if parsed is None:
        return Folder(spec, Path(spec))
    repo_id, revision = parsed
    return _download(spec, option, repo_id, revision or "main", pinned, kind, weights)


def recorded(run_dir: Path) -> dict[str, dict[str, str]]:
    """The Hub sources a run folder's ``config.resolved.json`` recorded, by option."""
    try:
        doc = json.loads((run_dir / "config.resolved.json").read_text())
    except (OSError, ValueError):
        return {}
    hub = doc.get("sources") if isinstance(doc, dict) else None
    return hub if isinstance(hub, dict) else {}


def pinned_commit(run_dir: Path, option: str, spec: str) -> str:
    """The commit a run folder recorded for ``option`` = ``spec`` ('' if none)."""
    rec = recorded(run_dir).get(option) or {}
    return str(rec.get("commit", "")) if rec.get("spec") == spec else ""


NOTE_MAX_AGE_S = 3600.0
"""A commit note older than this is another launch's, whatever its key."""


def _job_key() -> str:
    """Identifies the ranks of one launch on this node: the launcher sets MASTER_ADDR and
    MASTER_PORT alike on all of them, and they are children of one launching process (the port
    alone is shared by every launch on the default port)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return ""
    return f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}:{os.getppid()}"


def _download(spec: str, option: str, repo_id: str, revision: str, pinned: str, kind: str,
              weights: bool) -> Folder:
    from filelock import FileLock
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    cache = Path(constants.HF_HUB_CACHE)
    locks = cache / ".locks" / "alum_ds"
    try:
        locks.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HubError(f"{option} {spec}: the Hugging Face cache {cache} is not writable "
                       f"({e.strerror}): set HF_HOME or HF_HUB_CACHE to a writable folder") from None
    stem = repo_folder_name(repo_id=repo_id, repo_type="model")
    note = locks / f"{stem}.{re.sub(r'[^A-Za-z0-9._-]', '_', revision)}.json"
    job = _job_key()
    with FileLock(str(locks / f"{stem}.lock")):
        ask = pinned
        if not ask and job:
            try:
                prev = json.loads(note.read_text())
                fresh = time.time() - float(prev["written"]) < NOTE_MAX_AGE_S
                ask = prev["commit"] if prev.get("job") == job and fresh else ""
            except (OSError, ValueError, KeyError, TypeError):
                ask = ""
        files = TOKENIZER_FILES + (WEIGHTS if weights else [])
        path = _snapshot(spec, option, repo_id, ask or revision, revision, cache, kind, files)
        commit = path.name
        if weights and not any(path.glob("*.safetensors")):
            path = _snapshot(spec, option, repo_id, commit, revision, cache, kind, LEGACY_WEIGHTS)
        if job and not pinned:
            tmp = note.with_suffix(".tmp")
            tmp.write_text(json.dumps({"job": job, "commit": commit, "written": time.time()}))
            os.replace(tmp, note)
    return Folder(spec, path, repo_id, revision, commit)


def _snapshot(spec: str, option: str, repo_id: str, ask: str, revision: str, cache: Path,
              kind: str, files: list[str]) -> Path:
    """snapshot_download, its many exception types turned into one line each."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{option} {spec}: no such {kind}, and the Hub id {repo_id}@{revision}"
    why = hub_reachable()
    try:
        # Offline or unreachable: the cache alone (huggingface_hub would retry the host first).
        path = snapshot_download(repo_id, revision=ask, local_files_only=bool(why), allow_patterns=files)
    except RevisionNotFoundError:
        raise HubError(f"{where} names a revision {revision!r} that {repo_id} does not have: give "
                       "an existing branch, tag or commit after '@'") from None
    except GatedRepoError:
        raise HubError(f"{where} is a gated repository: accept its conditions on the Hub and set "
                       "HF_TOKEN (or run `hf auth login`)") from None
    except RepositoryNotFoundError:
        token = "with the token in use" if _has_token() else "without a token"
        raise HubError(f"{where} is no repository this machine can read {token}: check the id, or "
                       "for a private repository set HF_TOKEN (or run `hf auth login`)") from None
    except LocalEntryNotFoundError:
        cached = _cached_revisions(cache, repo_id)
        have = f" (cached: {', '.join(cached)})" if cached else ""
        if constants.HF_HUB_OFFLINE:
            raise HubError(f"{where} is not (all) in the Hugging Face cache {cache}{have} and "
                           "HF_HUB_OFFLINE=1: download it once with network access (unset "
                           "HF_HUB_OFFLINE), or give a local folder") from None
        raise HubError(f"{where} is not (all) in the Hugging Face cache {cache}{have} and the Hub cannot "
                       f"be reached ({why or 'no answer'}): run with network access, or give a "
                       "local folder") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", "?")
        raise HubError(f"{where}: the Hub answered HTTP {status} ({str(e).splitlines()[0]}): check "
                       "HF_TOKEN and HF_ENDPOINT, or give a local folder") from None
    except (OSError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HubError(f"{where} does not download ({msg}): "
                       "check the disk space and permissions of the cache, or give a local "
                       "folder") from None
    return Path(path)


def _has_token() -> bool:
    from huggingface_hub import get_token

    return bool(get_token())


def _cached_revisions(cache: Path, repo_id: str) -> list[str]:
    from huggingface_hub.file_download import repo_folder_name

    refs = cache / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs"
    try:
        return sorted(str(p.relative_to(refs)) for p in refs.rglob("*") if p.is_file())
    except OSError:
        return []


def sources_record(folders: dict[str, Folder]) -> dict[str, Any]:
    """``config.resolved.json``'s ``sources``: the Hub-resolved folders by option."""
    return {option: f.record() for option, f in folders.items() if f.from_hub}


__all__ = ["Folder", "HubError", "hub_reachable", "parse_id", "pinned_commit", "recorded", "resolve",
           "sources_record"]
