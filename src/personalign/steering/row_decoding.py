"""Per-row decoding: OpenAI's sampling controls (seed, temperature, ``top_p``, penalties,
``logit_bias``, ``logprobs``, ``response_format``), each row of a batch on its own (:class:`RowDecoder`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessor

from personalign.steering.grammar import _grammar_mask, _matcher

# --- per-row decoding: OpenAI's sampling controls, each row on its own -----------------------------

SEED_MODULUS = 2**64  # torch.Generator.manual_seed's range
_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment: spreads consecutive indices over the seed space


def derived_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` of a request seeded ``seed`` (index 0 is ``seed`` itself, mod 2**64).

    The ``n`` choices or ``rerank`` candidates of one seeded request must differ from each other,
    yet each must depend only on ``(seed, index)``, never on what else shares the batch.
    """
    return (seed + index * _GOLDEN) % SEED_MODULUS


def openai_penalties(
    scores: torch.Tensor, generated: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor
) -> torch.Tensor:
    """OpenAI's presence and frequency penalties: ``mu[j] - c[j] * frequency - [c[j] > 0] * presence``.

    ``c[j]`` counts token ``j`` among the tokens generated so far (the prompt is not counted), as in
    OpenAI's "Parameter details" for the chat API.

    Args:
        scores: ``(B, V)`` logits.
        generated: ``(B, T)`` generated token ids (``T`` may be 0).
        presence, frequency: ``(B,)`` penalties (OpenAI allows -2 to 2).
    Returns:
        ``(B, V)``, a new tensor.
    """
    counts = torch.zeros_like(scores).scatter_add_(
        1, generated, torch.ones_like(generated, dtype=scores.dtype)
    )  # (B, V)
    return scores - counts * frequency.unsqueeze(-1) - (counts > 0).to(scores.dtype) * presence.unsqueeze(-1)


def sample_row(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    """One token from ``(V,)`` logits: the argmax at ``temperature == 0``, else nucleus sampling with ``generator``.

    ``p = softmax(logits / temperature)``; the smallest prefix of tokens by decreasing ``p`` whose mass
    reaches ``top_p`` is kept (at least one token), renormalised and sampled.
    """
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(
        logits.double() / temperature, dim=-1
    )  # (V,); float64: a tiny temperature stays non-zero
    if not bool(
        torch.isfinite(probs).all()
    ):  # a temperature so small the logits overflow: its limit, the argmax
        return int(logits.argmax())
    sorted_probs, order = probs.sort(descending=True)
    keep = (sorted_probs.cumsum(-1) - sorted_probs) < top_p  # (V,)
    keep[0] = True  # the most likely token always stays, even for a top_p that is 0 in float32 (5e-324)
    return int(order[torch.multinomial(sorted_probs * keep, 1, generator=generator)])


@dataclass(frozen=True)
class RowControls:
    """One row's decoding controls (OpenAI's chat fields), applied by :class:`RowDecoder`.

    ``top_logprobs``: ``None`` records no log-probabilities, ``k >= 0`` records the chosen
    token's and the ``k`` most likely ones. ``grammar``: a compiled xgrammar grammar
    (:func:`compile_grammar`) the row's text must follow, or ``None``.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    logit_bias: Mapping[int, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    top_logprobs: int | None = None
    grammar: Any = None

    @property
    def plain(self) -> bool:
        """Greedy and nothing else: plain ``generate`` decodes it exactly."""
        return (
            self.temperature <= 0
            and not self.logit_bias
            and not self.presence_penalty
            and not self.frequency_penalty
            and self.top_logprobs is None
            and self.grammar is None
        )


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log-probability and the ``top`` most likely alternatives, as ``(token id, logprob)``."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class RowDecoder(LogitsProcessor):
    """Chooses every row's next token by its own controls and forces ``generate`` (run greedy) to take it.

    Per step and row: OpenAI penalties (:func:`openai_penalties`), ``logit_bias`` added to the
    logits, the grammar's allowed-token mask, log-probabilities recorded from the result (before
    temperature and ``top_p``, as OpenAI reports them), then :func:`sample_row` with the row's own
    ``torch.Generator``. A seeded row therefore samples the same tokens whatever else shares its
    batch (up to floating-point differences in the logits from padding); an unseeded row's
    generator is seeded from the global torch RNG, so ``torch.manual_seed`` still reproduces a
    whole batch. It must be the last processor and see one row per request (no logit mixing).
    """

    def __init__(self, controls: Sequence[RowControls], prompt_width: int, eos_ids: Sequence[int]) -> None:
        self.controls = list(controls)
        self.prompt_width = prompt_width
        self.eos_ids = list(eos_ids)
        self.generators = [self._generator(c.seed) for c in self.controls]
        self.presence = torch.tensor([c.presence_penalty for c in self.controls], dtype=torch.float32)  # (B,)
        self.frequency = torch.tensor(
            [c.frequency_penalty for c in self.controls], dtype=torch.float32
        )  # (B,)
        self.penalised = bool(self.presence.any() or self.frequency.any())
        self.matchers = [_matcher(c.grammar) for c in self.controls]
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in self.controls]
        self._bias: torch.Tensor | None = None

    @staticmethod
    def _generator(seed: int | None) -> torch.Generator:
        generator = torch.Generator()
        generator.manual_seed(seed % SEED_MODULUS if seed is not None else int(torch.randint(0, 2**62, (1,))))
        return generator

    def _biases(self, scores: torch.Tensor) -> torch.Tensor | None:
        if self._bias is None and any(c.logit_bias for c in self.controls):
            bias = torch.zeros(len(self.controls), scores.shape[-1])  # (B, V)
            for row, control in enumerate(self.controls):
                for token, value in (control.logit_bias or {}).items():
                    bias[row, int(token)] = float(value)
            self._bias = bias
        return self._bias

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self.controls):
            raise RuntimeError(f"RowDecoder was set up for {len(self.controls)} rows, got {scores.shape[0]}")
        logits = scores.float()  # (B, V)
        if self.penalised:
            logits = openai_penalties(
                logits,
                input_ids[:, self.prompt_width :],
                self.presence.to(logits.device),
                self.frequency.to(logits.device),
            )
        bias = self._biases(logits)
        if bias is not None:
            logits = logits + bias.to(logits.device)
        forced = torch.full_like(scores, -float("inf"))
        for row, control in enumerate(self.controls):
            row_logits = logits[row]  # (V,)
            matcher = self.matchers[row]
            if matcher is not None:
                if matcher.is_terminated():  # the grammar is complete: end the turn
                    forced[row, self.eos_ids[0]] = 0.0
                    continue
                row_logits = _grammar_mask(matcher, row_logits)
            token = sample_row(row_logits, control.temperature, control.top_p, self.generators[row])
            if control.top_logprobs is not None:
                self.logprobs[row].append(_logprob(row_logits, token, control.top_logprobs))
            if matcher is not None:
                matcher.accept_token(token)
            forced[row, token] = 0.0
        return forced


def _logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (V,)
    top = logprobs.topk(k) if k else None
    pairs = (
        tuple((int(i), float(v)) for v, i in zip(top.values, top.indices, strict=True))
        if top is not None
        else ()
    )
    return TokenLogprob(token, float(logprobs[token]), pairs)
