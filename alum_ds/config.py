"""Typed configs: one dataclass per section, a file plus ``--section.key=value`` overrides.

Pretraining (``RunConfig``) and fine-tuning (``alum_ds.finetune.config.FinetuneConfig``) are two
roots built from the same sections and read by the same loader, so both take TOML/JSON files and
overrides and refuse bad input with the same one-line ``ConfigError``. A config owns the ML
meaning of a run; systems settings (ZeRO stage, precision, offload) belong to the DeepSpeed JSON,
and ``ds_config`` joins the two and refuses contradictions. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os

try:  # Python 3.11+; on 3.10 config files must be JSON
    import tomllib
except ImportError:  # pragma: no cover
    tomllib = None  # type: ignore[assignment]

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

Check = tuple[str, bool, str]

SEED_LIMIT = 2**63
"""Seeds feed torch.manual_seed and numpy's generators: non-negative and below 2**63 for both."""
FLOAT_LIMIT = 3.4028234663852886e38
"""fp32's largest finite value: every float setting reaches fp32 tensors (a larger one is inf)."""


def seed_check(key: str, seed: int) -> Check:
    return (key, 0 <= seed < SEED_LIMIT, "must be an integer in [0, 2**63)")


class ConfigError(ValueError):
    """A bad config value or file; the message is one line and names the key."""


class Section:
    """A config section: ``CHOICES`` (key -> allowed values) and ``checks`` are its validation;
    ``PARSE`` (key -> function of (key, value)) reads a value of a key that has its own syntax."""

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {}
    PARSE: ClassVar[dict[str, Any]] = {}

    def checks(self) -> list[Check]:
        return []


@dataclass
class RunBase(Section):
    dir: str = "runs/default"
    """Run folder: resolved config, metrics, TensorBoard logs and checkpoints or results."""
    seed: int = 42
    """Seeds model initialisation, dropout and the perturbation noise."""

    def checks(self) -> list[Check]:
        return [("run.dir", bool(self.dir), "is empty: name the run folder (e.g. runs/my_run)"),
                seed_check("run.seed", self.seed)]


@dataclass
class RunSection(RunBase):
    stop_after: int = 0
    """Stop, after saving, once this invocation has trained N steps (0: run to the end); for
    time-sliced allocations. Rerunning the command continues the same run."""
    branch_from: str = ""
    """Start this run from another run's checkpoint (weights, optimizer, schedule and data
    position) when its own folder has none: arms of an experiment that differ only in their
    ``alum`` settings share the plain-MLM steps before ALUM starts (``alum.start_fraction`` or
    ``alum.start_step``: the paper's curriculum). Refused unless every other setting is the same
    and ALUM was off in both up to the checkpoint's step, so the branch computes what a run from
    scratch with its config would."""

    def checks(self) -> list[Check]:
        return [*super().checks(), ("run.stop_after", self.stop_after >= 0, "must be >= 0")]


@dataclass
class ModelBase(Section):
    dropout: float = 0.1
    """Hidden and attention dropout."""
    activation_checkpointing: bool = False
    """Non-reentrant activation checkpointing of encoder layers (reentrant breaks the ascent)."""

    def checks(self) -> list[Check]:
        return [("model.dropout", 0 <= self.dropout < 1, "must be in [0, 1)")]


@dataclass
class ModelConfig(ModelBase):
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"preset": ("tiny", "small", "base", "large"),
                                                     "arch": ("roberta", "bert")}
    arch: str = "roberta"
    """Architecture of a model built from a preset: roberta (byte-level BPE data) or bert
    (WordPiece data: ``alum-ds prepare --tokenizer-kind wordpiece``)."""
    preset: str = "tiny"
    """Size preset: tiny, small, base (RoBERTa-/BERT-base shape) or large (RoBERTa-large)."""
    pretrained: str = ""
    """Hugging Face model to start from (continual pretraining; overrides arch and preset): a local
    folder, or a Hub id ORG/NAME[@REVISION] (alum_ds.hub; a local folder of that name wins). BERT,
    RoBERTa, XLM-RoBERTa, DeBERTa-v2/v3, ELECTRA generator or ModernBERT, with its MLM head."""
    new_head: bool = False
    """Continue from a model.pretrained without an MLM head (ELECTRA's discriminator, a BertModel
    or sentence-transformers folder, DeBERTa-v3 without head): the head is created as the family's
    MaskedLM class initialises it, its decoder tied to the embeddings where the family ties it."""

    def checks(self) -> list[Check]:
        return [*super().checks(),
                ("model.new_head", not (self.new_head and not self.pretrained),
                 "needs model.pretrained (a model built from a preset has its head)")]


