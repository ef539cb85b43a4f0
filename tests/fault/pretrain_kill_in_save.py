"""``launch/pretrain.py`` with one injected fault, for tests: the last rank SIGKILLs itself right
after writing its shards of step ``$KILL_IN_SAVE_STEP`` (after ``engine.save_checkpoint``, before
the barrier that lets rank 0 complete the checkpoint and move ``latest``).

The fault is a wrapper around DeepSpeed's own ``save_checkpoint`` installed in this process only;
alum_ds reads no test switch.
"""

import os
import signal
import sys

from deepspeed.runtime.engine import DeepSpeedEngine

from alum_ds import distributed as D
from alum_ds.cli import train_main

TAG = f"step{int(os.environ['KILL_IN_SAVE_STEP']):08d}"
_save = DeepSpeedEngine.save_checkpoint


def _save_then_die(self, save_dir, tag=None, *args, **kwargs):
    out = _save(self, save_dir, tag, *args, **kwargs)
    if tag == TAG and D.rank() == D.world() - 1:
        print(f"fault: rank {D.rank()} kills itself while saving {tag}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return out


DeepSpeedEngine.save_checkpoint = _save_then_die

if __name__ == "__main__":
    sys.exit(train_main(prog="pretrain_kill_in_save.py"))
