"""SIGKILL the server in the middle of enrollments and memory writes, 20 times, and restart it.

After every restart, every acknowledged write is there, every request's pair of items is stored
whole or not at all, nothing appears that was never sent, and at the end the store opens cleanly
in this process.

Each server is a real process killed with SIGKILL. To keep 20 restarts fast, a "zygote" process
imports torch, transformers and chromadb once and forks a fresh server child for each round; the
zygote itself never opens the store, so nothing survives a kill but what is on disk.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict

import httpx

from personalign.server.run import bound_socket

KILLS = 20
USERS = [f"u{i}" for i in range(5)]
WRITERS = 4

ZYGOTE = r"""
import os, signal, sys
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import chromadb, fastapi, sentence_transformers, torch, transformers, uvicorn  # the slow imports, once
import personalign.personalizer, personalign.server.app, personalign.server.run
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps killed children
model, store = sys.argv[1], sys.argv[2]
print("ready", flush=True)
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        from personalign.personalizer import Personalizer
        from personalign.server.config import ServerConfig
        from personalign.server.run import serve
        with Personalizer.load(model=model, device="cpu", store=store) as pz:
            serve(pz, ServerConfig(max_batch=4), port=int(line), log_level="error")
        os._exit(0)
    print(pid, flush=True)
"""


def free_port() -> int:
    with bound_socket() as sock:
        return sock.getsockname()[1]


class Ledger:
    """Every write request sent, and which were acknowledged (HTTP 200)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent: dict[str, list[tuple[str, tuple[str, str]]]] = {"comparisons": [], "memories": []}
        self.acked: dict[str, dict[str, set[str]]] = {
            "comparisons": defaultdict(set),
            "memories": defaultdict(set),
        }
        self.inflight = 0
        self.acks = 0
        self.counter = itertools.count()

    def check(self, http: httpx.Client) -> int:
        """Compare the server's store with the ledger; returns how many items were checked."""
        stored: dict[str, dict[str, list[str]]] = {"comparisons": {}, "memories": {}}
        for user in USERS:
            profile = http.get(f"/v1/users/{user}")
            if profile.status_code == 404:
                stored["comparisons"][user], stored["memories"][user] = [], []
                continue
            assert profile.status_code == 200, profile.text
            stored["comparisons"][user] = [c["prompt"] for c in profile.json()["comparisons"]]
            memories = http.get(f"/v1/users/{user}/memories")
            assert memories.status_code == 200, memories.text
            stored["memories"][user] = [m["memory"] for m in memories.json()["results"]]
        checked = 0
        for kind in ("comparisons", "memories"):
            for user in USERS:
                items = stored[kind][user]
                assert len(items) == len(set(items)), f"{kind} of {user} duplicated"
                missing = self.acked[kind][user] - set(items)
                assert not missing, f"acknowledged {kind} of {user} lost: {sorted(missing)[:3]}"
                checked += len(self.acked[kind][user])
            sent = {item for _, pair in self.sent[kind] for item in pair}
            everything = {item for user in USERS for item in stored[kind][user]}
            assert everything <= sent, f"{kind} stored that were never sent: {sorted(everything - sent)[:3]}"
            for user, pair in self.sent[kind]:
                present = [item in stored[kind][user] for item in pair]
                assert all(present) or not any(present), f"half-written {kind} request for {user}: {pair}"
        return checked


def writer(url: str, ledger: Ledger, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=30) as http:
        while not stop.is_set():
            user = rng.choice(USERS)
            n = next(ledger.counter)
            if n % 2:
                kind, pair = "comparisons", (f"Question {n}a?", f"Question {n}b?")
                body = {
                    "comparisons": [
                        {"prompt": p, "chosen": "Short.", "rejected": "A much longer answer."} for p in pair
                    ]
                }
            else:
                kind, pair = "memories", (f"Fact {n}a.", f"Fact {n}b.")
                body = {"text": list(pair)}
            with ledger.lock:
                ledger.sent[kind].append((user, pair))
                ledger.inflight += 1
            try:
                response = http.post(f"/v1/users/{user}/{kind}", json=body)
            except httpx.HTTPError:
                return  # the server was killed under this request
            finally:
                with ledger.lock:
                    ledger.inflight -= 1
            if response.status_code == 200:
                with ledger.lock:
                    ledger.acked[kind][user].update(pair)
                    ledger.acks += 1
            else:
                raise AssertionError(f"write failed with {response.status_code}: {response.text}")


def wait_for(url: str, pid: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise AssertionError("the restarted server died (see captured stderr)") from None
        time.sleep(0.05)
    raise AssertionError(f"the server did not come back within {timeout} s")


def wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} survived SIGKILL")


def test_sigkill_during_writes_keeps_every_acknowledged_write(tiny_model_dir, encoder, tmp_path):
    store = tmp_path / "store"
    zygote = subprocess.Popen(
        [sys.executable, "-c", ZYGOTE, str(tiny_model_dir), str(store)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    ledger = Ledger()
    rng = random.Random(0)
    inflight_at_kill = []
    try:
        assert zygote.stdout.readline().strip() == "ready"

        def start() -> tuple[str, int]:
            port = free_port()
            zygote.stdin.write(f"{port}\n")
            zygote.stdin.flush()
            pid = int(zygote.stdout.readline())
            url = f"http://127.0.0.1:{port}"
            wait_for(url, pid)
            return url, pid

        for round_ in range(KILLS):
            url, pid = start()
            with httpx.Client(base_url=url, timeout=30) as http:
                ledger.check(http)
            stop = threading.Event()
            acks_before = ledger.acks
            threads = [
                threading.Thread(target=writer, args=(url, ledger, stop, round_ * 100 + i))
                for i in range(WRITERS)
            ]
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 30
            while ledger.acks == acks_before and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.4))
            with ledger.lock:
                inflight_at_kill.append(ledger.inflight)
            os.kill(pid, signal.SIGKILL)
            wait_gone(pid)
            stop.set()
            for thread in threads:
                thread.join(30)

        url, pid = start()
        with httpx.Client(base_url=url, timeout=30) as http:
            checked = ledger.check(http)
        os.kill(pid, signal.SIGTERM)
        wait_gone(pid)
    finally:
        zygote.kill()
        zygote.wait()

    assert len(inflight_at_kill) == KILLS and min(inflight_at_kill) >= 1, (
        inflight_at_kill
    )  # every kill hit writes in flight
    assert checked >= 4 * KILLS
    # The store opens cleanly here too, and holds exactly what the server showed.
    from personalign.memory.store import UserStore

    with UserStore(store, encoder) as users:
        for user in USERS:
            if users.profiles.exists(user):
                assert ledger.acked["comparisons"][user] <= {
                    c.prompt_text for c in users.profiles.get(user).comparisons
                }
            assert ledger.acked["memories"][user] <= {
                m["memory"] for m in users.memory.get_all(user)["results"]
            }
