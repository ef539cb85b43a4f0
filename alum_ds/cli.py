"""``alum-ds`` and the ``launch/*.py`` entry points: parse, build, call; no logic of their own."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alum_ds.config import Config, ConfigError, DataConfig, RunConfig, cache_dir, load_config
from alum_ds.data.shards import DataError
from alum_ds.ds_config import DEFAULT as DEFAULT_DS_CONFIG

# Each command imports its own modules inside it: `alum-ds --help`, a parse error or a refused
# config must answer without loading torch, transformers and DeepSpeed (seconds each).
_LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}


def _fail(msg: str) -> int:
    # One line even when the message quotes a key or path holding a line break.
    print(f"alum-ds: error: {msg.translate(_LINE_BREAKS)}", file=sys.stderr)
    return 2


def _run_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The options pretraining and fine-tuning share; ``--section.key=value`` come after them."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--ds_config", "--ds-config", default=DEFAULT_DS_CONFIG,
                   help="DeepSpeed JSON (ZeRO stage, precision, offload): a file, or the name of a "
                   f"shipped one (zero0/1/2/3.json, zero3_offload.json, ...); default {DEFAULT_DS_CONFIG}")
    p.add_argument("--config", default=None, help="config file (TOML or JSON)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return p


def _run(argv: list[str], parser: argparse.ArgumentParser, cls: type[Config],
         start: Callable[[Config, argparse.Namespace], Any], aliases: dict[str, str] | None = None) -> int:
    """Parse, load the config (file + overrides, with ``aliases`` turning an option into its
    config key), check the DeepSpeed JSON, start the CPU ranks where needed, run ``start`` and
    tear the process group down; refusals are one-line errors with exit code 2."""
    args, rest = parser.parse_known_args(argv)
    try:
        bad = [r for r in rest if not (r.startswith("--") and "=" in r)]
        if bad:
            raise ConfigError(f"unrecognised argument {bad[0]!r} (overrides look like "
                              f"--section.key=value; see {parser.prog} --help)")
        extra = [f"{key}={getattr(args, dest)}" for dest, key in (aliases or {}).items()
                 if getattr(args, dest) is not None]
        cfg = load_config(args.config, [*extra, *rest], cls=cls)
        from alum_ds.ds_config import read_ds_json

        read_ds_json(args.ds_config)  # fail before starting processes and the engine
        from alum_ds.launching import maybe_respawn_cpu_ranks

        maybe_respawn_cpu_ranks()
        start(cfg, args)
        from alum_ds.distributed import shutdown

        shutdown()
    except (ConfigError, DataError) as e:
        return _fail(str(e))
    except RuntimeError as e:
        return _runtime_failure(e)
    return 0


def _guarded(fn: Callable[[], Any]) -> int:
    """``fn()``, its refusals as one-line errors with exit code 2."""
    try:
        fn()
    except (ConfigError, DataError) as e:
        return _fail(str(e))
    except RuntimeError as e:
        return _runtime_failure(e)
    return 0


def _runtime_failure(e: RuntimeError) -> int:
    """A one-line error for the runtime failures that are the user's to fix; re-raise the rest."""
    from alum_ds import compiling
    from alum_ds.adversarial import PrecisionError
    from alum_ds.checkpoint import CheckpointError
    from alum_ds.guard import EXIT_DIVERGED, Diverged

    if isinstance(e, Diverged):
        _fail(str(e))
        return EXIT_DIVERGED
    # not a traceback from the step
    if isinstance(e, (PrecisionError, compiling.CompileError, CheckpointError)):
        return _fail(str(e))
    if compiling.failure(e):
        return _fail(compiling.failure(e))
    raise e


def train_main(argv: list[str] | None = None, prog: str = "alum-ds train") -> int:
    p = _run_parser(prog, "ALUM pretraining. Extra --section.key=value arguments override the "
                    "config (e.g. --schedule.steps=1000 --alum.alpha=1).")
    p.add_argument("--resume", default="", help="checkpoint folder to resume from "
                   "(default: the run folder's latest, if any)")
    p.add_argument("--check", action="store_true", help="check the config, the DeepSpeed JSON, the "
                   "run folder, its checkpoint and the data folder as the run would, print what it "
                   "would do (as `alum-ds plan`) and exit without writing anything")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--check" in argv:
        return plan_main([a for a in argv if a != "--check"], prog, check=True)

    def start(cfg: Config, args: argparse.Namespace) -> None:
        from alum_ds.trainer import train

        train(cfg, args.ds_config, resume=args.resume)

    return _run(argv, p, RunConfig, start)


