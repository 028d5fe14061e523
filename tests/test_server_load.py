"""16 concurrent clients mixing chats, enrollments and memory writes for 20 users.

Every acknowledged write must be stored exactly once, nothing else may appear, every chat must
succeed, and chats must have shared ``generate`` calls (the batcher saw batches of more than one).
"""

from __future__ import annotations

import random
import threading
from collections import defaultdict

import httpx

from personalign.personalizer import Personalizer
from personalign.server import ServerConfig, ServerThread, create_app

USERS = [f"user{i:02d}" for i in range(20)]
CLIENTS = 16
OPS_PER_CLIENT = 9


def test_sixteen_clients_mixed_load_loses_no_writes(tiny_generator, encoder, tmp_path):
    config = ServerConfig(max_batch=16, batch_wait_ms=20, default_max_tokens=8)
    with (
        Personalizer(tiny_generator, encoder, store=tmp_path / "store") as pz,
        ServerThread(create_app(pz, config)) as server,
    ):
        with httpx.Client(base_url=server.url, timeout=120) as http:
            for user in USERS:
                seed = {
                    "prompt": f"Seed question of {user}?",
                    "chosen": "Short.",
                    "rejected": "A much longer answer than needed.",
                }
                assert (
                    http.post(f"/v1/users/{user}/comparisons", json={"comparisons": [seed]}).status_code
                    == 200
                )

        acked_comparisons: dict[str, list[str]] = defaultdict(list)
        acked_memories: dict[str, list[str]] = defaultdict(list)
        chats: list[int] = []
        failures: list[str] = []
        lock = threading.Lock()
        start = threading.Barrier(CLIENTS)

        def client(index: int) -> None:
            rng = random.Random(index)
            with httpx.Client(base_url=server.url, timeout=120) as http:
                start.wait()
                for op in range(OPS_PER_CLIENT):
                    user = rng.choice(USERS)
                    tag = f"c{index}-op{op}"
                    kind = op % 3
                    if kind == 0:
                        body = {
                            "comparisons": [
                                {
                                    "prompt": f"Question {tag}?",
                                    "chosen": f"Yes {tag}.",
                                    "rejected": f"No {tag}, at length.",
                                }
                            ]
                        }
                        response = http.post(f"/v1/users/{user}/comparisons", json=body)
                        record = acked_comparisons
                    elif kind == 1:
                        response = http.post(
                            f"/v1/users/{user}/memories", json={"text": f"Fact {tag} about {user}."}
                        )
                        record = acked_memories
                    else:
                        body = {
                            "model": "personalign",
                            "user": user,
                            "messages": [{"role": "user", "content": f"Tell me about {tag}."}],
                            "max_tokens": 8,
                        }
                        response = http.post("/v1/chat/completions", json=body)
                        record = None
                    with lock:
                        if response.status_code != 200:
                            failures.append(f"{tag} {response.status_code} {response.text[:200]}")
                        elif record is acked_comparisons:
                            record[user].append(f"Question {tag}?")
                        elif record is acked_memories:
                            record[user].append(f"Fact {tag} about {user}.")
                        else:
                            chats.append(response.json()["usage"]["completion_tokens"])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert not failures, failures[:5]
        assert len(chats) == CLIENTS * OPS_PER_CLIENT // 3

        with httpx.Client(base_url=server.url, timeout=120) as http:
            for user in USERS:
                profile = http.get(f"/v1/users/{user}").json()
                prompts = [c["prompt"] for c in profile["comparisons"]]
                assert prompts[0] == f"Seed question of {user}?"
                assert sorted(prompts[1:]) == sorted(acked_comparisons[user]), (
                    user
                )  # none lost, none duplicated
                assert profile["version"] == 1 + len(
                    acked_comparisons[user]
                )  # one read-modify-write per enrolment
                stored = [m["memory"] for m in http.get(f"/v1/users/{user}/memories").json()["results"]]
                assert sorted(stored) == sorted(acked_memories[user]), user
            stats = http.get("/v1/server/stats").json()
        assert stats["requests"] == len(chats)
        assert stats["max_batch_size"] > 1 and stats["mean_batch_size"] > 1.5, (
            stats
        )  # chats shared generate calls
