# Run: python examples/remote_engine.py                  (starts llama.cpp's server for the embedded model)
#      python examples/remote_engine.py --engine-url http://127.0.0.1:8081   (one already running:
#                                                         `personalign engine run --port 8081`)
# Builds llama-server once per machine the first time (minutes); then about ten seconds on a CPU.
"""personalign's personalisation in front of a llama.cpp server.

personalign keeps the users (comparisons, memories, the inferred state) and renders each
personalised prompt; llama.cpp decodes it. What the engine cannot do (value-head guidance,
log-probabilities) is refused by name, and conditioners that are on by default but need the
model in this process are reported as skipped.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from personalign import Personalizer
from personalign.backends import BackendCapabilityError
from personalign.backends.remote import RemoteEngine, managed_llama_cpp

QUESTION = [{"role": "user", "content": "What should I cook tonight?"}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine-url", default=None, help="a running llama-server (default: start one here)")
    parser.add_argument("--store", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    started = time.perf_counter()
    engine = RemoteEngine(args.engine_url) if args.engine_url else managed_llama_cpp(parallel=2, threads=1)
    store = args.store or tempfile.mkdtemp(prefix="personalign-remote-")
    with Personalizer.load(device="cpu", store=store, backend=engine) as pz:
        print(f"== engine: {engine.kind} at {engine.url}")
        print(f"can do: {engine.capabilities.describe()}")
        pz.enroll(
            "mia",
            [
                {
                    "prompt": "Dinner idea?",
                    "chosen": "Lentil curry.",
                    "rejected": "A long list of steak recipes.",
                },
                {
                    "prompt": "Lunch?",
                    "chosen": "A chickpea salad.",
                    "rejected": "A chicken burger with fries.",
                },
            ],
        )
        pz.remember("mia", "I am vegetarian and cook in ten minutes.")
        generic = pz.respond(None, QUESTION, max_new_tokens=args.max_new_tokens)
        mine = pz.respond("mia", QUESTION, max_new_tokens=args.max_new_tokens)
        print("--- generic\n" + generic.text)
        print("--- mia\n" + mine.text)
        print(f"memories: {mine.memories}")
        print(f"shots: {len(mine.shots)}, steer: {mine.steer}, prompt tokens: {mine.prompt_tokens}")
        print(f"skipped here: {sorted((mine.personalization or {}).get('skipped', {}))}")
        try:
            pz.respond("mia", QUESTION, max_new_tokens=4, top_logprobs=2)
        except BackendCapabilityError as err:
            print(f"refused: {err.field}")
        print(f"engine requests: {engine.requests}")
    print(f"done in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
