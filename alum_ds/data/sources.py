"""Corpus inputs read in bounded chunks, each resumable from a recorded position.

A :class:`Corpus` is an ordered list of sources (text files, JSON lines, Parquet, a saved or a
Hub ``datasets`` dataset, or an in-memory list). Reading never holds more than one chunk (a few
MiB) of any input, and every chunk carries the position of its first document, so an interrupted
``prepare`` can continue from there instead of rereading what it already wrote.

Documents are the same whatever the chunking: text files are cut only right after a blank line
(``\\n\\n`` or ``\\n\\r\\n``), where a paragraph boundary lies whatever comes next, and JSON lines
right after a newline.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alum_ds.data.shards import DataError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json")
FILE_SUFFIXES = (*TEXT_SUFFIXES, ".parquet")
BLOCK_BYTES = 1 << 22  # text read per chunk
ROWS_PER_CHUNK = 2048  # table rows per chunk
HF_PREFIX = "hf:"

Position = dict[str, int]
"""``{"source": i, "offset": byte offset or row, "line": line number (JSON lines)}``."""


@dataclass
class Chunk:
    docs: list[str]
    start: Position
    """Where the chunk's first document begins: reading from here yields this chunk again."""
    nbytes: int
    """Input consumed (bytes of text files, or characters of table rows), for throughput."""
    replaced: int = 0
    """Undecodable bytes replaced by U+FFFD in this chunk."""


def decode_utf8(data: bytes | memoryview) -> tuple[str, int]:
    """UTF-8 text with each undecodable span replaced by U+FFFD (as ``errors="replace"``), and
    the number of bytes replaced."""
    # Counted here rather than in a registered codecs error handler: such a handler is
    # process-global, so its count leaked from one prepare call into the next.
    view = memoryview(data)
    parts: list[str] = []
    replaced = pos = 0
    while True:
        try:
            parts.append(codecs.utf_8_decode(view[pos:], "strict", True)[0])
            return "".join(parts), replaced
        except UnicodeDecodeError as e:
            parts.append(codecs.utf_8_decode(view[pos : pos + e.start], "strict", True)[0])
            parts.append("\ufffd")
            replaced += e.end - e.start
            pos += e.end


def _file_stamp(p: Path) -> list[Any]:
    st = p.stat()
    return [str(p), st.st_size, st.st_mtime_ns]


class Source:
    """One input; ``chunks`` yields its documents from ``start`` (an offset/row) onward."""

    label: str

    def chunks(self, index: int, start: Position | None) -> Iterator[Chunk]:
        raise NotImplementedError

    def stamp(self) -> Any:
        """What identifies this input's content cheaply (path, size, mtime; name and split)."""
        raise NotImplementedError


@dataclass
class TextFile(Source):
    """Paragraphs (blank-line separated) of a text file, or the ``field`` of each JSON line."""

    path: Path
    json_field: str = ""
    label: str = ""

    def __post_init__(self) -> None:
        self.label = str(self.path)

    def stamp(self) -> Any:
        return ["text", self.json_field, *_file_stamp(self.path)]

    def _cut(self, buf: bytes) -> int:
        """Bytes of ``buf`` that hold only whole documents (0: none yet)."""
        if self.json_field:
            return buf.rfind(b"\n") + 1
        a, b = buf.rfind(b"\n\n"), buf.rfind(b"\n\r\n")
        return max(a + 2 if a >= 0 else 0, b + 3 if b >= 0 else 0)

    def chunks(self, index: int, start: Position | None) -> Iterator[Chunk]:
        offset = int(start["offset"]) if start else 0
        line = int(start["line"]) if start else 1
        try:
            f = open(self.path, "rb")
        except OSError as e:
            raise DataError(f"input {self.path} cannot be read ({e.strerror})") from None
        with f:
            f.seek(offset)
            pending: list[bytes] = []
            tail = b""  # the last 2 pending bytes, where a separator may begin
            while True:
                data = f.read(BLOCK_BYTES)
                if data:
                    # Search the new bytes only: a paragraph longer than a block costs no rescans.
                    cut = self._cut(tail + data)
                    if cut <= len(tail):
                        pending.append(data)
                        tail = (tail + data)[-2:]
                        continue
                    pending.append(data)
                    block = b"".join(pending)
                    cut += len(block) - len(data) - len(tail)
                else:
                    block = b"".join(pending)
                    cut = len(block)
                    if not cut:
                        return
                head = block[:cut]
                docs, replaced = self._documents(head, line)
                yield Chunk(docs, {"source": index, "offset": offset, "line": line}, cut, replaced)
                offset += cut
                line += head.count(b"\n")
                pending = [block[cut:]] if cut < len(block) else []
                tail = block[-2:] if pending else b""
                if not data:
                    return

    def _documents(self, block: bytes, first_line: int) -> tuple[list[str], int]:
        text, replaced = decode_utf8(block)
        if not self.json_field:
            # Windows line ends would otherwise hide every blank line: one file, one document.
            if "\r" in text:
                text = text.replace("\r\n", "\n")
            paras = (p.strip() for p in text.split("\n\n"))
            return [p for p in paras if p], replaced
        docs = []
        # Only "\n" ends a JSON line: str.splitlines would also cut at U+2028 or U+0085, which
        # JSON strings may hold unescaped.
        for n, ln in enumerate(text.split("\n"), first_line):
            if not ln.strip():
                continue
            try:
                obj = json.loads(ln)
            except json.JSONDecodeError:
                raise DataError(f"{self.path}:{n} is not valid JSON") from None
            if not isinstance(obj, dict) or self.json_field not in obj:
                raise DataError(f"{self.path}:{n} has no {self.json_field!r} field (use --text-field)")
            value = obj[self.json_field]
            text_value = value if isinstance(value, str) else ("" if value is None else str(value))
            if text_value.strip():
                docs.append(text_value)
        return docs, replaced


