"""Run under the real launcher by tests/test_distributed.py: several pretraining runs, one after
the other, in this one process per rank. The spec (a JSON file, the last argument) lists them as
[run folder, DeepSpeed config, [--section.key=value, ...]]. Each run seeds itself (run.seed, and
the data and ALUM noise streams keyed by position), so it computes what it computes alone; one
launch for all, because starting the launcher costs more than a tiny run."""

import json
import sys
from pathlib import Path

from alum_ds.config import load_config
from alum_ds.distributed import shutdown
from alum_ds.trainer import train

for run_dir, ds, args in json.loads(Path(sys.argv[-1]).read_text())["runs"]:
    train(load_config(None, [*args, f"--run.dir={run_dir}"]), ds)
shutdown()
