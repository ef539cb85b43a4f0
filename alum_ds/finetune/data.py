"""Labelled examples for sequence classification: read, check, map labels, tokenize, batch.

Sources: CSV/TSV (a header row names the columns), JSON lines (or a JSON array of objects),
folders written by Hugging Face ``datasets`` (``save_to_disk``: a Dataset, or a DatasetDict whose
split is chosen by role or named as ``FOLDER@split``), and Hub datasets ``hf:NAME[:CONFIG][@SPLIT]``
(read by ``alum_ds.data.sources``, as ``alum-ds prepare`` reads them; the split chosen by role
when none is named). Texts are single (``task.text_column``) or pairs
(``task.text_pair_column``: premise/hypothesis, MNLI/ANLI style). Every problem is a one-line
``DataError`` naming the file, the row and the option that fixes it.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alum_ds.data.shards import DataError

DEFAULT_SPLITS = {
    "train": ("train",),
    "validation": ("validation", "validation_matched", "dev", "dev_r1", "test"),
    "adversarial": ("test", "test_r1", "validation", "dev"),
}


@dataclass(frozen=True)
class Columns:
    text: str = "text"
    pair: str = ""
    """Second text of a pair; empty for single texts."""
    label: str = "label"


@dataclass
class Examples:
    texts: list[str]
    pairs: list[str] | None
    labels: list[str]
    """Raw labels as strings (mapped to ids by ``LabelSet``)."""
    rows: list[str]
    """Where each example came from (``file:line``), for error messages."""
    source: str

    def __len__(self) -> int:
        return len(self.texts)


def _label_str(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()


def _records_csv(path: Path) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
    delim = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=delim)
            rows = [(f"{path}:{i + 2}", dict(r)) for i, r in enumerate(reader)]
            columns = list(reader.fieldnames or [])
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text") from None
    except csv.Error as e:
        raise DataError(f"{path} is not valid CSV: {e}") from None
    return columns, rows


def _records_json(path: Path) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text") from None
    rows: list[tuple[str, Any]] = []
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}") from None
        rows = [(f"{path}[{i}]", r) for i, r in enumerate(data)]
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError:
                raise DataError(f"{path}:{n} is not valid JSON") from None
    columns: list[str] = []
    for where, r in rows:
        if not isinstance(r, dict):
            raise DataError(f"{where} is not a JSON object")
        for k in r:
            if k not in columns:
                columns.append(k)
    return columns, rows


def _records_hf(path: Path, split: str, role: str) -> tuple[list[str], list[tuple[str, dict]], dict]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{path} is not a folder saved by datasets' save_to_disk: "
                        f"{str(e).splitlines()[0]}") from None
    return _records_dataset(ds, str(path), split, role)


def _records_hub(spec: str, option: str, role: str) -> tuple[list[str], list[tuple[str, dict]], dict]:
    from alum_ds.data.sources import HF_PREFIX, load_hub_dataset, parse_hf

    name, config, split = parse_hf(spec)
    ds = load_hub_dataset(name, config=config, split=split,
                          fix=f"its :CONFIG and @SPLIT ({option}=hf:NAME:CONFIG@SPLIT)")
    where = f"{HF_PREFIX}{name}" + (f":{config}" if config else "")
    return _records_dataset(ds, where, split, role, picked=bool(split))


def _records_dataset(ds: Any, where: str, split: str, role: str, picked: bool = False
                     ) -> tuple[list[str], list[tuple[str, dict]], dict]:
    """Rows of a Dataset or of a DatasetDict's split (``split``, or the first of the role's
    usual names); ``picked``: ``ds`` is already that split."""
    import datasets

    path = where
    if picked:
        where = f"{where}@{split}"
    elif isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        if split:
            if split not in ds:
                raise DataError(f"{path} has no split {split!r} (splits: {', '.join(names)})")
        else:
            found = [s for s in DEFAULT_SPLITS[role] if s in ds]
            if not found:
                raise DataError(f"{path} holds splits {', '.join(names)}: name one as {path}@SPLIT")
            split = found[0]
        ds = ds[split]
        where = f"{path}@{split}"
    elif split:
        raise DataError(f"{path} is a single dataset without splits; drop '@{split}'")
    features = dict(ds.features)
    names_of = {k: f.names for k, f in features.items() if isinstance(f, datasets.ClassLabel)}
    rows = [(f"{where}[{i}]", r) for i, r in enumerate(ds)]
    return list(ds.column_names), rows, names_of


def read_examples(spec: str, cols: Columns, role: str) -> Examples:
    """Read one data source (see the module docstring); ``role`` picks a DatasetDict split."""
    option = {"adversarial": "task.adv_eval"}.get(role, f"task.{role}")
    from alum_ds.data.sources import HF_PREFIX

    if spec.startswith(HF_PREFIX):
        return _examples(spec, cols, *_records_hub(spec, option, role), option)
    path, split = Path(spec), ""
    if not path.exists() and "@" in spec:
        base, _, split = spec.rpartition("@")
        path = Path(base)
    if not path.exists():
        raise DataError(f"{option} {spec}: no such file or folder")
    class_names: dict[str, list[str]] = {}
    if path.is_dir():
        columns, rows, class_names = _records_hf(path, split, role)
    elif path.suffix.lower() in (".csv", ".tsv"):
        columns, rows = _records_csv(path)
    elif path.suffix.lower() in (".jsonl", ".json"):
        columns, rows = _records_json(path)
    else:
        raise DataError(f"{option} {spec}: unsupported data file (use .csv, .tsv, .jsonl, .json, a "
                        "folder saved by datasets' save_to_disk or hf:NAME[:CONFIG][@SPLIT])")
    return _examples(spec, cols, columns, rows, class_names, option)


def _examples(spec: str, cols: Columns, columns: list[str], rows: list[tuple[str, dict[str, Any]]],
              class_names: dict[str, list[str]], option: str) -> Examples:
    """Checked examples from rows (``class_names``: a ClassLabel column's names by id)."""
    if not rows:
        raise DataError(f"{option} {spec}: no examples")
    for name, flag in ((cols.text, "task.text_column"), (cols.pair, "task.text_pair_column"),
                       (cols.label, "task.label_column")):
        if name and name not in columns:
            raise DataError(f"{spec} has no column {name!r} (columns: {', '.join(columns)}); "
                            f"choose one with {flag}")
    texts, pairs, labels, where = [], [] if cols.pair else None, [], []
    for loc, r in rows:
        for name in (cols.text, cols.pair):
            if name and (r.get(name) is None or not isinstance(r.get(name), str)):
                raise DataError(f"{loc}: column {name!r} is missing or not text")
        raw = r.get(cols.label)
        if cols.label in class_names and isinstance(raw, int) and 0 <= raw < len(class_names[cols.label]):
            raw = class_names[cols.label][raw]
        label = _label_str(raw)
        if label is None or label == "":
            raise DataError(f"{loc}: no label in column {cols.label!r}")
        texts.append(r[cols.text])
        if pairs is not None:
            pairs.append(r[cols.pair])
        labels.append(label)
        where.append(loc)
    return Examples(texts, pairs, labels, where, spec)


class LabelSet:
    """Labels <-> ids. Given explicitly (``task.labels=a,b,c``: ids in that order) or taken from the
    training data (sorted; numerically when every label is an integer)."""

    def __init__(self, names: list[str]) -> None:
        if len(names) < 2:
            raise DataError(f"a classification task needs at least 2 labels, got {names}")
        if len(set(names)) != len(names):
            raise DataError(f"the label set repeats a label: {names}")
        self.names = list(names)
        self.index = {n: i for i, n in enumerate(self.names)}

    @classmethod
    def from_examples(cls, ex: Examples) -> LabelSet:
        found = sorted(set(ex.labels))
        if all(_is_int(x) for x in found):
            found.sort(key=int)
        return cls(found)

    def ids(self, ex: Examples) -> np.ndarray:
        out = np.empty(len(ex), dtype=np.int64)
        for i, label in enumerate(ex.labels):
            if label not in self.index:
                shown = ", ".join(self.names[:10]) + (", ..." if len(self.names) > 10 else "")
                raise DataError(f"{ex.rows[i]}: label {label!r} is not in the label set ({shown}); "
                                "set the label set with task.labels")
            out[i] = self.index[label]
        return out


class RealLabels:
    """A regression target (``task.type=regression``): each label read as a real number; the
    model has one output, named ``score``."""

    names = ["score"]

    def ids(self, ex: Examples) -> np.ndarray:
        out = np.empty(len(ex), dtype=np.float32)
        for i, label in enumerate(ex.labels):
            try:
                out[i] = float(label)
            except ValueError:
                raise DataError(f"{ex.rows[i]}: label {label!r} is not a number (task.type="
                                "regression needs real-valued labels)") from None
            if not np.isfinite(out[i]):
                raise DataError(f"{ex.rows[i]}: label {label!r} is not a finite number")
        return out


def _is_int(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return False
    return True


@dataclass
class Encoded:
    """Token ids per example (unpadded) and label ids; batches are padded to their longest row."""

    ids: list[list[int]]
    labels: np.ndarray
    source: str
    pairs: bool = False
    token_types: list[list[int]] | None = None
    """Segment ids per example, where the tokenizer gives them (BERT-style pairs); None else."""

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, index: np.ndarray | list[int], pad_id: int) -> dict[str, np.ndarray]:
        """``input_ids``, ``attention_mask``, ``labels`` (and ``token_type_ids`` where the
        examples have them): the keyword arguments of the classifier objective."""
        rows = [self.ids[i] for i in index]
        width = max(len(r) for r in rows)
        x = np.full((len(rows), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for j, r in enumerate(rows):
            x[j, : len(r)] = r
            mask[j, : len(r)] = 1
        out = {"input_ids": x, "attention_mask": mask, "labels": self.labels[np.asarray(index)]}
        if self.token_types is not None:
            tt = np.zeros((len(rows), width), dtype=np.int64)
            for j, i in enumerate(index):
                tt[j, : len(self.token_types[i])] = self.token_types[i]
            out["token_type_ids"] = tt
        return out


def encode(ex: Examples, labels: LabelSet | RealLabels, tokenizer: Any, max_length: int) -> Encoded:
    """Tokenize with the model's tokenizer (``<s> a </s></s> b </s>`` for pairs), truncating the
    longer text first to ``max_length`` tokens."""
    y = labels.ids(ex)
    enc = tokenizer(ex.texts, ex.pairs, truncation=True, max_length=max_length)
    types = enc.get("token_type_ids") if ex.pairs is not None else None
    return Encoded([list(r) for r in enc["input_ids"]], y, ex.source, ex.pairs is not None,
                   [list(r) for r in types] if types is not None else None)


def train_batch_indices(n: int, *, step: int, micro: int, accum: int, rank: int, world: int,
                        seed: int) -> list[tuple[int, np.ndarray]]:
    """The micro-batches of optimizer ``step`` for ``rank`` as (global position of the first
    example, example indices): consecutive slices of a seeded permutation per epoch, the same on
    every rank, each rank taking its own part. Batches have equal size everywhere (the order wraps
    across epochs), so DeepSpeed's gradient mean over ranks is the mean over the global batch."""
    per_step = micro * accum * world
    start = step * per_step
    out = []
    for a in range(accum):
        lo = start + (a * world + rank) * micro
        pos = np.arange(lo, lo + micro)
        epochs = pos // n
        idx = np.empty(micro, dtype=np.int64)
        for e in np.unique(epochs):
            perm = np.random.default_rng([seed, int(e)]).permutation(n)
            sel = epochs == e
            idx[sel] = perm[pos[sel] % n]
        out.append((int(lo), idx))
    return out
