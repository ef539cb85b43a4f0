"""The embedded default corpus: the documentation text that ships with every Python."""

from __future__ import annotations

import hashlib


def embedded_documents() -> list[str]:
    """Python's own help topics (``pydoc_data.topics``): about half a megabyte of real English
    technical prose, present wherever Python is, so the default run needs no download. Each
    topic's sections (split at its underlined headings) are the documents."""
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


def documents_fingerprint(docs: list[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:16]