def parse_sources(key: str, value: Any) -> list[str]:
    """``data.sources`` as ``["DIR:WEIGHT", ...]`` from a TOML array of tables
    (``[[data.sources]] dir = ..., weight = ...``), a list of such strings, or the command line's
    ``DIR:W,DIR:W``. The weight is kept as written (an exact decimal or ``a/b``)."""
    from fractions import Fraction

    items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v.strip()]
    out = []
    for item in items:
        if isinstance(item, dict):
            unknown = set(item) - {"dir", "weight"}
            if unknown or "dir" not in item:
                raise ConfigError(f"{key}: each source is a table with dir and weight (got keys "
                                  f"{', '.join(sorted(map(str, item)))})")
            d, w = str(item["dir"]).strip(), str(item.get("weight", 1)).strip()
        elif isinstance(item, str):
            d, sep, w = item.strip().rpartition(":")
            if not sep or w.startswith("//"):  # no weight ("DIR", or a URL "s3://b/p"): 1
                d, w = item.strip(), "1"
        else:
            raise ConfigError(f"{key}: expected DIR:WEIGHT entries, got {item!r}")
        try:
            ok = Fraction(w) > 0
        except (ValueError, ZeroDivisionError):
            ok = False
        if not d or not ok:
            raise ConfigError(f"{key}: {item!r} needs a folder and a positive weight "
                              "(DIR:WEIGHT, e.g. data/wiki:0.7)")
        out.append(f"{d}:{w}")
    return out


def cache_dir(explicit: str = "") -> Path:
    """The node-local cache folder (the embedded default, fine-tuning tasks, mirrors of remote
    data, the verified-shard record): ``explicit``, else $ALUM_DS_CACHE, else ~/.cache/alum_ds."""
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("ALUM_DS_CACHE", Path.home() / ".cache" / "alum_ds"))


@dataclass
class DataConfig(Section):
    PARSE: ClassVar[dict[str, Any]] = {"sources": parse_sources}
    dir: str = ""
    """Prepared data folder (``alum-ds prepare``). Empty: the embedded default corpus, prepared
    into the cache folder on first use."""
    sources: list[str] = field(default_factory=list)
    """A mixture of prepared folders instead of ``data.dir``: ``DIR:WEIGHT`` entries (TOML
    ``[[data.sources]]`` tables with ``dir`` and ``weight``; ``--data.sources=A:0.7,B:0.3``). A
    weight is the share of training sequences drawn from its folder (weights are normalised to
    sum to 1); every folder must have been prepared with the same tokenizer."""
    cache_dir: str = ""
    """The node-local cache folder: the embedded default, mirrors of remote folders, the record
    of verified shards. Empty: $ALUM_DS_CACHE or ~/.cache/alum_ds."""
    cache_max_gb: float = 0.0
    """Bound on the mirrors of remote folders in the cache (GB, 10^9 bytes): mirrors no run on
    the node is using are evicted, least recently used first. 0: unbounded."""
    fetch_retry_s: float = 120.0
    """How long a read from a remote store is retried, with backoff, before the run stops."""
    seq_len: int = 32
    """Tokens per packed training sequence, including <s> and </s> (a real corpus wants 128-512)."""
    vocab_size: int = 2048
    """BPE vocabulary size learned for the embedded default."""
    seed: int = 1234
    """Seeds the global sample order of every epoch and the masks."""

    def checks(self) -> list[Check]:
        return [("data.sources", not (self.sources and self.dir),
                 "give either data.dir (one folder) or data.sources (a mixture), not both"),
                ("data.seq_len", self.seq_len >= 8, "must be at least 8"),
                ("data.cache_max_gb", self.cache_max_gb >= 0, "must be at least 0 (0: unbounded)"),
                ("data.fetch_retry_s", self.fetch_retry_s >= 0, "must be at least 0"),
                seed_check("data.seed", self.seed),
                ("data.vocab_size", self.vocab_size >= 300, "must be at least 300 (256 bytes + specials)")]


