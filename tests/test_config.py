"""Config errors are one-line messages naming the key, and a non-zero exit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alum_ds.cli import main, train_main
from alum_ds.config import ConfigError, batching_for, load_config
from alum_ds.ds_config import resolve_ds_config
from tests.conftest import ROOT, run

ZERO2 = str(ROOT / "ds_configs" / "zero2.json")


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_defaults_validate() -> None:
    cfg = load_config()
    assert cfg.alum.enabled and cfg.alum.alpha == 10.0 and cfg.alum.sigma == 1e-5
    assert cfg.alum.eta == 1e-3 and cfg.alum.ascent_steps == 1 and cfg.alum.norm == "linf"


def test_overrides_and_file(tmp_path: Path) -> None:
    f = tmp_path / "run.toml"
    f.write_text('[alum]\nalpha = 1.0\nnorm = "l2"\n[optim]\nbetas = [0.9, 0.95]\n')
    cfg = load_config(str(f), ["--alum.alpha=2", "--schedule.steps=7", "--model.dropout=0"])
    assert cfg.alum.alpha == 2.0 and cfg.alum.norm == "l2" and cfg.schedule.steps == 7
    assert cfg.optim.betas == (0.9, 0.95)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("--alum.bogus=1", "alum.bogus"),
        ("--nosuch.key=1", "nosuch.key"),
        ("--schedule.steps=ten", "schedule.steps"),
        ("--alum.norm=l3", "alum.norm"),
        ("--alum.enabled=maybe", "alum.enabled"),
        ("--masking.prob=1.5", "masking.prob"),
        ("--schedule.micro_batch_size=0", "schedule.micro_batch_size"),
    ],
)
def test_bad_override_is_one_line(override: str, needle: str, capsys) -> None:
    assert train_main(["--ds_config", ZERO2, override]) == 2
    line = _err(capsys)
    assert line.startswith("alum-ds: error:") and needle in line


def test_missing_ds_json(tmp_path: Path, capsys) -> None:
    assert train_main(["--ds_config", str(tmp_path / "nope.json")]) == 2
    assert "nope.json not found" in _err(capsys)


def test_malformed_ds_json(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 2,}')
    assert train_main(["--ds_config", str(bad)]) == 2
    line = _err(capsys)
    assert "bad.json is not valid JSON" in line and "line 1" in line


def test_malformed_config_file(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "run.toml"
    bad.write_text("[alum\nalpha=")
    assert train_main(["--ds_config", ZERO2, "--config", str(bad)]) == 2
    assert "run.toml is malformed" in _err(capsys)


def _resolve(ds: dict, tmp_path: Path, overrides=(), world=2, on_gpu=False) -> dict:
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(ds))
    cfg = load_config(None, list(overrides))
    return resolve_ds_config(str(p), cfg, batching_for(cfg, world), bf16_supported=True,
                             on_gpu=on_gpu)


def test_ds_json_contradicting_run_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=4.*schedule.micro_batch_size=32"):
        _resolve({"train_micro_batch_size_per_gpu": 4}, tmp_path)
    with pytest.raises(ConfigError, match="gradient_clipping"):
        _resolve({"gradient_clipping": 5.0}, tmp_path)
    with pytest.raises(ConfigError, match="train_batch_size=10"):
        _resolve({"train_batch_size": 10}, tmp_path)
    with pytest.raises(ConfigError, match="optimizer"):
        _resolve({"optimizer": {"type": "Adam"}}, tmp_path)
    with pytest.raises(ConfigError, match="fp16, which needs a GPU"):
        _resolve({"fp16": {"enabled": True}}, tmp_path)
    with pytest.raises(ConfigError, match="stage must be 0-3"):
        _resolve({"zero_optimization": {"stage": 5}}, tmp_path)


def test_ds_json_agreeing_values_and_auto_precision(tmp_path: Path) -> None:
    ds = _resolve({"train_micro_batch_size_per_gpu": 32, "bf16": {"enabled": "auto"}}, tmp_path)
    assert ds["train_batch_size"] == 64 and ds["gradient_accumulation_steps"] == 1
    assert ds["bf16"]["enabled"] is False  # auto: fp32 on the CPU
    # On a GPU, auto is bf16 only when ALUM's radius survives bf16 (docs/ALUM.md trap 4).
    ds = _resolve({"bf16": {"enabled": "auto"}}, tmp_path, on_gpu=True)
    assert ds["bf16"]["enabled"] is False
    ds = _resolve({"bf16": {"enabled": "auto"}}, tmp_path, ["--alum.eta=0.01", "--alum.epsilon=0.01"],
                  on_gpu=True)
    assert ds["bf16"]["enabled"] is True
    ds = _resolve({"bf16": {"enabled": "auto"}}, tmp_path, ["--alum.enabled=false"], on_gpu=True)
    assert ds["bf16"]["enabled"] is True


def test_every_shipped_ds_config_parses() -> None:
    for p in sorted((ROOT / "ds_configs").glob("*.json")):
        json.loads(p.read_text())


def test_cli_help_lists_subcommands(capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("prepare", "train", "export"):
        assert f"  {cmd}" in out


def test_launcher_reports_bad_json_and_fails(tmp_path: Path) -> None:
    """Through the real deepspeed launcher: a clear message and a non-zero exit."""
    from tests.conftest import deepspeed_cmd

    bad = tmp_path / "bad.json"
    bad.write_text("{")
    r = run(deepspeed_cmd(str(ROOT / "launch" / "pretrain.py"), "--ds_config", str(bad)), ROOT,
            timeout=180)
    assert r.returncode != 0
    assert "bad.json is not valid JSON" in r.stderr + r.stdout
    assert "Traceback" not in r.stderr + r.stdout


def test_entry_points_tear_the_process_group_down(monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished run destroys its process group itself (left to interpreter exit, teardown
    once aborted a finished rank with exit 250)."""
    import os

    import torch.distributed as dist

    from alum_ds import distributed as D
    from alum_ds import launching, trainer
    from alum_ds.cli import finetune_main
    from alum_ds.finetune import loop

    monkeypatch.setattr(launching, "maybe_respawn_cpu_ranks", lambda: None)
    monkeypatch.setattr(trainer, "train", lambda *a, **k: D.init())
    monkeypatch.setattr(loop, "finetune", lambda *a, **k: D.init())
    saved = dict(os.environ)  # D.init sets RANK, WORLD_SIZE, ...: later launches must not see them
    try:
        assert train_main(["--ds_config", ZERO2]) == 0
        assert not dist.is_initialized()
        assert finetune_main(["--ds_config", ZERO2]) == 0
        assert not dist.is_initialized()
        D.shutdown()  # nothing to tear down: a no-op
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_a_bare_ds_config_name_is_a_shipped_config_from_any_folder(tmp_path: Path, monkeypatch) -> None:
    from alum_ds.ds_config import SHIPPED, read_ds_json, resolve_ds_path

    monkeypatch.chdir(tmp_path)
    assert resolve_ds_path("zero2.json") == SHIPPED / "zero2.json"
    assert resolve_ds_path("zero3_offload") == SHIPPED / "zero3_offload.json"
    assert read_ds_json("zero1.json")["zero_optimization"]["stage"] == 1
    (tmp_path / "zero2.json").write_text('{"zero_optimization": {"stage": 0}}')
    assert resolve_ds_path("zero2.json") == Path("zero2.json")  # a file of that name wins
    with pytest.raises(ConfigError, match="nested/zero2.json not found"):
        resolve_ds_path("nested/zero2.json")  # a path is a path: not looked up among the shipped


