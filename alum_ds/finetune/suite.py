"""``alum-ds evaluate CHECKPOINT... --suite glue|anli|FILE.toml``: fine-tune every task of a suite
(plainly, with ALUM or both, over several seeds) and write the paper's table.

A suite is a TOML file: ``[suite]`` (name, description), ``[defaults]`` (fine-tuning settings
for every task, as ``"section.key" = value``) and one ``[[tasks]]`` table per task: its data
(``train``: one source or a list, concatenated; ``validation``; ``eval``: further evaluation
sets by column name), columns, labels, ``type``, ``metrics``, ``config`` (its settings) and
``ranges`` (the published search space the defaults were taken from, recorded in suite.json).
The shipped suites are package data (``alum_ds/finetune/suites/``).

Every fine-tuning is one call of ``alum_ds.finetune.loop.finetune`` (what ``alum-ds finetune``
runs) into ``OUT/runs/MODEL/TASK/MODE-seedK/``; its record ``suite_result.json`` holds the config
it ran with, and a rerun skips every run whose record matches. Everything a run can refuse (data,
columns, labels, settings) is checked for every task before the first one trains.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from alum_ds import records
from alum_ds.config import ConfigError, load_config
from alum_ds.data.shards import DataError
from alum_ds.finetune import data as FD
from alum_ds.finetune import metrics as FM
from alum_ds.finetune.config import FinetuneConfig

try:  # Python 3.11+; on 3.10 suites cannot be read
    import tomllib
except ImportError:  # pragma: no cover
    tomllib = None  # type: ignore[assignment]

MODES = {"plain": ("plain",), "alum": ("alum",), "both": ("plain", "alum")}
# Fine-tuning settings the runner owns: a suite or the command line must not set them.
OWNED = ("run.dir", "run.seed", "task.checkpoint", "task.train", "task.validation", "task.adv_eval",
         "alum.enabled")
TASK_KEYS = {"name", "train", "validation", "eval", "table", "pool", "text_column",
             "text_pair_column", "label_column", "labels", "type", "metrics", "drop_labels",
             "config", "ranges", "validation_name"}


def shipped() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in resources.files("alum_ds.finetune.suites").iterdir()
                  if p.name.endswith(".toml"))


@dataclass
class Task:
    name: str
    train: list[str]
    validation: list[str]
    """One source or several (pooled)."""
    evals: dict[str, str]
    """Further evaluation sets: column name -> source."""
    table: list[str]
    """The columns this task contributes to the table, in order (validation, evals, pools)."""
    pool: dict[str, list[str]]
    """Pooled columns: name -> the eval columns whose examples it pools (accuracy only)."""
    columns: FD.Columns
    labels: list[str]
    type: str
    metrics: list[str]
    drop_labels: list[str]
    config: dict[str, Any]
    ranges: dict[str, Any]
    validation_name: str

    def settings(self) -> dict[str, Any]:
        """The task's own fine-tuning settings (its data and columns excluded)."""
        out = {"task.type": self.type, "task.metrics": self.metrics,
               "task.text_column": self.columns.text, "task.text_pair_column": self.columns.pair,
               "task.label_column": self.columns.label, "task.labels": self.labels}
        return {**out, **self.config}


@dataclass
class Suite:
    name: str
    description: str
    source: str
    defaults: dict[str, Any]
    tasks: list[Task]
    notes: list[str] = field(default_factory=list)


