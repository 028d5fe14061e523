"""Steer one answer along a sweep of verbosity weights, with each decode-time method.

    python examples/steering.py                       # the embedded SmolLM2 and its shipped artefacts
    python examples/steering.py --model DIR --train   # another model: fit a small VAS head first

The shipped VAS value heads and MODPO objective adapters were trained for the embedded
generator. For another model, ``--train`` samples answers from it, fits a VAS head for
verbosity (the recipe behind ``personalign train vas``) into a temporary folder and points
``PERSONALIGN_STEERING_DIR`` there.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

PROMPT = "How do I make a small room feel bigger?"


def train_small_vas(model_dir: str | None, folder: Path, tokens: int) -> None:
    from personalign.models import load_generator
    from personalign.steering.recipes import train_vas_recipe
    from personalign.training.samples import sample_responses

    generator = load_generator(model_dir, device="cpu")
    samples = sample_responses(
        generator,
        ["How do I cook rice?", "What is a budget?", "How do I back up photos?"],
        n_per_prompt=4,
        max_new_tokens=tokens,
    )
    train_vas_recipe(
        generator, folder, ["verbosity"], kinds=("trunk",), samples=samples, epochs=4, progress=False
    )
    print(f"trained a VAS verbosity head on {len(samples)} samples -> {folder}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="generator folder (default: the embedded SmolLM2)")
    parser.add_argument("--train", action="store_true", help="fit a small VAS head for this model first")
    parser.add_argument("--max-new-tokens", type=int, default=120)
    args = parser.parse_args()
    started = time.perf_counter()
    if args.train:
        folder = Path(tempfile.mkdtemp(prefix="personalign-steering-"))
        train_small_vas(args.model, folder, min(args.max_new_tokens, 24))
        os.environ["PERSONALIGN_STEERING_DIR"] = str(folder)

    from personalign import Personalizer
    from personalign.steering.methods import steerable_by_method
    from personalign.steering.objectives import score

    with Personalizer.load(
        model=args.model, device="cpu", store=Path(tempfile.mkdtemp(prefix="personalign-store-"))
    ) as pz:
        methods = [
            m
            for m, objectives in steerable_by_method(pz.generator.model_id).items()
            if "verbosity" in objectives
        ]
        print("methods that steer verbosity here:", methods)
        for method in methods:
            print(f"== {method}")
            for weight in (-1.0, -0.5, 0.0, 0.5, 1.0):
                steer = {"weights": {"verbosity": weight}, "method": method} if weight else {}
                reply = pz.chat(
                    None,
                    [{"role": "user", "content": PROMPT}],
                    steer=steer,
                    max_new_tokens=args.max_new_tokens,
                    memory=False,
                    shots=False,
                )
                words = len(reply.split())
                print(
                    f"verbosity {weight:+.1f}: {words:3d} words, scores {score(PROMPT, reply, ['verbosity', 'structure'])} | {reply[:70]!r}"
                )
    print(f"done in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