@dataclass
class MaskingConfig(Section):
    prob: float = 0.15
    """Fraction of non-special tokens selected for prediction."""
    mask_frac: float = 0.8
    """Of the selected tokens: replaced by <mask>."""
    random_frac: float = 0.1
    """Of the selected tokens: replaced by a random token (the rest stay unchanged)."""
    whole_word: bool = False
    """Select whole words (all their BPE pieces together) instead of single tokens."""

    def checks(self) -> list[Check]:
        return [("masking.prob", 0 < self.prob < 1, "must be in (0, 1)"),
                ("masking.mask_frac", 0 <= self.mask_frac <= 1, "must be in [0, 1]"),
                ("masking.random_frac", 0 <= self.random_frac <= 1 - self.mask_frac,
                 "must be in [0, 1 - masking.mask_frac]")]


@dataclass
class AlumConfig(Section):
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"norm": ("linf", "l2"),
                                                     "update": ("project", "normalize"),
                                                     "perturbation": ("adversarial", "random", "table")}
    enabled: bool = True
    """False: plain MLM through the same code path."""
    alpha: float = 10.0
    """Weight of the symmetric-KL regulariser (10 for pretraining, 1 for fine-tuning)."""
    sigma: float = 1e-5
    """Standard deviation of the initial random perturbation."""
    eta: float = 1e-3
    """Ascent step size (per-token norm of each ascent step)."""
    epsilon: float = 1e-3
    """Projection radius per token for the ``project`` rule."""
    ascent_steps: int = 1
    """K, the number of ascent steps."""
    norm: str = "linf"
    """Per-token norm of the ascent: linf (paper default) or l2."""
    update: str = "project"
    """``project`` (paper, Algorithm 1) or ``normalize`` (authors' later code)."""
    start_step: int = 0
    """Optimizer step from which ALUM is on; plain MLM before it (the paper's curriculum). Set
    this or start_fraction: setting one clears the other."""
    start_fraction: float = 0.9
    """ALUM from this fraction of the run's steps (rounded down): 0.9 trains plain MLM for the
    first 90% and ALUM for the last 10%, the paper's curriculum ("ALUM for the last part of
    training") at any run length. 0: start_step decides."""
    min_surviving_fraction: float = 0.5
    """Precision guard: the fraction of the intended perturbation norm that must survive the cast
    to the model's dtype; below it the step stops with a message naming a radius that survives."""
    perturbation: str = "adversarial"
    """``adversarial`` (ALUM: delta ascends the KL) or ``random``: a control that replaces each
    ascent direction by Gaussian noise, normalised and projected the same way (delta of the same
    radius, no ascent pass): tells whether the adversarial direction matters or any noise does.
    ``table``: the warm-started "free" perturbation (Shafahi et al. 2019, Zhu et al. 2020): delta
    is read from a per-token-id table of earlier perturbations (plus the sigma noise), projected
    to the epsilon ball, with no ascent pass; the gradient w.r.t. delta that the step's one
    backward computes anyway moves the table's rows an eta step up the KL (docs/ALUM.md,
    "Cheaper variants"). A step is a clean forward, a perturbed forward and one backward."""
    every_k_steps: int = 1
    """The adversarial term on every k-th optimizer step from ALUM's start only (plain MLM
    steps between); 1: every step (exact ALUM)."""
    row_fraction: float = 1.0
    """The adversarial passes (ascent and adversarial) on this fraction of each micro-batch's
    sequences, drawn at random per micro-step (at least one); the clean pass and the MLM loss
    on all of them. The adversarial term stays a mean over the masked tokens it ran on. 1: all
    (exact ALUM). Pretraining only."""
    fused_first_pass: bool = False
    """Run the clean pass and the first perturbed pass as one forward over a doubled batch (they
    are independent: delta_0 is random). Same loss and gradients, but the ascent's backward and
    the clean part of the final backward then run over both halves (11 forward-equivalents, not
    8). Off by default: on the CPU 2.94x a plain step against 2.32x unfused, and more memory
    (docs/performance.md); it may pay on a GPU at small micro-batches (bench/bench_alum.py).
    Not supported under ZeRO-3."""

    def on_at(self, step: int, start: int) -> bool:
        """Whether optimizer step ``step`` (0-based) runs the adversarial term, ALUM starting at
        ``start``."""
        return self.enabled and step >= start and (step - start) % self.every_k_steps == 0

    def start_for(self, total_steps: int) -> int:
        """The first optimizer step with ALUM on in a run of ``total_steps``."""
        if self.start_fraction > 0:
            return int(self.start_fraction * total_steps)
        return self.start_step

    def checks(self) -> list[Check]:
        return [("alum.alpha", self.alpha >= 0, "must be >= 0"),
                ("alum.sigma", self.sigma >= 0, "must be >= 0"),
                ("alum.eta", self.eta > 0, "must be > 0"),
                ("alum.epsilon", self.epsilon > 0, "must be > 0"),
                ("alum.ascent_steps", self.ascent_steps >= 1, "must be >= 1"),
                ("alum.start_step", self.start_step >= 0, "must be >= 0"),
                ("alum.start_fraction", 0 <= self.start_fraction < 1, "must be in [0, 1)"),
                ("alum.start_fraction", not (self.start_fraction > 0 and self.start_step > 0),
                 "and alum.start_step both set: set one of the two"),
                ("alum.fused_first_pass",
                 not (self.fused_first_pass and self.perturbation in ("random", "table")),
                 f"fuses the ascent's first pass, which alum.perturbation={self.perturbation} does not run"),
                ("alum.every_k_steps", self.every_k_steps >= 1, "must be >= 1"),
                ("alum.row_fraction", 0 < self.row_fraction <= 1, "must be in (0, 1]"),
                ("alum.row_fraction", not (self.fused_first_pass and self.row_fraction < 1),
                 "below 1 does not combine with alum.fused_first_pass=true: set one of the two")]