def _column_docs(col: Any) -> tuple[list[str], int, int]:
    """Non-blank strings of an Arrow string column; undecodable bytes replaced and counted."""
    import pyarrow as pa

    docs: list[str] = []
    replaced = nbytes = 0
    # Arrow does not promise valid UTF-8 in a string column: decode the bytes ourselves.
    for raw in col.cast(pa.large_binary()).to_pylist():
        if raw is None:
            continue
        nbytes += len(raw)
        text, r = decode_utf8(raw)
        replaced += r
        if text.strip():
            docs.append(text)
    return docs, replaced, nbytes


def _check_string_column(types: dict[str, Any], column: str, where: str) -> None:
    import pyarrow as pa

    if column not in types:
        names = ", ".join(list(types)[:8])
        raise DataError(f"{where} has no column {column!r} (columns: {names}); choose one with --text-field")
    t = types[column]
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise DataError(f"{where}: column {column!r} holds {t}, not text; choose another with --text-field")


@dataclass
class ParquetFile(Source):
    path: Path
    column: str
    label: str = ""

    def __post_init__(self) -> None:
        self.label = str(self.path)

    def stamp(self) -> Any:
        return ["parquet", self.column, *_file_stamp(self.path)]

    def chunks(self, index: int, start: Position | None) -> Iterator[Chunk]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(self.path)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"input {self.path} is not a readable Parquet file ({e})") from None
        schema = pf.schema_arrow
        _check_string_column({n: schema.field(n).type for n in schema.names}, self.column, str(self.path))
        row = int(start["offset"]) if start else 0
        first, g0 = 0, 0
        while g0 < pf.num_row_groups and first + pf.metadata.row_group(g0).num_rows <= row:
            first += pf.metadata.row_group(g0).num_rows
            g0 += 1
        if g0 == pf.num_row_groups:
            return
        batches = pf.iter_batches(batch_size=ROWS_PER_CHUNK, row_groups=list(range(g0, pf.num_row_groups)),
                                  columns=[self.column])
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"input {self.path} does not read past row {first} ({e}); the file "
                                "is damaged") from None
            n = batch.num_rows
            if first + n > row:
                lo = max(row - first, 0)
                docs, replaced, nbytes = _column_docs(batch.column(0).slice(lo))
                yield Chunk(docs, {"source": index, "offset": first + lo, "line": 0}, nbytes, replaced)
            first += n


