"""Entry point for the DeepSpeed launcher:

    deepspeed launch/finetune.py --checkpoint runs/default [--task.train=FILE ...] [--section.key=value ...]
"""

import sys

from alum_ds.cli import finetune_main

if __name__ == "__main__":
    sys.exit(finetune_main(prog="launch/finetune.py"))
