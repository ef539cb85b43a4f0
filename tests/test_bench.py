"""The benchmark scripts still run (quick mode); figures are saved, never asserted as timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.distributed


def test_vs_hf_quick_mode_writes_its_figures(tmp_path: Path, cache_dir: Path) -> None:
    out = tmp_path / "vs_hf.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_vs_hf.py"), "--quick",
                        f"--out={out}", f"--cache={cache_dir}"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    res = json.loads(out.read_text())
    got = res["settings"]["embedded"]
    for key in ("alum_ds_tokens_per_s", "hf_trainer_tokens_per_s", "speedup", "alum_tokens_per_s",
                "alum_vs_plain_step", "alum_ds_model_gflops_per_s"):
        assert got[key] > 0, key
    assert got["windows_measured"] >= 1
    assert res["speedup"] == got["speedup"]
    assert got["alum_flop_model_ratio"] == pytest.approx(8 / 3)


def test_run_all_collect_summarises_saved_results(tmp_path: Path) -> None:
    (tmp_path / "vs_hf.json").write_text(json.dumps({"speedup": 1.7, "settings": {"embedded": {
        "speedup": 1.7, "alum_vs_plain_step": 2.1}}}))
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "run_all.py"), "--collect",
                        "--only=vs_hf,data", f"--out-dir={tmp_path}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, "a missing saved result must fail the summary"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["results"]["vs_hf"]["speedup"] == 1.7 and "data" in summary["failed"]
    md = (tmp_path / "summary.md").read_text()
    assert "| settings.embedded.alum_vs_plain_step | 2.1 |" in md and "data: FAILED" in md


def test_alum_passes_times_every_pass(tmp_path: Path) -> None:
    out = tmp_path / "passes.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_alum_passes.py"),
                        "--preset=tiny", "--steps=2", "--seq-len=32", "--micro-batch=2",
                        f"--out={out}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    res = json.loads(out.read_text())
    assert set(res["median_s"]) == {
        "plain/clean forward", "plain/backward", "alum/clean forward", "alum/perturbed forward",
        "alum/ascent backward", "alum/adversarial forward", "alum/final backward"}
    assert all(v > 0 for v in res["median_s"].values())
    assert res["alum_s"] == pytest.approx(sum(v for k, v in res["median_s"].items()
                                              if k.startswith("alum/")))
    for kind in ("plain", "alum"):
        ab = res["fast_path_vs_stock"][kind]
        assert ab["speedup"] == pytest.approx(ab["stock_step_s"] / ab["fast_step_s"])