@dataclass
class OptimConfig(Section):
    lr: float = 5e-4
    """Peak learning rate."""
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float = 1.0
    """Gradient clipping (global norm); 0 disables."""

    def checks(self) -> list[Check]:
        return [("optim.lr", self.lr > 0, "must be > 0"),
                ("optim.weight_decay", self.weight_decay >= 0, "must be >= 0"),
                ("optim.betas", all(0 <= b < 1 for b in self.betas), "must be two numbers in [0, 1)"),
                ("optim.eps", self.eps > 0, "must be > 0"),
                ("optim.grad_clip", self.grad_clip >= 0, "must be >= 0")]


@dataclass
class ScheduleBase(Section):
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"decay": ("linear", "polynomial", "constant")}
    steps: int = 300
    """Optimizer steps of the run."""
    warmup_steps: int = 30
    """Linear warmup steps (set this or warmup_fraction: setting one clears the other)."""
    warmup_fraction: float = 0.0
    """Warmup as a fraction of the run's steps (rounded down); 0: warmup_steps decides."""
    micro_batch_size: int = 8
    """Sequences (examples) per rank per micro-step."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    decay: str = "linear"
    """Decay after warmup to 0 at the last step: linear, polynomial (RoBERTa's; see power) or
    constant."""
    power: float = 1.0
    """Exponent of the polynomial decay: lr x (1 - progress) ** power (1.0 equals linear)."""

    def warmup_for(self, total_steps: int) -> int:
        """The warmup in optimizer steps for a run of ``total_steps``."""
        if self.warmup_fraction > 0:
            return int(self.warmup_fraction * total_steps)
        return self.warmup_steps

    def checks(self) -> list[Check]:
        return [("schedule.steps", self.steps >= 1, "must be >= 1"),
                ("schedule.warmup_steps", self.warmup_steps >= 0, "must be >= 0"),
                ("schedule.warmup_fraction", 0 <= self.warmup_fraction < 1, "must be in [0, 1)"),
                ("schedule.warmup_fraction", not (self.warmup_fraction > 0 and self.warmup_steps > 0),
                 "and schedule.warmup_steps both set: set one of the two"),
                ("schedule.micro_batch_size", self.micro_batch_size >= 1, "must be >= 1"),
                ("schedule.grad_accum", self.grad_accum >= 1, "must be >= 1"),
                ("schedule.power", self.power > 0, "must be > 0")]


@dataclass
class ScheduleConfig(ScheduleBase):
    grad_accum: int = 1
    """Micro-steps per optimizer step (leave at 1 when global_batch_size is set)."""
    global_batch_size: int = 0
    """Sequences per optimizer step over all ranks. 0: micro_batch_size x grad_accum x ranks. Set,
    the accumulation is derived (global / (micro_batch_size x ranks)), so a run resumed on another
    number of ranks keeps its global batch."""
    max_tokens: int = 0
    """Token budget: stop once the run has consumed this many training tokens (sequences x
    data.seq_len); the schedule then ends there. 0: no budget, schedule.steps decides."""

    def checks(self) -> list[Check]:
        return [*super().checks(),
                ("schedule.global_batch_size", self.global_batch_size >= 0, "must be >= 0"),
                ("schedule.grad_accum", not (self.global_batch_size and self.grad_accum != 1),
                 "is derived from schedule.global_batch_size: set one of the two"),
                ("schedule.max_tokens", self.max_tokens >= 0, "must be >= 0")]


@dataclass
class EvalConfig(Section):
    every: int = 0
    """Evaluate (masked-LM loss and perplexity on the held-out split) every N optimizer steps; the
    run always evaluates at its end. 0: only at the end."""
    max_sequences: int = 512
    """Held-out sequences per evaluation (0: all of them)."""
    fill_mask: int = 3
    """At its end the run exports its model and shows this many held-out sentences with one word
    masked, the model's top-3 fill-ins beside the true word (0: none)."""
    adv_kl_sequences: int = 64
    """Held-out sequences on which each evaluation also measures adversarial smoothness (the
    largest symmetric KL between clean and perturbed predictions at the masked tokens within an
    L-inf ball of alum.epsilon and of 3 x alum.epsilon per token: ``eval_adv_kl_eps``,
    ``eval_adv_kl_3eps``; alum_ds.smoothness). 0: not measured."""
    adv_kl_steps: int = 3
    """PGD steps of that measure (each a forward and a backward to the perturbation only)."""

    def checks(self) -> list[Check]:
        return [("eval.every", self.every >= 0, "must be >= 0"),
                ("eval.adv_kl_sequences", self.adv_kl_sequences >= 0, "must be >= 0"),
                ("eval.adv_kl_steps", self.adv_kl_steps >= 1, "must be >= 1"),
                ("eval.max_sequences", self.max_sequences >= 0, "must be >= 0"),
                ("eval.fill_mask", self.fill_mask >= 0, "must be >= 0")]


@dataclass
class CheckpointConfig(Section):
    every: int = 0
    """Save every N optimizer steps (0: only at the end)."""
    keep: int = 3
    """How many checkpoints to keep; the one `latest` points to is never removed."""

    def checks(self) -> list[Check]:
        return [("checkpoint.every", self.every >= 0, "must be >= 0"),
                ("checkpoint.keep", self.keep >= 1, "must be >= 1")]


@dataclass
class GuardConfig(Section):
    """The divergence policy (``alum_ds.guard``): what a step with a non-finite loss or gradient
    norm, or a loss spike, does to the run and to its checkpoints."""

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"action": ("rollback", "stop")}

    enabled: bool = True
    """Check every step's loss and gradient norm (no extra host sync: the values ride on the
    step's own all-reduce); false: no step is skipped and saves are not checked."""
    max_nonfinite: int = 3
    """This many optimizer steps in a row with a non-finite loss or gradient norm (each skipped:
    no optimizer update) trigger ``action``."""
    spike_factor: float = 2.0
    """A step's masked-LM loss above this multiple of the running median is a spike (0: off)."""
    spike_window: int = 100
    """Steps in the running median (spikes are not added to it); spikes are judged once it holds
    10 steps or the whole window, whichever is fewer."""
    spike_steps: int = 10
    """This many spiking steps in a row trigger ``action``."""
    action: str = "rollback"
    """``rollback``: reload the newest healthy checkpoint, skip the data seen since it and go on
    (the PaLM recipe); ``stop``: end the run with a one-line error (exit code 3)."""
    max_rollbacks: int = 3
    """Rollbacks allowed in one invocation; one more divergence stops the run."""

    def checks(self) -> list[Check]:
        return [("guard.max_nonfinite", self.max_nonfinite >= 1, "must be >= 1"),
                ("guard.spike_factor", self.spike_factor == 0 or 1 < self.spike_factor < math.inf,
                 "must be 0 (off) or a finite number above 1"),
                ("guard.spike_window", self.spike_window >= 1, "must be >= 1"),
                ("guard.spike_steps", self.spike_steps >= 1, "must be >= 1"),
                ("guard.max_rollbacks", self.max_rollbacks >= 0, "must be >= 0")]


