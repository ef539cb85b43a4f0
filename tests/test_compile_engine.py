"""torch.compile through the real launcher (2 CPU ranks, ZeRO-2, tests/drivers/compile_runs.py):
compiled and eager runs give the same losses, step by step over 20 steps of plain MLM then ALUM;
a compiled run stopped and resumed equals the uninterrupted one; the run reports compile time and
graphs apart from step times."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT, deepspeed_cmd, free_port, run

pytestmark = pytest.mark.distributed


def _by_step(run_dir: Path, key: str) -> dict[int, float]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in recs if key in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[Path, str]:
    base = tmp_path_factory.mktemp("compile")
    compiled = base / "compiled.json"
    compiled.write_text(json.dumps({"zero_optimization": {"stage": 2}, "torch_compile": {"enabled": True}}))
    spec = base / "spec.json"
    spec.write_text(json.dumps({"out": str(base / "runs"), "eager": "zero2.json", "compiled": str(compiled),
                                "cache": str(cache_dir)}))
    r = run(deepspeed_cmd(f"--master_port={free_port()}", str(ROOT / "tests" / "drivers" / "compile_runs.py"),
                          str(spec)), ROOT, {"OMP_NUM_THREADS": "1"}, timeout=1500)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    return base / "runs", r.stdout + r.stderr


def test_compiled_pretraining_equals_eager(runs: tuple[Path, str]) -> None:
    out, log = runs
    eager, compiled = _by_step(out / "eager", "loss"), _by_step(out / "compiled", "loss")
    assert sorted(eager) == list(range(1, 21)) and sorted(compiled) == sorted(eager)
    for step in eager:  # plain MLM for steps 1-10, ALUM after
        assert compiled[step] == pytest.approx(eager[step], rel=1e-4), (step, eager, compiled)
    assert _by_step(out / "compiled", "adv_loss")  # ALUM ran, compiled
    assert "fp32, compiled (DeepSpeed config" in log
    seconds = _by_step(out / "compiled", "compile_seconds")
    graphs = _by_step(out / "compiled", "graphs_compiled")
    assert seconds and all(s > 0 for s in seconds.values()) and max(graphs.values()) <= 16
    assert "not counted in step times" in log


def test_compiled_run_resumes_exactly(runs: tuple[Path, str]) -> None:
    out, _ = runs
    whole, split = _by_step(out / "compiled", "loss"), _by_step(out / "split", "loss")
    assert sorted(split) == list(range(1, 21))
    for step in whole:
        assert split[step] == pytest.approx(whole[step], rel=1e-6), (step, whole, split)
