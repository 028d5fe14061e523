"""A user whose facts change: keyed memories that supersede, a re-stated fact stored once, an
edit with its history, a possible conflict, metadata filters, a chat that retrieves only the
current fact, and the export of everything stored about the user.

    python examples/memory_lifecycle.py              # embedded models, about 20 s on a CPU
    python examples/memory_lifecycle.py --model DIR --store DIR --max-new-tokens 8

The same operations over HTTP: ``POST /v1/users/{id}/memories`` (``key``, ``on_conflict``),
``GET|PUT /v1/users/{id}/memories/{memory_id}``, ``GET .../{memory_id}/history``,
``GET /v1/users/{id}/memories?filters=...``, ``GET /v1/users/{id}/export``; on the command
line: ``personalign memory add|get|update|history|list|search`` and ``personalign export-user``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from personalign import Personalizer


def events(result: dict) -> list[tuple[str, str, str]]:
    return [(r["event"], r["status"], r["memory"]) for r in result["results"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default=None,
        help="generator: HF id or local folder (default: embedded SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--encoder",
        default=None,
        help="sentence encoder: HF id or local folder (default: embedded all-MiniLM-L6-v2)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:0 or auto (default: auto)")
    parser.add_argument(
        "--store", type=Path, default=None, help="store directory (default: a temporary one, removed after)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        store = args.store or Path(scratch) / "store"
        with Personalizer.load(model=args.model, encoder=args.encoder, device=args.device, store=store) as pz:
            print("== keys supersede")
            print(
                "add:",
                events(
                    pz.remember("mia", "I live in Paris.", key="home_city", metadata={"category": "home"})
                ),
            )
            moved = pz.remember(
                "mia", "I moved to Berlin last spring.", key="home_city", metadata={"category": "home"}
            )
            print("add:", events(moved))
            berlin = moved["results"][0]["id"]

            print("== a re-stated fact is stored once")
            pz.remember("mia", "I am vegetarian.", key="diet", metadata={"category": "food"})
            print("add:", events(pz.remember("mia", "I am vegetarian.", key="diet")))

            print("== an edit keeps the id; history keeps every version")
            print(
                "update:",
                events(pz.update_memory("mia", berlin, "I moved to Berlin last spring, to Kreuzberg.")),
            )
            for version in pz.memory_history("mia", berlin)["versions"]:
                print(
                    f"  v{version['version']} {version['event']:6s} source={version['source']}: {version['memory']}"
                )

            print("== without a key, a close match is reported as a possible conflict")
            pz.remember("mia", "My favourite colour is blue.")
            added = pz.remember("mia", "My favourite colour is green.")["results"][0]
            print("conflicts:", [(c["memory"], round(c["score"], 2)) for c in added["conflicts"]])

            print("== search finds active memories only; filters narrow by metadata")
            print(
                "search:",
                [
                    r["memory"]
                    for r in pz.search_memories("mia", "Which city do I live in?", top_k=2)["results"]
                ],
            )
            print(
                "all homes:",
                [
                    (r["memory"], r["status"])
                    for r in pz.memories("mia", filters={"category": "home"}, status="all")["results"]
                ],
            )

            print("== chat")
            reply = pz.respond(
                "mia",
                [{"role": "user", "content": "Which city should I explore this weekend?"}],
                max_new_tokens=args.max_new_tokens,
            )
            print("memories used:", reply.memories)
            print("reply:", reply.text)

            print("== export")
            document = pz.export("mia")
            print(
                f"export: {len(document['memories'])} memories, {sum(len(m['history']) for m in document['memories'])} versions, {len(json.dumps(document))} bytes of JSON"
            )
            print("forget:", pz.forget("mia"))
    print(f"done in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
