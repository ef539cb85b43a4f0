"""Fine-tuning's typed config: the run, model, alum, optim, schedule and logging sections of
pretraining (with fine-tuning's defaults) plus ``task`` (what to fine-tune on) and ``eval`` (how
to judge it). Read by ``alum_ds.config.load_config(..., cls=FinetuneConfig)``: the same TOML/JSON
files, ``--section.key=value`` overrides and one-line errors as pretraining."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from alum_ds.config import (
    AlumConfig,
    Check,
    Config,
    LoggingConfig,
    ModelBase,
    OptimConfig,
    RunBase,
    ScheduleBase,
    Section,
)


@dataclass
class FinetuneRun(RunBase):
    dir: str = "runs/finetune"
    """Output folder: metrics, TensorBoard, results.json and model/. Fine-tuning runs are short
    and not resumable: running again into the same folder replaces them."""
    save_model: bool = True
    """Write RUN/model (a Hugging Face folder that loads with AutoModelForSequenceClassification)."""


@dataclass
class TaskConfig(Section):
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"type": ("classification", "regression")}
    type: str = "classification"
    """classification (one label per example, cross-entropy) or regression (one real-valued
    output per example, mean squared error; STS-B style)."""
    checkpoint: str = "runs/default"
    """The pretrained model: an alum-ds run folder, one of its checkpoint folders (or the
    checkpoints/ folder itself), or a Hugging Face folder (``alum-ds export`` output or any local
    model of a supported family). ``--checkpoint DIR`` on the command line sets it too."""
    tokenizer: str = ""
    """Tokenizer folder (default: the model's own)."""
    train: str = ""
    """Training data: .csv/.tsv/.jsonl/.json or a datasets folder (FOLDER@split). Empty: the
    embedded topic task (generated into the cache folder on first use)."""
    validation: str = ""
    """Validation data (default: every 10th training example is held out)."""
    adv_eval: list[str] = field(default_factory=list)
    """Extra (adversarial, ANLI-style) evaluation sets, comma-separated; accuracy on each is
    reported."""
    text_column: str = "text"
    text_pair_column: str = ""
    """Second text of a pair (e.g. hypothesis); empty: single texts."""
    label_column: str = "label"
    labels: list[str] = field(default_factory=list)
    """The label set in id order, comma-separated (default: the training data's labels, sorted).
    F1 (``task.metrics``) is the F1 of the class with id 1, GLUE's positive class."""
    metrics: list[str] = field(default_factory=list)
    """What evaluation reports beside the loss, comma-separated: accuracy, f1, macro_f1, mcc
    (classification), pearson, spearman, mse (regression). Default: accuracy,macro_f1 or
    pearson,spearman."""
    epochs: float = 0.0
    """Train for this many passes over the training data (sets schedule.steps from the data's
    size and the global batch); 0: schedule.steps decides."""
    max_length: int = 128
    """Tokens per example after truncation."""
    cache_dir: str = ""
    """Where the embedded task is generated (default: $ALUM_DS_CACHE or ~/.cache/alum_ds)."""

    def checks(self) -> list[Check]:
        from alum_ds.finetune.metrics import CLASSIFICATION, REGRESSION

        allowed = CLASSIFICATION if self.type == "classification" else REGRESSION
        bad = [m for m in self.metrics if m not in allowed]
        return [("task.max_length", self.max_length >= 8, "must be at least 8"),
                ("task.metrics", not bad, f"{', '.join(bad)} is not a {self.type} metric "
                 f"(choose from {', '.join(allowed)})"),
                ("task.epochs", self.epochs >= 0, "must be >= 0"),
                ("task.labels", not (self.type == "regression" and self.labels),
                 "is for classification; a regression task's labels are numbers"),
                ("task.validation", not (self.validation and not self.train),
                 "needs task.train (without it the embedded task is used)")]


@dataclass
class FinetuneEval(Section):
    every: int = 0
    """Also evaluate every N steps (0: only at the end)."""
    batch: int = 64
    """Examples per evaluation batch."""
    robust_radius: list[float] = field(default_factory=lambda: [0.02])
    """L-inf radii of the PGD attack on the embedding output for robust accuracy (empty or 0: none)."""
    pgd_steps: int = 5
    """PGD steps of the robustness evaluation."""

    def checks(self) -> list[Check]:
        return [("eval.every", self.every >= 0, "must be >= 0"),
                ("eval.batch", self.batch >= 1, "must be >= 1"),
                ("eval.pgd_steps", self.pgd_steps >= 0, "must be >= 0"),
                ("eval.robust_radius", all(r >= 0 for r in self.robust_radius), "must be >= 0")]


@dataclass
class FinetuneConfig(Config):
    """Sequence-classification fine-tuning. The defaults suit the tiny embedded demo; for a base
    or large model use a fine-tuning learning rate such as 1e-5."""

    run: FinetuneRun = field(default_factory=FinetuneRun)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelBase = field(default_factory=ModelBase)
    alum: AlumConfig = field(default_factory=lambda: AlumConfig(alpha=1.0, start_fraction=0.0))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3))
    schedule: ScheduleBase = field(default_factory=lambda: ScheduleBase(
        warmup_steps=0, warmup_fraction=0.1, micro_batch_size=16))
    eval: FinetuneEval = field(default_factory=FinetuneEval)
    logging: LoggingConfig = field(default_factory=lambda: LoggingConfig(every=20))
