"""Adapter training off the request path: huey jobs run by a real `personalign worker` process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from personalign.server import ServerConfig, ServerThread, create_app, load_api_keys

PAIRS = [
    {"prompt": "How are you?", "chosen": "Fine, thanks.", "rejected": "Go away."},
    {"prompt": "Any tips?", "chosen": "Drink water.", "rejected": "No."},
    {"prompt": "Hello", "chosen": "Hi there!", "rejected": "What?"},
    {"prompt": "Plan my day.", "chosen": "Work, then rest.", "rejected": "No plans."},
]
ACME, GLOBEX = "sk-acme-jobs", "sk-globex-jobs"
CHAT = {"model": "personalign", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def served(tiny_model_dir, encoder, tmp_path_factory):
    """A server over the tiny generator with a job queue, and a worker process running its jobs."""
    from personalign.jobs import JobQueue, WorkerSpec
    from personalign.models import load_generator
    from personalign.personalizer import Personalizer

    tmp_path = tmp_path_factory.mktemp("jobs")
    store = tmp_path / "store"
    keys = tmp_path / "keys.json"
    keys.write_text(
        json.dumps({"keys": [{"key": ACME, "tenant": "acme"}, {"key": GLOBEX, "tenant": "globex"}]})
    )
    config = ServerConfig(api_keys=load_api_keys(keys), max_tokens_cap=16, default_max_tokens=4)
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "personalign.cli",
            "worker",
            "--store",
            str(store),
            "--model",
            str(tiny_model_dir),
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    # its own generator: the adapter the chats load must not wrap the session's shared one
    with Personalizer(load_generator(str(tiny_model_dir), device="cpu"), encoder, store=store) as pz:
        jobs = JobQueue(WorkerSpec(str(store), str(tiny_model_dir)))
        with ServerThread(create_app(pz, config, jobs=jobs)) as server:
            yield pz, jobs, server
    worker.terminate()
    worker.wait(30)


def client(server, key):
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def wait(http, job_id, timeout=180):
    deadline = time.monotonic() + timeout
    while True:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed") or time.monotonic() > deadline:
            return job
        time.sleep(0.2)


def test_enroll_with_adapter_queues_a_job_and_the_next_chat_uses_the_adapter(served):
    pz, _, server = served
    http = client(server, ACME)
    reply = http.post("/v1/users/ada/comparisons", json={"comparisons": PAIRS, "adapter": True})
    assert reply.status_code == 200
    job = reply.json()["job"]
    assert job["status"] == "queued" and job["user"] == "ada" and job["kind"] == "train_adapter"
    # the server answers chats while the worker trains
    assert http.post("/v1/chat/completions", json={**CHAT, "user": "someone-else"}).status_code == 200
    done = wait(http, job["id"])
    assert done["status"] == "succeeded", done
    assert done["result"]["pairs"] >= 1 and done["finished_at"] >= done["started_at"]
    stored = next(u for u in pz.profiles.list_users() if u.endswith("ada"))
    assert pz.adapters.has_adapter(stored)
    assert http.post("/v1/chat/completions", json={**CHAT, "user": "ada"}).status_code == 200
    assert stored in pz.adapters.resident  # the first chat after training ran the new adapter
    assert http.get("/v1/users/ada").json()["settings"]["adapter"]["pairs"] == done["result"]["pairs"]


def test_a_job_is_its_tenants_only(served):
    _, _, server = served
    acme, globex = client(server, ACME), client(server, GLOBEX)
    acme.post("/v1/users/bob/comparisons", json={"comparisons": PAIRS})
    job = acme.post("/v1/users/bob/adapter", json={"config": {"epochs": 1}})
    assert job.status_code == 202
    job_id = job.json()["id"]
    assert globex.get(f"/v1/jobs/{job_id}").status_code == 404
    assert acme.get(f"/v1/jobs/{job_id}").status_code == 200
    wait(acme, job_id)


def test_bad_training_requests_are_refused_before_queueing(served):
    _, jobs, server = served
    http = client(server, ACME)
    unknown = http.post("/v1/users/nobody/adapter", json={})
    assert unknown.status_code == 404
    http.post("/v1/users/carl/comparisons", json={"comparisons": PAIRS})
    bad = http.post("/v1/users/carl/adapter", json={"config": {"epochs": 0}})
    assert bad.status_code == 400 and "config" in bad.json()["error"]["message"]
    assert http.get("/v1/jobs/job_does_not_exist").status_code == 404
    assert jobs.huey.pending_count() == 0


def test_a_server_without_a_queue_says_so_and_stores_nothing(pz):
    with ServerThread(create_app(pz)) as server:
        http = httpx.Client(base_url=server.url, timeout=60)
        reply = http.post("/v1/users/dan/comparisons", json={"comparisons": PAIRS, "adapter": True})
        assert reply.status_code == 400 and "worker" in reply.json()["error"]["message"]
        assert reply.json()["error"]["param"] == "adapter"
        assert not pz.is_enrolled("dan")


def test_personalign_serve_runs_its_own_worker(tiny_model_dir, tmp_path):
    """`personalign serve` (jobs on by default) starts a worker child that trains queued adapters,
    and takes it down when stopped."""
    from test_server_chroma import free_port, serve_command, stop, wait_until_up

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(serve_command(tmp_path / "store", port, tiny_model_dir), env=env)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", server)
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        job = http.post("/v1/users/eve/comparisons", json={"comparisons": PAIRS, "adapter": True}).json()[
            "job"
        ]
        assert wait(http, job["id"])["status"] == "succeeded"
        assert http.post("/v1/chat/completions", json={**CHAT, "user": "eve"}).status_code == 200
        assert workers_of(server.pid), "serve's worker child is running"
    finally:
        assert stop(server) == 0
    time.sleep(1.5)
    assert not workers_of(server.pid), "the worker ends with serve"


def workers_of(pid: int) -> list[str]:
    table = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in table if "personalign.cli worker" in line and f"--parent {pid}" in line]
