"""`personalign serve --workers N` on one shared store, in real processes: profiles in SQLite (2 and 4
workers) or a real PostgreSQL server (2 workers), memories on a real `chroma run`, the tiny model.

Under a mixed concurrent load (enroll comparisons, memory writes, chats): no acknowledged write is
lost, duplicated or corrupted, every user is readable from every worker, and a worker killed with
SIGKILL in the middle of writes loses nothing it acknowledged. Also: several workers on an embedded
store are refused before any model loads, and a worker's resident adapter follows a retraining
done by another process, and a user forgotten by one process is gone for another that still held
a handle on their memory collection.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from personalign.cli import app
from personalign.server.run import WORKER_HEADER, check_workers
from postgres_server import postgres_url  # noqa: F401 (a fixture)
from test_server_chroma import free_port, wait_until_up

CHROMA = shutil.which("chroma", path=str(Path(sys.executable).parent)) or shutil.which("chroma")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
USERS, CLIENTS, ROUNDS = 6, 8, 4  # per phase: CLIENTS threads x ROUNDS rounds of (enroll, remember, chat)


def stop(process: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM, then after ``grace`` seconds SIGKILL to the process and (a server started in its
    own session) its workers: a replacement worker still loading its models may not stop sooner."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL) if process.pid == os.getpgid(process.pid) else process.kill()
        process.wait()


@pytest.fixture(scope="module")
def chroma_url(tmp_path_factory):
    if CHROMA is None:
        pytest.skip("the `chroma` command (from the chromadb package) is not installed")
    port = free_port()
    folder = tmp_path_factory.mktemp("chroma-server")
    command = [CHROMA, "run", "--path", str(folder), "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/api/v2/heartbeat", process, timeout=180)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)


def serve(
    store: Path, model: Path, workers: int, profiles_url: str, chroma: str
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "personalign.cli", "serve", "--store", str(store), "--port", str(port)]
    command += ["--model", str(model), "--device", "cpu", "--log-level", "warning", "--workers", str(workers)]
    command += ["--profiles-url", profiles_url, "--chroma-url", chroma, "--batch-wait-ms", "2", "--no-jobs"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = store.parent / f"serve-{port}.log"  # a file, not a pipe that a chatty worker could fill
    with log.open("w") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=sink, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/health", process, timeout=180)
    except AssertionError:
        stop(process, grace=5)
        raise AssertionError(log.read_text()[-3000:]) from None
    return process, url


class Load:
    """Mixed concurrent traffic over fresh connections; remembers what each worker acknowledged."""

    def __init__(self, url: str, users: list[str], database: str) -> None:
        self.url, self.users, self.database = url, users, database
        self.prompts: dict[str, list[str]] = {u: [] for u in users}  # acknowledged comparisons' prompts
        self.memories: dict[str, dict[str, str]] = {u: {} for u in users}  # acknowledged memory id -> text
        self.unsure: dict[str, set[str]] = {u: set() for u in users}  # writes sent without an answer
        self.failed: Counter[str] = Counter()  # requests with no answer (a killed worker's)
        self.served: Counter[str] = Counter()  # answers per worker process id
        self.lock = threading.Lock()

    def _call(self, method: str, path: str, **kwargs) -> httpx.Response | None:
        try:
            with httpx.Client(base_url=self.url, timeout=60) as client:  # a new connection: any worker
                answer = client.request(method, path, **kwargs)
        except httpx.TransportError:
            with self.lock:
                self.failed[path.rsplit("/", 1)[-1]] += 1
            return None
        assert answer.status_code == 200, (path, answer.status_code, answer.text[:500])
        with self.lock:
            self.served[answer.headers[WORKER_HEADER]] += 1
        return answer

    def client(self, tag: str) -> None:
        rng = random.Random(tag)
        for step in range(ROUNDS):
            user = rng.choice(self.users)
            prompt = f"Question {tag} {step}: how long do I boil an egg?"
            pair = {"prompt": prompt, "chosen": f"Nine minutes ({tag}.{step}).", "rejected": "It depends."}
            acknowledged = self._call("POST", f"/v1/users/{user}/comparisons", json={"comparisons": [pair]})
            with self.lock:
                (self.prompts[user].append if acknowledged else self.unsure[user].add)(prompt)
            fact = f"Fact {tag}.{step}: my locker code is {rng.randrange(10**6):06d}."
            answer = self._call("POST", f"/v1/users/{user}/memories", json={"text": fact})
            if answer is None:
                with self.lock:
                    self.unsure[user].add(fact)
            else:
                (record,) = answer.json()["results"]
                assert record["event"] == "ADD" and record["memory"] == fact
                with self.lock:
                    self.memories[user][record["id"]] = fact
            chat = {"model": "personalign", "user": user, "max_tokens": 4, "temperature": 0}
            chat["messages"] = [{"role": "user", "content": "What should I cook tonight?"}]
            self._call("POST", "/v1/chat/completions", json=chat)

    def run(self, phase: str, during=None) -> None:
        with ThreadPoolExecutor(CLIENTS) as pool:
            jobs = [pool.submit(self.client, f"{phase}{c}") for c in range(CLIENTS)]
            if during is not None:
                during()
            for job in jobs:
                job.result()

    def check_from(self, worker_count: int, timeout: float = 30, pause: float = 0.0) -> set[str]:
        """Read every user through fresh connections until ``worker_count`` workers have each
        answered for every user; each answer holds exactly the acknowledged writes. The workers seen.
        ``pause``: seconds between rounds (leaves the CPU to workers that are still loading)."""
        seen: dict[str, set[str]] = {}
        deadline = time.monotonic() + timeout

        def read(user: str) -> None:
            profile = self._call("GET", f"/v1/users/{user}")
            memories = self._call("GET", f"/v1/users/{user}/memories")
            assert profile is not None and memories is not None
            stored = [c["prompt"] for c in profile.json()["comparisons"]]
            assert len(stored) == len(set(stored)), user  # none twice
            assert set(self.prompts[user]) <= set(stored), user  # none acknowledged lost
            assert set(stored) - set(self.prompts[user]) <= self.unsure[user], (
                user
            )  # only unanswered ones extra
            for c in profile.json()["comparisons"]:  # none corrupted
                tag_step = c["prompt"].split()[1:3]
                assert c["chosen"] == f"Nine minutes ({tag_step[0]}.{tag_step[1][:-1]})."
            found = {r["id"]: r["memory"] for r in memories.json()["results"]}
            assert found.items() >= self.memories[user].items(), user
            extra = [text for i, text in found.items() if i not in self.memories[user]]
            assert len(set(found.values())) == len(found) and set(extra) <= self.unsure[user], user
            with self.lock:
                seen.setdefault(profile.headers[WORKER_HEADER], set()).add(user)

        with ThreadPoolExecutor(CLIENTS) as pool:
            while time.monotonic() < deadline:
                list(pool.map(read, self.users * 2))
                complete = [w for w, users in seen.items() if len(users) == len(self.users)]
                if len(complete) >= worker_count:
                    return set(complete)
                time.sleep(pause)
        raise AssertionError(f"only {sorted(seen)} answered for every user; wanted {worker_count} workers")


def worker_pids(supervisor: int) -> set[str]:
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return set(children)


def mixed_load(load: Load, phase: str, workers: int, supervisor: int) -> set[str]:
    """One phase of mixed load, then the check from ``workers`` workers; the workers that answered."""
    started = time.perf_counter()
    load.run(phase)
    seconds = time.perf_counter() - started
    served = dict(load.served)  # the load's answers per worker (not the check's)
    answered = load.check_from(workers, timeout=120)  # workers just added may still be loading
    assert answered <= worker_pids(supervisor) and len(answered) == workers
    assert load.failed == Counter()
    print(
        f"\n{workers} workers on {load.database}: {3 * CLIENTS * ROUNDS} mixed requests from {CLIENTS} "
        f"clients in {seconds:.2f} s ({3 * CLIENTS * ROUNDS / seconds:.1f} requests/s), served {served}"
    )
    load.served.clear()
    return answered


def kill_mid_write(load: Load, answered: set[str]) -> None:
    """SIGKILL one worker while the clients write: whatever any worker acknowledged is stored."""

    def kill_one() -> None:
        time.sleep(1.0)  # every client is writing by now
        os.kill(int(sorted(answered)[0]), signal.SIGKILL)

    load.served.clear()
    load.run("k", during=kill_one)
    load.check_from(len(answered) - 1)  # the supervisor's replacement may still be loading
    print(
        f"SIGKILL of one worker: {sum(load.failed.values())} requests without an answer {dict(load.failed)}"
    )


def test_two_then_four_workers_on_sqlite(chroma_url, tiny_model_dir, tmp_path):
    """``--workers 2``, then two more workers added (uvicorn's SIGTTIN) on the same store and port."""
    store = tmp_path / "store"
    process, url = serve(store, tiny_model_dir, 2, f"sqlite:///{store / 'profiles.db'}", chroma_url)
    try:
        load = Load(url, [f"sqlite-u{i}" for i in range(USERS)], "sqlite")  # one Chroma server for all
        mixed_load(load, "a", 2, process.pid)
        example = [sys.executable, str(EXAMPLES / "several_workers.py"), "--base-url", url, "--workers", "2"]
        done = subprocess.run(example, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "every user readable from every worker: yes" in done.stdout, done.stdout
        for _ in range(2):
            process.send_signal(signal.SIGTTIN)  # one more worker process each
            time.sleep(1.0)  # the supervisor looks every 0.5 s; two signals at once would count as one
        load.check_from(4, timeout=180, pause=1.0)  # the new workers load their models
        load.served.clear()
        answered = mixed_load(load, "b", 4, process.pid)
        kill_mid_write(load, answered)
    finally:
        stop(process, grace=5)


def test_two_workers_on_postgresql(postgres_url, chroma_url, tiny_model_dir, tmp_path):  # noqa: F811
    process, url = serve(tmp_path / "store", tiny_model_dir, 2, postgres_url, chroma_url)
    try:
        load = Load(url, [f"postgresql-u{i}" for i in range(USERS)], "postgresql")
        answered = mixed_load(load, "a", 2, process.pid)
        kill_mid_write(load, answered)
    finally:
        stop(process, grace=5)


def test_several_workers_need_a_shared_store(tmp_path):
    result = CliRunner().invoke(app, ["serve", "--store", str(tmp_path), "--workers", "2"])
    assert result.exit_code == 2, result.output
    assert "--workers: needs a store that several processes can share" in result.output
    assert "--profiles-url and --chroma-url are not given" in result.output
    assert "Fix: add --profiles-url sqlite:///" in result.output
    with pytest.raises(ValueError, match="--chroma-url is not given"):
        check_workers(4, None, "sqlite:///p.db")
    check_workers(1, None, None)  # one worker: any store
    check_workers(3, "http://127.0.0.1:8000", "sqlite:///p.db")


PAIRS = [
    {"prompt": f"Question number {i} about eggs?", "chosen": "Nine minutes.", "rejected": "It depends a lot."}
    for i in range(4)
]
FLIPPED = [{**c, "chosen": c["rejected"], "rejected": c["chosen"]} for c in PAIRS]
FAST = {"epochs": 2, "rank": 4, "learning_rate": 5e-2, "seed": 0, "holdout_fraction": 0.0}


def test_a_resident_adapter_follows_a_retraining_in_another_process(
    chroma_url, tiny_model_dir, encoder, tmp_path
):
    """Two Personalizers on one shared store stand for two workers: after one retrains a user's
    adapter, the other's next chat for that user loads the new adapter from disk (the profile's
    adapter note changed), so both answer the same."""
    import torch

    from personalign.models import load_generator
    from personalign.personalizer import Personalizer
    from personalign.server.run import chroma_client

    shared = {"store": tmp_path / "store", "profiles_url": f"sqlite:///{tmp_path / 'profiles.db'}"}
    ask = [{"role": "user", "content": "Question number 2 about eggs?"}]
    with (
        Personalizer(load_generator(str(tiny_model_dir), device="cpu"), encoder, memory_client=chroma_client(chroma_url), **shared) as one,
        Personalizer(load_generator(str(tiny_model_dir), device="cpu"), encoder, memory_client=chroma_client(chroma_url), **shared) as two,
    ):  # fmt: skip
        one.enroll("ana", PAIRS, adapter=True, adapter_config=FAST)
        two.chat("ana", ask, max_new_tokens=6, temperature=0.0)
        slot = two.adapters.resident["ana"]
        before = {n: p.detach().clone() for n, p in two.adapters._slot_params(slot).items()}
        one.edit_comparisons("ana", replace=dict(enumerate(FLIPPED)))
        one.train_adapter("ana", FAST)
        reply = two.chat("ana", ask, max_new_tokens=6, temperature=0.0)
        after = two.adapters._slot_params(two.adapters.resident["ana"])
        on_disk = one.adapters.path("ana") / "adapter_model.safetensors"
        from safetensors.torch import load_file

        trained = load_file(str(on_disk))
        assert any(not torch.equal(before[n], after[n]) for n in before)
        for name, value in trained.items():
            torch.testing.assert_close(after[name], value)
        assert reply == one.chat("ana", ask, max_new_tokens=6, temperature=0.0)


def test_a_user_forgotten_by_one_worker_is_gone_for_the_other(chroma_url, tiny_model_dir, encoder, tmp_path):
    """Two Personalizers on one shared store stand for two workers. After the first forgets a user
    (their Chroma collection is dropped), the second, which holds a handle on that collection,
    finds nothing of them (no Chroma ``NotFoundError``), and its writes go to a new collection."""
    from personalign.errors import UnknownUserError
    from personalign.memory.lifecycle import UnknownMemoryError
    from personalign.models import load_generator
    from personalign.personalizer import Personalizer
    from personalign.server.run import chroma_client

    shared = {"store": tmp_path / "store", "profiles_url": f"sqlite:///{tmp_path / 'profiles.db'}"}
    with (
        Personalizer(load_generator(str(tiny_model_dir), device="cpu"), encoder, memory_client=chroma_client(chroma_url), **shared) as one,
        Personalizer(load_generator(str(tiny_model_dir), device="cpu"), encoder, memory_client=chroma_client(chroma_url), **shared) as two,
    ):  # fmt: skip
        one.enroll("bea", PAIRS[:2])
        added = one.remember(
            "bea", ["I keep bees on the roof.", "I live in Lisbon."], metadata={"topic": "home"}
        )
        kept = added["results"][0]["id"]
        assert len(two.memories("bea")["results"]) == 2  # the second worker now holds a handle
        assert two.search_memories("bea", "bees", filters={"topic": "home"})["results"]
        assert two.get_memory("bea", kept)["memory"] == "I keep bees on the roof."

        one.forget("bea")

        assert two.memories("bea", status="all")["results"] == []
        assert two.search_memories("bea", "bees", filters={"topic": "home"})["results"] == []
        assert two.memory.count("bea") == 0 and two.store.memories.texts("bea") == []
        for read in (two.get_memory, two.memory_history):
            with pytest.raises(UnknownMemoryError):
                read("bea", kept)
        with pytest.raises(UnknownMemoryError):
            two.update_memory("bea", kept, "I keep wasps.")
        assert two.delete_memory("bea", kept) is False and two.forget_memories("bea") == 0
        with pytest.raises(UnknownUserError):
            two.export("bea")
        with pytest.raises(UnknownUserError):
            two.chat("bea", [{"role": "user", "content": "Where do I live?"}], max_new_tokens=2)

        # Writes after a forget elsewhere (twice: once through a dropped handle) land in a new collection.
        two.remember("bea", "I moved to Porto.")
        assert [r["memory"] for r in one.memories("bea")["results"]] == ["I moved to Porto."]
        one.forget("bea")
        two.remember("bea", "I moved to Faro.", key="home_city")
        assert [r["memory"] for r in one.memories("bea", status="all")["results"]] == ["I moved to Faro."]
        assert [r["memory"] for r in two.search_memories("bea", "Porto")["results"]] == ["I moved to Faro."]


def test_workers_get_the_api_keys_as_digests_only():
    from personalign.server.config import ApiKey, ServerConfig
    from personalign.server.run import WorkerSettings, hashed_keys

    plain = "sk-a-plain-secret-key"
    config = ServerConfig(api_keys=(ApiKey(key=plain, tenant="acme", read_only=True),), max_batch=4)
    settings = WorkerSettings(store="/srv/store", config=hashed_keys(config).model_dump(mode="json"))
    sent = settings.model_dump_json()  # what the workers' environment holds
    assert plain not in sent
    received = ServerConfig.model_validate(WorkerSettings.model_validate_json(sent).config)
    assert received.keys_by_digest().keys() == config.keys_by_digest().keys()
    assert (
        received.api_keys[0].tenant == "acme" and received.api_keys[0].read_only and received.max_batch == 4
    )
