"""ALUM step cost against a plain MLM step, same model, data, batch, engine and launcher.

    python bench/bench_alum_step.py [--preset small] [--steps 40] [--ds ds_configs/zero2.json]

Runs the real trainer twice through the deepspeed launcher (``--ranks``, 2 CPU ranks by default,
on a random master port), with ALUM off and on, and reports the median step time of each (from
metrics.jsonl, warm-up excluded) and their ratio. Figures are printed and saved to
bench/results/alum_step.json; nothing is asserted. The reference CPU setting of the project is
2 ranks, ZeRO-2, the small preset, sequence length 128. bench/bench_alum.py compares the
variants (and a naive baseline) inside one engine, interleaved step by step, which is steadier
on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_once(alum: bool, args: argparse.Namespace, work: Path) -> list[float]:
    run_dir = work / ("alum" if alum else "plain")
    cmd = [sys.executable, "-c", "from deepspeed.launcher.runner import main; main()",
           f"--num_gpus={args.ranks}", f"--master_port={random.randint(20000, 45000)}",
           str(ROOT / "launch" / "pretrain.py"), "--ds_config", str(ROOT / args.ds),
           f"--model.preset={args.preset}", f"--schedule.steps={args.steps}", "--logging.every=1",
           f"--alum.enabled={str(alum).lower()}", f"--run.dir={run_dir}",
           f"--data.seq_len={args.seq_len}", f"--schedule.micro_batch_size={args.micro_batch}",
           f"--alum.fused_first_pass={str(args.fused).lower()}"]
    subprocess.run(cmd, check=True, cwd=work, stdout=subprocess.DEVNULL)
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time_s"] for r in recs if "step_time_s" in r][args.warmup:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--ds", default="ds_configs/zero2.json")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--fused", action="store_true", help="ALUM with alum.fused_first_pass=true")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "alum_step.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        plain = statistics.median(run_once(False, args, Path(tmp)))
        alum = statistics.median(run_once(True, args, Path(tmp)))
    res = {"preset": args.preset, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
           "ds_config": args.ds, "fused_first_pass": args.fused, "plain_step_s": plain, "alum_step_s": alum,
           "ratio": alum / plain, "flop_ratio_model": 8 / 3}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
