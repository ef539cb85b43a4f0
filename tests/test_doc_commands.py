"""Every command the README and docs/ show in a ``bash`` block works as written.

What is checked, command by command (all in this process, in a temporary folder holding links to
``ds_configs/``, ``recipes/`` and ``launch/``):

- pretraining (``alum-ds train`` and ``alum-ds plan``, ``deepspeed [launcher options] launch/pretrain.py``,
  ``python launch/pretrain.py``, ``sbatch ... launch/slurm/pretrain.sbatch``): ``alum-ds plan``
  with the same arguments succeeds. A command whose DeepSpeed JSON is fp16 or whose recipe is a
  ``*_gpu`` one is planned ``--device=gpu`` (with the world ``sbatch --nodes x --gpus-per-node``
  names). Folders a page assumes exist: an exported model (``--model.pretrained``) is laid down
  as a tiny model's ``config.json``; a data folder (``--data.dir``) or a checkpoint (``--resume``)
  the page made earlier may stop the plan only with exactly the run's refusal of that missing
  folder, after everything else was planned, one in S3 only with the refusal of missing
  credentials (none are set here); a Hub id (``model.pretrained=roberta-base``) only
  with the run's refusal of a Hub it cannot reach (tests have no network);
- fine-tuning (``alum-ds finetune``, ``launch/finetune.py``): ``--help`` parses and the command's
  settings load as a fine-tuning config (an unknown key fails);
- ``alum-ds prepare``: the arguments parse with prepare's parser; other ``alum-ds`` commands and
  ``python bench/*.py``: ``--help`` parses and names every option the command uses;
- other ``launch/NAME.py`` entry points are checked as ``alum-ds NAME``;
- ``pip``, ``pytest`` and shell tools (``cat``, ``ls``, ``cd``, ``export``) are not ours and are
  not run; any other line fails the test.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

from alum_ds import cli
from alum_ds.config import load_config
from alum_ds.finetune.config import FinetuneConfig

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BASH = re.compile(r"^```bash\n(.*?)^```", flags=re.M | re.S)
NOT_OURS = ("pip", "pytest", "cat", "ls", "cd", "export")


def doc_commands() -> list[tuple[str, list[str]]]:
    """(page, words) of every command line in the pages' bash blocks."""
    out = []
    for page in PAGES:
        for body in BASH.findall(page.read_text()):
            for line in body.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                while words and (words[0] == "time" or re.match(r"^[A-Z_]+=", words[0])):
                    words = words[1:]
                if words:
                    out.append((page.name, words))
    return out


COMMANDS = doc_commands()


def _split_at(words: list[str], script: str) -> list[str]:
    """The arguments after the script, launcher options before it dropped."""
    i = next(i for i, w in enumerate(words) if w.endswith(script))
    return words[i + 1:]


def _plan(words: list[str], tmp: Path, capsys: pytest.CaptureFixture) -> None:
    """Plan a pretraining command; see the module docstring for what may stop it."""
    world, gpu = 0, False
    if words[0] == "sbatch":
        opts = dict(w.lstrip("-").split("=", 1) for w in words[1:] if w.startswith("--nodes")
                    or w.startswith("--gpus-per-node"))
        world, gpu = int(opts["nodes"]) * int(opts["gpus-per-node"]), True
        args = _split_at(words, "pretrain.sbatch")
    elif words[0] == "alum-ds":
        args = words[2:]
    else:
        args = _split_at(words, "launch/pretrain.py")
    joined = " ".join(args)
    gpu = gpu or "fp16" in joined or re.search(r"recipes/\w+_gpu\.toml", joined) is not None
    for a in args:
        if a.startswith("--model.pretrained="):
            folder = tmp / a.split("=", 1)[1]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "config.json").write_text(json.dumps(TINY_ROBERTA))
    extra = [] if words[:2] == ["alum-ds", "plan"] else (
        [f"--device={'gpu' if gpu else 'here'}"] + ([f"--world={world}"] if world else []))
    code = cli.main(["plan", *args, *extra])
    out, err = capsys.readouterr()
    if code == 0:
        assert "checkpoint: " in out and "memory per rank (estimate)" in out, out
        return
    assert code == 2, (code, err)
    allowed = []
    config = args[args.index("--config") + 1] if "--config" in args else None
    cfg = load_config(config, [a for a in args if re.match(r"^--\w+\.\w+=", a)])
    d = cfg.data.dir
    if d:  # the run's data folder, from the command or its recipe
        allowed.append(f"data folder {d} not found: prepare it with `alum-ds prepare INPUT --out {d}`")
    if "--resume" in args:
        r = args[args.index("--resume") + 1]
        allowed.append(f"--resume {r}: no such checkpoint folder")
    first = d or (cfg.data.sources[0].rpartition(":")[0] if cfg.data.sources else "")
    if first.startswith("s3://") and "\n" not in err.strip() and err.startswith(
            f"alum-ds: error: {first}/manifest.json: no usable credentials for the store"):
        return  # a folder in S3, with no credentials here: the run's refusal of exactly that
    hub_id = cfg.model.pretrained and not (tmp / cfg.model.pretrained).exists()
    if hub_id and err.startswith(f"alum-ds: error: model.pretrained {cfg.model.pretrained}:") and \
            err.rstrip().endswith("run with network access, or give a local folder"):
        return  # a Hub id, with no network here: the run's refusal of exactly that
    assert err.strip() in {f"alum-ds: error: {m}" for m in allowed}, (words, err)


