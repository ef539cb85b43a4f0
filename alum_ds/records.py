"""Metric records as standard JSON (RFC 8259 has no NaN or Infinity).

A non-finite number (a skipped step's loss, a diverged evaluation, a correlation of a constant)
is written as ``null`` and named in the record's ``"nonfinite"`` object: JSON Pointer (RFC 6901)
of the value -> ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``. So any JSON reader parses every
record, a plain reader sees "no value" there, and ``loads`` gives the floats back.
"""

from __future__ import annotations

import json
import math
from typing import Any

NONFINITE = "nonfinite"


def _name(x: float) -> str:
    return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


def _escape(key: str) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")


def _clean(v: Any, pointer: str, found: dict[str, str]) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        found[pointer] = _name(v)
        return None
    if isinstance(v, dict):
        return {k: _clean(x, f"{pointer}/{_escape(k)}", found) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x, f"{pointer}/{i}", found) for i, x in enumerate(v)]
    return v


def dumps(record: dict[str, Any], **kwargs: Any) -> str:
    """``record`` as standard JSON, its non-finite numbers as ``null`` named under ``"nonfinite"``
    (``kwargs`` as for ``json.dumps``)."""
    found: dict[str, str] = {}
    out = _clean(record, "", found)
    if found:
        out[NONFINITE] = found
    return json.dumps(out, allow_nan=False, **kwargs)


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def restore(record: Any) -> Any:
    """A parsed record with the numbers its ``"nonfinite"`` names put back as floats."""
    if not isinstance(record, dict) or not isinstance(record.get(NONFINITE), dict):
        return record
    for pointer, name in record.pop(NONFINITE).items():
        *path, last = [_unescape(t) for t in str(pointer).split("/")[1:]]
        node: Any = record
        for token in path:
            node = node[int(token)] if isinstance(node, list) else node[token]
        if isinstance(node, list):
            node[int(last)] = float(name)
        else:
            node[last] = float(name)
    return record


def loads(text: str) -> Any:
    """One record written by ``dumps`` (or any JSON), non-finite numbers restored."""
    return restore(json.loads(text))


__all__ = ["dumps", "loads", "restore", "NONFINITE"]
