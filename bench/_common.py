"""What the benchmark scripts share: the description of the machine they ran on, and a
RoBERTa-size vocabulary without a download.

The embedded default corpus only supports a ~6.5k-entry BPE. The standard library's sources of
this interpreter (tests excluded) are ~13 MB of text and yield ~43k entries when 50,265 (RoBERTa's
size) are requested: the shape of the model a user of RoBERTa's tokenizer trains.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def corpus_parser(doc: str, *, mb: float, out: str) -> argparse.ArgumentParser:
    """The options of a benchmark over a generated corpus: its size, repeats, a quick mode, and
    the results file (under bench/results/)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--mb", type=float, default=mb, help="corpus size in MB")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="a tiny corpus and one repeat (seconds)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / out))
    return p


def machine() -> dict:
    """The machine a figure came from: cores this process may use, CPU model, GPU if any."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {"cpus": cpus, "cpu_model": model, "platform": platform.platform(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:  # pragma: no cover
        pass
    return info


def stdlib_corpus(work: Path) -> Path:
    """This interpreter's standard library sources (tests excluded) as one JSON-lines corpus."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = work / "stdlib.jsonl"
    with open(out, "w") as f:
        for p in sorted(root.rglob("*.py")):
            rel = p.relative_to(root).as_posix()
            if rel.startswith(("site-packages/", "test/")) or "/test/" in rel or "/tests/" in rel:
                continue
            try:
                f.write(json.dumps({"text": p.read_text(encoding="utf-8")}) + "\n")
            except (UnicodeDecodeError, OSError):
                continue
    return out


def stdlib_data(vocab: int = 50265) -> Path:
    """The prepared stdlib folder, cached between bench runs (prepared on first use)."""
    cache = Path(os.environ.get("ALUM_DS_CACHE", Path.home() / ".cache" / "alum_ds"))
    data = cache / f"bench-stdlib-{sys.version_info.major}.{sys.version_info.minor}-v{vocab}"
    if not (data / "manifest.json").is_file():
        with tempfile.TemporaryDirectory(prefix="alum_corpus_") as tmp:
            corpus = stdlib_corpus(Path(tmp))
            subprocess.run([sys.executable, "-m", "alum_ds.cli", "prepare", str(corpus), "--out",
                            str(data), "--vocab-size", str(vocab), "--quiet"], check=True, cwd=ROOT)
    return data