def _fmt(v: Any) -> str:
    """A setting as ``load_config`` reads it from the command line."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return ",".join(_fmt(x) for x in v)
    return str(v)


def _str_list(v: Any, where: str) -> list[str]:
    if isinstance(v, str):
        return [v] if v else []
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return list(v)
    raise ConfigError(f"{where}: expected a string or a list of strings, got {v!r}")


def _settings(d: Any, where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a table of \"section.key\" = value")
    for k in d:
        if k in OWNED:
            raise ConfigError(f"{where}: {k} is set by the suite runner (per task, mode and seed)")
    return dict(d)


def _task(d: dict[str, Any], where: str) -> Task:
    if not isinstance(d.get("name"), str) or not d["name"]:
        raise ConfigError(f"{where}: every task needs a name")
    name = d["name"]
    where = f"{where}, task {name}"
    unknown = sorted(set(d) - TASK_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (keys: {', '.join(sorted(TASK_KEYS))})")
    train = _str_list(d.get("train", ""), f"{where}: train")
    if not train:
        raise ConfigError(f"{where}: needs train (a data source or a list of them)")
    validation = _str_list(d.get("validation", ""), f"{where}: validation")
    if not validation:
        raise ConfigError(f"{where}: needs validation (a data source or a list of them)")
    evals = d.get("eval", {})
    if not isinstance(evals, dict) or not all(isinstance(v, str) for v in evals.values()):
        raise ConfigError(f"{where}: eval is a table of column name = data source")
    if len(set(evals.values())) != len(evals) or set(evals.values()) & {*validation}:
        raise ConfigError(f"{where}: an eval set repeats a data source (each set once)")
    kind = d.get("type", "classification")
    if kind not in ("classification", "regression"):
        raise ConfigError(f"{where}: type {kind!r} is not classification or regression")
    metrics = _str_list(d.get("metrics", []), f"{where}: metrics") or list(FM.defaults(kind))
    allowed = FM.CLASSIFICATION if kind == "classification" else FM.REGRESSION
    bad = [m for m in metrics if m not in allowed]
    if bad:
        raise ConfigError(f"{where}: metric {bad[0]!r} is not a {kind} metric (choose from "
                          f"{', '.join(allowed)})")
    vname = d.get("validation_name", name)
    pool = d.get("pool", {})
    if not isinstance(pool, dict):
        raise ConfigError(f"{where}: pool is a table of column name = [eval columns]")
    pool = {k: _str_list(v, f"{where}: pool.{k}") for k, v in pool.items()}
    for k, members in pool.items():
        missing = [m for m in members if m not in evals]
        if missing or not members:
            raise ConfigError(f"{where}: pool.{k} pools {missing or members} which are not eval columns")
        if metrics != ["accuracy"]:
            raise ConfigError(f"{where}: pool.{k} pools accuracy only; set metrics = [\"accuracy\"]")
    known = [vname, *evals, *pool]
    table = _str_list(d.get("table", []), f"{where}: table") or known
    missing = [c for c in table if c not in known]
    if missing:
        raise ConfigError(f"{where}: table column {missing[0]!r} is neither the validation set "
                          f"({vname}), an eval set nor a pool")
    labels = _str_list(d.get("labels", []), f"{where}: labels")
    cols = FD.Columns(d.get("text_column", "text"), d.get("text_pair_column", ""),
                      d.get("label_column", "label"))
    return Task(name, train, validation, dict(evals), table, pool, cols, labels, kind, metrics,
                _str_list(d.get("drop_labels", []), f"{where}: drop_labels"),
                _settings(d.get("config", {}), f"{where}: config"), dict(d.get("ranges", {})), vname)


def load_suite(spec: str) -> Suite:
    """A shipped suite by name, or a TOML file."""
    if spec in shipped():
        path: Any = resources.files("alum_ds.finetune.suites") / f"{spec}.toml"
        where = f"suite {spec}"
    else:
        path = Path(spec)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"--suite {spec}: neither a shipped suite ({', '.join(shipped())}) "
                              "nor a TOML file")
    if tomllib is None:
        raise ConfigError("suites are TOML files, which need Python 3.11+")
    try:
        d = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where} is not valid TOML: {e}") from None
    unknown = sorted(set(d) - {"suite", "defaults", "tasks"})
    if unknown:
        raise ConfigError(f"{where}: unknown table {unknown[0]!r} (tables: suite, defaults, tasks)")
    head = d.get("suite", {})
    tasks = d.get("tasks", [])
    if not isinstance(tasks, list) or not tasks:
        raise ConfigError(f"{where}: no [[tasks]]")
    parsed = [_task(t, where) for t in tasks]
    names = [t.name for t in parsed]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: two tasks are named {next(n for n in names if names.count(n) > 1)}")
    return Suite(head.get("name", Path(str(spec)).stem), head.get("description", ""), where,
                 _settings(d.get("defaults", {}), f"{where}: [defaults]"), parsed,
                 _str_list(head.get("notes", []), f"{where}: notes"))


# ------------------------------------------------------------------------------ the runs


@dataclass
class Plan:
    suite: Suite
    models: list[tuple[str, str]]
    """(label, checkpoint) per model row."""
    modes: tuple[str, ...]
    seeds: int
    out: Path
    overrides: list[str]
    ds_path: str
    config_file: str | None = None
    """A fine-tuning config file (TOML/JSON) under the suite's settings, as --config."""


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") or "model"


# The runner's own defaults, under every suite's: no model folder per run (a suite is dozens of
# runs) and no PGD attack (robust accuracy is not in the paper's tables).
RUNNER_DEFAULTS = {"run.save_model": False, "eval.pgd_steps": 0}