def plan_main(argv: list[str] | None = None, prog: str = "alum-ds plan", *, check: bool = False) -> int:
    """``alum-ds plan``: ``alum-ds train``'s arguments; prints what that run would do and exits
    without starting a process group, a model or an engine (``check``: as ``train --check``,
    which ends with the line saying so)."""
    p = _run_parser(prog, "Print what `alum-ds train` (or `deepspeed launch/pretrain.py`) with "
                    "these arguments would do: the resolved config and DeepSpeed plan, the ranks, "
                    "the batch arithmetic, the ALUM schedule, an estimate of memory per rank and "
                    "the checkpoint it would resume from. Starts nothing, writes nothing.")
    p.add_argument("--resume", default="", help="checkpoint folder to resume from "
                   "(default: the run folder's latest, if any)")
    p.add_argument("--world", type=int, default=0, help="ranks to plan for (default: what "
                   "`deepspeed launch/pretrain.py` starts here: every GPU, or the CPU ranks)")
    p.add_argument("--device", choices=("here", "gpu"), default="here", help="plan for this "
                   "machine (default), or for CUDA GPUs with bf16 (a GPU cluster's run, planned "
                   "from anywhere; give --world)")
    args, rest = p.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    try:
        bad = [r for r in rest if not (r.startswith("--") and "=" in r)]
        if bad:
            raise ConfigError(f"unrecognised argument {bad[0]!r} (overrides look like "
                              f"--section.key=value; see {prog} --help)")
        cfg = load_config(args.config, rest, cls=RunConfig)
        from alum_ds.planning import describe

        print("\n".join(describe(cfg, args.ds_config, resume=args.resume, world=args.world,
                                 device=args.device)))
        if check:
            print("alum-ds: check passed; nothing was written")
    except (ConfigError, DataError) as e:
        return _fail(str(e))
    return 0


def finetune_main(argv: list[str] | None = None, prog: str = "alum-ds finetune") -> int:
    from alum_ds.finetune.config import FinetuneConfig

    p = _run_parser(prog, "Fine-tune a sequence classifier (the model family's "
                    "AutoModelForSequenceClassification) from an alum-ds run, checkpoint or Hugging "
                    "Face folder, plainly or with ALUM (alum.alpha, default 1; --alum.enabled=false "
                    "for plain). Without --task.train: the embedded topic task. Settings are "
                    "--section.key=value (sections run, task, model, alum, optim, schedule, eval, "
                    "logging; e.g. --task.train=data.csv --schedule.steps=500 --optim.lr=2e-5).")
    p.add_argument("--checkpoint", default=None,
                   help="the pretrained model, as task.checkpoint (default: runs/default)")

    def start(cfg: Config, args: argparse.Namespace) -> None:
        from alum_ds.finetune.loop import finetune

        finetune(cfg, args.ds_config)

    return _run(list(sys.argv[1:] if argv is None else argv), p, FinetuneConfig, start,
                aliases={"checkpoint": "task.checkpoint"})


