"""The embedded default corpus: help topics plus the standard library's docstrings, read by
``ast`` without importing anything, deterministically."""

from __future__ import annotations

import hashlib
import sys
import textwrap
from pathlib import Path

import pytest

from alum_ds.data import corpus as C


def _fingerprint(docs: list[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def _write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(textwrap.dedent(text), encoding="utf-8")


LONG = "This sentence is long enough to pass the minimum length of a docstring."


@pytest.fixture
def fake_stdlib(tmp_path: Path) -> Path:
    root = tmp_path / "lib"
    _write(root, "zeta.py", f'''
        """Module zeta. {LONG}"""
        import sys
        sys.modules["alum_ds_side_effect_zeta"] = sys  # runs only if the file is imported
        raise SystemExit("imported")

        class Widget(object):
            """A widget. {LONG}"""

            def spin(self, speed, *args, turns=1, **kw):
                """Spin the widget. {LONG}"""

            def short(self):
                """Too short."""

        if sys.platform:
            def platform_only(x):
                """Defined under an if. {LONG}"""
        try:
            pass
        except ImportError:
            async def fallback():
                """Defined in an except handler. {LONG}"""
        ''')
    _write(root, "alpha/__init__.py", f'''
        """Package alpha. {LONG}"""
        ''')
    _write(root, "alpha/beta.py", f'''
        def own():
            """Beta's own function. {LONG}"""
        ''')
    _write(root, "zz.py", f'''
        def copy_of_spin():
            """Spin the widget. {LONG}"""

        def own():
            """Zz's own function. {LONG}"""
        ''')
    _write(root, "broken.py", 'def f(:\n    """Unparseable."""\n')
    _write(root, "nodoc.py", "x = 1\n")
    for skipped in ("test/test_x.py", "alpha/tests/test_y.py", "idlelib/idle_test/t.py",
                    "site-packages/pkg/m.py", "__pycache__/m.py", "encodings/cp0.py"):
        _write(root, skipped, f'"""Skipped {skipped}. {LONG}"""\n')
    return root


def test_docstring_documents_structure(fake_stdlib: Path) -> None:
    before = set(sys.modules)
    docs = C.stdlib_docstring_documents(fake_stdlib)
    assert set(sys.modules) == before  # nothing was imported
    assert "alum_ds_side_effect_zeta" not in sys.modules
    # One document per module with docstrings, in sorted path order; broken and empty files and
    # the skipped folders give none.
    assert [d.split("\n", 1)[0] for d in docs] == ["Module alpha", "Module alpha.beta", "Module zeta",
                                                   "Module zz"]
    assert not any("Skipped" in d for d in docs)
    zeta = docs[2]
    assert zeta.split("\n\n") == [
        f"Module zeta\nModule zeta. {LONG}",
        f"class Widget\nA widget. {LONG}",
        f"Widget.spin(self, speed, *args, turns, **kw)\nSpin the widget. {LONG}",
        f"platform_only(x)\nDefined under an if. {LONG}",
        f"fallback()\nDefined in an except handler. {LONG}",
    ]
    assert docs[0] == f"Module alpha\nPackage alpha. {LONG}"
    # A module without a docstring of its own is still headed by its name.
    assert docs[1] == f"Module alpha.beta\n\nown()\nBeta's own function. {LONG}"
    # The docstring repeated in zz (later in path order) is kept in zeta only.
    assert docs[3] == f"Module zz\n\nown()\nZz's own function. {LONG}"


def test_deduplication_is_global_and_first_wins(fake_stdlib: Path) -> None:
    docs = C.stdlib_docstring_documents(fake_stdlib)
    text = "\n".join(docs)
    assert text.count(f"Spin the widget. {LONG}") == 1
    assert "Too short." not in text


def test_fake_stdlib_is_deterministic(fake_stdlib: Path) -> None:
    a = C.stdlib_docstring_documents(fake_stdlib)
    b = C.stdlib_docstring_documents(fake_stdlib)
    assert a == b and _fingerprint(a) == _fingerprint(b)


def test_embedded_documents_real_stdlib() -> None:
    import pydoc_data.topics  # noqa: F401  (the topics are imported on purpose)
    import sysconfig

    sysconfig.get_paths()  # loads _sysconfigdata_* once: where the standard library is

    before = set(sys.modules)
    a = list(C._embedded.__wrapped__())  # the extraction itself, not the per-process copy
    assert set(sys.modules) == before, sorted(set(sys.modules) - before)[:10]
    b = C.embedded_documents()
    assert a == b and _fingerprint(a) == _fingerprint(b)
    topics = C._topic_documents()
    assert a[: len(topics)] == topics  # the help topics first, unchanged
    stdlib = a[len(topics):]
    heads = [d.split("\n", 1)[0] for d in stdlib]
    assert "Module json.decoder" in heads and "Module argparse" in heads
    assert not any(h.startswith(("Module test.", "Module idlelib.idle_test", "Module lib2to3.tests"))
                   for h in heads)
    assert sum(len(d) for d in stdlib) > 1_000_000


def test_embedded_fingerprint_keys_the_cache_without_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    # The prepared corpus is found by this key on every run: it must not cost the extraction.
    first = C.embedded_fingerprint()

    def no_parse(*a: object, **k: object) -> None:
        raise AssertionError("the fingerprint parsed a source file")

    monkeypatch.setattr(C.ast, "parse", no_parse)
    assert C.embedded_fingerprint.__wrapped__() == first and len(first) == 16