def _config(plan: Plan, task: Task, mode: str, seed: int, checkpoint: str, run_dir: Path,
            data: dict[str, str]) -> FinetuneConfig:
    items = {**RUNNER_DEFAULTS, **plan.suite.defaults, **task.settings()}
    overrides = [f"{k}={_fmt(v)}" for k, v in items.items()]
    overrides += [f"task.checkpoint={checkpoint}", f"task.train={data['train']}",
                  f"task.validation={data['validation']}",
                  f"task.adv_eval={','.join(data[c] for c in task.evals)}",
                  f"alum.enabled={'true' if mode == 'alum' else 'false'}"]
    overrides += plan.overrides
    cfg = load_config(plan.config_file, overrides, cls=FinetuneConfig)
    cfg.run.dir = str(run_dir)
    cfg.run.seed = cfg.run.seed + seed
    return cfg


def _read(spec: str, task: Task, role: str) -> FD.Examples:
    try:
        ex = FD.read_examples(spec, task.columns, role)
    except DataError as e:
        raise DataError(f"suite task {task.name}: {e}") from None
    if task.drop_labels:
        keep = [i for i, y in enumerate(ex.labels) if y not in task.drop_labels]
        ex = FD.Examples([ex.texts[i] for i in keep],
                         None if ex.pairs is None else [ex.pairs[i] for i in keep],
                         [ex.labels[i] for i in keep], [ex.rows[i] for i in keep], ex.source)
        if not len(ex):
            raise DataError(f"suite task {task.name}: {spec} has no examples left after drop_labels")
    return ex


def _write_jsonl(ex: FD.Examples, cols: FD.Columns, path: Path, sources: list[str]) -> None:
    meta = path.with_suffix(".sources.json")
    want = {"sources": sources, "columns": [cols.text, cols.pair, cols.label], "examples": len(ex)}
    if path.is_file() and meta.is_file() and json.loads(meta.read_text()) == want:
        return
    tmp = path.with_name(f"{path.name}.partial.{os.getpid()}")  # every rank writes the same file
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(len(ex)):
            r = {cols.text: ex.texts[i], cols.label: ex.labels[i]}
            if ex.pairs is not None:
                r[cols.pair] = ex.pairs[i]
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
    meta_tmp = meta.with_name(f"{meta.name}.{os.getpid()}")
    meta_tmp.write_text(json.dumps(want))
    meta_tmp.replace(meta)


Pending = list[tuple[FD.Examples, FD.Columns, Path, list[str]]]


def check_task(task: Task, data_dir: Path) -> tuple[dict[str, str], Pending]:
    """Read every source of ``task`` (a one-line DataError naming the task on any problem) and
    return the specs its fine-tunings read: the sources themselves, or, for a set of several
    sources or a task with ``drop_labels``, a JSON lines file in ``data_dir``, returned as a
    pending write (written once every task has passed its checks)."""
    roles = {"train": task.train, "validation": task.validation,
             **{c: [s] for c, s in task.evals.items()}}
    read = {k: [_read(s, task, "train" if k == "train" else "validation" if k == "validation"
                      else "adversarial") for s in specs] for k, specs in roles.items()}
    train = read["train"]
    if task.type == "regression":
        for exs in read.values():
            for ex in exs:
                try:
                    FD.RealLabels().ids(ex)
                except DataError as e:
                    raise DataError(f"suite task {task.name}: {e}") from None
    else:
        labels = FD.LabelSet(task.labels) if task.labels else FD.LabelSet.from_examples(
            FD.Examples([], None, [y for ex in train for y in ex.labels], [], ""))
        for exs in read.values():
            for ex in exs:
                try:
                    labels.ids(ex)
                except DataError as e:
                    raise DataError(f"suite task {task.name}: {e}") from None
    specs: dict[str, str] = {}
    pending: Pending = []
    for k, exs in read.items():
        if len(exs) == 1 and not task.drop_labels:
            specs[k] = roles[k][0]
            continue
        merged = FD.Examples([t for ex in exs for t in ex.texts],
                             None if exs[0].pairs is None else [p for ex in exs for p in ex.pairs or []],
                             [y for ex in exs for y in ex.labels], [r for ex in exs for r in ex.rows],
                             " + ".join(roles[k]))
        path = data_dir / f"{_slug(task.name)}.{_slug(k)}.jsonl"
        pending.append((merged, task.columns, path, roles[k]))
        specs[k] = str(path)
    return specs, pending


