"""Run under the real launcher by tests/test_architectures.py: for every model folder of the
spec (a JSON file, the last argument), in this one process per rank:

1. continual pretraining from the folder, 5 steps, a checkpoint at step 3 (RUN/full);
2. a resume of RUN/full's step-3 checkpoint into another run folder, steps 4-5 (RUN/resumed);
3. ALUM fine-tuning from RUN/full/checkpoints (DeepSpeed's own save folder), 3 steps.

Plus a from-scratch BERT (``model.arch=bert``) on WordPiece data, and the spec's ``extra``
pretraining runs (headless encoders under ``model.new_head``, a model from a Hub id that both ranks
resolve at once). One launch for all: starting the launcher costs more than a tiny run.
"""

import json
import sys
from pathlib import Path

from alum_ds.config import load_config
from alum_ds.distributed import shutdown
from alum_ds.finetune.config import FinetuneConfig
from alum_ds.finetune.loop import finetune
from alum_ds.trainer import train

spec = json.loads(Path(sys.argv[-1]).read_text())
out, ds = Path(spec["out"]), spec["ds_config"]
common = ["--schedule.steps=5", "--schedule.warmup_steps=1", "--schedule.micro_batch_size=2",
          "--optim.lr=3e-3", "--logging.every=1", "--model.dropout=0.1", "--data.seq_len=32",
          "--eval.max_sequences=16", "--logging.tensorboard=false", "--alum.start_step=0"]
for family, folder in spec["families"].items():
    run = out / family
    base = [*common, f"--model.pretrained={folder}", f"--data.dir={spec['data']}"]
    train(load_config(None, [*base, f"--run.dir={run / 'full'}", "--checkpoint.every=3"]), ds)
    train(load_config(None, [*base, f"--run.dir={run / 'resumed'}"]), ds,
          resume=str(run / "full" / "checkpoints" / "step00000003"))
    finetune(load_config(None, [
        f"--task.checkpoint={run / 'full' / 'checkpoints'}", f"--task.cache_dir={spec['cache']}",
        f"--run.dir={run / 'finetune'}", "--task.max_length=32", "--schedule.steps=3",
        "--schedule.micro_batch_size=4", "--eval.pgd_steps=1", "--eval.robust_radius=0.05",
        "--run.save_model=false", "--logging.every=1", "--logging.tensorboard=false"],
        cls=FinetuneConfig), ds)
train(load_config(None, [*common, "--model.arch=bert", "--model.preset=tiny",
                         f"--data.dir={spec['wordpiece_data']}", f"--run.dir={out / 'bert-scratch'}"]), ds)
for extra in spec.get("extra", []):
    train(load_config(None, [*common, f"--data.dir={spec['data']}", *extra["overrides"],
                             f"--run.dir={out / extra['name']}"]), ds)
shutdown()
