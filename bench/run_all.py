"""Run every benchmark of the project and collect the figures.

    python bench/run_all.py [--quick | --collect] [--only data,alum,vs_hf,scale]

Each benchmark is its own script writing ``bench/results/<name>.json``; this driver runs them
one after the other (never concurrently: they share the cores), then writes
``bench/results/summary.json``, ``bench/results/summary.md`` (a table per benchmark, with the
machine it ran on) and ``bench/results/summary.png`` (the headline ratios against their goals).
Nothing is asserted: a benchmark prints and saves numbers. ``--collect`` rebuilds the summary
from the results already saved, without running anything.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import machine

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

# name -> (script, the arguments of its quick mode)
BENCHES: dict[str, tuple[str, list[str]]] = {
    "data": ("bench_data.py", ["--quick"]),
    "alum": ("bench_alum.py", ["--quick"]),
    "alum_passes": ("bench_alum_passes.py", ["--preset", "tiny", "--steps", "2"]),
    "vs_hf": ("bench_vs_hf.py", ["--quick"]),
    "scale": ("bench_scale.py", ["--cases", "base:zero2", "--steps", "2", "--corpus", "embedded",
                                 "--vocab", "8192"]),
}

# Headline ratios and their goals (issue text): (result, key, goal, "higher"/"lower" is better).
HEADLINES = [
    ("vs_hf", "speedup", 1.6, "higher", "plain MLM tokens/s vs HF Trainer (6.5k vocab)"),
    ("vs_hf", "speedup_roberta_vocab", 2.6, "higher", "plain MLM tokens/s vs HF Trainer (43k vocab)"),
    ("vs_hf", "settings.embedded.alum_vs_plain_step", 2.2, "lower", "ALUM step / plain step (trainer)"),
    ("data", "prepare_vs_baseline", 1.5, "higher", "prepare tokens/s vs datasets.map"),
    ("alum", "ratios.alum_vs_plain", 2.2, "lower", "ALUM step / plain step (engine only)"),
    ("alum", "ratios.alum_vs_baseline_time", 0.6, "lower", "ALUM time / naive ALUM"),
    ("alum", "ratios.alum_vs_baseline_memory", 0.5, "lower", "ALUM memory / naive ALUM"),
]


def _find(d: dict, path: str):
    """A dotted path into a nested result (scripts group their figures)."""
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _table(name: str, res: dict) -> list[str]:
    rows = [f"### {name}", "", "| figure | value |", "|---|---|"]

    def walk(prefix: str, d: dict) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                # Cases (e.g. scale's preset x config runs): labelled by what they ran.
                for i, item in enumerate(v):
                    label = ":".join(Path(str(item[x])).stem for x in ("preset", "ds_config") if x in item)
                    walk(f"{prefix}{k}[{label or i}].", item)
            elif isinstance(v, float):
                rows.append(f"| {prefix}{k} | {v:.4g} |")
            elif isinstance(v, (int, bool)) or (isinstance(v, str) and len(v) <= 200):
                rows.append(f"| {prefix}{k} | {v} |")

    walk("", res)
    return rows + [""]


def chart(summary: dict, out: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart (pip install -e '.[bench]')", file=sys.stderr)
        return False
    labels, values, goals, colors = [], [], [], []
    for name, key, goal, better, text in HEADLINES:
        v = _find(summary["results"].get(name, {}), key)
        if not isinstance(v, (int, float)):
            continue
        ok = v >= goal if better == "higher" else v <= goal
        labels.append(text)
        values.append(v)
        goals.append(goal)
        colors.append("tab:green" if ok else "tab:red")
    if not values:
        return False
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(values) + 1.2))
    ax.barh(labels, values, color=colors)
    ax.scatter(goals, labels, marker="|", s=400, color="black", label="goal")
    ax.set_xlabel("ratio")
    ax.set_title(f"alum_ds benchmarks ({summary['machine'].get('gpu', 'CPU')}, "
                 f"{summary['machine']['date']})")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="each script's quick mode")
    p.add_argument("--collect", action="store_true",
                   help="summarise the saved results in --out-dir without running the benchmarks")
    p.add_argument("--only", default="", help="comma-separated subset of " + ",".join(BENCHES))
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [n for n in (args.only.split(",") if args.only else BENCHES) if n]
    if args.quick and args.collect:
        p.error("--quick and --collect exclude each other")
    summary = {"machine": machine(), "quick": args.quick, "collected": args.collect, "results": {},
               "failed": {}}
    for name in names:
        script, quick = BENCHES[name]
        path = ROOT / "bench" / script
        out = out_dir / f"{name}.json"
        if args.collect:
            if out.is_file():
                summary["results"][name] = json.loads(out.read_text())
            else:
                summary["failed"][name] = f"no saved result {out}"
            continue
        if not path.is_file():
            summary["failed"][name] = f"{script} not found"
            continue
        cmd = [sys.executable, str(path), f"--out={out}", *(quick if args.quick else [])]
        print(f"== {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        t0 = time.time()
        r = subprocess.run(cmd, cwd=ROOT)
        if r.returncode != 0 or not out.is_file():
            summary["failed"][name] = f"exit code {r.returncode}"
            continue
        res = json.loads(out.read_text())
        res["bench_seconds"] = round(time.time() - t0, 1)
        summary["results"][name] = res
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = ["# alum_ds benchmark summary", "",
             f"Machine: {json.dumps(summary['machine'])}", "",
             f"Command: `python bench/run_all.py{' --quick' if args.quick else ''}`"
             + (" (collected from the saved results; each benchmark's own machine and load are in "
                "its table)" if args.collect else ""), ""]
    for name, res in summary["results"].items():
        lines += _table(name, res)
    for name, why in summary["failed"].items():
        lines.append(f"- {name}: FAILED ({why})")
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    chart(summary, out_dir / "summary.png")
    print("\n".join(lines))
    if summary["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
