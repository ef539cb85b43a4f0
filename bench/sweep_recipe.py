"""One point of a recipe sweep for the main job: how far below the unigram line a setting gets.

    python bench/sweep_recipe.py NAME [--section.key=value ...]

Trains plain MLM on the embedded corpus in this process (one rank, one thread, so two points
run side by side on two cores), with the run config's defaults plus the given overrides, the
main job's global batch of 64 on one rank, and an eval every 350 steps. Prints and appends to
``bench/results/recipe_sweep.jsonl`` the distance below the unigram line at each eval (nats;
each eval at the run's own masking rate) and the wall time. bench/results/README.md
tabulates the points behind the defaults. Nothing is asserted.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "recipe_sweep.jsonl"
FIXED = ["--schedule.micro_batch_size=64", "--alum.enabled=false", "--eval.every=350",
         "--eval.fill_mask=0", "--logging.tensorboard=false", "--logging.every=100", "--checkpoint.keep=1"]


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    name, overrides = sys.argv[1], sys.argv[2:]
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from alum_ds.config import load_config
    from alum_ds.trainer import train

    with tempfile.TemporaryDirectory(prefix="alum_sweep_") as tmp:
        run = Path(tmp) / name
        t0 = time.time()
        train(load_config(None, [*FIXED, *overrides, f"--run.dir={run}"]), "zero2.json")
        seconds = time.time() - t0
        from alum_ds import records  # metrics.jsonl: a non-finite value is null, named
        recs = [records.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    below = {r["step"]: round(r["unigram_loss"] - r["eval_loss"], 3) for r in recs if "eval_loss" in r}
    point = {"name": name, "overrides": overrides, "below_unigram_line": below, "seconds": round(seconds)}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("a") as f:
        f.write(json.dumps(point) + "\n")
    print(json.dumps(point))
    return 0


if __name__ == "__main__":
    sys.exit(main())
