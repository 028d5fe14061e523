"""Per-user LoRA adapters: enroll two users with adapters and answer both in one batch; then
use the two trained adapters as the bases of a LoRA bank and enroll a third user by fitting
two weights only (no training).

Run:  .venv/bin/python examples/adapters.py            (about 3 minutes on a 2-core CPU;
      adapter training is most of it)
A test runs it on a tiny model:  --model <dir> --epochs 1 --max-new-tokens 8
"""

from __future__ import annotations

import argparse
import tempfile

from personalign import Comparison, Personalizer
from personalign.adapters.bank import LoraBank

QUESTIONS = [
    "How do I boil an egg?",
    "How can I sleep better?",
    "How do I save money on food?",
    "Why is the sky blue?",
]
SHORT = [
    "Boil it for 9 minutes.",
    "Keep a fixed bedtime.",
    "Plan meals and shop from a list.",
    "Air scatters blue light most.",
]
LONG = [
    "Bring water to a boil, lower the egg in gently, cook 6 minutes for a soft yolk or 9-10 for a firm one, then cool it in ice water before peeling.",
    "Keep the same schedule every day, avoid screens for an hour before bed, keep the room cool and dark, and skip caffeine after lunch.",
    "Plan the week's meals, write a list, buy staples in bulk, compare unit prices, try store brands, and cook in batches you can freeze.",
    "Sunlight is scattered by air molecules, and short blue wavelengths scatter far more than red ones (Rayleigh scattering), so blue fills the sky.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--model", default=None, help="HF id or local path (default: embedded SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--store", default=None, help="store directory (default: a temporary one)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=60)
    args = parser.parse_args()

    store = args.store or tempfile.mkdtemp(prefix="personalign-adapters-")
    terse = [
        Comparison(prompt=q, chosen=s, rejected=long)
        for q, s, long in zip(QUESTIONS, SHORT, LONG, strict=True)
    ]
    thorough = [Comparison(prompt=c.prompt, chosen=c.rejected, rejected=c.chosen) for c in terse]
    config = {"rank": 8, "epochs": args.epochs, "learning_rate": 1e-3, "seed": 0}

    with Personalizer.load(model=args.model, store=store) as pz:
        for user, comparisons in (("terse", terse), ("thorough", thorough)):
            profile = pz.enroll(user, comparisons, adapter=True, adapter_config=config)
            print(
                f"enrolled {user}: adapter at {pz.adapters.path(user)} ({profile.settings['adapter']['pairs']} pairs)"
            )

        # A LoRA bank whose bases are the two trained adapters: a new user is two weights.
        bank = LoraBank.from_folders(pz.generator, [pz.adapters.path("terse"), pz.adapters.path("thorough")])
        profile = pz.enroll("newcomer", terse[:2], adapter=bank)
        weights = ", ".join(f"{w:+.2f}" for w in profile.settings["adapter"]["weights"])
        print(f"enrolled newcomer through the bank: weights (terse, thorough) = ({weights})")

        question = [{"role": "user", "content": "How do I make a good cup of tea?"}]
        # One generate call for all users: each row runs with its own adapter (gathered per row).
        users = ("terse", "thorough", "newcomer")
        requests = [
            {
                "user": u,
                "messages": question,
                "max_new_tokens": args.max_new_tokens,
                "steer": {},
                "shots": False,
            }
            for u in users
        ]
        requests.append({"user": None, "messages": question, "max_new_tokens": args.max_new_tokens})
        for result in pz.respond_batch(requests):
            print(f"\n[{result.user or 'generic'}] ({result.completion_tokens} tokens)\n{result.text}")
        print(f"\nadapters resident: {sorted(pz.adapters.resident)}")


if __name__ == "__main__":
    main()
