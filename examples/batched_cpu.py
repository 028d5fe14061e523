"""Batched decoding on CPU with packed weights, next to the stock layers on the same batch.

    python examples/batched_cpu.py                       # the embedded SmolLM2-135M-Instruct
    python examples/batched_cpu.py --model ./my-model --rows 3 --max-new-tokens 32

``load_generator`` packs the generator's linear layers (``personalign.packed_linear``): a
decoding step of 2 to 32 rows runs on oneDNN weights, a single row and every prefill on the
stock ``F.linear``. This decodes one batch greedily both ways and prints the tokens' agreement,
the largest logit difference, and the time of each (best of ``--repeats``).
"""

from __future__ import annotations

import argparse
import time

import torch

from personalign.models import load_generator
from personalign.packed_linear import PackedLinear, pack_modules, packing_available, unpack_linears

PROMPTS = [
    "How do I cook rice on the stove?",
    "Why is the sky blue?",
    "What is a password manager?",
    "How can I sleep better?",
]


def decode(generator, rows: int, max_new_tokens: int) -> tuple[torch.Tensor, list[torch.Tensor], float]:
    tokenizer = generator.tokenizer
    encoded = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for i in range(rows)
    ]
    batch = tokenizer(
        encoded, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
    )
    start = time.perf_counter()
    with torch.inference_mode():
        out = generator.model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
    return out.sequences, list(out.scores), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    if not packing_available():
        raise SystemExit("this PyTorch build has no oneDNN linear ops: nothing is packed")
    generator = load_generator(args.model, device="cpu", dtype="float32")
    model = generator.model
    print(f"packed layers: {sum(isinstance(m, PackedLinear) for m in model.modules())}")
    runs = {}
    for _ in range(args.repeats):
        for label in ("packed", "stock"):
            layers = unpack_linears(model) if label == "stock" else []
            sequences, scores, seconds = decode(generator, args.rows, args.max_new_tokens)
            pack_modules(layers)
            best = runs.get(label, (None, None, float("inf")))[2]
            runs[label] = (sequences, scores, min(seconds, best))
    (seq_p, scores_p, t_p), (seq_s, scores_s, t_s) = runs["packed"], runs["stock"]
    difference = max((a - b).abs().max().item() for a, b in zip(scores_p, scores_s, strict=True))
    print(f"{args.rows} rows x {args.max_new_tokens} tokens, {torch.get_num_threads()} threads")
    print(f"same tokens: {torch.equal(seq_p, seq_s)}; largest logit difference: {difference:.2e}")
    print(f"stock: {t_s:.2f} s, packed: {t_p:.2f} s, packed / stock: {t_p / t_s:.2f}x")


if __name__ == "__main__":
    main()
