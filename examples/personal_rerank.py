"""The user's own reward picks the answer: personal reranking for two users the reward never saw.

    python examples/personal_rerank.py                   # the embedded SmolLM2, about 10 min on 2 CPU cores the first time
    python examples/personal_rerank.py --model DIR --max-new-tokens 8 --per-prompt 3   # any chat model folder

1. The generator answers the synthetic population's prompts (8 samples each, cached), and the
   population's training users compare pairs of those answers, as a chat app's users compare its
   model's answers. A PAL reward (4 prototypes) is fitted on them.
2. Two test users, never seen in fitting, enrol with 4 such comparisons each.
3. Each asks a question on a held-out topic: the generic answer, and ``rerank=4`` (four sampled
   answers, the user's inferred reward picks one). The synthetic population knows each user's
   hidden reward, so the printout says how each answer scores for its user, and what moved.
"""

from __future__ import annotations

import argparse
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="generator folder (default: the embedded SmolLM2)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--per-prompt", type=int, default=8, help="pooled samples per prompt (fitting data)")
    parser.add_argument("--rerank", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()

    from personalign import Personalizer
    from personalign.eval.generate import decoys, generation_split
    from personalign.eval.onpolicy import PoolConfig, answer_pool
    from personalign.eval.populations import ATTRIBUTES, SyntheticPopulation
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

    first = split.test[0]
    second = decoys(split.test)[first.user]  # a user of another type
    prompt = split.prompts[0]
    ask = [{"role": "user", "content": prompt}]
    with (
        tempfile.TemporaryDirectory() as store,
        Personalizer(generator, encoder, store, embedder=reward) as pz,
    ):
        generic = pz.respond(None, ask, max_new_tokens=args.max_new_tokens).text
        print(f"\nQ: {prompt}\n--- generic\n{generic}")
        for user in (first, second):
            pz.enroll(user.user, user.shots)
            result = pz.respond(
                user.user,
                ask,
                max_new_tokens=args.max_new_tokens,
                rerank=args.rerank,
                seed=args.seed,
                memory=False,
                shots=False,
                steer={},
            )
            mine, theirs = population.true_reward(user.user, [result.text, generic])
            delta = population.attributes([result.text])[0] - population.attributes([generic])[0]
            weights = population.user_weights[population.user_ids.index(user.user)]
            moved = [
                f"{name} {'+' if d > 0 else '-'}"
                for name, d, w in zip(ATTRIBUTES, delta, weights, strict=True)
                if d * w > 0
            ]
            report = result.personalization
            print(
                f"--- {user.user} ({user.group}); picked candidate {report['picked']} of {report['candidates']}, scores {report['scores']}"
            )
            print(result.text)
            print(
                f"hidden reward: this answer {mine:+.2f}, generic {theirs:+.2f} ({'better' if mine > theirs else 'not better'}); moved toward the user: {', '.join(moved) or 'nothing'}"
            )
    print(f"\ndone in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
