"""The batcher's collection window: plain wait, and waiting for requests still arriving."""

from __future__ import annotations

import threading
import time

from personalign.server.batcher import Batcher


def _recording_batcher(**kwargs):
    seen: list[list[int]] = []

    def run(requests):
        seen.append([r["i"] for r in requests])
        return [r["i"] * 10 for r in requests]

    return Batcher(run, **kwargs), seen


def test_a_late_request_misses_the_window_without_an_arrival_mark():
    batcher, seen = _recording_batcher(max_batch=8, max_wait_s=0.01)
    try:
        first = batcher.submit({"i": 1})
        assert first.result(5) == 10  # its batch has closed and run: no sleep needed to miss the window
        second = batcher.submit({"i": 2})
        assert second.result(5) == 20
    finally:
        batcher.stop()
    assert seen == [[1], [2]]


def test_requests_marked_as_arriving_join_the_batch_being_collected():
    batcher, seen = _recording_batcher(max_batch=8, max_wait_s=0.01, max_hold_s=2.0)
    ready = threading.Event()

    def slow_client():
        with batcher.arriving():
            ready.set()
            time.sleep(0.15)  # parsing and validating, well past max_wait_s
            futures.append(batcher.submit({"i": 2}))

    futures = []
    try:
        thread = threading.Thread(target=slow_client)
        thread.start()
        ready.wait(5)
        first = batcher.submit({"i": 1})
        thread.join(5)
        assert first.result(5) == 10 and futures[0].result(5) == 20
    finally:
        batcher.stop()
    assert seen == [[1, 2]]
    assert batcher.stats.snapshot()["max_batch_size"] == 2


def test_the_hold_is_bounded_when_an_arrival_never_submits():
    batcher, seen = _recording_batcher(max_batch=8, max_wait_s=0.01, max_hold_s=0.2)
    release = threading.Event()

    def stuck_client():
        with batcher.arriving():
            release.wait(5)  # e.g. a request that will fail validation, slowly

    thread = threading.Thread(target=stuck_client)
    thread.start()
    try:
        time.sleep(0.02)
        started = time.monotonic()
        assert batcher.submit({"i": 1}).result(5) == 10
        waited = time.monotonic() - started
    finally:
        release.set()
        thread.join(5)
        batcher.stop()
    assert 0.15 <= waited < 2.0 and seen == [[1]]
