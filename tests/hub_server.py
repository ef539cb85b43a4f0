"""A Hugging Face Hub on 127.0.0.1 for the tests: the few endpoints ``snapshot_download`` calls
(repo info at a revision, the recursive tree, HEAD/GET of a file under ``resolve/``), answered with
the Hub's status codes and headers (``X-Error-Code`` RepoNotFound / RevisionNotFound / GatedRepo,
``X-Repo-Commit``, ``ETag``), from files on disk. The cache the tests use is written by
huggingface_hub itself downloading from it; the runs under test then read that cache with
HF_HUB_OFFLINE=1. Private repos answer 401 RepoNotFound without ``Authorization``, as the Hub
does."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    commits: dict[str, Path]
    """commit (40 hex) -> folder of the files at that commit."""
    refs: dict[str, str]
    """branch or tag -> commit."""
    private: bool = False
    gated: bool = False
    downloads: list[str] = field(default_factory=list)
    """Files served by GET, in order (to count downloads)."""


def commit_of(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Hub:
    """``with Hub({"org/tiny": Repo(...)}) as hub:`` serves them at ``hub.endpoint``."""

    def __init__(self, repos: dict[str, Repo], token: str = "hf_test_token") -> None:
        self.repos, self.token = repos, token
        self.requests: list[str] = []
        """Every request as "METHOD path", in order."""
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

            def do_GET(self) -> None:
                hub._answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Hub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _error(self, h: BaseHTTPRequestHandler, status: int, code: str, body: bool) -> None:
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", code)
        h.send_header("Content-Type", "application/json")
        payload = json.dumps({"error": code}).encode()
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        if body:
            h.wfile.write(payload)

    def _json(self, h: BaseHTTPRequestHandler, doc: object, body: bool) -> None:
        payload = json.dumps(doc).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        if body:
            h.wfile.write(payload)

    def _repo(self, h: BaseHTTPRequestHandler, repo_id: str, body: bool) -> Repo | None:
        repo = self.repos.get(repo_id)
        authorised = h.headers.get("Authorization") == f"Bearer {self.token}"
        if repo is None:
            self._error(h, 401 if not authorised else 404, "RepoNotFound", body)
            return None
        if repo.private and not authorised:
            self._error(h, 401, "RepoNotFound", body)
            return None
        if repo.gated and not authorised:
            self._error(h, 401, "GatedRepo", body)
            return None
        return repo

    def _commit(self, h: BaseHTTPRequestHandler, repo: Repo, revision: str, body: bool) -> str | None:
        commit = revision if revision in repo.commits else repo.refs.get(revision)
        if commit is None:
            self._error(h, 404, "RevisionNotFound", body)
        return commit

    @staticmethod
    def _tree(names: list[str], files: list[Path], under: str, recursive: bool) -> list[dict]:
        """The /tree listing of folder ``under``: files (and, not recursive, the folders) in it."""
        prefix = f"{under}/" if under else ""
        out: list[dict] = []
        folders: set[str] = set()
        for n, p in zip(names, files):
            if not n.startswith(prefix):
                continue
            rest = n[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/", 1)[0])
                continue
            out.append({"type": "file", "path": n, "size": p.stat().st_size,
                        "oid": _git_sha1(p.read_bytes())})
        if recursive:
            folders = {"/".join(n.split("/")[:i]) for n in names if n.startswith(prefix)
                       for i in range(prefix.count("/") + 1, n.count("/") + 1)}
        out += [{"type": "directory", "path": f, "oid": commit_of(f)} for f in sorted(folders)]
        return out

    def _answer(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append(f"{h.command} {h.path}")
        parts = [unquote(p) for p in urlparse(h.path).path.strip("/").split("/")]
        if parts[:1] == ["api"] and len(parts) >= 6 and parts[1] in ("models", "datasets"):
            repo_id, what, revision = f"{parts[2]}/{parts[3]}", parts[4], parts[5]
            repo = self._repo(h, repo_id, body)
            if repo is None:
                return
            commit = self._commit(h, repo, revision, body)
            if commit is None:
                return
            files = sorted(p for p in repo.commits[commit].rglob("*") if p.is_file())
            names = [str(p.relative_to(repo.commits[commit])) for p in files]
            if what == "revision":
                self._json(h, {"id": repo_id, "sha": commit, "private": repo.private,
                               "siblings": [{"rfilename": n} for n in names]}, body)
            elif what == "tree":
                self._json(h, self._tree(names, files, "/".join(parts[6:]),
                                         "recursive=true" in h.path.lower()), body)
            else:
                self._error(h, 404, "EntryNotFound", body)
            return
        if "resolve" in parts:
            i = parts.index("resolve")
            repo_id = "/".join(parts[1:i] if parts[0] == "datasets" else parts[:i])
            repo = self._repo(h, repo_id, body)
            if repo is None:
                return
            commit = self._commit(h, repo, parts[i + 1], body)
            if commit is None:
                return
            f = repo.commits[commit].joinpath(*parts[i + 2:])
            if not f.is_file():
                self._error(h, 404, "EntryNotFound", body)
                return
            data = f.read_bytes()
            h.send_response(200)
            h.send_header("X-Repo-Commit", commit)
            h.send_header("ETag", f'"{_git_sha1(data)}"')
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            if body:
                repo.downloads.append(f"{commit}/{f.relative_to(repo.commits[commit])}")
                h.wfile.write(data)
            return
        self._error(h, 404, "EntryNotFound", body)
