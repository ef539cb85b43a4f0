"""Pretraining's evaluation: the masked-LM loss on the held-out split, the unigram line it is read
against, the held-out adversarial smoothness (``alum_ds.smoothness``), and the fill-mask showcase
of the exported model at the end of a run."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy
import torch

from alum_ds import distributed as D
from alum_ds import showcase
from alum_ds.config import RunConfig
from alum_ds.data.mixture import mixture_unigram
from alum_ds.data.shards import read_manifest
from alum_ds.data.stream import validation_batches
from alum_ds.data.tokenizer import load_tokenizer
from alum_ds.data.unigram import token_counts, unigram_line, unigram_log_probs
from alum_ds.export import export
from alum_ds.metrics import MetricsLogger

WHOLE_SPLIT_TOKENS = 1 << 18
"""A validation split of at most this many tokens (262,144; the embedded corpus's is about 50k)
is evaluated whole at the end of a run, so the figure a run ends on is the split's; evaluating
it costs a few seconds even on a CPU. Larger splits, and the periodic evaluations, take the
first ``eval.max_sequences`` sequences."""


def final_sequences(data_dir: Path, max_sequences: int) -> int:
    """The held-out sequences the final evaluation scores (0: all): all of a small split."""
    tokens = sum(s["tokens"] for s in read_manifest(data_dir)["splits"].get("validation", []))
    return 0 if tokens <= WHOLE_SPLIT_TOKENS else max_sequences


def evaluate(engine: Any, cfg: RunConfig, data_dir: Path, device: torch.device, rank: int,
             world: int, max_sequences: int = 512) -> float:
    """Masked-LM loss on the held-out split, token-weighted, reduced over ranks."""
    batches = validation_batches(data_dir, seq_len=cfg.data.seq_len, seed=cfg.data.seed,
                                 masking=cfg.masking, batch=cfg.schedule.micro_batch_size,
                                 rank=rank, world=world, max_sequences=max_sequences)
    # Every rank must run the same number of forwards (ZeRO-3 gathers collectively).
    n = torch.tensor([float(len(batches))], device=device)
    n_max = int(D.all_reduce(n, "max").item())
    total = torch.zeros(2, dtype=torch.float64)
    engine.eval()
    with torch.no_grad():
        for i in range(n_max):
            x, y = batches[i] if i < len(batches) else batches[0]
            loss, st = engine(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device), False)
            if i < len(batches):
                total += torch.tensor([float(loss) * st["rows"], st["rows"]],
                                      dtype=torch.float64)
    engine.train()
    total = D.all_reduce(total.to(device), "sum").cpu()
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def evaluate_smoothness(engine: Any, cfg: RunConfig, data_dir: Path, device: torch.device, rank: int,
                        world: int) -> dict[str, float]:
    """Held-out adversarial smoothness at alum.epsilon and 3 x alum.epsilon on the first
    ``eval.adv_kl_sequences`` validation sequences, token-weighted over batches and ranks."""
    eps = cfg.alum.epsilon
    batches = validation_batches(data_dir, seq_len=cfg.data.seq_len, seed=cfg.data.seed,
                                 masking=cfg.masking, batch=cfg.schedule.micro_batch_size,
                                 rank=rank, world=world, max_sequences=cfg.eval.adv_kl_sequences)
    n_max = int(D.all_reduce(torch.tensor([float(len(batches))], device=device), "max").item())
    total = torch.zeros(3, dtype=torch.float64)
    engine.eval()
    for i in range(n_max):  # the same number of passes on every rank (ZeRO-3 gathers collectively)
        x, y = batches[i] if i < len(batches) else batches[0]
        s, st = engine(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device), False,
                       mode="adv_kl", radii=(eps, 3 * eps), steps=cfg.eval.adv_kl_steps)
        if i < len(batches):
            rows = st["rows"]
            total += torch.tensor([*(s.double().cpu() * rows).tolist(), rows], dtype=torch.float64)
    engine.train()
    total = D.all_reduce(total.to(device), "sum").cpu()
    mean = (total[:2] / total[2]).tolist() if total[2] > 0 else [math.nan, math.nan]
    return {"eval_adv_kl_eps": mean[0], "eval_adv_kl_3eps": mean[1]}


class Validator:
    """The periodic and final evaluation of a pretraining run, logged with the unigram line."""

    def __init__(self, engine: Any, cfg: RunConfig, data_dir: Path, *, device: torch.device,
                 rank: int, world: int, log: MetricsLogger) -> None:
        self.engine, self.cfg, self.data_dir, self.log = engine, cfg, data_dir, log
        self.device, self.rank, self.world = device, rank, world
        self._unigram: dict[int, float] = {}

    def run(self, step: int, *, final: bool = False) -> float:
        """Evaluate, log ``eval_loss``, ``eval_perplexity``, ``unigram_loss`` and the line that
        reads the loss against the unigram line; return the loss. The ``final`` evaluation covers
        a small split whole (``WHOLE_SPLIT_TOKENS``)."""
        n = self.cfg.eval.max_sequences
        if final:
            n = final_sequences(self.data_dir, n)
        ev = evaluate(self.engine, self.cfg, self.data_dir, self.device, self.rank, self.world,
                      max_sequences=n)
        ppl = math.exp(min(ev, 50))
        line = self.unigram_line(n)
        record = {"eval_loss": ev, "eval_perplexity": ppl, "unigram_loss": line, "eval_sequences": n}
        if self.cfg.eval.adv_kl_sequences:
            t0 = time.time()
            record.update(evaluate_smoothness(self.engine, self.cfg, self.data_dir, self.device,
                                              self.rank, self.world))
            record["eval_adv_kl_seconds"] = time.time() - t0
        self.log.log(step, record)
        gap = line - ev
        scope = "the whole validation split" if n == 0 else f"{n} validation sequences"
        self.log.message(f"eval at step {step} on {scope}: masked-LM loss {ev:.4f}, perplexity "
                         f"{ppl:.2f}; a model of token frequencies alone: {line:.4f} (the run is "
                         f"{abs(gap):.2f} nats {'below' if gap >= 0 else 'above'} it)")
        return ev

    def unigram_line(self, max_sequences: int) -> float:
        """The eval loss a model of token frequencies alone reaches on the same targets (rank 0
        computes it once per scope: counting the training tokens is a bincount over the shards)."""
        if max_sequences not in self._unigram and self.rank == 0:
            self._unigram[max_sequences] = unigram_line(
                self.data_dir, seq_len=self.cfg.data.seq_len, seed=self.cfg.data.seed,
                masking=self.cfg.masking, max_sequences=max_sequences).eval_nats
        return self._unigram.get(max_sequences, math.nan)


class MixtureValidator(Validator):
    """A mixture's evaluation: each source's validation split on its own (``eval_loss/NAME``);
    the mixture's ``eval_loss`` is their share-weighted mean, the loss on sequences drawn as
    training draws them, read against a unigram of the mixture's token frequencies."""

    def __init__(self, engine: Any, cfg: RunConfig, stream: Any, *, device: torch.device,
                 rank: int, world: int, log: MetricsLogger) -> None:
        super().__init__(engine, cfg, stream.sources[0].dir, device=device, rank=rank, world=world,
                         log=log)
        self.stream = stream
        self._mixture_line: float | None = None

    def run(self, step: int, *, final: bool = False) -> float:
        """As ``Validator.run``; every evaluation, the final one too, reads ``eval.max_sequences``
        sequences of each source (the mixture's line is drawn on them)."""
        st, cfg = self.stream, self.cfg
        losses = [evaluate(self.engine, cfg, s.dir, self.device, self.rank, self.world,
                           max_sequences=cfg.eval.max_sequences) for s in st.sources]
        ev = float(sum(w * x for w, x in zip(st.shares, losses)))
        ppl = math.exp(min(ev, 50))
        line = self.mixture_line()
        self.log.log(step, {"eval_loss": ev, "eval_perplexity": ppl, "unigram_loss": line,
                            **{f"eval_loss/{s.name}": x for s, x in zip(st.sources, losses)}})
        per = ", ".join(f"{s.name} {x:.4f}" for s, x in zip(st.sources, losses))
        self.log.message(f"eval at step {step}: masked-LM loss {ev:.4f} (the mixture's; {per}), "
                         f"perplexity {ppl:.2f}; a model of the mixture's token frequencies alone: "
                         f"{line:.4f} (the run is {abs(line - ev):.2f} nats "
                         f"{'below' if line >= ev else 'above'} it)")
        return ev

    def mixture_line(self) -> float:
        if self._mixture_line is None and self.rank == 0:
            self._mixture_line = mixture_unigram(self.stream, seq_len=self.cfg.data.seq_len,
                                            seed=self.cfg.data.seed, masking=self.cfg.masking,
                                            max_sequences=self.cfg.eval.max_sequences)[0]
        return self._mixture_line if self._mixture_line is not None else math.nan


def show_fill_mask(run_dir: Path, data_dir: Path, cfg: RunConfig, log: MetricsLogger) -> None:
    """Rank 0: export the run's last checkpoint (as ``alum-ds export`` does) into a scratch
    folder and print the fill-mask answers for ``eval.fill_mask`` held-out sentences."""
    examples = showcase.masked_examples(data_dir, load_tokenizer(data_dir / "tokenizer"),
                                        cfg.eval.fill_mask, seq_len=cfg.data.seq_len)
    if not examples:
        return
    scratch = run_dir / "fill_mask.tmp"
    try:
        # DeepSpeed's consolidation prints, and draws a bar for two shards.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            folder = export(str(run_dir), str(scratch))
        # The model of token frequencies that the unigram line is the loss of.
        frequencies = numpy.exp(unigram_log_probs(token_counts(data_dir)))
        results = showcase.fill_mask(folder, examples, token_probs=frequencies)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    (run_dir / "fill_mask.json").write_text(json.dumps(results, indent=1))
    log.message("held-out sentences, one word masked (fill-mask on the exported model):\n"
                + "\n".join(showcase.lines(results)))
