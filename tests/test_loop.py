"""The training loop's parts: schedule, global batch, signals, metrics, plots, bad input (in
process, no engine), and preemption through the real launcher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from alum_ds import checkpoint as C
from alum_ds.cadence import Every, StopAfter
from alum_ds.cli import main, train_main
from alum_ds.config import ConfigError, batching_for, grad_accum_for, load_config
from alum_ds.metrics import MetricsLogger, StepWindow, flops_per_token, forward_equivalents
from alum_ds.optim import lr_lambda, planned_steps
from alum_ds.trainer import EXIT_PREEMPTED, Signals
from tests.conftest import ROOT, deepspeed_cmd, free_port

ZERO2 = str(ROOT / "ds_configs" / "zero2.json")


# ---- schedule and global batch -------------------------------------------------------------

def test_polynomial_and_linear_decay() -> None:
    cfg = load_config(None, ["--schedule.warmup_steps=10", "--schedule.decay=polynomial",
                             "--schedule.power=2"])
    f = lr_lambda(cfg.schedule, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.25) and f(110) == 0.0
    lin = lr_lambda(load_config(None, ["--schedule.warmup_steps=10"]).schedule, 110)
    assert lin(60) == pytest.approx(0.5) and lin(200) == 0.0
    one = lr_lambda(load_config(None, ["--schedule.warmup_steps=10", "--schedule.decay=polynomial"]).schedule,
                    110)
    assert one(60) == pytest.approx(lin(60))  # power 1 is linear
    const = lr_lambda(load_config(None, ["--schedule.decay=constant",
                                         "--schedule.warmup_steps=0"]).schedule, 5)
    assert const(0) == const(4) == 1.0


def test_token_budget_sets_the_last_step() -> None:
    cfg = load_config(None, ["--schedule.steps=1000", "--schedule.max_tokens=100000", "--data.seq_len=128"])
    assert planned_steps(cfg, 8) == 98  # ceil(100000 / (8 x 128))
    big = load_config(None, ["--schedule.steps=5", "--schedule.max_tokens=1000000000"])
    assert planned_steps(big, 8) == 5
    assert planned_steps(load_config(None, ["--schedule.steps=7"]), 8) == 7


def test_global_batch_derives_accumulation() -> None:
    cfg = load_config(None, ["--schedule.global_batch_size=32", "--schedule.micro_batch_size=4"])
    assert [grad_accum_for(cfg, w) for w in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(ConfigError, match=r"global_batch_size=32 is not a multiple of "
                       r"schedule.micro_batch_size=4 x 3 rank\(s\) = 12"):
        grad_accum_for(cfg, 3)
    # How the global batch is split may change between invocations; the config hash stays.
    other = load_config(None, ["--schedule.global_batch_size=32", "--schedule.micro_batch_size=8"])
    assert other.fingerprint() == cfg.fingerprint()
    assert load_config(None, ["--schedule.micro_batch_size=4"]).fingerprint() != load_config().fingerprint()
    with pytest.raises(ConfigError, match="schedule.grad_accum: is derived"):
        load_config(None, ["--schedule.global_batch_size=32", "--schedule.grad_accum=2"])

    # The batching is derived beside the config, which stays the user's.
    b = batching_for(cfg, 2)
    assert (b.micro_batch, b.accum, b.world, b.global_batch) == (4, 4, 2, 32)
    assert cfg.schedule.grad_accum == 1


def test_cadences_decide_when_work_is_due() -> None:
    log, ev, save = Every(5, 12, final=True), Every(5, 12, final=False), Every(5, 12)
    steps = range(1, 13)
    assert [s for s in steps if log.due(s)] == [5, 10, 12]  # the last step is always logged
    assert [s for s in steps if ev.due(s)] == [5, 10]  # the final evaluation follows the loop
    assert [s for s in steps if save.due(s)] == [5, 10]
    assert not any(Every(0, 12).due(s) for s in steps)
    stop = StopAfter(4, 3, 12)
    assert [s for s in range(4, 13) if stop.due(s)][0] == 7 and not stop.due(12)
    assert not any(StopAfter(0, 0, 12).due(s) for s in steps)


def test_micro_batch_passes_what_is_set() -> None:
    import torch

    from alum_ds.runtime import MicroBatch

    x = torch.zeros(2, 3, dtype=torch.long)
    assert set(MicroBatch(8, x, x, True, token_weight=0.5).inputs()) == {
        "input_ids", "labels", "alum_on", "token_weight"}
    assert set(MicroBatch(0, x, x[:, 0], False, attention_mask=x).inputs()) == {
        "input_ids", "labels", "alum_on", "attention_mask"}


# ---- signals --------------------------------------------------------------------------------

def test_signals_first_requests_duplicate_ignored_second_exits(monkeypatch) -> None:
    exits: list[int] = []
    monkeypatch.setattr(os, "_exit", exits.append)
    s = Signals(duplicate_s=60.0)
    try:
        assert not s.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert s.requested and exits == []
        os.kill(os.getpid(), signal.SIGINT)  # the launcher's forwarded copy: the same request
        assert exits == []
        s.first = time.monotonic() - 61.0  # a second request, later: exit at once
        os.kill(os.getpid(), signal.SIGINT)
        assert exits == [128 + signal.SIGINT]
    finally:
        s.restore()
    assert signal.getsignal(signal.SIGTERM) is not s._handle


def test_signals_after_a_preempted_save_are_ignored() -> None:
    """A late copy of the stop request must not kill a rank that saved and is leaving with 75."""
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN under a shell's background job
    s = Signals()
    try:
        s.ignore()
        os.kill(os.getpid(), signal.SIGTERM)  # the default action would end this process
        os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        s.restore()
    assert signal.getsignal(signal.SIGINT) is before


# ---- metrics and plots ----------------------------------------------------------------------

def test_metrics_drop_an_abandoned_continuation(tmp_path: Path) -> None:
    recs = [{"step": s, "loss": 9.0 - s} for s in (1, 2, 3, 4)] + [{"step": 4, "eval_loss": 5.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 5, "lo')
    log = MetricsLogger(tmp_path, enabled=True, tensorboard=False, total_steps=10, resume_step=2)
    log.log(3, {"loss": 1.0})
    log.close()
    got = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in got] == [(1, 8.0), (2, 7.0), (3, 1.0)]


def test_flop_model_counts_every_pass() -> None:
    # docs/ALUM.md "Cost": plain = forward + backward = 3; each ascent step adds a forward and an
    # activation-only backward (2); the adversarial pass a forward and a full backward (3).
    assert forward_equivalents(False, 1) == 3.0
    assert forward_equivalents(True, 1) == 8.0
    assert forward_equivalents(True, 2) == 10.0
    # 6N + 12 L h s per token: RoBERTa-base's 85M non-embedding parameters at 512 tokens.
    assert flops_per_token(85_000_000, 12, 768, 512) == pytest.approx(6 * 85e6 + 12 * 12 * 768 * 512)


def test_step_window_weights_by_tokens() -> None:
    import torch

    w = StepWindow(torch.device("cpu"))
    w.add({"task_sum": torch.tensor(10.0), "rows": 5, "adv_sum": torch.tensor(1.0)})
    w.add({"task_sum": torch.tensor(30.0), "rows": 5})
    r = w.reduce(lambda t, op: t, world=1, alpha=10.0)
    assert r["task_loss"] == 4.0 and r["loss"] == 5.0 and r["rows"] == 10 and float(w.sum.sum()) == 0.0


def test_wandb_gets_the_numeric_values(tmp_path: Path, monkeypatch) -> None:
    calls: list[tuple] = []

    class Run:
        def log(self, values, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    fake = type(sys)("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = MetricsLogger(tmp_path, enabled=True, tensorboard=False, total_steps=3,
                        wandb={"project": "p", "name": "run"})
    log.log(1, {"loss": 2.5, "alum_on": True, "mfu": None})
    log.close()
    assert calls[0] == ("init", {"resume": "allow", "project": "p", "name": "run"})
    assert calls[1:] == [("log", 1, {"loss": 2.5}), ("finish",)]


def _fake_run(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    recs = [{"step": s, "loss": 9 - s / 10, "mlm_loss": 9 - s / 10, "lr": 1e-3, "tokens_per_s": 1e4}
            for s in range(1, 21)] + [{"step": 10, "eval_loss": 8.1, "unigram_loss": 8.5},
                                      {"step": 20, "eval_loss": 7.9, "unigram_loss": 8.5}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_plot_writes_curves(tmp_path: Path, capsys, monkeypatch) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    lines = []
    real = Axes.axhline
    monkeypatch.setattr(Axes, "axhline", lambda self, y, **kw: lines.append((y, kw)) or real(self, y, **kw))
    _fake_run(tmp_path / "run")
    assert main(["plot", str(tmp_path / "run")]) == 0
    assert lines and lines[0][0] == 8.5 and "unigram line" in lines[0][1]["label"]
    png = tmp_path / "run" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert f"wrote {png}" in capsys.readouterr().out


def test_plot_without_matplotlib_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    _fake_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["plot", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'alum_ds[plot]'" in err[0]


# ---- bad input: one line, exit 2, nothing changed ---------------------------------------------

def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _fake_checkpoint(run_dir: Path, step: int, overrides: list[str], *, complete: bool = True) -> Path:
    cfg = load_config(None, overrides)
    tag_dir = C.checkpoint_dir(run_dir) / C.tag_for(step)
    tag_dir.mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"not a pickle")
    if complete:
        (tag_dir / C.STATE_FILE).write_text(json.dumps(
            {"version": C.STATE_VERSION, "step": step, "world_size": 2, "zero_stage": 2,
             "global_batch": 8, "stream": {"consumed": 8 * step}, "config_hash": cfg.fingerprint(),
             "config": cfg.to_dict()}))
    (C.checkpoint_dir(run_dir) / "latest").write_text(C.tag_for(step))
    return tag_dir


def _refused(capsys, args: list[str], needle: str) -> None:
    assert train_main(["--ds_config", ZERO2, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("alum-ds: error:") and needle in err[0], err


@pytest.mark.parametrize("case", ["shape", "config", "other_run", "missing_tag", "incomplete",
                                  "global_batch", "wandb", "pretrained", "unsupported", "discriminator",
                                  "classifier", "ds_name"])
def test_bad_input_is_refused_before_anything_changes(case: str, tmp_path: Path, capsys,
                                                      monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # one rank, no process group is started
    run_dir = tmp_path / "run"
    args = [f"--run.dir={run_dir}"]
    needle = {
        "shape": "holds another model shape: model.preset='small' (this run 'tiny')",
        "config": "was written with another config",
        "other_run": "holds another run",
        "missing_tag": "checkpoints/latest names 'step00000009', which is missing",
        "incomplete": "is incomplete (no alum_state.json",
        "global_batch": "schedule.global_batch_size=10 is not a multiple of schedule.micro_batch_size=4 x 1",
        "wandb": "logging.wandb=true needs the wandb package",
        "pretrained": "no config.json",
        "unsupported": "model_type 'gpt2' is not supported by alum_ds (supported: bert, roberta",
        "discriminator": "ElectraForPreTraining is ELECTRA's discriminator, which has no MLM head",
        "classifier": "RobertaForSequenceClassification has no MLM head",
        "ds_name": "zero9.json not found (a file, or one of the shipped configs: zero0.json",
    }[case]
    if case == "shape":
        _fake_checkpoint(run_dir, 4, ["--model.preset=small"])
    elif case == "config":
        _fake_checkpoint(run_dir, 4, ["--alum.alpha=1"])
    elif case == "other_run":
        _fake_checkpoint(run_dir, 4, [])
        (run_dir / "config.resolved.json").write_text(json.dumps({"config_hash": "0123456789abcdef"}))
        (run_dir / "metrics.jsonl").write_text('{"step": 4, "loss": 1.0}\n')
    elif case == "missing_tag":
        _fake_checkpoint(run_dir, 4, [])
        (run_dir / "checkpoints" / "latest").write_text("step00000009")
    elif case == "incomplete":
        args.append(f"--resume={_fake_checkpoint(tmp_path / 'old', 2, [], complete=False)}")
    elif case == "global_batch":
        args += ["--schedule.global_batch_size=10", "--schedule.micro_batch_size=4"]
    elif case == "wandb":
        if __import__("importlib").util.find_spec("wandb") is not None:
            pytest.skip("wandb is installed here")
        args.append("--logging.wandb=true")
    elif case == "pretrained":
        args.append(f"--model.pretrained={tmp_path}")
    elif case in ("unsupported", "discriminator", "classifier"):
        folder = tmp_path / "model"
        folder.mkdir()
        config = {"unsupported": {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]},
                  "discriminator": {"model_type": "electra", "architectures": ["ElectraForPreTraining"]},
                  "classifier": {"model_type": "roberta",
                                 "architectures": ["RobertaForSequenceClassification"]}}[case]
        (folder / "config.json").write_text(json.dumps(config))
        args.append(f"--model.pretrained={folder}")
    before = _tree(tmp_path)
    if case == "ds_name":
        assert train_main(["--ds_config", "zero9.json", *args]) == 2
        assert needle in capsys.readouterr().err
        return
    _refused(capsys, args, needle)
    assert _tree(tmp_path) == before


def test_prune_removes_partial_saves_never_latest(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for step, complete in ((2, True), (4, True), (6, False), (8, True)):
        (root / C.tag_for(step)).mkdir(parents=True)
        if complete:
            (root / C.tag_for(step) / C.STATE_FILE).write_text("{}")
    (root / "latest").write_text(C.tag_for(4))
    C.prune(root, keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step00000004", "step00000008"]


# ---- preemption through the real launcher -----------------------------------------------------

def _start(run_dir: Path, cache: Path, *extra: str) -> subprocess.Popen:
    cmd = deepspeed_cmd(f"--master_port={free_port()}", str(ROOT / "launch" / "pretrain.py"),
                        "--ds_config", ZERO2, f"--run.dir={run_dir}", f"--data.cache_dir={cache}",
                        "--schedule.steps=100000", "--logging.every=1", "--schedule.micro_batch_size=2",
                        "--data.seq_len=64", *extra)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "ALUM_DS_CPU_RANKS": "2"}
    env.pop("ALUM_DS_RESPAWNED", None)
    # A session of its own, like a job step: the signal goes to every process of the group.
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    p.lines = []  # type: ignore[attr-defined]
    # Drain the pipe while the run goes on (a full pipe would block the ranks).
    p.reader = threading.Thread(target=lambda: p.lines.extend(p.stdout), daemon=True)  # type: ignore
    p.reader.start()  # type: ignore[attr-defined]
    return p


def _finish(p: subprocess.Popen, timeout: float = 120) -> str:
    """Wait for the launcher and for every rank (they hold the pipe until they exit)."""
    p.wait(timeout=timeout)
    p.reader.join(timeout=timeout)  # type: ignore[attr-defined]
    return "".join(p.lines)  # type: ignore[attr-defined]


def _wait_for_step(p: subprocess.Popen, run_dir: Path, step: int, timeout: float = 240) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        path = run_dir / "metrics.jsonl"
        if path.is_file() and any(json.loads(x).get("step", 0) >= step and "loss" in json.loads(x)
                                  for x in path.read_text().splitlines() if x.endswith("}")):
            return
        if p.poll() is not None:
            raise AssertionError(f"run ended early ({p.returncode}): {_finish(p)[-3000:]}")
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    raise AssertionError("no progress")


@pytest.mark.distributed
def test_sigterm_finishes_the_step_saves_and_resumes(tmp_path: Path, cache_dir: Path) -> None:
    import psutil

    run_dir = tmp_path / "run"
    # 1. SIGTERM to the whole process group (Ctrl-C or a scheduler): the runner dies at once,
    # DeepSpeed's launch process forwards SIGTERM to the ranks (a duplicate they ignore) and
    # waits; each rank finishes its step, saves, and exits EXIT_PREEMPTED.
    p = _start(run_dir, cache_dir)
    _wait_for_step(p, run_dir, 2)
    os.killpg(p.pid, signal.SIGTERM)
    out = _finish(p)
    assert f"(exit code {EXIT_PREEMPTED})" in out, out[-3000:]
    saved = int(out.split("stopped by signal after saving step ")[1].split(";")[0])
    assert saved >= 2 and (run_dir / "checkpoints" / "latest").read_text() == C.tag_for(saved)
    assert C.read_state(run_dir / "checkpoints" / C.tag_for(saved))["step"] == saved
    assert p.returncode == -signal.SIGTERM  # the runner itself does not wait for its children

    # 2. Rerun: it resumes there. SIGTERM to the ranks only (as a scheduler that signals the
    # training processes): the rank's exit code comes back through the launcher unchanged.
    p = _start(run_dir, cache_dir)
    _wait_for_step(p, run_dir, saved + 1)
    ranks = [c for c in psutil.Process(p.pid).children(recursive=True)
             if any("--local_rank" in a for a in c.cmdline())]
    assert len(ranks) == 2
    for r in ranks:
        r.send_signal(signal.SIGTERM)
    out = _finish(p)
    assert f"at step {saved}" in out and "resumed from" in out, out[-3000:]
    assert "universal" not in out  # same ranks, same stage: a plain load, no conversion
    assert p.returncode == EXIT_PREEMPTED, (p.returncode, out[-3000:])
    again = int(out.split("stopped by signal after saving step ")[1].split(";")[0])
    assert again > saved and (run_dir / "checkpoints" / "latest").read_text() == C.tag_for(again)
