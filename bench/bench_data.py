"""Data path throughput: ``alum-ds prepare`` against a ``datasets.map`` baseline, and the stream.

    python bench/bench_data.py [--mb 32] [--repeats 3] [--quick] [--out bench/results/data.json]

(1) Prepare: the embedded corpus (one paragraph per document) replicated to ``--mb`` MB over four
text files; end to end from the files on disk to token files on disk, with the same fast
tokenizer (learned once by prepare, then passed to both): ``prepare --tokenizer`` against
``load_dataset("text", sample_by="paragraph")`` + ``.map(batched=True, num_proc=2)`` +
``save_to_disk``. Each run is a fresh process (so neither inherits the other's thread pools or
caches), the two alternate, and the time excludes interpreter start and imports. A third run per
repeat, ``prepare_in_thread``, is prepare with its word cache in its own thread
(``ALUM_DS_PREPARE_WORKERS=0``) instead of one worker process per core: what the pool gives here.
(2) Stream: packed, masked micro-batches of one rank (``next_for_rank``), tokens per second.

Figures are medians of ``--repeats`` runs, printed and saved as JSON; nothing is asserted. The
machine's load average is recorded, since the project's machine is shared, and so are the ratios
of each back-to-back pair of runs (``prepare_vs_baseline_per_repeat``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import corpus_parser, machine

FILES = 4


def write_corpus(folder: Path, mb: float) -> list[Path]:
    from alum_ds.data.corpus import embedded_documents

    # No blank line inside a document and none around it: both readers see the same paragraphs.
    docs = [re.sub(r"\n\s*\n", "\n", d).strip() for d in embedded_documents()]
    unit = ("\n\n".join(docs) + "\n\n").encode()
    per_file = max(int(mb * 1e6 / FILES / len(unit)), 1)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(FILES):
        f = folder / f"part{k}.txt"
        f.write_bytes(unit * per_file)
        files.append(f)
    return files


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the baseline's map workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _child_prepare(files: list[str], tokenizer: str, out: str) -> dict:
    # What alum_ds.data.tokenizer imported at load time before it imported transformers lazily
    # (for the encoding workers' start): imports stay out of the timing, as for the baseline.
    from transformers import AutoTokenizer, RobertaTokenizerFast  # noqa: F401

    from alum_ds.data.encoding import default_workers
    from alum_ds.data.prepare import prepare_inputs

    t0, c0 = time.perf_counter(), _cpu_seconds()
    m = prepare_inputs(files, out, tokenizer=tokenizer, progress=False)
    dt, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    tokens = sum(e["tokens"] for split in m["splits"].values() for e in split)
    docs = m["source"]["documents"]
    return {"seconds": dt, "cpu_seconds": cpu, "tokens": tokens, "documents": docs,
            "encode_workers": default_workers()}


def _child_baseline(files: list[str], tokenizer: str, out: str, num_proc: int = 2) -> dict:
    import datasets
    import pyarrow.compute as pc
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    # Text that spells a special token ("<s>" in a C docstring) is text, as prepare encodes it.
    tok = AutoTokenizer.from_pretrained(tokenizer, split_special_tokens=True)
    cache = str(Path(out).parent / "hf-cache")
    t0, c0 = time.perf_counter(), _cpu_seconds()
    ds = datasets.load_dataset("text", data_files=files, sample_by="paragraph", split="train",
                               cache_dir=cache)
    ds = ds.map(lambda b: {"input_ids": tok(b["text"], add_special_tokens=False)["input_ids"]},
                batched=True, num_proc=num_proc, remove_columns=["text"])
    ds.save_to_disk(out)
    dt, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    lengths = pc.list_value_length(ds.data.table.column("input_ids"))
    return {"seconds": dt, "cpu_seconds": cpu, "tokens": int(pc.sum(lengths).as_py()), "documents": len(ds)}


def _run_child(kind: str, files: list[Path], tokenizer: Path, out: Path, quick: bool) -> dict:
    if quick:  # in this process, one baseline process: only the figures' presence matters
        if kind.startswith("prepare"):
            return _child_prepare(list(map(str, files)), str(tokenizer), str(out))
        return _child_baseline(list(map(str, files)), str(tokenizer), str(out), num_proc=1)
    cmd = [sys.executable, __file__, "--_child", kind, "--_tokenizer", str(tokenizer), "--_out", str(out),
           *map(str, files)]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    if kind == "prepare_in_thread":
        env["ALUM_DS_PREPARE_WORKERS"] = "0"
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if r.returncode:
        raise RuntimeError(f"{kind} run failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_stream(data_dir: Path, *, seconds: float, repeats: int, seq_len: int, micro_batch: int,
                 whole_word: bool = False) -> dict:
    from alum_ds.config import MaskingConfig
    from alum_ds.data.stream import TrainStream

    masking = MaskingConfig(whole_word=whole_word)
    rates = []
    for _ in range(repeats):
        s = TrainStream(data_dir, seq_len=seq_len, seed=1, masking=masking)
        n, t0 = 0, time.perf_counter()
        while (dt := time.perf_counter() - t0) < seconds:
            x, _ = s.next_for_rank(rank=0, world=1, micro_batch=micro_batch)
            n += x.size
        rates.append(n / dt)
    return {"seq_len": seq_len, "micro_batch": micro_batch, "whole_word": whole_word,
            "tokens_per_s": rates, "tokens_per_s_median": statistics.median(rates),
            "sequences_per_s_median": statistics.median(rates) / seq_len}


def main(argv: list[str] | None = None) -> dict:
    p = corpus_parser(__doc__, mb=32.0, out="data.json")
    p.add_argument("--_child", default="", help=argparse.SUPPRESS)
    p.add_argument("--_tokenizer", default="", help=argparse.SUPPRESS)
    p.add_argument("--_out", default="", help=argparse.SUPPRESS)
    p.add_argument("files", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._child:
        fn = _child_prepare if a._child.startswith("prepare") else _child_baseline
        print(json.dumps(fn(a.files, a._tokenizer, a._out)))
        return {}
    if a.quick:
        a.mb, a.repeats = 0.3, 1
    from alum_ds.data.prepare import prepare_inputs

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = write_corpus(work / "corpus", a.mb)
        corpus_mb = sum(f.stat().st_size for f in files) / 1e6
        t0 = time.perf_counter()
        prepare_inputs([str(files[0])], str(work / "learned"), vocab_size=8192, progress=False)
        learn_s = time.perf_counter() - t0
        tokenizer = work / "learned" / "tokenizer"
        runs: dict[str, list[dict]] = {"prepare": [], "baseline": [], "prepare_in_thread": []}
        for r in range(a.repeats):
            for kind in ("prepare", "baseline", "prepare_in_thread"):
                runs[kind].append(_run_child(kind, files, tokenizer, work / f"{kind}-{r}" / "out", a.quick))
        stream_s = 0.2 if a.quick else 3.0
        streams = [bench_stream(work / "prepare-0" / "out", seconds=stream_s, repeats=a.repeats,
                                seq_len=128, micro_batch=mb, whole_word=ww)
                   for mb, ww in ((8, False), (64, False), (8, True))]
    load_after = os.getloadavg()

    def summary(rs: list[dict]) -> dict:
        rates = [r["tokens"] / r["seconds"] for r in rs]
        per_cpu = [r["tokens"] / r["cpu_seconds"] for r in rs]
        return {"tokens": rs[0]["tokens"], "documents": rs[0]["documents"],
                "seconds": [round(r["seconds"], 3) for r in rs],
                "cpu_seconds": [round(r["cpu_seconds"], 3) for r in rs], "tokens_per_s": rates,
                "tokens_per_s_median": statistics.median(rates),
                "tokens_per_cpu_s_median": statistics.median(per_cpu)}

    res = {
        "machine": {**machine(), "load_average_before": load_before, "load_average_after": load_after},
        "corpus_mb": round(corpus_mb, 2), "files": FILES, "repeats": a.repeats, "quick": a.quick,
        "tokenizer": {"vocab_size": 8192, "learn_and_prepare_one_file_s": round(learn_s, 3)},
        "prepare": {**summary(runs["prepare"]), "encode_workers": runs["prepare"][0]["encode_workers"]},
        "baseline": {**summary(runs["baseline"]), "num_proc": 1 if a.quick else 2,
                     "what": "load_dataset('text', sample_by='paragraph') + map(batched=True, "
                     "num_proc) + save_to_disk, same fast tokenizer"},
        "stream": streams[0], "stream_variants": streams[1:],
    }
    ratio = res["prepare"]["tokens_per_s_median"] / res["baseline"]["tokens_per_s_median"]
    res["prepare_vs_baseline"] = ratio
    # Repeat r ran ours and then the baseline, back to back: each pair saw about the same load.
    pairs = [b["seconds"] / p["seconds"] for p, b in zip(runs["prepare"], runs["baseline"])]
    res["prepare_vs_baseline_per_repeat"] = pairs
    res["prepare_vs_baseline_per_repeat_median"] = statistics.median(pairs)
    # The machine is shared: work per CPU-second does not depend on what else runs.
    res["prepare_vs_baseline_per_cpu_s"] = (res["prepare"]["tokens_per_cpu_s_median"]
                                            / res["baseline"]["tokens_per_cpu_s_median"])
    # The word cache in this process's encoding thread, run right after each pair above.
    res["prepare_in_thread"] = {**summary(runs["prepare_in_thread"]), "encode_workers": 0}
    res["pool_vs_in_thread_per_repeat"] = [t["seconds"] / p["seconds"]
                                           for p, t in zip(runs["prepare"], runs["prepare_in_thread"])]
    res["pool_vs_in_thread_per_repeat_median"] = statistics.median(res["pool_vs_in_thread_per_repeat"])
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
