"""Entry point for the DeepSpeed launcher:

    deepspeed launch/evaluate.py CHECKPOINT... --suite glue [--mode both] [--seeds N] [--sec.key=value]
"""

import sys

from alum_ds.cli import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main(prog="launch/evaluate.py"))