def _rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _say(msg: str) -> None:
    if _rank0():
        print(f"alum-ds evaluate: {msg}", flush=True)


def run_suite(plan: Plan) -> dict[str, Any]:
    """Check every task, run what is not done yet, write OUT/suite.md, suite.json and the chart."""
    data = _checked_data(plan)
    models = dict(_consolidated(plan))
    runs = [(label, task, mode, seed) for label, _ in plan.models for task in plan.suite.tasks
            for mode in plan.modes for seed in range(plan.seeds)]
    results = [_one_run(plan, i, len(runs), label, models[label], task, mode, seed, data[task.name])
               for i, (label, task, mode, seed) in enumerate(runs, 1)]
    table = build_table(plan, results)
    if _rank0():
        write_outputs(plan, table, results)
    return table


def _checked_data(plan: Plan) -> dict[str, dict[str, str]]:
    """Every task's data and settings checked before any training, then its converted files
    written: {task: {split: path}}."""
    data: dict[str, dict[str, str]] = {}
    pending: Pending = []
    for task in plan.suite.tasks:
        data[task.name], writes = check_task(task, plan.out / "data")
        pending += writes
        for _, ckpt in plan.models:
            for mode in plan.modes:
                try:
                    _config(plan, task, mode, 0, ckpt, plan.out, data[task.name])
                except ConfigError as e:
                    raise ConfigError(f"suite task {task.name}: {e}") from None
    plan.out.mkdir(parents=True, exist_ok=True)
    for ex, cols, path, sources in pending:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_jsonl(ex, cols, path, sources)
    return data


def _consolidated(plan: Plan) -> list[tuple[str, str]]:
    """(label, checkpoint) per model. In one process a DeepSpeed run is consolidated once for all
    its fine-tunings (under a launcher each rank consolidates privately, as alum-ds finetune
    does)."""
    from alum_ds.finetune.source import _is_deepspeed

    models = []
    for label, ckpt in plan.models:
        p = Path(ckpt)
        if os.environ.get("WORLD_SIZE", "1") == "1" and p.is_dir() and _is_deepspeed(p) \
                and not (p / "config.json").is_file():
            hf = plan.out / "models" / _slug(label)
            if not (hf / "config.json").is_file():
                from alum_ds.export import export

                _say(f"consolidating {ckpt} into {hf}")
                export(ckpt, str(hf))
            ckpt = str(hf)
        models.append((label, ckpt))
    return models


def _one_run(plan: Plan, i: int, n: int, label: str, ckpt: str, task: Task, mode: str, seed: int,
             data: dict[str, str]) -> dict[str, Any]:
    """One fine-tuning of the suite, or its record from an earlier invocation."""
    run_dir = plan.out / "runs" / _slug(label) / _slug(task.name) / f"{mode}-seed{seed}"
    cfg = _config(plan, task, mode, seed, ckpt, run_dir, data)
    record = run_dir / "suite_result.json"
    what = f"task {i}/{n}: {task.name}, {mode}, seed {seed} ({label})"
    done = _read_record(record, cfg)
    if done is not None:
        _say(f"{what}: done before, skipped")
        return done
    _say(what)
    if _rank0():
        record.unlink(missing_ok=True)
    from alum_ds.finetune.loop import finetune

    res = finetune(cfg, plan.ds_path)
    rec = {"model": label, "task": task.name, "mode": mode, "seed": seed, "config": cfg.to_dict(),
           "results": {k: res[k] for k in ("validation", "adversarial", "steps")}}
    if _rank0():
        record.write_text(records.dumps(rec, indent=2))
    return rec


def _read_record(path: Path, cfg: FinetuneConfig) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        rec = records.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return rec if rec.get("config") == json.loads(json.dumps(cfg.to_dict())) else None


# ------------------------------------------------------------------------------ the table


def _column_values(task: Task, rec: dict[str, Any], col: str) -> dict[str, float]:
    """The metrics of one table column in one run's record."""
    res = rec["results"]
    by_spec = dict(zip(task.evals, res["adversarial"].values()))
    if col == task.validation_name:
        return {m: res["validation"][m] for m in task.metrics}
    if col in task.evals:
        return {m: by_spec[col][m] for m in task.metrics}
    members = [by_spec[c] for c in task.pool[col]]
    n = sum(ev["examples"] for ev in members)
    return {"accuracy": sum(ev["accuracy"] * ev["examples"] for ev in members) / n}


