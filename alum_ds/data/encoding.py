"""Encoding for ``prepare`` on every core: the word cache in a pool of worker processes.

``WordCacheEncoder`` is pure Python and holds the GIL, so threads cannot spread it over cores;
each worker process builds its own encoder (and cache) from the tokenizer's JSON once, and
batches go out and come back in order, so the shards are byte-identical to the in-thread
encoder's and the Rust tokenizer's. This module imports neither transformers nor the corpus
readers: a worker starts in a fraction of a second.
"""

from __future__ import annotations

import json
import os
import pickle
import queue
import subprocess
import sys
import threading
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, TypeVar

import numpy as np
from tokenizers import Tokenizer

from alum_ds.data.tokenizer import WordCacheEncoder

T = TypeVar("T")
Batch = tuple[np.ndarray, list[int]]
"""The ids of a batch of documents, concatenated, and each document's length."""

WORKERS_ENV = "ALUM_DS_PREPARE_WORKERS"
"""Number of encoding worker processes (0: encode in prepare's own thread); default below."""


class EncodeWorkerError(RuntimeError):
    """An encoding worker process failed or died; the pool is shut down."""


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. a Slurm or taskset limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers(cores: int | None = None) -> int:
    """Worker processes for the word cache on ``cores`` cores (default: the usable ones), unless
    ``ALUM_DS_PREPARE_WORKERS`` says otherwise.

    One core: none, the in-thread encoder (a pool would only add pickling and a second cache to
    warm). Otherwise one worker per core, not one fewer for the main process: its share (reading
    and decoding, batching, pickling, cutting and writing shards) is about an eighth of the word
    cache's CPU per token, so a core kept for it would idle most of the time. Measured on the
    2-core machine (fresh processes, 5 interleaved repeats, 32 MB): 2 workers 3.61M tokens/s,
    in-thread 3.60M, 1 worker 3.20M, with another job taking about a core; with the machine
    quieter ``bench/bench_data.py`` gives 2 workers 1.1-1.35x the in-thread encoder.
    """
    env = os.environ.get(WORKERS_ENV, "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"{WORKERS_ENV}={env!r}: expected a number of processes (0: none)") from None
        return max(n, 0)
    cores = usable_cores() if cores is None else cores
    return 0 if cores <= 1 else cores


def encoding_backend(backend: Tokenizer) -> Tokenizer:
    """``backend`` set up for prepare (in place; returned): corpus text such as ``<s>`` (HTML) or
    ``</s>`` stays text, since as special ids it would fake document boundaries and masks inside
    a sequence; and a truncation or padding setting (made for model inputs) would cut every
    document short or pad it."""
    backend.encode_special_tokens = True
    backend.no_truncation()
    backend.no_padding()
    return backend


# Worker side ----------------------------------------------------------------------------------


def _worker_main(task_fd: int, result_fd: int) -> None:
    """A worker's loop: read the tokenizer, then batches (lists of documents) until ``None`` or
    the end of the pipe; answer each with ``("ok", ids bytes, lengths)`` or ``("error", text)``.

    The end of the pipe is how a worker learns that its parent is gone, killed included: the
    parent holds the only other end, so a worker never outlives it by more than one batch."""
    tasks, results = open(task_fd, "rb"), open(result_fd, "wb")
    try:
        tok_json, dtype = pickle.load(tasks)
        enc = WordCacheEncoder(encoding_backend(Tokenizer.from_str(tok_json)), np.dtype(dtype))
        while (docs := pickle.load(tasks)) is not None:
            pickle.dump(("ok", *enc.encode_packed(docs)), results, pickle.HIGHEST_PROTOCOL)
            results.flush()
        results.close()
    except (EOFError, BrokenPipeError):
        # The parent is gone (or stopped the pool): nobody reads any more. Exit at once, since
        # closing the result pipe would flush into it again and print a second error.
        os._exit(0)
    except Exception:
        try:
            pickle.dump(("error", traceback.format_exc()), results, pickle.HIGHEST_PROTOCOL)
            results.flush()
        except OSError:
            pass
        os._exit(1)


# The worker's command: the parent's sys.path (as multiprocessing's spawn does), then the loop.
_WORKER_CODE = ("import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
                "from alum_ds.data.encoding import _worker_main; "
                "_worker_main(int(sys.argv[2]), int(sys.argv[3]))")


# Parent side ----------------------------------------------------------------------------------

_STOP = object()


class _Worker:
    """One worker process and the thread that feeds it: the thread sends a batch and waits for
    its result before sending the next, so neither side can block writing to a full pipe while
    the other does too; a batch takes far longer to encode than to pass through the pipe."""

    def __init__(self, index: int, init: tuple[str, str]) -> None:
        self.index = index
        task_r, task_w = os.pipe()
        result_r, result_w = os.pipe()
        try:
            # Not multiprocessing: its spawn start reruns the caller's main module in each worker
            # (a script without a __main__ guard would prepare again there), and fork is unsafe
            # here, since prepare runs threads. A plain interpreter started with two pipe ends
            # imports numpy, tokenizers and this module only (about 0.2 s). Its own session:
            # Ctrl-C at a terminal reaches prepare alone, which then stops the workers itself.
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER_CODE, json.dumps(sys.path), str(task_r), str(result_w)],
                pass_fds=(task_r, result_w), start_new_session=True)
        except BaseException:
            for fd in (task_w, result_r):
                os.close(fd)
            raise
        finally:
            os.close(task_r)
            os.close(result_w)
        self._tasks: IO[bytes] = open(task_w, "wb")
        self._results: IO[bytes] = open(result_r, "rb")
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, args=(init,), daemon=True,
                                        name=f"alum_ds-encode-worker-{index}")
        self._thread.start()

    def _send(self, message: Any) -> None:
        pickle.dump(message, self._tasks, pickle.HIGHEST_PROTOCOL)
        self._tasks.flush()

    def _run(self, init: tuple[str, str]) -> None:
        try:
            self._send(init)
            while (docs := self.inbox.get()) is not _STOP:
                self._send(docs)
                self.outbox.put(pickle.load(self._results))
            self._send(None)
        except (EOFError, OSError, pickle.UnpicklingError):  # a pipe ended: the process is gone
            self.outbox.put(("died", ""))
        except BaseException as e:  # handed to the consumer
            self.outbox.put(("exception", e))
        finally:
            for f in (self._tasks, self._results):
                try:
                    f.close()
                except OSError:
                    pass

    def failure(self, kind: str, detail: Any) -> BaseException:
        name = f"encoding worker {self.index} (pid {self.proc.pid})"
        if kind == "error":
            last = detail.strip().splitlines()[-1] if detail.strip() else "unknown error"
            return EncodeWorkerError(f"prepare: {name} failed: {last}\n{detail.rstrip()}")
        if kind == "died":
            try:
                code = self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                code = None
            how = (f"killed by signal {-code}" if code is not None and code < 0
                   else f"exit code {code}" if code is not None else "pipe closed")
            return EncodeWorkerError(f"prepare: {name} ended unexpectedly ({how}; killed for memory? "
                                     "any message of its own is above)")
        return detail

    def stop(self, abort: bool) -> None:
        self.inbox.put(_STOP)
        if abort and self.proc.poll() is None:
            self.proc.kill()  # its batch is not wanted any more; its pipe then ends, the thread too

    def join(self) -> None:
        self._thread.join(timeout=10)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class EncoderPool:
    """``map`` batches of documents through ``workers`` processes of ``WordCacheEncoder``, in
    order (batch k to worker k mod workers), with at most ``in_flight`` batches sent and not
    yet taken (bounded memory).

    The processes start on the second batch (a corpus of one batch never pays for them), and
    the first batch is encoded here while they start. Use as a context manager: leaving it
    stops the workers and waits for them (killing them if it is left by an exception, Ctrl-C
    included: their batches are not wanted any more)."""

    def __init__(self, encoder: WordCacheEncoder, workers: int, in_flight: int | None = None) -> None:
        if workers < 1:
            raise ValueError("an EncoderPool needs at least one worker")
        self.encoder, self.workers = encoder, workers
        # Two batches per worker: one encoding, one waiting in the parent, so that no worker
        # idles while the parent takes a result; more would only hold memory.
        self.in_flight = max(in_flight or 2 * workers, workers)
        self._workers: list[_Worker] = []

    def _start(self) -> None:
        init = (self.encoder.backend.to_str(), self.encoder.dtype.str)
        try:
            for i in range(self.workers):
                self._workers.append(_Worker(i, init))
        except BaseException:
            self.close(abort=True)
            raise

    def _take(self, w: _Worker) -> Batch:
        kind, *rest = w.outbox.get()
        if kind != "ok":
            raise w.failure(kind, rest[0])
        packed, lengths = rest
        return np.frombuffer(packed, dtype=self.encoder.dtype), lengths

    def map(self, items: Iterable[tuple[T, list[str]]]) -> Iterator[tuple[T, Batch]]:
        """``(tag, encode(docs))`` for each ``(tag, docs)`` of ``items``, in their order."""
        it = iter(items)
        first = next(it, None)
        if first is None:
            return
        second = next(it, None)
        if second is None:
            yield first[0], self.encoder.encode_batch(first[1])
            return
        if not self._workers:
            self._start()
        sent: deque[tuple[T, _Worker | None]] = deque()
        k = 0

        def send(tag: T, docs: list[str]) -> None:
            nonlocal k
            if not docs:  # nothing to encode: no round trip, and no turn taken
                sent.append((tag, None))
                return
            w = self._workers[k % self.workers]
            w.inbox.put(docs)
            sent.append((tag, w))
            k += 1

        def take() -> tuple[T, Batch]:
            tag, w = sent.popleft()
            return tag, (np.zeros(0, self.encoder.dtype), []) if w is None else self._take(w)

        send(*second)
        yield first[0], self.encoder.encode_batch(first[1])  # while the workers start
        for tag, docs in it:
            send(tag, docs)
            if len(sent) >= self.in_flight:
                yield take()
        while sent:
            yield take()

    def close(self, abort: bool = False) -> None:
        """Stop the workers and wait for them to exit; ``abort``: kill them first."""
        workers, self._workers = self._workers, []
        for w in workers:
            w.stop(abort)
        for w in workers:
            w.join()

    def __enter__(self) -> EncoderPool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.close(abort=exc_type is not None)


def in_thread(encode: Callable[[list[str]], Batch]) -> Callable[[Iterable[tuple[T, list[str]]]],
                                                             Iterator[tuple[T, Batch]]]:
    """The ``map`` of an encoder run in the calling thread."""

    def map_(items: Iterable[tuple[T, list[str]]]) -> Iterator[tuple[T, Batch]]:
        for tag, docs in items:
            yield tag, encode(docs) if docs else (np.zeros(0, np.uint16), [])

    return map_
