"""Entry point for the DeepSpeed launcher:

    deepspeed launch/pretrain.py --ds_config ds_configs/zero2.json [--section.key=value ...]
"""

import sys

from alum_ds.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main(prog="launch/pretrain.py"))
