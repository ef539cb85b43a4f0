"""The paper's experiment in miniature: does ALUM pretraining (and ALUM fine-tuning) change clean
and robust accuracy?

1. Pretrain the same tiny RoBERTa twice through the real launcher, from the same initial weights
   on the same data in the same order: plain MLM (``--alum.enabled=false``) and ALUM (the paper's
   curriculum: plain MLM for the first half, ALUM for the second, ``--alum.start_step``). Both runs
   are identical up to that step.
2. Fine-tune each on the embedded topic task (4 classes, chance 25%), plainly (``--alum.alpha=0``)
   and with ALUM (alpha = 1), with several fine-tuning seeds.
3. Report validation accuracy, macro F1, accuracy under an L-inf PGD attack on the embedding output
   and accuracy on the distractor (adversarial) set, mean and spread over seeds.

    python bench/experiment_mini_alum.py            # ~10 minutes on a quiet 2-core CPU machine

Prints the table and writes bench/results/mini_alum.json and bench/results/mini_alum.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    while True:
        port = random.randint(20000, 45000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def launcher(ranks: int) -> list[str]:
    """The ``deepspeed`` command (its runner, from this interpreter) with an explicit port."""
    return [sys.executable, "-u", "-c", "from deepspeed.launcher.runner import main; main()",
            f"--num_gpus={ranks}", f"--master_port={free_port()}"]


def sh(cmd: list[str], log: Path) -> float:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("ALUM_DS_RESPAWNED", None)
    t = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"command failed (exit {rc}): {' '.join(cmd)}\n--- {log} ---\n{tail}")
    return time.time() - t


def pretrain(work: Path, name: str, alum: bool, a: argparse.Namespace) -> dict:
    run_dir = work / f"pretrain-{name}"
    cmd = [*launcher(a.ranks), "launch/pretrain.py", "--ds_config", "ds_configs/zero2.json",
           f"--alum.enabled={str(alum).lower()}", f"--run.dir={run_dir}",
           f"--schedule.steps={a.pretrain_steps}", f"--logging.every={max(1, a.pretrain_steps // 10)}"]
    if alum:
        cmd.append(f"--alum.start_step={a.pretrain_steps // 2}")
    if a.cache_dir:
        cmd.append(f"--data.cache_dir={a.cache_dir}")
    print(f"pretraining {name}: {' '.join(cmd[5:])}", flush=True)
    seconds = sh(cmd, work / f"pretrain-{name}.log")
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in recs if "eval_loss" in r]
    out = {"seconds": round(seconds, 1), "eval_mlm_loss": evals[-1] if evals else None}
    if a.work:  # a temporary work folder is gone by the end
        out["run_dir"] = str(run_dir)
    return out


def finetune(work: Path, pre: str, alum: bool, seed: int, a: argparse.Namespace) -> dict:
    out = work / f"ft-{pre}-{'alum' if alum else 'plain'}-s{seed}"
    cmd = [*launcher(a.ranks), "launch/finetune.py", "--checkpoint", str(work / f"pretrain-{pre}"),
           f"--run.dir={out}", f"--run.seed={seed}", f"--alum.alpha={1 if alum else 0}",
           f"--schedule.steps={a.finetune_steps}", f"--schedule.micro_batch_size={16 // a.ranks}",
           f"--optim.lr={a.lr}", f"--task.max_length={a.max_length}", f"--eval.robust_radius={a.radii}",
           f"--eval.pgd_steps={a.pgd_steps}", "--run.save_model=false", "--logging.every=50"]
    if a.cache_dir:
        cmd.append(f"--task.cache_dir={a.cache_dir}")
    seconds = sh(cmd, out.with_suffix(".log"))
    res = json.loads((out / "results.json").read_text())
    v = res["validation"]
    (adv,) = res["adversarial"].values()
    row = {"pretraining": pre, "finetuning": "ALUM" if alum else "plain", "seed": seed,
           "accuracy": v["accuracy"], "macro_f1": v["macro_f1"],
           "distractor_accuracy": adv["accuracy"], "seconds": round(seconds, 1)}
    row.update({k: x for k, x in v.items() if k.startswith("robust_accuracy@")})
    print(f"  {pre:>5} pretraining, {row['finetuning']:>5} fine-tuning, seed {seed}: accuracy "
          f"{row['accuracy']:.3f}, " + ", ".join(f"{k} {x:.3f}" for k, x in row.items()
                                                if k.startswith("robust")) +
          f", distractor set {row['distractor_accuracy']:.3f} ({seconds:.0f}s)", flush=True)
    return row


def summarise(rows: list[dict], metrics: list[str]) -> list[dict]:
    table = []
    for pre in ("plain", "ALUM"):
        for ft in ("plain", "ALUM"):
            sel = [r for r in rows if r["pretraining"] == pre.lower() and r["finetuning"] == ft]
            entry = {"pretraining": pre, "finetuning": ft, "runs": len(sel)}
            for m in metrics:
                xs = [r[m] for r in sel]
                entry[m] = {"mean": statistics.fmean(xs), "min": min(xs), "max": max(xs)}
            table.append(entry)
    return table


def markdown(table: list[dict], metrics: list[str], pre: dict) -> str:
    names = {"accuracy": "accuracy", "macro_f1": "macro F1",
             "distractor_accuracy": "distractor-set acc."}
    head = ["pretraining (MLM eval loss)", "fine-tuning"] + [
        names[m] if m in names else "robust acc. r=" + m.split("@")[1] for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in table:
        loss = pre[e["pretraining"].lower()]["eval_mlm_loss"]
        cells = [f"{e['pretraining']} ({loss:.3f})" if loss is not None else e["pretraining"],
                 e["finetuning"]]
        for m in metrics:
            s = e[m]
            cells.append(f"{s['mean']:.3f} ({s['min']:.3f}-{s['max']:.3f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--finetune-steps", type=int, default=200)
    p.add_argument("--seeds", type=int, default=2, help="fine-tuning seeds per condition")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--radii", default="0.01,0.02", help="PGD radii (L-inf, embedding output)")
    p.add_argument("--pgd-steps", type=int, default=5)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--cache-dir", default="", help="data cache (default: $ALUM_DS_CACHE or ~/.cache)")
    p.add_argument("--work", default="", help="keep the runs here (default: a temporary folder)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "mini_alum.json"))
    a = p.parse_args()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="alum_mini_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        pre = {name: pretrain(work, name, name == "alum", a) for name in ("plain", "alum")}
        rows = [finetune(work, name, alum, seed, a) for name in ("plain", "alum")
                for alum in (False, True) for seed in range(1, a.seeds + 1)]
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    radii = [f"robust_accuracy@{float(r):g}" for r in a.radii.split(",") if float(r) > 0]
    metrics = ["accuracy", "macro_f1", *radii, "distractor_accuracy"]
    table = summarise(rows, metrics)
    md = markdown(table, metrics, pre)
    result = {
        "settings": {k: v for k, v in vars(a).items() if k not in ("work", "out")},
        "pretraining": pre, "runs": rows, "table": table, "markdown": md,
        "seconds": round(time.time() - t0, 1),
        "notes": "mean (min-max) over fine-tuning seeds; chance accuracy 0.25; ALUM pretraining "
                 f"= plain MLM for steps 0-{a.pretrain_steps // 2 - 1}, ALUM (alpha 10) after",
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(md + "\n")
    print("\n" + md)
    print(f"\n{len(rows)} fine-tuning runs, {result['seconds'] / 60:.1f} minutes; wrote {out} and "
          f"{out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
