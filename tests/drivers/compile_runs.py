"""Run under the real launcher by tests/test_compile_engine.py (2 ranks, ZeRO-2), in this one
process per rank: pretraining eager and compiled (plain MLM, then ALUM), and the compiled run
again, stopped and resumed. The spec (a JSON file, the last argument) names the folders and
DeepSpeed configs. (Compiled fine-tuning and compiled dropout are compared with eager in
tests/test_compile.py, in one process: each compiled configuration costs a cold compile here.)"""

import json
import sys
from pathlib import Path

from alum_ds.config import load_config
from alum_ds.distributed import shutdown
from alum_ds.trainer import train

spec = json.loads(Path(sys.argv[-1]).read_text())
out, eager, compiled = Path(spec["out"]), spec["eager"], spec["compiled"]
common = ["--schedule.steps=20", "--schedule.warmup_steps=2", "--optim.lr=3e-3", "--logging.every=1",
          "--schedule.micro_batch_size=4", "--alum.start_step=10", "--eval.fill_mask=0",
          "--eval.max_sequences=16", "--logging.tensorboard=false", f"--data.cache_dir={spec['cache']}",
          "--model.dropout=0"]
for name, ds, extra in (("eager", eager, []), ("compiled", compiled, []),
                        ("split", compiled, ["--run.stop_after=12"]), ("split", compiled, [])):
    train(load_config(None, [*common, f"--run.dir={out / name}", *extra]), ds)
shutdown()
