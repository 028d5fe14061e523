"""One PrefEval-style user, made up here: is a preference stated early in a conversation followed
when it sits in the long history, when memory retrieves it, when it is absent, or when it is
stated right before the question? (``personalign eval prefeval`` runs the real benchmark.)

    python examples/prefeval_memory.py              # embedded models, about 30 s on a CPU
    python examples/prefeval_memory.py --model DIR --store DIR --filler-turns 1

The model "answers" by the option it finds most likely (mean log-probability per token) as
its reply; ``shift`` is the option whose likelihood the context raised most over ``none``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from personalign import Personalizer
from personalign.eval.prefeval import (
    CONDITIONS,
    PrefEvalConfig,
    PrefEvalItem,
    add_shift,
    memory_texts,
    score_item,
)

ITEM = PrefEvalItem(
    topic="example",
    index=0,
    preference="I have a severe nut allergy, so I never eat anything with nuts in it.",
    question="Can you suggest a snack to pack for my long hike tomorrow?",
    options=(  # the first option follows the preference (as in PrefEval's files)
        "Dried apricots, rice cakes and a cheese stick.",
        "A bag of trail mix with almonds, cashews and peanuts.",
        "Two peanut butter energy bars.",
        "Walnut and honey granola clusters.",
    ),
)
FILLER = [
    {"role": "user", "content": "How do I convert a Python list of strings to integers?"},
    {"role": "assistant", "content": "Use a list comprehension: numbers = [int(s) for s in strings]."},
    {"role": "user", "content": "What is the capital of Australia?"},
    {"role": "assistant", "content": "Canberra is the capital of Australia."},
    {"role": "user", "content": "Write a haiku about autumn rain."},
    {
        "role": "assistant",
        "content": "Cold rain on red leaves / the gutter hums all evening / the maple stands bare.",
    },
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="generator: HF id or local path (default: embedded SmolLM2)"
    )
    parser.add_argument("--store", type=Path, default=None, help="store directory (default: a temporary one)")
    parser.add_argument(
        "--filler-turns",
        type=int,
        default=3,
        help="exchanges of small talk between the preference and the question",
    )
    args = parser.parse_args()
    started = time.perf_counter()
    store = args.store or Path(tempfile.mkdtemp(prefix="personalign-prefeval-example-"))
    config = PrefEvalConfig(n_memories=3)
    filler = FILLER[: 2 * args.filler_turns]
    with Personalizer.load(model=args.model, device="cpu", store=store) as pz:
        texts = memory_texts(ITEM, filler)
        pz.remember(ITEM.user, texts)
        print(f"remembered {len(texts)} user turn(s) for {ITEM.user}; question: {ITEM.question}")
        records = [score_item(pz, ITEM, condition, filler, config) for condition in CONDITIONS]
        add_shift(records)
        for r in records:
            shown = [ITEM.options[i] for i in r["permutation"]]
            extra = (
                f", memories retrieved: {[texts[i] for i in r['retrieved']]}"
                if r["condition"] == "memory"
                else ""
            )
            shift = (
                f", shift {'aligned' if r['shift_correct'] else 'not aligned'}"
                if "shift_correct" in r
                else ""
            )
            print(
                f"{r['condition']:9s} ({r['prompt_tokens']} prompt tokens) picks {shown[r['choice']]!r}: {'aligned' if r['correct'] else 'not aligned'}{shift}{extra}"
            )
    print(f"done in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
