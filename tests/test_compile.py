"""torch.compile of ALUM's pieces (alum_ds/compiling.py) on the CPU, in one process: compiled and
eager compute the same losses and gradients (plain MLM, ALUM with the frozen-parameter ascent,
the fine-tuning classifier), the number of graphs stays bounded while the masked count changes
every batch, and the settings decide and refuse as documented. Kernels are cached in the
session's cache folder, which the engine-level compile test shares."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alum_ds import compiling, cpu_fastpath
from alum_ds import model as M
from alum_ds.config import AlumConfig, ConfigError
from alum_ds.ds_config import compile_setting
from alum_ds.objective import AlumObjective

V, T, B = 300, 16, 2


@pytest.fixture(scope="module", autouse=True)
def inductor_cache(cache_dir: Path) -> None:
    compiling.use_cache(cache_dir / "inductor")


def _batch(seed: int, prob: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (B, T), generator=g)
    sel = torch.rand(B, T, generator=g) < prob
    sel[:, 1] = True
    return torch.where(sel, torch.full_like(ids, 4), ids), torch.where(sel, ids, torch.full_like(ids, -100))


def _close(eager: torch.nn.Module, compiled: torch.nn.Module) -> None:
    """Every parameter gradient equal within 1e-5 of the largest gradient (some are zero in exact
    arithmetic, e.g. the attention key biases, and only rounding noise in both)."""
    ge, gc = dict(eager.named_parameters()), dict(compiled.named_parameters())
    scale = max(float(p.grad.abs().max()) for p in ge.values() if p.grad is not None)
    for name, p in ge.items():
        torch.testing.assert_close(gc[name].grad, p.grad, rtol=1e-5, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("alum_on, dropout", [(False, 0.0), (True, 0.0), (True, 0.1)])
def test_compiled_mlm_objective_equals_eager(alum_on: bool, dropout: float) -> None:
    """With dropout too: the fast path's dropout is a custom op compiled graphs call in program
    order, so the same seed draws the same masks."""
    torch.manual_seed(0)
    eager = cpu_fastpath.install(M.build_model(preset="tiny", vocab_size=V, seq_len=T, dropout=dropout))
    compiled = copy.deepcopy(eager)
    compiling.compile_model(compiled)
    ids, labels = _batch(1)
    alum = AlumConfig(sigma=1e-2, eta=0.1, epsilon=0.1)  # a perturbation fp32 resolves
    losses = []
    for model, freeze in ((eager, False), (compiled, True)):
        obj = AlumObjective(model, alum, freeze_ascent=freeze).train()
        obj.generator = torch.Generator().manual_seed(7)
        torch.manual_seed(11)  # the dropout masks
        loss, stats = obj(ids, labels, alum_on)
        loss.backward()
        losses.append(float(loss.detach()))
        assert not alum_on or (stats["adv_skipped"] == 0 and float(stats["adv_loss"]) > 0)
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    _close(eager, compiled)


def test_compiled_classifier_objective_equals_eager() -> None:
    from transformers import RobertaForSequenceClassification

    from alum_ds.finetune.objective import ClassifierObjective

    cfg = M.roberta_config("tiny", vocab_size=V, seq_len=T, dropout=0.0)
    cfg.num_labels = 3
    torch.manual_seed(0)
    eager = cpu_fastpath.install(RobertaForSequenceClassification(cfg))
    compiled = copy.deepcopy(eager)
    compiling.compile_model(compiled)
    ids = torch.randint(5, V, (3, T), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    y = torch.tensor([0, 2, 1])
    losses = []
    for model, freeze in ((eager, False), (compiled, True)):
        obj = ClassifierObjective(model, AlumConfig(alpha=1.0, sigma=1e-2, eta=0.1, epsilon=0.1),
                                  freeze_ascent=freeze).train()
        obj.generator = torch.Generator().manual_seed(7)
        loss, _ = obj(ids, mask, y)
        loss.backward()
        losses.append(float(loss.detach()))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    _close(eager, compiled)


def test_graphs_stay_bounded_while_the_masked_count_changes() -> None:
    """50 training steps, plain and ALUM, a different number of masked tokens in almost every
    batch: the head is compiled with dynamic shapes, so the count of graphs does not grow with the
    counts seen. (Dropout 0: the graphs of the tests above.)"""
    torch.manual_seed(0)
    model = cpu_fastpath.install(M.build_model(preset="tiny", vocab_size=V, seq_len=T, dropout=0.0))
    compiling.compile_model(model)
    obj = AlumObjective(model, AlumConfig(), freeze_ascent=True).train()
    before, counts = compiling.graphs_compiled(), set()
    for i in range(50):
        ids, labels = _batch(100 + i, prob=0.1 + 0.4 * (i % 7) / 7)
        counts.add(int((labels != -100).sum()))
        loss, _ = obj(ids, labels, i % 2 == 1)
        loss.backward()
        if i == 3:
            warm = compiling.graphs_compiled()
    grown = compiling.graphs_compiled() - before
    assert len(counts) >= 10
    assert grown <= 12, grown  # embeddings, layers (3 variants), head: a handful, not one per count
    assert compiling.graphs_compiled() - warm <= 2  # after the first ALUM steps, at most a re-trace


def test_decide() -> None:
    assert compiling.decide("auto", on_gpu=False, zero_stage=2, offload=False) == (False, "")
    assert compiling.decide(False, on_gpu=True, zero_stage=2, offload=False) == (False, "")
    assert compiling.decide("auto", on_gpu=True, zero_stage=3, offload=False) == (False, "")
    with pytest.raises(compiling.CompileError, match="ZeRO-3 or with offload"):
        compiling.decide(True, on_gpu=False, zero_stage=3, offload=False)
    with pytest.raises(ConfigError, match="must be"):
        compile_setting({"torch_compile": {"enabled": "yes"}})
    assert compiling.decide(True, on_gpu=False, zero_stage=2, offload=False) == (True, "")


def test_auto_falls_back_with_one_warning_without_a_compiler(monkeypatch) -> None:
    monkeypatch.setattr(compiling, "missing_compiler", lambda: "No working C++ compiler found")
    on, note = compiling.decide("auto", on_gpu=True, zero_stage=2, offload=False)
    assert not on and note.startswith("warning: torch_compile auto: running eager") and "\n" not in note


@pytest.mark.parametrize("setting", [True, "auto"])
def test_compiler_hidden_from_path(setting: object, tmp_path: Path, cache_dir: Path) -> None:
    """The real check, in a fresh process with no C/C++ compiler on PATH: ``true`` is a
    one-line error before any work (exit 2); ``auto`` on the CPU runs eager (no compile wanted)."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "torch_compile": {"enabled": setting}}))
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "CC")}
    env["PATH"] = str(Path(sys.executable).parent)  # python only: no gcc, g++, cc
    r = subprocess.run([sys.executable, "-m", "alum_ds.cli", "train", "--ds_config", str(ds),
                        f"--run.dir={tmp_path / 'run'}", f"--data.cache_dir={cache_dir}",
                        "--schedule.steps=1", "--eval.fill_mask=0", "--eval.max_sequences=8"],
                       env=env, capture_output=True, text=True, timeout=300)
    if setting is True:
        assert r.returncode == 2, r.stderr[-2000:]
        err = r.stderr.strip().splitlines()[-1]
        assert err.startswith("alum-ds: error: torch_compile: torch.compile needs a working C/C++ compiler")
        assert not (tmp_path / "run" / "checkpoints").exists()
    else:
        assert r.returncode == 0, r.stderr[-2000:]
        assert ", compiled" not in r.stderr
