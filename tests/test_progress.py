"""Pins ``alum_ds.data.progress``: prepare's progress lines on a pipe (whole lines, rates), and none
when quiet."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._data_helpers import _prepare


def test_progress_lines(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    from alum_ds.data import progress, sources

    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)
    monkeypatch.setattr(sources, "BLOCK_BYTES", 20_000)
    _prepare([corpus], tmp_path / "quiet")
    assert capsys.readouterr().err == ""
    _prepare([corpus], tmp_path / "data", progress=True)
    err = capsys.readouterr().err.splitlines()
    tokenizing = [ln for ln in err if ln.startswith("prepare: tokenizing:")]
    assert len(tokenizing) >= 3, err
    assert all("documents" in ln and "tok/s" in ln and "MiB/s" in ln for ln in tokenizing)
    assert "\r" not in "".join(err)  # not a terminal: whole lines
    assert any("learning" in ln for ln in err) and any(ln.startswith("prepare: wrote") for ln in err)
