"""A user's inferred reward distilled into their own LoRA adapter (amplified comparisons).

    python examples/personal_lora.py                  # the embedded SmolLM2, about 10 min on 2 CPU cores the first time
    python examples/personal_lora.py --model DIR --max-new-tokens 8 --per-prompt 3 --pairs 4 --epochs 1   # any chat model folder

1. The generator answers the synthetic population's prompts (samples cached), its training users
   compare pairs of those answers, and a PAL reward is fitted on them.
2. A test user enrols with 4 such comparisons. Their inferred reward then labels many pairs of the
   generator's answers to the training prompts (``Personalizer.amplified_comparisons``), and their
   LoRA is trained with DPO on the 4 comparisons plus those pairs (``train_adapter(extra=...)``).
3. They ask a question on a held-out topic. The adapter is a plain PEFT folder, so the same
   personalisation runs on vLLM or LoRAX after ``personalign export``; the printout says how the
   answer scores for the user's hidden reward against the generic answer.
"""

from __future__ import annotations

import argparse
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="generator folder (default: the embedded SmolLM2)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--per-prompt", type=int, default=8, help="pooled samples per prompt")
    parser.add_argument("--pairs", type=int, default=32, help="amplified comparisons")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()

    from personalign import Personalizer
    from personalign.eval.generate import generation_split
    from personalign.eval.onpolicy import PoolConfig, answer_pool
    from personalign.eval.populations import SyntheticPopulation
    from personalign.models import load_encoder, load_generator
    from personalign.preference import PAL, Featurizer

    generator, encoder = load_generator(args.model, device="cpu"), load_encoder(device="cpu")
    population = SyntheticPopulation()
    pool = answer_pool(
        generator,
        population.prompts,
        PoolConfig(n_per_prompt=args.per_prompt, max_new_tokens=args.max_new_tokens),
    )
    split = generation_split(seed=args.seed, shots=4, pool=pool)
    reward = PAL(Featurizer(encoder)).fit(split.train, seed=args.seed)
    print(
        f"PAL fitted on {len(split.train)} users' comparisons of the generator's own answers ({time.perf_counter() - started:.0f} s)"
    )

    user = split.test[0]
    training_answers = {p: texts for p, texts in pool.items() if p not in set(split.prompts)}
    prompt = split.prompts[0]
    ask = [{"role": "user", "content": prompt}]
    with (
        tempfile.TemporaryDirectory() as store,
        Personalizer(generator, encoder, store, embedder=reward) as pz,
    ):
        pz.enroll(user.user, user.shots)
        extra = pz.amplified_comparisons(user.user, training_answers, {"pairs": args.pairs})
        profile = pz.train_adapter(user.user, {"epochs": args.epochs, "seed": args.seed}, extra=extra)
        print(
            f"{user.user}: {len(user.shots)} comparisons + {len(extra)} amplified -> adapter trained on {profile.settings['adapter']['pairs']} pairs in {pz.adapter_folder(user.user)}"
        )
        generic = pz.respond(None, ask, max_new_tokens=args.max_new_tokens).text
        mine = pz.respond(
            user.user,
            ask,
            max_new_tokens=args.max_new_tokens,
            memory=False,
            shots=False,
            user_vas=0,
            steer={},
        ).text
    print(f"\nQ: {prompt}\n--- generic\n{generic}\n--- {user.user}'s adapter\n{mine}")
    ours, theirs = population.true_reward(user.user, [mine, generic])
    print(
        f"hidden reward: adapter answer {ours:+.2f}, generic {theirs:+.2f} ({'better' if ours > theirs else 'not better'})"
    )
    print(f"\ndone in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
