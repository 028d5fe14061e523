"""Enroll a user from a few comparisons, predict what they will prefer, and ask the next question.

    python examples/enrollment.py                      # embedded models, a temporary store
    python examples/enrollment.py --model DIR --store DIR

The preference embedder is the shipped PAL (fitted on the project's synthetic population). It
turns a user's comparisons into a mixture over prototype rewards; ``predict`` is the
probability they prefer one answer over another, and ``next_question`` ranks candidate
comparisons by how much the answer would teach about the user.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from personalign import Comparison, Personalizer

PROMPT = "How do I keep basil alive on a windowsill?"
SHORT = "Water it when the soil is dry, give it sun, pinch the tips."
LONG = (
    "Basil is a warm-climate herb, so it wants as much light as your window can give, ideally six hours of "
    "direct sun. Water deeply whenever the top of the soil feels dry, let the pot drain so the roots never "
    "sit in water, and pinch off the top pair of leaves above a node every week so it branches out instead "
    "of flowering. Turn the pot every few days so it grows evenly."
)

ENROLMENT = [
    Comparison(
        prompt="What is a good first pet?",
        chosen="A goldfish: cheap, quiet, easy.",
        rejected="It depends on your lifestyle, budget, space and time. Dogs need walks and attention several times a day, cats are more independent but still need play, and fish need a cycled tank and regular water changes before they are easy.",
    ),
    Comparison(
        prompt="How do I boil an egg?",
        chosen="Boil water, add the egg, 9 minutes, cold water.",
        rejected="Place the eggs in a saucepan in a single layer, cover them with cold water by about an inch, bring the water to a rolling boil over high heat, then turn off the heat, cover the pan and leave them for nine to twelve minutes depending on how firm you like the yolk, then move them into iced water.",
    ),
    Comparison(
        prompt="Is it worth learning Rust?",
        chosen="Yes, if you want fast and safe systems code.",
        rejected="Rust has a steep learning curve because of its ownership and borrowing rules, but it rewards the effort with memory safety without a garbage collector, excellent tooling through cargo, a friendly compiler with detailed error messages and a growing ecosystem in systems, web and embedded programming.",
    ),
]

CANDIDATES = [
    {
        "prompt": "How do I fix a squeaky door?",
        "a": "Oil the hinges.",
        "b": "Lift the pin out of each hinge, clean off the old grease and rust with a rag and some steel wool, coat the pin with a thin layer of petroleum jelly or a silicone lubricant, tap it back in and swing the door a few times to spread it.",
    },
    {"prompt": "How do I fix a squeaky door?", "a": "Oil the hinges.", "b": "Oil the hinges with WD-40."},
    {"prompt": "Name a good sci-fi book.", "a": "Dune.", "b": "The Left Hand of Darkness."},
    {
        "prompt": "How should I start running?",
        "a": "Run slowly three times a week, add a little each week.",
        "b": "Begin with a run-walk plan: one minute of easy jogging followed by two of walking, repeated for twenty minutes, three days a week with rest days between, increasing the running share gradually over eight weeks while keeping the pace conversational, and invest in shoes fitted at a running store.",
    },
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="generator (default: the embedded SmolLM2)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--store", type=Path, default=None, help="store folder (default: a temporary one)")
    args = parser.parse_args()
    started = time.perf_counter()
    store = args.store or Path(tempfile.mkdtemp(prefix="personalign-enroll-")) / "store"
    with Personalizer.load(model=args.model, device=args.device, store=store) as pz:
        print(f"embedder: {pz.embedder.name} ({pz.embedder.config.n_prototypes} prototypes)")

        print("== cold start: the first question to ask a new user")
        for q in pz.next_question("kim", CANDIDATES, top_k=2):
            print(
                f"  gain {q['gain']:.3f} nats  p(a)={q['p_a']:.2f}  {q['prompt']} a={q['a'][:30]!r} b={q['b'][:30]!r}"
            )

        print("== enroll kim (prefers short answers) with 3 comparisons")
        profile = pz.enroll("kim", ENROLMENT)
        state = profile.settings["state"]
        print(
            f"  stored state: method={state['method']} n_comparisons={state['n_comparisons']} mixture={[round(w, 2) for w in state['extra']['mixture']]}"
        )

        print("== predictions")
        p_short = pz.predict("kim", PROMPT, SHORT, LONG)
        print(f"  p(kim prefers the short basil answer) = {p_short:.2f}")
        short_reward, long_reward = pz.reward("kim", PROMPT, [SHORT, LONG])
        print(f"  rewards: short {short_reward:+.2f}, long {long_reward:+.2f}")

        print("== the next question for kim")
        ranked = pz.next_question("kim", CANDIDATES)
        for q in ranked:
            print(f"  gain {q['gain']:.3f}  p(a)={q['p_a']:.2f}  #{q['index']} {q['prompt']}")
        print(f"short-answer preference learned: {'yes' if p_short > 0.5 else 'no'}")
    print(f"done in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