def prepare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alum-ds prepare",
        description="Tokenize a corpus into shards (or --verify a folder). Rerunning an interrupted "
        "prepare with the same inputs and options continues it.")
    p.add_argument("inputs", nargs="*", help=".txt/.jsonl/.parquet files, folders or globs; "
                   "folders written by datasets' save_to_disk; hf:NAME for a Hub dataset")
    p.add_argument("--out", help="output folder, or an fsspec URL (s3://, gs://, az://, ...): "
                   "prepared in the node cache, then uploaded, the manifest last")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--tokenizer", default="", help="existing tokenizer: a local folder or a Hub id "
                   "ORG/NAME[@REVISION] (a local folder of that name wins)")
    p.add_argument("--tokenizer-kind", choices=("bpe", "wordpiece"), default="bpe",
                   help="tokenizer to learn when no --tokenizer is given: byte-level BPE (RoBERTa's) "
                        "or WordPiece (BERT's: [CLS] [SEP] [PAD] [MASK], lower-cased)")
    p.add_argument("--tokenizer-sample-bytes", type=int, default=1 << 30,
                   help="learn the BPE from the first N bytes of the training documents (0: all)")
    p.add_argument("--text-field", default="text",
                   help="the text: JSON lines field, Parquet or dataset column")
    p.add_argument("--split", default="train", help="split of a saved DatasetDict or Hub dataset")
    p.add_argument("--hf-config", default="", help="configuration name of an hf:NAME dataset")
    p.add_argument("--streaming", action="store_true",
                   help="read an hf:NAME dataset as a stream instead of downloading it first")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--fresh", action="store_true", help="ignore an interrupted prepare and start over")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--workers", type=int, default=None,
                   help="encoding processes for a byte-level BPE (default: one per usable core, or "
                        "$ALUM_DS_PREPARE_WORKERS; 0: encode in prepare's own thread)")
    p.add_argument("--verify", metavar="DIR", help="check a prepared folder (or URL, fetched into "
                   "the node cache) fully and exit")
    return p


def prepare_main(argv: list[str]) -> int:
    a = prepare_parser().parse_args(argv)
    from alum_ds.data import remote
    from alum_ds.data.encoding import default_workers
    from alum_ds.data.prepare import prepare_inputs, verify

    try:
        if a.verify:
            target = remote.fetch_all(a.verify, DataConfig()) if remote.is_url(a.verify) else a.verify
            print(json.dumps(verify(target), indent=2))
            return 0
        if not a.inputs or not a.out:
            return _fail("prepare needs INPUT... and --out DIR (or --verify DIR)")
        if not 0 < a.val_fraction < 1:  # training evaluates on the validation split
            return _fail(f"--val-fraction {a.val_fraction}: expected a fraction above 0 and below 1")
        # Checked before any work: a bad count must not surface after the tokenizer is learned.
        try:
            workers = default_workers() if a.workers is None else a.workers
        except ValueError as e:
            return _fail(str(e))
        if workers < 0:
            return _fail(f"--workers {workers}: expected 0 or more encoding processes")
        tokenizer = a.tokenizer
        if tokenizer:
            from alum_ds.hub import resolve

            found = resolve(tokenizer, "--tokenizer", kind="tokenizer folder", weights=False)
            tokenizer = str(found.path)
            if found.from_hub:
                print(f"tokenizer: {found.describe()}", file=sys.stderr)
        store = remote.Store(a.out, DataConfig().fetch_retry_s) if remote.is_url(a.out) else None
        out = remote.mirror_dir(a.out, cache_dir()) if store else a.out
        m = prepare_inputs(a.inputs, out, vocab_size=a.vocab_size, tokenizer=tokenizer,
                           val_fraction=a.val_fraction, seed=a.seed, text_field=a.text_field,
                           split=a.split, hf_config=a.hf_config, streaming=a.streaming,
                           tokenizer_sample_bytes=a.tokenizer_sample_bytes, fresh=a.fresh,
                           progress=not a.quiet, encode_workers=workers,
                           tokenizer_kind=a.tokenizer_kind)
        if store is not None:
            n = remote.upload(Path(out), store)
            print(f"uploaded {n} files to {a.out} (the manifest last)", file=sys.stderr)
    except (ConfigError, DataError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print(f"\nalum-ds: prepare interrupted; rerun the same command to continue {a.out}",
              file=sys.stderr)
        return 130
    tr = sum(s["tokens"] for s in m["splits"]["train"])
    print(f"prepared {a.out}: {tr:,} training tokens, vocabulary {m['tokenizer']['vocab_size']}")
    return 0


def export_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="alum-ds export",
                                description="Checkpoint -> Hugging Face model folder.")
    p.add_argument("checkpoint", help="a checkpoint folder (RUN/checkpoints/stepN) or a run folder")
    p.add_argument("out_dir")
    a = p.parse_args(argv)
    from alum_ds.export import export

    try:
        out = export(a.checkpoint, a.out_dir)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as e:
        return _fail(str(e))
    print(f"exported {out}")
    return 0