def test_finetune_config_sections_defaults_and_alternatives() -> None:
    from alum_ds.finetune.config import FinetuneConfig

    cfg = load_config(None, [], cls=FinetuneConfig)
    assert cfg.alum.alpha == 1.0 and cfg.optim.lr == 1e-3 and cfg.run.dir == "runs/finetune"
    assert cfg.schedule.warmup_for(300) == 30  # 10% by default
    cfg = load_config(None, ["--schedule.warmup_steps=7", "--eval.robust_radius=0.01,0.02",
                             "--task.labels=a, b"], cls=FinetuneConfig)
    assert cfg.schedule.warmup_for(300) == 7 and cfg.schedule.warmup_fraction == 0.0
    assert cfg.eval.robust_radius == [0.01, 0.02] and cfg.task.labels == ["a", "b"]
    assert load_config(None, ["--schedule.warmup_fraction=0.2"]).schedule.warmup_for(100) == 20
    with pytest.raises(ConfigError, match="set one of the two"):
        load_config(None, ["--schedule.warmup_fraction=0.2", "--schedule.warmup_steps=3"])
    with pytest.raises(ConfigError, match="unknown config key 'task.train'"):
        load_config(None, ["--task.train=x.csv"])  # a fine-tuning section, not pretraining's


def test_alum_start_is_a_fraction_of_the_run_or_a_step(tmp_path: Path) -> None:
    """The curriculum's switch: 90% of the run by default, a fraction or a step, never both."""
    from alum_ds.trainer import _alum_words

    cfg = load_config(None, [])
    assert cfg.alum.start_fraction == 0.9 and cfg.alum.start_for(1400) == 1260
    assert cfg.alum.start_for(7) == 6  # rounded down
    assert _alum_words(cfg.alum, 1400) == "plain MLM to step 1260, then ALUM (of 1400 steps)"
    step = load_config(None, ["--alum.start_step=0"]).alum  # setting the step clears the fraction
    assert step.start_fraction == 0.0 and step.start_for(1400) == 0 and _alum_words(step, 9) == "ALUM on"
    assert load_config(None, ["--alum.start_step=30"]).alum.start_for(1400) == 30
    assert _alum_words(load_config(None, ["--alum.start_step=30"]).alum, 20).startswith("ALUM never on")
    assert _alum_words(load_config(None, ["--alum.enabled=false"]).alum, 20) == "ALUM off"
    with pytest.raises(ConfigError, match="alum.start_fraction.*must be in \\[0, 1\\)"):
        load_config(None, ["--alum.start_fraction=1.0"])
    f = tmp_path / "both.toml"
    f.write_text("[alum]\nstart_step = 3\nstart_fraction = 0.5\n")
    with pytest.raises(ConfigError,
                       match="alum.start_fraction: and alum.start_step both set: set one of the two"):
        load_config(str(f), [])
    # Fine-tuning runs ALUM throughout.
    from alum_ds.finetune.config import FinetuneConfig

    assert load_config(None, [], cls=FinetuneConfig).alum.start_for(300) == 0


def test_a_missing_branch_checkpoint_names_run_branch_from(tmp_path: Path) -> None:
    from alum_ds.checkpoint import find_resume

    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match=f"^run.branch_from {missing}: no such checkpoint folder$"):
        find_resume(tmp_path / "run", str(missing), option="run.branch_from")
    with pytest.raises(ConfigError, match=f"^--resume {missing}: no such checkpoint folder$"):
        find_resume(tmp_path / "run", str(missing))
