"""Run under the real launcher by tests/test_faults.py: several 2-rank pretraining runs with
injected faults, one after the other in this one process per rank (one launch for all). The spec
(a JSON file, the last argument) lists steps, each one of

- ``{"train": [run folder, DeepSpeed config, [--section.key=value, ...]], "env": {...}}``: a run,
  with the fault settings of tests/fault/pretrain_poison.py in ``env`` (set for this run only);
  a one-line refusal (``ConfigError``) or a divergence stop is printed as
  ``fault_runs: refused: ...`` and the next step runs;
- ``{"copy": [src, dst]}``: rank 0 copies a run folder;
- ``{"flip": [file, byte offset]}``: rank 0 flips the lowest bit of one byte of a file;
- ``{"write": [file, text]}``, ``{"truncate": [file, size]}``, ``{"remove": file}``: rank 0
  overwrites, truncates or deletes a file.

Every step ends with a barrier, so the ranks agree on what is on disk.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import pretrain_poison as poison  # installs the wrappers around DeepSpeed's engine (this folder)

from alum_ds import distributed as D
from alum_ds.config import ConfigError, load_config
from alum_ds.guard import Diverged
from alum_ds.trainer import train

for item in json.loads(Path(sys.argv[-1]).read_text())["steps"]:
    if "train" in item:
        run_dir, ds, args = item["train"]
        env = item.get("env", {})
        poison.POISON = int(env.get("POISON_STEP", 0))
        poison.ONCE = bool(env.get("POISON_ONCE"))
        poison.SPIKES = {int(s) for s in env.get("POISON_LOSS_AT", "").split(",") if s}
        poison._done.clear()
        poison._fired.clear()
        try:
            train(load_config(None, [*args, f"--run.dir={run_dir}"]), ds)
        except (ConfigError, Diverged) as e:
            if D.rank() == 0:
                print(f"fault_runs: refused: {e}", file=sys.stderr, flush=True)
    elif D.rank() == 0 and "copy" in item:
        shutil.copytree(*item["copy"])
    elif D.rank() == 0 and "flip" in item:
        path, offset = item["flip"]
        with open(path, "r+b") as f:
            f.seek(offset)
            b = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([b ^ 1]))
    elif D.rank() == 0 and "write" in item:
        Path(item["write"][0]).write_bytes(item["write"][1].encode("latin-1"))
    elif D.rank() == 0 and "truncate" in item:
        os.truncate(*item["truncate"])
    elif D.rank() == 0 and "remove" in item:
        os.remove(item["remove"])
    D.barrier()
    os.sync()
D.shutdown()