def evaluate_main(argv: list[str] | None = None, prog: str = "alum-ds evaluate") -> int:
    from alum_ds.finetune import suite as S

    p = _run_parser(prog,
                    "Fine-tune every task of a suite (GLUE, ANLI or your own TOML) from each "
                    "CHECKPOINT, plainly, with ALUM or both, over --seeds seeds, and write "
                    "OUT/suite.md (the table), suite.json and suite.png. Rerunning skips finished "
                    "runs. Extra --section.key=value settings apply to every fine-tuning "
                    "(e.g. --schedule.steps=200 for a quick pass).")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="a model as task.checkpoint takes it (run, checkpoint or Hugging Face folder)")
    p.add_argument("--suite", default="glue", help="a shipped suite (" + ", ".join(S.shipped())
                   + ") or a TOML file of your own tasks; default glue")
    p.add_argument("--mode", choices=tuple(S.MODES), default="both",
                   help="plain fine-tuning, ALUM fine-tuning, or both (a table row each); default both")
    p.add_argument("--seeds", type=int, default=1, help="seeds per task and mode (default 1)")
    p.add_argument("--out", default="", help="output folder (default runs/evaluate/SUITE)")
    args, rest = p.parse_known_args(list(sys.argv[1:] if argv is None else argv))

    def start() -> None:
        bad = [r for r in rest if not (r.startswith("--") and "=" in r)]
        if bad:
            raise ConfigError(f"unrecognised argument {bad[0]!r} (settings look like "
                              "--section.key=value; see alum-ds evaluate --help)")
        if args.seeds < 1:
            raise ConfigError(f"--seeds {args.seeds}: expected 1 or more")
        suite = S.load_suite(args.suite)
        from alum_ds.ds_config import read_ds_json

        read_ds_json(args.ds_config)
        names = [c.rstrip("/").rsplit("/", 1)[-1] or c for c in args.checkpoints]
        labels = [n if names.count(n) == 1 else f"{n}-{i}" for i, n in enumerate(names)]
        plan = S.Plan(suite, list(zip(labels, args.checkpoints)), S.MODES[args.mode], args.seeds,
                      Path(args.out or f"runs/evaluate/{suite.name}"), rest, args.ds_config,
                      args.config)
        from alum_ds.launching import maybe_respawn_cpu_ranks

        maybe_respawn_cpu_ranks()
        S.run_suite(plan)
        from alum_ds.distributed import shutdown

        shutdown()

    return _guarded(start)


def plot_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="alum-ds plot",
                                description="Draw loss, learning-rate and throughput curves from "
                                "RUN_DIR/metrics.jsonl into RUN_DIR/curves.png (needs matplotlib: "
                                "pip install 'alum_ds[plot]').")
    p.add_argument("run_dir")
    p.add_argument("--out", default="", help="image path (default: RUN_DIR/curves.png)")
    a = p.parse_args(argv)
    from alum_ds.plot import plot_run

    try:
        out = plot_run(a.run_dir, a.out or None)
    except (ConfigError, FileNotFoundError) as e:
        return _fail(str(e))
    print(f"wrote {out}")
    return 0


COMMANDS = {
    "train": ("run ALUM pretraining in this process (or under a launcher)", None),
    "plan": ("print what `alum-ds train` with the same arguments would do; start nothing", plan_main),
    "prepare": ("tokenize a corpus into shards, or verify a prepared folder", prepare_main),
    "export": ("write a Hugging Face model folder from a checkpoint", export_main),
    "plot": ("draw loss / lr / throughput curves of a run into RUN_DIR/curves.png", plot_main),
    "finetune": ("fine-tune a sequence classifier, plainly or with ALUM", finetune_main),
    "evaluate": ("fine-tune a suite of tasks (GLUE, ANLI, your own) and write its table", evaluate_main),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: alum-ds COMMAND [ARGS]\n\ncommands:")
        for name, (text, _) in COMMANDS.items():
            print(f"  {name:<9} {text}")
        print("\nMulti-rank training: deepspeed launch/pretrain.py --ds_config ds_configs/zero2.json")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        return train_main(rest)
    if cmd not in COMMANDS:
        return _fail(f"unknown command {cmd!r} (see alum-ds --help)")
    return COMMANDS[cmd][1](rest)


if __name__ == "__main__":
    sys.exit(main())