@dataclass
class LoggingConfig(Section):
    every: int = 10
    """Log metrics every N optimizer steps."""
    tensorboard: bool = True
    wandb: bool = False
    """Also log to Weights & Biases (needs ``pip install wandb``; not a dependency)."""
    wandb_project: str = "alum_ds"
    """Weights & Biases project name."""

    def checks(self) -> list[Check]:
        return [("logging.every", self.every >= 1, "must be >= 1")]


class Config:
    """A root config: its dataclass fields are sections. ``EXCLUSIVE`` pairs of keys are
    alternatives: setting one (in a file or an override) clears the other's default."""

    EXCLUSIVE: ClassVar[tuple[tuple[str, str], ...]] = (
        ("schedule.warmup_steps", "schedule.warmup_fraction"),
        ("alum.start_step", "alum.start_fraction"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@dataclass
class RunConfig(Config):
    """Pretraining. The defaults are the main job: the tiny preset on the embedded corpus, tuned
    to learn context within minutes on two CPU cores. ``recipes/main_job.toml`` holds the same
    values with the reason for each; the other recipes there are real corpora and models."""

    run: RunSection = field(default_factory=RunSection)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(dropout=0.0))
    data: DataConfig = field(default_factory=DataConfig)
    masking: MaskingConfig = field(default_factory=lambda: MaskingConfig(prob=0.4))
    alum: AlumConfig = field(default_factory=AlumConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-3))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(
        steps=1250, warmup_steps=100, micro_batch_size=32))
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def fingerprint(self, *, without: tuple[str, ...] = ()) -> str:
        """Hash of the values that change what a run computes (not where it writes); ``without``
        leaves further sections out (``run.branch_from`` compares configs without ``alum``)."""
        d = self.to_dict()
        for section in without:
            d.pop(section, None)
        d.pop("run", None)
        d.pop("logging", None)
        d.pop("checkpoint", None)
        d.pop("eval", None)
        d.pop("guard", None)  # how a divergence is handled, not what a healthy step computes
        for key in ("cache_dir", "cache_max_gb", "fetch_retry_s"):  # where and how data is
            d["data"].pop(key, None)  # cached and fetched, not what it is
        if not d["model"].get("new_head"):  # off: the hash of every config that never sets it
            d["model"].pop("new_head", None)
        if not d["data"].get("sources"):
            d["data"].pop("sources", None)  # one folder: the hash of runs made before mixtures
        for key in ("steps", "max_tokens"):  # extending a run is allowed
            d["schedule"].pop(key, None)
        if self.schedule.global_batch_size:
            # The global batch is fixed; how it is split into micro-batches may change with the
            # number of ranks (the gradient is normalised over the whole step either way).
            d["schedule"].pop("micro_batch_size", None)
            d["schedule"].pop("grad_accum", None)
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


