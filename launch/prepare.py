"""Entry point: python launch/prepare.py INPUT... --out DIR (same as `alum-ds prepare`)."""

import sys

from alum_ds.cli import prepare_main

if __name__ == "__main__":
    sys.exit(prepare_main(sys.argv[1:]))
