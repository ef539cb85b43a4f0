"""Entry point: python launch/export.py CHECKPOINT OUT_DIR (same as `alum-ds export`)."""

import sys

from alum_ds.cli import export_main

if __name__ == "__main__":
    sys.exit(export_main(sys.argv[1:]))
