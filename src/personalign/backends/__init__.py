"""Generation backends: where the tokens of a personalised prompt are decoded.

personalign always does the personalisation itself: memory retrieval, shots, the user's
description and state, prompt-level steering, reranking by the user's reward. A backend decodes
the resulting prompt tokens:

- :class:`LocalBackend` (the default): Hugging Face ``generate`` in this process. The only backend
  with the methods that need the model's hidden states or several rows per request (``vas``,
  ``vas-model``, logit-level ``mix``, ``user-vas``, Persona-Plug) and with ``top_logprobs``.
- :class:`~personalign.backends.remote.RemoteEngine`: an OpenAI-compatible engine on the network,
  llama.cpp's ``llama-server`` (CPU) or vLLM. Per-user adapters are routed to the engine (a
  per-request ``lora`` list on llama.cpp, ``model=<adapter>`` on vLLM).

What a backend cannot do is refused with :class:`BackendCapabilityError`, which lists what it can
do; a conditioner that is on by default but cannot run there is left out and reported in the
reply's ``personalization["skipped"]``, never dropped silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from personalign.errors import ValidationError
from personalign.prefix_cache import PrefixCache, PrefixCacheConfig

DEFAULT_PREFIX_CACHE = PrefixCacheConfig()

# Everything the engine can ask of a backend. Conditioning names are ConditioningParams fields;
# decoding names are GenerationParams fields (or groups of them).
CONDITIONING = ("memory", "shots", "describe", "adapter", "fspo", "pplug", "user_vas", "rerank")
DECODING = (
    "temperature", "top_p", "seed", "logit_bias", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "min_new_tokens", "top_logprobs", "grammar",
)  # fmt: skip


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do: steering methods, conditioners and decoding controls."""

    steering: frozenset[str]
    conditioning: frozenset[str] = frozenset(CONDITIONING)
    decoding: frozenset[str] = frozenset(DECODING)
    notes: dict[str, str] = field(default_factory=dict)  # how a capability differs from the local one

    def describe(self) -> str:
        return (
            f"steering {sorted(self.steering)}, conditioning {sorted(self.conditioning)}, "
            f"decoding {sorted(self.decoding)}"
        )


class BackendCapabilityError(ValidationError):
    """A request asks the generation backend for something it cannot do (a 400 over HTTP)."""

    def __init__(self, field: str, backend: str, capabilities: Capabilities, value: Any = None) -> None:
        super().__init__(
            field,
            f"is not available on the {backend} backend",
            f"leave it out, or serve with the in-process backend; {backend} offers {capabilities.describe()}",
            value,
        )


class LocalBackend:
    """Hugging Face ``generate`` in this process (:meth:`GenerationEngine.decode_local`).

    ``prefix_cache``: the per-user prompt cache (:mod:`personalign.prefix_cache`), on by default
    with :class:`PrefixCacheConfig`'s bounds (32 prompts, 256 MiB); ``None`` turns it off.
    """

    name = "local"
    remote = False

    def __init__(self, prefix_cache: PrefixCacheConfig | None = DEFAULT_PREFIX_CACHE) -> None:
        from personalign.steering.methods import REGISTRY

        self.capabilities = Capabilities(steering=frozenset(REGISTRY))
        self.prefix_cache = PrefixCache(prefix_cache) if prefix_cache is not None else None

    def check(self, prepared: Any) -> None:
        """Everything runs here."""

    def run(self, engine: Any, batch: Sequence[Any], streams: Sequence[Any]) -> list[Any]:
        return engine.decode_local(batch, streams, self.prefix_cache)

    def forget(self, user: str) -> None:
        """Drop the prompt cache's entries made for ``user`` (their memories and shots)."""
        if self.prefix_cache is not None:
            self.prefix_cache.forget(user)

    def close(self) -> None:
        if self.prefix_cache is not None:
            self.prefix_cache.clear()


__all__ = ["CONDITIONING", "DECODING", "BackendCapabilityError", "Capabilities", "LocalBackend"]