TINY_ROBERTA = {"model_type": "roberta", "architectures": ["RobertaForMaskedLM"], "vocab_size": 300,
                "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                "intermediate_size": 32, "max_position_embeddings": 130}


def _help(run: callable) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        run()
    assert e.value.code == 0, out.getvalue()
    return out.getvalue()


def _options_named(words: list[str], text: str) -> None:
    missing = [w.split("=")[0] for w in words if w.startswith("--")
               and not re.match(r"^--\w+\.\w+=", w) and w.split("=")[0] not in text]
    assert not missing, (words, missing)


def _finetune(words: list[str]) -> None:
    args = words[2:] if words[0] == "alum-ds" else _split_at(words, "launch/finetune.py")
    _options_named(args, _help(lambda: cli.finetune_main(["--help"])))
    overrides = [a for a in args if re.match(r"^--\w+\.\w+=", a)]
    if "--checkpoint" in args:
        overrides.append(f"--task.checkpoint={args[args.index('--checkpoint') + 1]}")
    assert isinstance(load_config(None, overrides, cls=FinetuneConfig), FinetuneConfig)


def _bench(words: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    script = ROOT / words[1]
    assert script.is_file(), words
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    monkeypatch.syspath_prepend(str(script.parent))
    _options_named(words[2:], _help(lambda: runpy.run_path(str(script), run_name="__main__")))


def _check(words: list[str], tmp: Path, capsys: pytest.CaptureFixture,
           monkeypatch: pytest.MonkeyPatch) -> None:
    head = words[0]
    line = " ".join(words)
    if head in NOT_OURS:
        return
    if ("pretrain.py" in line or "pretrain.sbatch" in line
            or words[:2] in (["alum-ds", "train"], ["alum-ds", "plan"])):
        return _plan(words, tmp, capsys)
    if "launch/finetune.py" in line or words[:2] == ["alum-ds", "finetune"]:
        return _finetune(words)
    if head == "python" and words[1].startswith("bench/"):
        return _bench(words, monkeypatch)
    script = next((w for w in words if re.match(r"^launch/\w+\.py$", w)), None)
    if script is not None:  # launch/NAME.py is `alum-ds NAME`
        words = ["alum-ds", Path(script).stem, *_split_at(words, script)]
        head, line = "alum-ds", " ".join(words)
    assert head == "alum-ds", f"a command this test does not know: {line}"
    if words[1:] == ["--help"]:
        assert cli.main(["--help"]) == 0
    elif words[1] == "prepare":
        cli.prepare_parser().parse_args(words[2:])
    else:
        assert words[1] in cli.COMMANDS, f"no such command: {line}"
        command = cli.COMMANDS[words[1]][1]
        _options_named(words[2:], _help(lambda: command(["--help"])))


def test_pages_show_commands() -> None:
    assert len(COMMANDS) >= 40 and any(w[:2] == ["alum-ds", "train"] for _, w in COMMANDS)


def test_every_documented_command_works(tmp_path: Path, capsys: pytest.CaptureFixture,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ds_configs", "recipes", "launch", "bench"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALUM_DS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    # No store credentials here (nor network): an s3:// folder is refused for exactly that.
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for page, words in COMMANDS:
        try:
            _check(words, tmp_path, capsys, monkeypatch)
        except AssertionError as e:
            raise AssertionError(f"{page}: {' '.join(words)}: {e}") from None
