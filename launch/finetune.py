"""Entry point for the DeepSpeed launcher:

    deepspeed launch/finetune.py --checkpoint runs/default [--train FILE ...] [--section.key=value ...]
"""

import sys

from alum_ds.finetune.cli import finetune_main

if __name__ == "__main__":
    sys.exit(finetune_main(prog="launch/finetune.py"))
