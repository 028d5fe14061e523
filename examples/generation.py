"""Train a small FSPO adapter, then answer a new user from four of their comparisons.

    python examples/generation.py                        # the embedded SmolLM2, about 15 min on 2 CPU cores
    python examples/generation.py --model DIR --shots 1  # any chat model folder

FSPO meta-training (the recipe behind ``personalign train fspo``) shows the generator many
synthetic users, each as N of their comparisons in the prompt, and trains it to give the
answer that user prefers. Here it runs at a small scale on the training users of the
synthetic population. A user the adapter never saw is then enrolled with N comparisons and
asked a question on a topic held out of training; the answer with the FSPO adapter and the
generic answer are scored by that user's hidden reward (the synthetic population knows it).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="generator folder (default: the embedded SmolLM2)")
    parser.add_argument(
        "--shots", type=int, default=4, help="comparisons per user (in training tasks and at enrolment)"
    )
    parser.add_argument("--tasks", type=int, default=32, help="SFT tasks (IPO uses a quarter as many)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()
    started = time.perf_counter()

    from personalign import Personalizer
    from personalign.conditioning.fspo import FspoTrainConfig, save_fspo, train_fspo
    from personalign.eval.generate import generation_split
    from personalign.models import load_encoder, load_generator
    from personalign.training.loop import LoopConfig

    split = generation_split(shots=args.shots)
    trainer = load_generator(args.model, device="cpu")
    config = FspoTrainConfig(
        shots=args.shots,
        sft_tasks=args.tasks,
        ipo_tasks=max(1, args.tasks // 4),
        max_length=min(1536, trainer.context_length),
        sft=LoopConfig(epochs=1, learning_rate=5e-4, batch_size=2),
        ipo=LoopConfig(epochs=1, learning_rate=1e-4, batch_size=2),
    )
    model, report = train_fspo(trainer, split.train, config)
    folder = save_fspo(
        model,
        Path(tempfile.mkdtemp(prefix="personalign-fspo-")) / "adapter",
        trainer.model_id,
        config,
        report,
        "synthetic training users",
    )
    print(
        f"== trained FSPO on {report.tasks} tasks: SFT loss {report.sft.epoch_loss[-1]:.3f}, IPO loss {report.ipo.epoch_loss[-1] if report.ipo else 0:.3f} -> {folder}"
    )

    user = split.test[0]
    prompt = split.prompts[0]
    store = Path(tempfile.mkdtemp(prefix="personalign-store-"))
    with Personalizer(
        load_generator(args.model, device="cpu"), load_encoder(device="cpu"), store, fspo=folder
    ) as pz:
        pz.enroll(user.user, user.shots)
        print(
            f"== enrolled {user.user} ({user.group}) with {len(user.shots)} comparisons; first preferred answer:"
        )
        print(f"   {user.shots[0].chosen[:160]}")
        messages = [{"role": "user", "content": prompt}]
        answers = {
            "generic": pz.chat(None, messages, max_new_tokens=args.max_new_tokens),
            "shots only": pz.chat(
                user.user, messages, memory=False, fspo=False, max_new_tokens=args.max_new_tokens
            ),
            "FSPO adapter": pz.chat(user.user, messages, memory=False, max_new_tokens=args.max_new_tokens),
        }
    rewards = split.population.true_reward(user.user, list(answers.values()))
    print(f"== {prompt}")
    for (name, text), reward in zip(answers.items(), rewards, strict=True):
        print(f"--- {name} (hidden reward {reward:+.2f})\n{text}\n")
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
