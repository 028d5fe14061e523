# Run: .venv/bin/python examples/quickstart.py
# Takes about 90 s on a 2-core CPU with the embedded models (about 40 s less with --max-new-tokens 40;
# the very first run also converts the embedded GGUF generator to a safetensors cache, about 40 s more).
# Nothing is downloaded.
"""personalign in one file: two users with opposite tastes, the same questions, different answers.

Enrolls two users from opposite pairwise comparisons (``ana`` prefers short answers, ``ben``
long ones), remembers a fact for each, answers the same question for both and shows what
conditioned each reply (memories, FSPO shots, steering). Then overrides steering for one
request, streams a reply, prints a profile, and forgets a user.

Pass ``--model``/``--encoder`` to use any Hugging Face model id (already cached) or local folder.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from personalign import Comparison, Personalizer, UnknownUserError
from personalign.personalizer import ChatResult

# The same three prompts; ana chose the short answer every time, ben the long one.
PAIRS = [
    (
        "How do I boil an egg?",
        "Put the egg in boiling water for 9 minutes, then cool it in cold water.",
        "Boiling an egg well takes a little care. Bring a pot of water to a rolling boil, enough to cover "
        "the egg by about 2 cm. Lower the egg in gently with a spoon so the shell does not crack. Cook it "
        "for 6 minutes for a soft yolk, or 9 to 10 minutes for a firm one. Move it straight into ice water "
        "for at least 2 minutes; this stops the cooking and makes peeling easier.",
    ),
    (
        "How can I save money on groceries?",
        "Plan meals for the week and shop from a list.",
        "Saving on groceries comes down to planning and a few habits. Plan your meals for the week around "
        "what you already have, then write a shopping list and stick to it. Buy staples such as rice, oats "
        "and beans in bulk, compare unit prices rather than package prices, and try store brands. Shop "
        "after eating, because hunger leads to impulse buys, and cook larger batches to freeze.",
    ),
    (
        "Why is the sky blue?",
        "Air scatters blue sunlight more than red, so blue reaches your eyes from all over the sky.",
        "Sunlight contains all visible colours. As it passes through the atmosphere it hits nitrogen and "
        "oxygen molecules much smaller than the wavelength of light, which scatter short wavelengths far "
        "more strongly than long ones (Rayleigh scattering). Blue light is therefore scattered across the "
        "whole sky, so wherever you look you see blue. At sunset the light crosses more air and the blue "
        "is scattered away, leaving reds and oranges.",
    ),
]
FACTS = {"ana": "I am vegetarian and I cook for two.", "ben": "I run 50 km a week and eat a lot of pasta."}
QUESTION = [{"role": "user", "content": "What should I eat for dinner tonight?"}]


def comparisons_for(prefers_short: bool) -> list[Comparison]:
    return [
        Comparison(prompt=prompt, chosen=short, rejected=long)
        if prefers_short
        else Comparison(prompt=prompt, chosen=long, rejected=short)
        for prompt, short, long in PAIRS
    ]


def words(text: str) -> int:
    return len(text.split())


def show(label: str, result: ChatResult) -> None:
    """Print a ChatResult: the reply and everything that conditioned it."""
    print(
        f"--- {label}: {words(result.text)} words, {result.prompt_tokens} prompt tokens, {result.completion_tokens} new tokens"
    )
    print(f"    memories: {result.memories}")
    print(f"    shots:    {[(s.comparison.prompt_text, round(s.relevance, 2)) for s in result.shots]}")
    steer = {name: round(weight, 2) for name, weight in result.steer.items()}
    print(f"    steer:    {steer}")
    print(f"    reply:    {result.text!r}")


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
    parser.add_argument("--max-new-tokens", type=int, default=120)
    args = parser.parse_args()

    started = time.perf_counter()
    store = args.store or Path(tempfile.mkdtemp(prefix="personalign-quickstart-"))
    # SmolLM2-135M loops without a mild repetition penalty; greedy decoding (temperature=0) is the default.
    options = {"max_new_tokens": args.max_new_tokens, "repetition_penalty": 1.1}
    try:
        with Personalizer.load(model=args.model, encoder=args.encoder, device=args.device, store=store) as pz:
            print(
                f"== loaded {pz.generator.model_id} and {pz.encoder.name} in {time.perf_counter() - started:.1f} s; store {store}"
            )

            print("\n== enroll and remember")
            for user, prefers_short in (("ana", True), ("ben", False)):
                profile = pz.enroll(user, comparisons_for(prefers_short))
                pz.remember(user, FACTS[user])
                inferred = {k: round(v, 2) for k, v in profile.settings["inferred_steer"].items()}
                print(
                    f"{user}: {len(profile.comparisons)} comparisons, inferred weights {inferred}, memory {FACTS[user]!r}"
                )

            print(f"\n== chat: the same question for each user: {QUESTION[-1]['content']!r}")
            for user in ("ana", "ben", None):
                show(user or "generic (user=None)", pz.respond(user, QUESTION, **options))

            print("\n== steer override for one request (the stored profile is unchanged)")
            show(
                "ana, steer={'verbosity': 1.0}",
                pz.respond("ana", QUESTION, steer={"verbosity": 1.0}, **options),
            )
            show("ana, steer={} (steering off)", pz.respond("ana", QUESTION, steer={}, **options))

            print("\n== stream (ben)")
            for piece in pz.stream(
                "ben", [{"role": "user", "content": "How should I prepare for a long run?"}], **options
            ):
                print(piece, end="", flush=True)
            print()

            print("\n== profile (ana)")
            profile = pz.profile("ana")
            print(
                f"user_id={profile.user_id} version={profile.version} comparisons={len(profile.comparisons)}"
            )
            print(f"settings={profile.settings}")
            print(f"memories={[m['memory'] for m in pz.memories('ana')['results']]}")

            print("\n== forget (ben)")
            print(f"forget: {pz.forget('ben')}")
            print(f"ben's memories after forget: {pz.memories('ben')['results']}")
            print(f"ana's memories are untouched: {[m['memory'] for m in pz.memories('ana')['results']]}")
            try:
                pz.profile("ben")
            except UnknownUserError as err:
                print(f"profile('ben') raises UnknownUserError: {err}")
            print(f"users now: {pz.users()}")
    finally:
        if args.store is None:
            shutil.rmtree(store, ignore_errors=True)
    print(f"\ndone in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