C = typing.TypeVar("C", bound=Config)


def _coerce(where: str, tp: Any, value: Any) -> Any:
    """Convert ``value`` (from a file or a command-line string) to the field's type."""
    origin = typing.get_origin(tp)
    if origin is tuple or origin is list:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        args = typing.get_args(tp)
        if origin is list:
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{where}: expected a list (comma-separated), got {value!r}")
            return [_coerce(where, args[0], v) for v in value]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} comma-separated values, got {value!r}")
        return tuple(_coerce(where, a, v) for a, v in zip(args, value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value).strip()
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _set(cfg: Config, dotted: str, value: Any) -> str:
    section, _, key = dotted.partition(".")
    sections = _field_types(type(cfg))
    if section not in sections or not key:
        raise ConfigError(f"unknown config key {dotted!r} (sections: {', '.join(sections)})")
    sec_obj = getattr(cfg, section)
    fields = _field_types(type(sec_obj))
    if key not in fields:
        raise ConfigError(f"unknown config key {dotted!r} (keys of [{section}]: {', '.join(fields)})")
    parse = sec_obj.PARSE.get(key)
    setattr(sec_obj, key, parse(dotted, value) if parse else _coerce(dotted, fields[key], value))
    return f"{section}.{key}"


def _clear_alternatives(cfg: Config, explicit: set[str]) -> None:
    for a, b in cfg.EXCLUSIVE:
        for mine, other in ((a, b), (b, a)):
            if mine in explicit and other not in explicit:
                section, _, key = other.partition(".")
                sec = getattr(cfg, section)
                setattr(sec, key, type(getattr(sec, key))())  # 0 / 0.0 / "" / False


def _check_finite(name: str, sec: Section) -> None:
    """Every float setting, alone or in a tuple/list: finite and within fp32's range (an ``inf``
    learning rate passed ``> 0`` and trained NaNs; ``1e300`` becomes inf in the step's tensors);
    every integer within int64 (numpy and torch take no more)."""
    for key in _field_types(type(sec)):
        value = getattr(sec, key)
        values = value if isinstance(value, (tuple, list)) else (value,)
        for v in values:
            if isinstance(v, float) and not (math.isfinite(v) and abs(v) <= FLOAT_LIMIT):
                raise ConfigError(f"{name}.{key}: {v!r} is not a finite number within fp32's range "
                                  f"(|x| <= {FLOAT_LIMIT:.3g})")
            if isinstance(v, int) and not isinstance(v, bool) and not -SEED_LIMIT <= v < SEED_LIMIT:
                raise ConfigError(f"{name}.{key}: {v} is outside the 64-bit integer range")


def validate(cfg: Config) -> None:
    """Raise ConfigError (one line, naming the key) for the first value a section refuses."""
    for name in _field_types(type(cfg)):
        sec = getattr(cfg, name)
        for key, choices in sec.CHOICES.items():
            if getattr(sec, key) not in choices:
                raise ConfigError(f"{name}.{key}: {getattr(sec, key)!r} is not one of {', '.join(choices)}")
        for key, ok, msg in sec.checks():
            if not ok:
                raise ConfigError(f"{key}: {msg}")
        _check_finite(name, sec)  # after the section's own checks: theirs name the range


class DuplicateKeyError(ValueError):
    """A JSON object names one key twice (``json`` keeps the last silently)."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(key)
        out[key] = value
    return out


def loads_json(text: str) -> Any:
    """``json.loads`` that refuses a key given twice in one object (DuplicateKeyError, a
    ValueError naming the key): the last one would otherwise win without a word."""
    return json.loads(text, object_pairs_hook=_no_duplicates)


def read_config_file(path: str) -> dict[str, dict[str, Any]]:
    """A TOML or JSON config file as {section: {key: value}}; one-line ConfigError otherwise."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        if p.suffix == ".json":
            data = loads_json(p.read_text())
        elif tomllib is None:
            raise ConfigError(f"config file {path}: TOML needs Python 3.11+, use JSON")
        else:
            data = tomllib.loads(p.read_text())
    except ConfigError:
        raise
    except DuplicateKeyError as e:
        raise ConfigError(f"config file {path} gives the key {e.args[0]!r} twice in one table: "
                          "keep one (the last would win silently)") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSON and TOML decode errors are ValueErrors
        raise ConfigError(f"config file {path} is malformed: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of sections")
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path}: [{section}] must be a table")
    return data


