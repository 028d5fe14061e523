"""Features of ``(prompt, response)`` pairs for the preference embedders: the frozen sentence encoder,
prompt-response interactions, length, style and the generator's hidden states (:class:`Featurizer`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from personalign.errors import ValidationError
from personalign.models import Encoder
from personalign.preference.style import STYLE_FEATURES, style_features
from personalign.types import Comparison

# --- features -----------------------------------------------------------------------------------

FEATURE_PARTS = ("response", "prompt_x_response", "log_length", "style", "hidden")
DEFAULT_PARTS = ("response", "prompt_x_response", "log_length")


@dataclass(frozen=True)
class FeaturizerConfig:
    """Which features describe a ``(prompt, response)`` pair.

    Parts, concatenated in this order:
        ``response``: the encoder vector e(y), unit norm (``dim`` numbers).
        ``prompt_x_response``: e(x) * e(y) elementwise, times sqrt(dim) so its norm is about 1
            (``dim`` numbers). A linear reward on it is a prompt-conditioned bilinear form
            e(x)^T diag(w) e(y): how the response fits what was asked.
        ``log_length``: (log(1 + characters) - 5) / 2, one number. The encoder truncates long
            texts, so it does not see length reliably.
        ``style``: stylometric measurements of the response (reading level, sentence length,
            exclamations, warm and cold words, person, lists, ...;
            :data:`personalign.preference.style.STYLE_FEATURES`). Off by default; it matters where
            users differ in how a text is written rather than what it is about.
        ``hidden``: the generator's last hidden state, mean-pooled over the response tokens
            of the chat-formatted (prompt, response), unit norm (``hidden_size`` numbers). Needs
            a generator; the texts are truncated to ``hidden_max_tokens`` (prompt) and
            ``hidden_max_tokens`` (response).
    """

    parts: tuple[str, ...] = DEFAULT_PARTS
    batch_size: int = 64
    hidden_max_tokens: int = 256

    def __post_init__(self) -> None:
        parts = tuple(self.parts)
        object.__setattr__(self, "parts", parts)
        unknown = [p for p in parts if p not in FEATURE_PARTS]
        if unknown or not parts or len(set(parts)) != len(parts):
            raise ValidationError(
                "featurizer.parts",
                f"must be distinct names from {FEATURE_PARTS}",
                "e.g. parts=('response', 'log_length')",
                parts,
            )
        if self.batch_size < 1:
            raise ValidationError(
                "featurizer.batch_size", "must be at least 1", "use e.g. 64", self.batch_size
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "parts": list(self.parts),
            "batch_size": self.batch_size,
            "hidden_max_tokens": self.hidden_max_tokens,
        }


class Featurizer:
    """Maps ``(prompt, response)`` pairs to fixed feature vectors with the frozen encoder.

    Texts are encoded once per call in batches, through the encoder's text cache, so repeated
    prompts and responses cost nothing.
    """

    def __init__(
        self, encoder: Encoder, config: FeaturizerConfig | None = None, generator: Any = None
    ) -> None:
        self.encoder = encoder
        self.config = config or FeaturizerConfig()
        self._enc_dim = encoder.dim
        self.generator = generator
        if "hidden" in self.config.parts and generator is None:
            raise ValidationError(
                "featurizer.parts",
                "includes 'hidden' but no generator was given",
                "pass generator=... or drop the 'hidden' part",
            )
        self._hidden_cache: dict[tuple[str, str], np.ndarray] = {}
        self._style_cache: dict[str, np.ndarray] = {}

    def _style(self, text: str) -> np.ndarray:
        cached = self._style_cache.get(text)
        if cached is None:
            if len(self._style_cache) > 100_000:
                self._style_cache.clear()
            cached = self._style_cache[text] = style_features(text)
        return cached

    @property
    def encoder_name(self) -> str:
        """The encoder, plus the generator when its hidden states are features."""
        if "hidden" in self.config.parts:
            return f"{self.encoder.name}+{self.generator.model_id}"
        return self.encoder.name

    def _hidden_dim(self) -> int:
        return int(self.generator.model.config.hidden_size) if self.generator is not None else 0

    def hidden(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """``(n, hidden_size)`` unit-norm mean last hidden state over each response's tokens (cached)."""
        import torch

        keys = list(zip(prompts, responses, strict=True))
        todo = list(dict.fromkeys(k for k in keys if k not in self._hidden_cache))
        if todo:
            tok = self.generator.tokenizer
            model = self.generator.model
            limit = self.config.hidden_max_tokens
            seqs = []
            for prompt, response in todo:
                head = tok.apply_chat_template(
                    [{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True
                )
                if not isinstance(head, list):
                    head = list(head["input_ids"])
                body = tok(response, add_special_tokens=False)["input_ids"][:limit]
                seqs.append((head[-limit:], body or [tok.eos_token_id]))
            order = sorted(range(len(todo)), key=lambda i: len(seqs[i][0]) + len(seqs[i][1]))
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            device = next(model.parameters()).device
            step = max(1, self.config.batch_size // 4)
            for start in range(0, len(order), step):
                chunk = order[start : start + step]
                width = max(len(seqs[i][0]) + len(seqs[i][1]) for i in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                attention = torch.zeros((len(chunk), width), dtype=torch.long)
                response_mask = torch.zeros((len(chunk), width), dtype=torch.float32)
                for row, i in enumerate(chunk):  # right padding
                    head, body = seqs[i]
                    ids[row, : len(head) + len(body)] = torch.tensor(head + body)
                    attention[row, : len(head) + len(body)] = 1
                    response_mask[row, len(head) : len(head) + len(body)] = 1.0
                with torch.no_grad():
                    out = model(
                        input_ids=ids.to(device),
                        attention_mask=attention.to(device),
                        output_hidden_states=True,
                    )
                last = out.hidden_states[-1].float().cpu()  # (b, T, H)
                pooled = (last * response_mask[..., None]).sum(1) / response_mask.sum(
                    1, keepdim=True
                )  # (b, H)
                pooled = pooled / pooled.norm(dim=1, keepdim=True).clamp_min(1e-12)
                for row, i in enumerate(chunk):
                    self._hidden_cache[todo[i]] = pooled[row].numpy().astype(np.float32)
        return np.stack([self._hidden_cache[k] for k in keys])

    @property
    def dim(self) -> int:
        sizes = {
            "response": self._enc_dim,
            "prompt_x_response": self._enc_dim,
            "log_length": 1,
            "style": len(STYLE_FEATURES),
            "hidden": self._hidden_dim(),
        }
        return sum(sizes[p] for p in self.config.parts)

    def features(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """``(n, dim)`` float32 features of ``n`` (prompt, response) pairs."""
        if len(prompts) != len(responses):
            raise ValidationError(
                "prompts",
                f"has {len(prompts)} items, responses has {len(responses)}",
                "pass one prompt per response",
            )
        n = len(responses)
        if n == 0:
            return np.zeros((0, self.dim), np.float32)
        parts = self.config.parts
        needs_prompt = "prompt_x_response" in parts
        needs_encoder = needs_prompt or "response" in parts
        texts = (list(responses) + (list(prompts) if needs_prompt else [])) if needs_encoder else []
        unique = list(dict.fromkeys(texts))
        index = {t: i for i, t in enumerate(unique)}
        vectors = (
            self.encoder.encode(unique, batch_size=self.config.batch_size)
            if unique
            else np.zeros((0, self._enc_dim), np.float32)
        )  # (u, enc_dim)
        resp = vectors[[index[t] for t in responses]] if needs_encoder else vectors  # (n, enc_dim)
        out: list[np.ndarray] = []
        for part in parts:
            if part == "response":
                out.append(resp)
            elif part == "prompt_x_response":
                prom = vectors[[index[t] for t in prompts]]  # (n, enc_dim)
                out.append(prom * resp * math.sqrt(self._enc_dim))
            elif part == "style":
                out.append(np.stack([self._style(t) for t in responses]))
            elif part == "hidden":
                out.append(self.hidden(prompts, responses))
            else:
                chars = np.array([len(t) for t in responses], dtype=np.float32)
                out.append(((np.log1p(chars) - 5.0) / 2.0)[:, None])
        return np.concatenate(out, axis=1).astype(np.float32)

    def pair_features(self, comparisons: Sequence[Comparison]) -> tuple[np.ndarray, np.ndarray]:
        """``(chosen, rejected)`` features, each ``(n, dim)``, encoded in one batch."""
        prompts = [c.prompt_text for c in comparisons]
        both = self.features(
            prompts + prompts, [c.chosen for c in comparisons] + [c.rejected for c in comparisons]
        )
        n = len(comparisons)
        return both[:n], both[n:]
