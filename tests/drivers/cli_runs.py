"""Run several ``alum-ds`` commands in this one process (the spec, a JSON file given as the last
argument, lists their argument lists), each through ``alum_ds.cli.main`` as the ``alum-ds``
script runs it. Before each, a line ``== run N`` on stderr separates their output; after it,
``== rc N R`` gives its exit code. One interpreter for all: importing torch and DeepSpeed costs
more than a refused or a two-step run. Only the last command may train to its end: a run that
finishes tears the process group down, and DeepSpeed does not build it again in the same process."""

import json
import sys
from pathlib import Path

from alum_ds.cli import main

for i, argv in enumerate(json.loads(Path(sys.argv[-1]).read_text())["runs"]):
    print(f"== run {i}", file=sys.stderr, flush=True)
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    print(f"== rc {i} {rc}", file=sys.stderr, flush=True)
