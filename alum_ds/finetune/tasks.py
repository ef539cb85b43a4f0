"""The embedded default fine-tuning task: which part of the Python reference a paragraph is from.

Derived from the same text as the embedded pretraining corpus (``pydoc_data.topics``), so
``alum-ds finetune --checkpoint RUN`` needs no download. Every help topic is assigned to one of
four groups (statements, expressions, data model, built-in types); each prose paragraph of a
topic (code, grammar and headings dropped) is an example labelled with its topic's group. A
paragraph that appears under topics of two groups is dropped (ambiguous); the groups are then
balanced to the smallest one, so chance is 25%. The split is a seeded hash of the text.

``adversarial.jsonl`` is the validation set with a distractor: after each paragraph, the first
sentence of a training paragraph from another group (a miniature of adversarial SQuAD's AddSent
and of ANLI-style evaluation sets: the label does not change, the added surface cues mislead).

Generated deterministically on first use into the cache folder and reused after.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

TASK_VERSION = 2
VALIDATION_FRACTION = 0.2

# Help topics (``pydoc_data.topics`` keys) per group. Topics a Python version lacks are skipped,
# topics it adds are ignored (``debugger`` on purpose: it is neither language nor type).
GROUPS: dict[str, tuple[str, ...]] = {
    "statements": (
        "assert", "assignment", "async", "augassign", "break", "class", "compound", "continue",
        "del", "else", "for", "function", "global", "if", "import", "nonlocal", "pass", "raise",
        "return", "try", "while", "with", "yield",
    ),
    "expressions": (
        "atom-identifiers", "atom-literals", "attribute-references", "await", "binary", "bitwise",
        "booleans", "calls", "comparisons", "conversions", "exprlists", "in", "lambda",
        "operator-summary", "power", "shifting", "slicings", "subscriptions", "unary", "lists",
        "dict", "strings", "integers", "floating", "imaginary", "identifiers", "numbers",
    ),
    "data model": (
        "attribute-access", "callable-types", "context-managers", "customization", "id-classes",
        "numeric-types", "objects", "sequence-types", "specialattrs", "specialnames", "types",
        "execmodel", "naming", "dynamic-features", "exceptions",
    ),
    "built-in types": (
        "bltin-code-objects", "bltin-ellipsis-object", "bltin-null-object", "bltin-type-objects",
        "formatstrings", "string-methods", "truth", "typesfunctions", "typesmapping",
        "typesmethods", "typesmodules", "typesseq", "typesseq-mutable",
    ),
}
LABELS = list(GROUPS)


def _prose_paragraphs(text: str) -> list[str]:
    """Paragraphs of running text: headings, grammar rules, examples and tables are dropped."""
    out = []
    for para in text.split("\n\n"):
        if any(line.strip()[:3] in ("***", "===", "---") for line in para.split("\n")):
            continue
        t = " ".join(para.split())
        if len(t) < 80 or "::=" in t or ">>>" in t:
            continue
        if sum(ch.isalpha() or ch == " " for ch in t) < 0.85 * len(t):
            continue
        out.append(t)
    return out


def _key(seed: int, text: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{text}".encode(), digest_size=8).digest(), "little")


def build_topic_task(seed: int = 0) -> dict[str, list[dict[str, str]]]:
    """The three splits as lists of ``{"text", "label"}`` records (deterministic in ``seed``)."""
    from pydoc_data.topics import topics

    groups_of: dict[str, set[str]] = {}
    order: list[str] = []
    for group, names in GROUPS.items():
        for name in names:
            for t in _prose_paragraphs(topics.get(name, "")):
                if t not in groups_of:
                    groups_of[t] = set()
                    order.append(t)
                groups_of[t].add(group)
    per_group: dict[str, list[str]] = {g: [] for g in GROUPS}
    for t in order:
        if len(groups_of[t]) == 1:
            per_group[next(iter(groups_of[t]))].append(t)
    n = min(len(v) for v in per_group.values())
    if n < 10:
        raise RuntimeError(f"the embedded task needs pydoc_data.topics; found only {n} paragraphs")
    n_val = max(1, round(n * VALIDATION_FRACTION))
    train, val = [], []
    for group, texts in per_group.items():
        chosen = sorted(texts, key=lambda t: _key(seed, t))[:n]
        val += [{"text": t, "label": group} for t in chosen[:n_val]]
        train += [{"text": t, "label": group} for t in chosen[n_val:]]
    train.sort(key=lambda r: _key(seed + 1, r["text"]))
    val.sort(key=lambda r: _key(seed + 1, r["text"]))
    # Distractors: the first sentence of a training paragraph of another group.
    firsts: dict[str, list[str]] = {g: [] for g in GROUPS}
    for r in train:
        first = re.split(r"(?<=[.:;])\s", r["text"], maxsplit=1)[0]
        firsts[r["label"]].append(first)
    adv = []
    for i, r in enumerate(val):
        others = [g for g in GROUPS if g != r["label"]]
        group = others[_key(seed + 2, r["text"]) % len(others)]
        pool = firsts[group]
        distractor = pool[(_key(seed + 3, r["text"]) + i) % len(pool)]
        adv.append({"text": f"{r['text']} {distractor}", "label": r["label"]})
    return {"train": train, "validation": val, "adversarial": adv}


def task_fingerprint(seed: int) -> str:
    from pydoc_data.topics import topics

    h = hashlib.sha256(json.dumps([TASK_VERSION, seed, GROUPS], sort_keys=True).encode())
    for name in sorted(topics):
        h.update(name.encode())
        h.update(topics[name].encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


def ensure_topic_task(cache_dir: str | Path, seed: int = 0) -> Path:
    """Write the embedded task to ``cache_dir/finetune-topics-<hash>/`` once; return the folder
    (``train.jsonl``, ``validation.jsonl``, ``adversarial.jsonl``, ``task.json``). Safe when several
    ranks call it at once: each writes its own temporary folder and the first rename wins."""
    out = Path(cache_dir) / f"finetune-topics-{task_fingerprint(seed)}"
    if (out / "task.json").is_file():
        return out
    splits = build_topic_task(seed)
    tmp = out.with_name(f"{out.name}.partial.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, records in splits.items():
        with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    meta: dict[str, Any] = {
        "task": "topics", "version": TASK_VERSION, "seed": seed, "text_column": "text",
        "label_column": "label", "labels": LABELS,
        "sizes": {k: len(v) for k, v in splits.items()},
    }
    (tmp / "task.json").write_text(json.dumps(meta, indent=2))  # written last: marks it complete
    try:
        tmp.rename(out)
    except OSError:
        if not (out / "task.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out
