# Run: personalign serve --store ./store  (in one shell, then in another)
#      python examples/client.py --base-url http://127.0.0.1:8000/v1
# Takes a few seconds on a CPU once the server is up (about 10 s to start with the embedded model).
"""Talk to a running `personalign serve` with the official openai client.

Enrolls a user from two comparisons and a memory over plain HTTP, then asks the same question
generically, for a user the server has never seen, personalised, steered through `extra_body`,
cut at a stop string, sampled twice (`n=2`), personally reranked, and streamed.
"""

from __future__ import annotations

import argparse
import os

import httpx
from openai import OpenAI

COMPARISONS = [
    {
        "prompt": "How do I boil an egg?",
        "chosen": "Nine minutes in boiling water.",
        "rejected": "Eggs have a long history; first, consider the water...",
    },
    {
        "prompt": "What should I cook tonight?",
        "chosen": "A quick vegetable stir-fry.",
        "rejected": "There are many possible dishes, each with many steps.",
    },
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("PERSONALIGN_API_KEY", "none"),
        help="needed when the server has a key file",
    )
    parser.add_argument("--user", default="sam")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    # User endpoints are plain JSON over HTTP.
    headers = {"Authorization": f"Bearer {args.api_key}"}
    with httpx.Client(base_url=args.base_url, headers=headers, timeout=120) as http:
        http.post(f"/users/{args.user}/comparisons", json={"comparisons": COMPARISONS}).raise_for_status()
        http.post(
            f"/users/{args.user}/memories", json={"text": "I am vegetarian and I cook for two."}
        ).raise_for_status()
        profile = http.get(f"/users/{args.user}").json()
    print(
        f"{args.user}: {profile['n_comparisons']} comparisons, {profile['n_memories']} memories, default steer {profile['default_steer']}"
    )

    # Chat is OpenAI's API: `user` selects the profile, personalign's fields go in extra_body.
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id
    question = [{"role": "user", "content": "Plan my dinner for tonight."}]

    generic = client.chat.completions.create(model=model, messages=question, max_tokens=args.max_tokens)
    print(f"\ngeneric: {generic.choices[0].message.content}")

    # A user the server has never seen gets the generic answer, and the response says so (nothing is stored).
    # safety_identifier is OpenAI's successor to `user`; LiteLLM forwards it (it drops `user`).
    stranger = client.chat.completions.create(
        model=model, messages=question, safety_identifier="auth0|never-seen", max_tokens=args.max_tokens
    )
    print(
        f"new user: user_known={stranger.model_extra['personalign']['user_known']} ({stranger.model_extra['personalign']['note']})"
    )

    personal = client.chat.completions.create(
        model=model, messages=question, user=args.user, max_tokens=args.max_tokens
    )
    used = personal.model_extra["personalign"]
    print(
        f"\npersonalised for {args.user} ({used['shots']} shots, memories {used['memories']}, steer {used['steer']}):"
    )
    print(personal.choices[0].message.content)

    longer = client.chat.completions.create(
        model=model,
        messages=question,
        user=args.user,
        max_tokens=args.max_tokens,
        extra_body={"steer": {"verbosity": 1.0}, "n_shots": 1},
    )
    print(f"\nsteered towards longer answers: {longer.choices[0].message.content}")

    # OpenAI's stop and n (n sampled choices are rows of one batch).
    cut = client.chat.completions.create(
        model=model, messages=question, user=args.user, max_tokens=args.max_tokens, stop=["."]
    )
    print(f"\nup to the first full stop ({cut.choices[0].finish_reason}): {cut.choices[0].message.content}")
    samples = client.chat.completions.create(
        model=model,
        messages=question,
        user=args.user,
        max_tokens=args.max_tokens,
        n=2,
        temperature=0.8,
        seed=1,
    )
    for choice in samples.choices:
        print(f"sample {choice.index}: {choice.message.content}")
    # Personal reranking: four sampled candidates, the user's inferred reward picks one.
    picked = client.chat.completions.create(
        model=model, messages=question, user=args.user, max_tokens=args.max_tokens, extra_body={"rerank": 4}
    )
    report = picked.model_extra["personalign"]["personalization"]
    print(
        f"reranked (picked {report['picked']} of {report['candidates']}, scores {report['scores']}): {picked.choices[0].message.content}"
    )

    print("\nstreamed: ", end="", flush=True)
    for chunk in client.chat.completions.create(
        model=model, messages=question, user=args.user, max_tokens=args.max_tokens, stream=True
    ):
        print(chunk.choices[0].delta.content or "", end="", flush=True)
    print()


if __name__ == "__main__":
    main()
