"""The embedded default corpus: the documentation text that ships with every Python.

Two parts, both present wherever Python is, so the default run needs no download:

- Python's help topics (``pydoc_data.topics``, about half a megabyte of the language reference),
  split into sections at their underlined headings;
- the docstrings of the standard library's modules, classes and functions, read from the source
  files with ``ast`` (no module is imported: nothing runs), one document per module.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

RULES_VERSION = 1
"""Bumped whenever the extraction rules below change what the same Python yields: it is part of
``embedded_fingerprint``, the cache key of the prepared default corpus."""

MIN_DOCSTRING_CHARS = 40
"""Shorter docstrings ("Return self.", "Not implemented.") are left out."""

SKIP_DIRS = frozenset({
    "test", "tests", "idle_test",  # test suites (test/, lib2to3/tests, idlelib/idle_test, ...)
    "site-packages", "dist-packages", "__pycache__",  # installed packages, bytecode
    "pydoc_data",  # the help topics: the corpus's other part already
    "encodings",  # generated codec modules: the same boilerplate per code page
    "turtledemo", "__phello__",  # demo scripts
})
"""Folders of the standard library (at any depth) whose files are not read."""


def _topic_documents() -> list[str]:
    """Python's own help topics, each topic's sections (split at its underlined headings)."""
    from pydoc_data.topics import topics

    docs: list[str] = []
    for name in sorted(topics):
        text = topics[name].strip()
        lines = text.split("\n")
        start = 0
        for i in range(1, len(lines)):
            # A heading is a line followed by an underline of '*', '=' or '-'.
            if i + 1 < len(lines) and lines[i + 1][:3] in ("***", "===", "---") and i - start > 8:
                docs.append("\n".join(lines[start:i]).strip())
                start = i
        docs.append("\n".join(lines[start:]).strip())
    return [d for d in docs if d]


def stdlib_sources(root: str | Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files in sorted order, test suites, installed packages and
    the ``SKIP_DIRS`` left out. ``root``: default ``sysconfig.get_paths()["stdlib"]``."""
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(base):
        # config-3.X-<platform>: the build's Makefile and scripts, not the library.
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-")]
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(base).parts)


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    a = node.args
    names = [x.arg for x in a.posonlyargs + a.args]
    if a.vararg is not None:
        names.append("*" + a.vararg.arg)
    elif a.kwonlyargs:
        names.append("*")
    names += [x.arg for x in a.kwonlyargs]
    if a.kwarg is not None:
        names.append("**" + a.kwarg.arg)
    return f"({', '.join(names)})"


_NESTED_BODIES = ("body", "orelse", "finalbody")


def _docstrings(body: list[ast.stmt], prefix: str) -> Iterator[tuple[str, str]]:
    """``(heading, docstring)`` for every class and function defined in ``body`` (statements at
    any depth of ``if``/``try``/``with``/loops, and inside classes and functions), source order.
    Only statements are visited, never expressions: a fraction of a full ``ast.walk``."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = prefix + node.name
            doc = ast.get_docstring(node)
            if doc:
                if isinstance(node, ast.ClassDef):
                    yield f"class {name}", doc
                else:
                    yield f"{name}{_signature(node)}", doc
            yield from _docstrings(node.body, name + ".")
            continue
        for attr in _NESTED_BODIES:
            inner = getattr(node, attr, None)
            if inner:
                yield from _docstrings(inner, prefix)
        for handler in getattr(node, "handlers", ()):  # try/except
            yield from _docstrings(handler.body, prefix)
        for case in getattr(node, "cases", ()):  # match
            yield from _docstrings(case.body, prefix)


def _module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def stdlib_docstring_documents(root: str | Path | None = None) -> list[str]:
    """One document per standard-library module: its docstring, then each class's and function's
    docstring under a heading line (``class Name``, ``Class.method(self, x)``), in source order.

    Files are parsed (``ast.parse``), never imported. Unreadable or unparseable files are
    skipped, as are docstrings shorter than ``MIN_DOCSTRING_CHARS`` and any docstring identical
    to an earlier one (in path order). Deterministic for a given standard library."""
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    docs: list[str] = []
    for path in stdlib_sources(base):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (OSError, SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError):
            continue
        module = _module_name(path.relative_to(base))
        parts: list[str] = []
        mod_doc = ast.get_docstring(tree)
        if mod_doc and len(mod_doc) >= MIN_DOCSTRING_CHARS and mod_doc not in seen:
            seen.add(mod_doc)
            parts.append(f"Module {module}\n{mod_doc}")
        for heading, doc in _docstrings(tree.body, ""):
            if len(doc) < MIN_DOCSTRING_CHARS or doc in seen:
                continue
            seen.add(doc)
            parts.append(f"{heading}\n{doc}")
        if parts:
            if not parts[0].startswith("Module "):
                parts.insert(0, f"Module {module}")
            docs.append("\n\n".join(parts))
    return docs


def embedded_documents() -> list[str]:
    """The embedded default corpus: Python's help topics (``pydoc_data.topics``, split into
    sections; first, in topic order) then the standard library's docstrings (one document per
    module, see ``stdlib_docstring_documents``): real English technical prose that needs no
    download. It depends on the Python installation; ``embedded_fingerprint`` keys the cache."""
    return list(_embedded())


@functools.cache
def _embedded() -> tuple[str, ...]:
    # Parsing the library takes seconds: once per process.
    return tuple(_topic_documents() + stdlib_docstring_documents())


@functools.cache
def embedded_fingerprint() -> str:
    """What ``embedded_documents`` depends on, hashed without parsing anything (milliseconds, not
    the seconds of the extraction): the rules' version, the help topics' text and every source
    file's path and bytes. Equal fingerprints mean equal documents."""
    from pydoc_data.topics import topics

    h = hashlib.sha256(f"rules {RULES_VERSION}\0".encode())
    for name in sorted(topics):
        h.update(f"{name}\0{topics[name]}\0".encode("utf-8", "surrogatepass"))
    base = Path(sysconfig.get_paths()["stdlib"])
    for path in stdlib_sources(base):
        h.update(f"{path.relative_to(base).as_posix()}\0".encode("utf-8", "surrogateescape"))
        try:
            h.update(hashlib.sha256(path.read_bytes()).digest())
        except OSError:
            h.update(b"unreadable")  # skipped by the extraction too
    return h.hexdigest()[:16]

