"""``alum-ds finetune`` and ``launch/finetune.py``: parse, check, call ``loop.finetune``."""

from __future__ import annotations

import argparse
import sys

from alum_ds.config import ConfigError, load_config
from alum_ds.data.shards import DataError

# Fine-tuning defaults on top of the run config's (tuned for the embedded task and a tiny model;
# for a base/large RoBERTa use e.g. --optim.lr=1e-5 --schedule.steps=... on real data).
FINETUNE_DEFAULTS = [
    "run.dir=runs/finetune", "alum.alpha=1", "optim.lr=1e-3", "optim.weight_decay=0.01",
    "schedule.steps=300", "schedule.warmup_steps=30", "schedule.micro_batch_size=16",
    "logging.every=20", "model.dropout=0.1",
]
# Run-config keys that mean something for fine-tuning; the rest belong to pretraining.
SECTIONS = ("run.", "alum.", "optim.", "schedule.steps", "schedule.warmup_steps",
            "schedule.micro_batch_size", "schedule.grad_accum", "schedule.decay", "schedule.power",
            "logging.every", "logging.tensorboard", "model.dropout")


def _parser(prog: str) -> argparse.ArgumentParser:
    from alum_ds.cli import DEFAULT_DS_CONFIG

    p = argparse.ArgumentParser(
        prog=prog,
        description="Fine-tune a sequence classifier (RobertaForSequenceClassification) from an "
        "alum-ds run, checkpoint or exported Hugging Face folder, plainly or with ALUM "
        "(--alum.alpha, default 1; --alum.enabled=false for plain). Without --train: the embedded "
        "topic task. Extra --section.key=value arguments set run, alum, optim, schedule, logging "
        "and model.dropout (e.g. --schedule.steps=500 --optim.lr=2e-5).",
    )
    p.add_argument("--checkpoint", default="runs/default",
                   help="run folder, checkpoint folder or Hugging Face folder (default: runs/default)")
    p.add_argument("--tokenizer", default="", help="tokenizer folder (default: the model's own)")
    p.add_argument("--train", default="", help=".csv/.tsv/.jsonl/.json file or datasets folder "
                   "(FOLDER@split); default: the embedded topic task")
    p.add_argument("--validation", default="", help="validation data (default: every 10th training "
                   "example is held out)")
    p.add_argument("--adv-eval", action="append", default=[], metavar="DATA",
                   help="extra (adversarial, ANLI-style) evaluation set; repeatable")
    p.add_argument("--text-column", default="text")
    p.add_argument("--text-pair-column", default="", help="second text of a pair (e.g. hypothesis)")
    p.add_argument("--label-column", default="label")
    p.add_argument("--labels", default="", help="comma-separated label set, in id order "
                   "(default: the labels of the training data, sorted)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per example after truncation")
    p.add_argument("--cache-dir", default="", help="where the embedded task is generated "
                   "(default: $ALUM_DS_CACHE or ~/.cache/alum_ds)")
    p.add_argument("--robust-radius", default="0.02", help="comma-separated L-inf radii of the PGD "
                   "attack on the embedding output for robust accuracy (0: none)")
    p.add_argument("--pgd-steps", type=int, default=5, help="PGD steps of the robustness evaluation")
    p.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps")
    p.add_argument("--eval-batch", type=int, default=64)
    p.add_argument("--no-save-model", action="store_true", help="do not write RUN/model")
    p.add_argument("--ds_config", "--ds-config", default=DEFAULT_DS_CONFIG,
                   help="DeepSpeed JSON (ZeRO stage, precision, offload)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{name}: expected comma-separated numbers, got {text!r}") from None


def finetune_main(argv: list[str] | None = None, prog: str = "alum-ds finetune") -> int:
    from alum_ds.cli import _fail

    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = _parser(prog).parse_known_args(argv)
    try:
        for r in rest:
            if not (r.startswith("--") and "=" in r):
                raise ConfigError(f"unrecognised argument {r!r} (see {prog} --help)")
            if not r[2:].startswith(SECTIONS):
                raise ConfigError(f"{r.split('=')[0]} does not apply to fine-tuning (settable: run.*, "
                                  "alum.*, optim.*, schedule.steps/warmup_steps/micro_batch_size/"
                                  "grad_accum/decay/power, logging.every/tensorboard, model.dropout)")
        cfg = load_config(None, FINETUNE_DEFAULTS + rest)
        if not any(r.startswith("--schedule.warmup_steps=") for r in rest):
            cfg.schedule.warmup_steps = cfg.schedule.steps // 10  # 10% warmup unless given
        from alum_ds.finetune.loop import FinetuneOptions

        opts = FinetuneOptions(
            checkpoint=args.checkpoint, tokenizer=args.tokenizer, train=args.train,
            validation=args.validation, adv_eval=args.adv_eval, text_column=args.text_column,
            text_pair_column=args.text_pair_column, label_column=args.label_column,
            labels=[x.strip() for x in args.labels.split(",") if x.strip()],
            max_length=args.max_length, cache_dir=args.cache_dir,
            robust_radius=_floats(args.robust_radius, "--robust-radius"),
            pgd_steps=args.pgd_steps, eval_every=args.eval_every, eval_batch=args.eval_batch,
            save_model=not args.no_save_model,
        )
        from alum_ds.ds_config import read_ds_json

        read_ds_json(args.ds_config)  # fail before starting processes and the engine
        from alum_ds.launching import maybe_respawn_cpu_ranks

        maybe_respawn_cpu_ranks()
        from alum_ds.finetune.loop import finetune

        finetune(opts, cfg, args.ds_config)
        from alum_ds.distributed import shutdown

        shutdown()
    except (ConfigError, DataError) as e:
        return _fail(str(e))
    except RuntimeError as e:
        from alum_ds.adversarial import PrecisionError

        if isinstance(e, PrecisionError):
            return _fail(str(e))
        raise
    return 0
