"""Group concurrent chat requests into shared ``generate`` calls.

Requests wait in a queue; one worker thread takes the first, keeps collecting for at most
``max_wait_s`` (or until ``max_batch`` are in hand) and hands the group to
``Personalizer.respond_batch``. While a batch generates, new requests queue up, so under
load batches fill by themselves and the wait window only matters when traffic is light.
Requests the server has received but not yet validated (:meth:`Batcher.arriving`) extend
the window up to ``max_hold_s``, so a batch does not close on half of a wave of clients.

A job is one request or a group of requests that must run in the same ``respond_batch`` call
(the ``n`` choices of one chat: sampled rows of one ``generate`` call, so one seed gives them
different samples). If a batch fails as a whole (one bad request fails ``respond_batch``'s
up-front validation, e.g. a user forgotten while their request waited), each job is retried
alone so only the bad one gets the error.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("personalign.server")

RunBatch = Callable[[Sequence[Mapping[str, Any]]], list[Any]]


@dataclass
class _Job:
    requests: list[Mapping[str, Any]]
    grouped: bool  # the future resolves to the list of results, not to the one result
    future: Future = field(default_factory=Future)

    def resolve(self, results: list[Any]) -> None:
        self.future.set_result(results if self.grouped else results[0])


@dataclass
class BatchStats:
    """How many batches ran, of which sizes (in requests to ``run_batch``): the evidence that batching happens."""

    sizes: Counter = field(default_factory=Counter)
    retried_alone: int = 0
    seconds: float = 0.0  # spent in run_batch, all batches together

    def seconds_per_batch(self, default: float = 1.0) -> float:
        """The mean time one batch took (``default`` before any ran): what a queued request waits per batch ahead of it."""
        batches = sum(self.sizes.values())
        return self.seconds / batches if batches else default

    def snapshot(self) -> dict[str, Any]:
        batches = sum(self.sizes.values())
        requests = sum(size * n for size, n in self.sizes.items())
        return {
            "batches": batches,
            "requests": requests,
            "mean_batch_size": requests / batches if batches else 0.0,
            "max_batch_size": max(self.sizes, default=0),
            "batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())},
            "retried_alone": self.retried_alone,
        }


class Batcher:
    """A queue and one worker thread that calls ``run_batch`` on groups of up to ``max_batch`` requests."""

    def __init__(
        self, run_batch: RunBatch, max_batch: int = 16, max_wait_s: float = 0.01, max_hold_s: float = 0.25
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_hold_s = max(max_hold_s, max_wait_s)
        self.stats = BatchStats()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._arriving = 0
        self._arriving_lock = threading.Lock()

    @contextmanager
    def arriving(self) -> Iterator[None]:
        """Mark a request that is being parsed and validated and will be submitted shortly.

        While any are marked, a batch being collected keeps waiting for them (up to
        ``max_hold_s`` from its first request) instead of closing after ``max_wait_s``: under
        load, the clients answered by one batch come back together, and the next batch should
        take all of them rather than whichever finished parsing first.
        """
        with self._arriving_lock:
            self._arriving += 1
        try:
            yield
        finally:
            with self._arriving_lock:
                self._arriving -= 1

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="personalign-batcher", daemon=True)
                self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)

    def submit(self, request: Mapping[str, Any]) -> Future:
        """Queue one ``respond_batch`` request; the future resolves to its ``ChatResult``."""
        return self._put(_Job([request], grouped=False))

    def submit_group(self, requests: Sequence[Mapping[str, Any]]) -> Future:
        """Queue requests that run in the same ``respond_batch`` call; the future resolves to their results, in order.

        A group larger than ``max_batch`` runs as a batch of its own.
        """
        if not requests:
            raise ValueError("submit_group needs at least one request")
        return self._put(_Job(list(requests), grouped=True))

    def _put(self, job: _Job) -> Future:
        if self._thread is None:
            self.start()
        self._queue.put(job)
        return job.future

    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        jobs = [first]
        rows = len(first.requests)
        started = time.monotonic()
        deadline, hold = started + self.max_wait_s, started + self.max_hold_s
        while rows < self.max_batch:
            limit = hold if self._arriving > 0 else deadline
            remaining = limit - time.monotonic()
            try:
                # Poll in short slices so a request that starts arriving extends the wait.
                job = (
                    self._queue.get(timeout=min(remaining, 0.005))
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                if remaining <= 0:
                    break
                continue
            if job is None:
                return jobs, True
            jobs.append(job)
            rows += len(job.requests)
        return jobs, False

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs, stopping = self._collect(first)
            self._run(jobs)
            if stopping:
                return

    def _run(self, jobs: list[_Job]) -> None:
        live = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        if not live:
            return
        requests = [r for j in live for r in j.requests]
        started = time.monotonic()
        try:
            results = self.run_batch(requests)
        except Exception as err:
            self.stats.seconds += time.monotonic() - started
            if len(live) == 1:
                live[0].future.set_exception(err)
                self.stats.sizes[len(requests)] += 1
                return
            self.stats.retried_alone += 1
            for job in live:
                try:
                    job.resolve(self.run_batch(job.requests))
                except Exception as single:
                    job.future.set_exception(single)
                self.stats.sizes[len(job.requests)] += 1
            return
        self.stats.sizes[len(requests)] += 1
        self.stats.seconds += time.monotonic() - started
        start = 0
        for job in live:
            job.resolve(results[start : start + len(job.requests)])
            start += len(job.requests)
