# Run: chroma run --path ./chroma --port 8001                                   (one shell)
#      personalign serve --store ./store --workers 2 --profiles-url sqlite:///store/profiles.db \
#          --chroma-url http://127.0.0.1:8001                                    (another shell)
#      python examples/several_workers.py --base-url http://127.0.0.1:8000        (a third)
# Takes a few seconds on a CPU once the server is up (each worker loads the models: ~10 s).
"""Several `personalign serve` workers on one shared store, seen from a client.

Users are enrolled and given memories from several threads at once, each request on a new
connection, so the worker processes share the writes. Then every user is read back through
fresh connections until each worker has answered for each of them (every answer names its
worker in the `x-personalign-worker` header): what one worker wrote, every worker reads.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

HEADER = "x-personalign-worker"


def request(base_url: str, method: str, path: str, **kwargs) -> httpx.Response:
    """One request on a new connection (so any worker may take it)."""
    with httpx.Client(base_url=base_url, timeout=60) as client:
        answer = client.request(method, path, **kwargs)
    answer.raise_for_status()
    return answer


def write(base_url: str, user: str, n: int) -> list[str]:
    """``n`` comparisons and ``n`` memories for ``user``, one request each; the workers that took them."""
    workers = []
    for i in range(n):
        pair = {"prompt": f"Question {i} of {user}?", "chosen": "Short answer.", "rejected": "A long detour."}
        answer = request(base_url, "POST", f"/v1/users/{user}/comparisons", json={"comparisons": [pair]})
        workers.append(answer.headers[HEADER])
        answer = request(
            base_url, "POST", f"/v1/users/{user}/memories", json={"text": f"Fact {i} of {user}."}
        )
        workers.append(answer.headers[HEADER])
    return workers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--writes", type=int, default=3, help="comparisons (and memories) per user")
    parser.add_argument("--workers", type=int, default=2, help="how many workers the server runs")
    parser.add_argument("--prefix", default="worker-demo")
    args = parser.parse_args()
    started = time.perf_counter()
    users = [f"{args.prefix}-{i}" for i in range(args.users)]

    with ThreadPoolExecutor(len(users)) as pool:
        writers = [w for ws in pool.map(lambda u: write(args.base_url, u, args.writes), users) for w in ws]
    print(
        f"== wrote {len(writers)} times from {len(users)} threads; workers that took them: {sorted(set(writers))}"
    )

    readers: dict[str, set[str]] = {}

    def read(user: str) -> None:
        answer = request(args.base_url, "GET", f"/v1/users/{user}")
        profile = answer.json()
        assert profile["n_comparisons"] == args.writes and profile["n_memories"] == args.writes, profile
        readers.setdefault(answer.headers[HEADER], set()).add(user)

    with ThreadPoolExecutor(8) as pool:
        for _ in range(50):  # until every worker has answered for every user
            list(pool.map(read, users * 2))
            if sum(len(seen) == len(users) for seen in readers.values()) >= args.workers:
                break
    complete = sorted(w for w, seen in readers.items() if len(seen) == len(users))
    print(
        f"== each user has {args.writes} comparisons and {args.writes} memories, as read from workers {complete}"
    )
    print(f"every user readable from every worker: {'yes' if len(complete) >= args.workers else 'no'}")
    for user in users:
        request(args.base_url, "DELETE", f"/v1/users/{user}")
    print(f"done in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