def build_table(plan: Plan, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows per (model, mode); per task column, each metric's mean and spread (sample standard
    deviation) over seeds."""
    columns = [(t, c) for t in plan.suite.tasks for c in t.table]
    rows = []
    for label, _ in plan.models:
        for mode in plan.modes:
            cells: dict[str, Any] = {}
            for task, col in columns:
                recs = [r for r in results if (r["model"], r["mode"], r["task"]) == (label, mode, task.name)]
                per_metric: dict[str, Any] = {}
                for m in (task.metrics if col not in task.pool else ["accuracy"]):
                    vals = [_column_values(task, r, col)[m] for r in recs]
                    arr = np.asarray(vals, dtype=np.float64)
                    per_metric[m] = {"mean": float(arr.mean()) if len(arr) else float("nan"),
                                     "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
                                     "values": vals}
                cells[col] = per_metric
            rows.append({"model": label, "mode": mode, "cells": cells})
    return {"suite": plan.suite.name, "columns": [c for _, c in columns], "rows": rows,
            "seeds": plan.seeds,
            "metrics": {c: (t.metrics if c not in t.pool else ["accuracy"]) for t, c in columns}}


def _cell(per_metric: dict[str, Any], seeds: int) -> str:
    parts = []
    for m, v in per_metric.items():
        scale = 1.0 if m == "mse" else 100.0
        if math.isnan(v["mean"]):
            parts.append("n/a")
        elif seeds > 1:
            parts.append(f"{v['mean'] * scale:.1f}±{v['std'] * scale:.1f}")
        else:
            parts.append(f"{v['mean'] * scale:.1f}")
    return "/".join(parts)


def markdown(table: dict[str, Any], suite: Suite) -> str:
    metric_names = {c: "/".join(FM.NAMES[m] for m in ms) for c, ms in table["metrics"].items()}
    head = "| model | mode | " + " | ".join(f"{c} ({metric_names[c]})" for c in table["columns"]) + " |"
    lines = [f"# {suite.name}", ""]
    if suite.description:
        lines += [suite.description, ""]
    spread = (f"mean ± sample standard deviation over {table['seeds']} seeds"
              if table["seeds"] > 1 else "one seed")
    lines += [f"Scores x100 (MSE as is), {spread}.", "", head,
              "|" + "---|" * (len(table["columns"]) + 2)]
    for row in table["rows"]:
        lines.append(f"| {row['model']} | {row['mode']} | "
                     + " | ".join(_cell(row["cells"][c], table["seeds"]) for c in table["columns"]) + " |")
    for note in suite.notes:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def chart(table: dict[str, Any], path: Path) -> bool:
    """A grouped bar chart of each column's first metric; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cols, rows = table["columns"], table["rows"]
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(cols) + 2), 4))
    x = np.arange(len(cols))
    for j, row in enumerate(rows):
        first = [next(iter(row["cells"][c].values())) for c in cols]
        ax.bar(x + (j - (len(rows) - 1) / 2) * width, [100 * v["mean"] for v in first], width,
               yerr=[100 * v["std"] for v in first], capsize=3, label=f"{row['model']} ({row['mode']})")
    ax.set_xticks(x, [f"{c}\n{FM.NAMES[table['metrics'][c][0]]}" for c in cols])
    ax.set_ylabel("score x100")
    ax.set_title(f"{table['suite']}: {table['seeds']} seed(s), mean and standard deviation")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(plan: Plan, table: dict[str, Any], results: list[dict[str, Any]]) -> None:
    suite = plan.suite
    md = markdown(table, suite)
    (plan.out / "suite.md").write_text(md)
    doc = {**table, "description": suite.description, "source": suite.source,
           "models": [{"label": lbl, "checkpoint": c} for lbl, c in plan.models],
           "modes": list(plan.modes), "overrides": plan.overrides,
           "tasks": [{"name": t.name, "train": t.train, "validation": t.validation, "eval": t.evals,
                      "type": t.type, "metrics": t.metrics, "settings": {**suite.defaults, **t.settings()},
                      "ranges": t.ranges} for t in suite.tasks],
           "runs": [{k: r[k] for k in ("model", "task", "mode", "seed")} | {"results": r["results"]}
                    for r in results]}
    (plan.out / "suite.json").write_text(records.dumps(doc, indent=2))
    print(md, end="")
    if chart(table, plan.out / "suite.png"):
        _say(f"wrote {plan.out / 'suite.md'}, suite.json and suite.png")
    else:
        _say(f"wrote {plan.out / 'suite.md'} and suite.json; no chart: matplotlib is not installed "
             "(pip install 'alum_ds[plot]')")
    sys.stdout.flush()