@dataclass
class ArrowDataset(Source):
    """A ``datasets.Dataset`` (saved folder or downloaded): memory-mapped Arrow, read by slices."""

    dataset: Any
    column: str
    label: str
    stamp_value: Any = field(default=None)

    def __post_init__(self) -> None:
        _check_string_column({n: self.dataset.data.schema.field(n).type
                              for n in self.dataset.column_names}, self.column, self.label)

    def stamp(self) -> Any:
        return ["arrow", self.column, self.label, self.stamp_value]

    def chunks(self, index: int, start: Position | None) -> Iterator[Chunk]:
        ds = self.dataset.select_columns([self.column]).with_format("arrow")
        for lo in range(int(start["offset"]) if start else 0, len(ds), ROWS_PER_CHUNK):
            docs, replaced, nbytes = _column_docs(ds[lo : lo + ROWS_PER_CHUNK][self.column])
            yield Chunk(docs, {"source": index, "offset": lo, "line": 0}, nbytes, replaced)


@dataclass
class StreamingDataset(Source):
    """A Hub dataset read with ``streaming=True``: nothing is downloaded ahead of use."""

    dataset: Any
    column: str
    label: str

    def stamp(self) -> Any:
        return ["hub", self.column, self.label]

    def chunks(self, index: int, start: Position | None) -> Iterator[Chunk]:
        row = int(start["offset"]) if start else 0
        ds = self.dataset.skip(row) if row else self.dataset
        for batch in ds.iter(batch_size=ROWS_PER_CHUNK):
            if self.column not in batch:
                raise DataError(f"{self.label} has no column {self.column!r}; choose one with --text-field")
            values = batch[self.column]
            docs = [v for v in values if isinstance(v, str) and v.strip()]
            yield Chunk(docs, {"source": index, "offset": row, "line": 0}, sum(map(len, docs)))
            row += len(values)


@dataclass
class DocumentList(Source):
    docs: list[str]
    label: str = "documents"

    def stamp(self) -> Any:
        h = hashlib.sha256()
        for d in self.docs:
            h.update(d.encode("utf-8", "surrogatepass"))
            h.update(b"\0")
        return ["list", h.hexdigest()]

    def chunks(self, index: int, start: Position | None) -> Iterator[Chunk]:
        for lo in range(int(start["offset"]) if start else 0, len(self.docs), ROWS_PER_CHUNK):
            # Kept as given, blank ones too: the caller's list index is the document index.
            docs = self.docs[lo : lo + ROWS_PER_CHUNK]
            yield Chunk(docs, {"source": index, "offset": lo, "line": 0}, sum(map(len, docs)))


class Corpus:
    """Sources read in order; positions name a source and a place in it."""

    def __init__(self, sources: list[Source]) -> None:
        self.sources = sources

    def chunks(self, start: Position | None = None) -> Iterator[Chunk]:
        first = int(start["source"]) if start else 0
        for i in range(first, len(self.sources)):
            yield from self.sources[i].chunks(i, start if start and i == first else None)

    def documents(self) -> Iterator[str]:
        for c in self.chunks():
            yield from c.docs

    def stamp(self) -> list[Any]:
        return [s.stamp() for s in self.sources]

    def labels(self) -> list[str]:
        return [s.label for s in self.sources]


def _is_saved_dataset(p: Path) -> bool:
    return (p / "dataset_dict.json").is_file() or (p / "state.json").is_file()


def _saved_dataset(p: Path, column: str, split: str) -> Source:
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except (OSError, ValueError, FileNotFoundError) as e:
        raise DataError(f"saved dataset {p} does not load ({str(e).splitlines()[0]}); save it again "
                        "with Dataset.save_to_disk") from None
    label = str(p)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"saved dataset {p} has no split {split!r} (splits: {', '.join(ds)}); "
                            "choose one with --split")
        ds, label = ds[split], f"{p}[{split}]"
    stamp = sorted(_file_stamp(f)[1:] + [str(f.relative_to(p))] for f in p.rglob("*") if f.is_file())
    return ArrowDataset(ds, column, label, stamp)


def parse_hf(spec: str, *, config: str = "", split: str = "") -> tuple[str, str, str]:
    """(name, config, split) of ``hf:NAME[:CONFIG][@SPLIT]``; ``config`` and ``split`` are the
    defaults for the parts the spec leaves out."""
    rest = spec[len(HF_PREFIX):] if spec.startswith(HF_PREFIX) else spec
    rest, at, named_split = rest.partition("@")
    name, colon, named_config = rest.partition(":")
    if not name or (colon and not named_config) or (at and not named_split):
        raise DataError(f"{spec}: expected hf:NAME[:CONFIG][@SPLIT] (e.g. hf:nyu-mll/glue:mrpc@train)")
    return name, named_config or config, named_split or split