def load_config(path: str | None = None, overrides: typing.Sequence[str] = (),
                cls: type[C] = RunConfig) -> C:  # type: ignore[assignment]
    """Build a ``cls`` config from its defaults, an optional TOML/JSON file, then ``key=value``
    overrides (``--`` optional). Raises ConfigError with a one-line message for unknown keys,
    wrong types or bad values."""
    cfg = cls()
    explicit: set[str] = set()
    if path:
        for section, values in read_config_file(path).items():
            for key, value in values.items():
                explicit.add(_set(cfg, f"{section}.{key}", value))
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        key, eq, value = text.partition("=")
        if not eq:
            raise ConfigError(f"override {item!r} must look like --section.key=value")
        explicit.add(_set(cfg, key.strip(), value.strip()))
    _clear_alternatives(cfg, explicit)
    validate(cfg)
    return cfg


def config_from_dict(d: dict[str, Any], cls: type[C] = RunConfig) -> C:  # type: ignore[assignment]
    """Rebuild a config from ``to_dict`` output (e.g. a checkpoint's stored config)."""
    cfg = cls()
    for section, values in d.items():
        for key, value in values.items():
            _set(cfg, f"{section}.{key}", value)
    validate(cfg)
    return cfg


def grad_accum_for(cfg: RunConfig, world: int) -> int:
    """Micro-steps per optimizer step on ``world`` ranks: schedule.grad_accum, or derived from
    schedule.global_batch_size (a one-line ConfigError when the ranks cannot divide it)."""
    sched = cfg.schedule
    if not sched.global_batch_size:
        return sched.grad_accum
    per_micro_step = sched.micro_batch_size * world
    if sched.global_batch_size % per_micro_step:
        raise ConfigError(
            f"schedule.global_batch_size={sched.global_batch_size} is not a multiple of "
            f"schedule.micro_batch_size={sched.micro_batch_size} x {world} rank(s) = "
            f"{per_micro_step}: change one of them"
        )
    return sched.global_batch_size // per_micro_step


@dataclass(frozen=True)
class Batching:
    """A run's batch arithmetic on its world: derived from the config, never written back into it."""

    micro_batch: int
    """Sequences (examples) per rank per micro-step."""
    accum: int
    """Micro-steps per optimizer step."""
    world: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accum * self.world


def batching_for(cfg: RunConfig, world: int) -> Batching:
    """Pretraining's batching on ``world`` ranks (the accumulation from ``grad_accum_for``)."""
    return Batching(cfg.schedule.micro_batch_size, grad_accum_for(cfg, world), world)


__all__ = [
    "ConfigError",
    "Config",
    "RunConfig",
    "load_config",
    "config_from_dict",
    "read_config_file",
    "validate",
    "grad_accum_for",
    "Batching",
    "batching_for",
]