def load_hub_dataset(name: str, *, config: str, split: str, streaming: bool = False,
                     fix: str = "--hf-config and --split") -> Any:
    """``datasets.load_dataset`` of a Hub dataset (``split`` '': every split, a DatasetDict), its
    failures one-line DataErrors; ``fix`` names the options that choose config and split."""
    from alum_ds.hub import hub_reachable

    why = hub_reachable()
    if why:
        raise DataError(f"dataset {name!r} needs the Hugging Face Hub, which is unreachable ({why}): "
                        "run with network access, set HF_HUB_OFFLINE=1 to use a cached copy, or "
                        "pass a folder written by save_to_disk")
    import datasets

    label = hub_label(name, config, split)
    try:
        return datasets.load_dataset(name, config or None, split=split or None, streaming=streaming)
    except Exception as e:  # the Hub client raises many types; all mean "cannot load this name"
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"dataset {label} does not load ({msg}): check the name, {fix}, or pass a "
                        "folder written by save_to_disk") from None


def hub_label(name: str, config: str, split: str) -> str:
    return f"{HF_PREFIX}{name}" + (f"/{config}" if config else "") + (f"[{split}]" if split else "")


def hub_dataset(name: str, *, column: str, split: str, config: str, streaming: bool) -> Source:
    """A dataset by name from the Hugging Face Hub (``hf:NAME``)."""
    ds = load_hub_dataset(name, config=config, split=split, streaming=streaming)
    label = hub_label(name, config, split)
    if streaming:
        return StreamingDataset(ds, column, label)
    return ArrowDataset(ds, column, label, getattr(ds, "_fingerprint", None))


def _source_for_file(p: Path, text_field: str) -> Source:
    if p.suffix == ".parquet":
        return ParquetFile(p, text_field)
    return TextFile(p, text_field if p.suffix in (".jsonl", ".json") else "")


def expand_inputs(
    inputs: list[str], *, text_field: str = "text", split: str = "train", hf_config: str = "",
    streaming: bool = False, exclude: Path | None = None,
) -> Corpus:
    """Files named directly, found under folders, or matched by globs (sorted for determinism);
    saved ``datasets`` folders; ``hf:NAME[:CONFIG][@SPLIT]`` Hub datasets (``hf_config`` and
    ``split`` where the spec names none). Files under ``exclude`` (the output
    folder) are skipped in folders and globs: its own JSON files are not corpus."""
    skip = exclude.resolve() if exclude is not None else None

    def wanted(f: Path) -> bool:
        return skip is None or not f.resolve().is_relative_to(skip)

    sources: list[Source] = []
    for item in inputs:
        if item.startswith(HF_PREFIX):
            name, config, part = parse_hf(item, config=hf_config, split=split)
            sources.append(hub_dataset(name, column=text_field, split=part, config=config,
                                       streaming=streaming))
            continue
        p = Path(item)
        if p.is_dir() and _is_saved_dataset(p):
            sources.append(_saved_dataset(p, text_field, split))
            continue
        if p.is_dir():
            found = sorted(f for f in p.rglob("*")
                           if f.is_file() and f.suffix in FILE_SUFFIXES and wanted(f))
        elif p.is_file():
            found = [p]
        else:
            found = sorted(Path(g) for g in glob.glob(item, recursive=True)
                           if Path(g).is_file() and wanted(Path(g)))
        if not found:
            raise DataError(f"input {item} matches no .txt/.jsonl/.parquet file or saved dataset")
        sources.extend(_source_for_file(f, text_field) for f in found)
    return Corpus(sources)


def files_corpus(files: list[Path], text_field: str = "text") -> Corpus:
    return Corpus([_source_for_file(Path(f), text_field) for f in files])


def read_documents(
    files: list[Path], text_field: str = "text", stats: dict[str, int] | None = None
) -> Iterator[str]:
    """Documents of text/JSON lines/Parquet files, in order; undecodable bytes are replaced and
    added up in ``stats["replaced_bytes"]``."""
    for c in files_corpus(files, text_field).chunks():
        if stats is not None:
            stats["replaced_bytes"] = stats.get("replaced_bytes", 0) + c.replaced
        yield from c.docs
