"""The per-user prompt cache of the in-process backend: the keys and values of a prompt's prefix,
reused by the next request that starts with the same tokens.

A returning user's prompt repeats most of their previous one: the system prompt, their memories
and shots, the conversation so far. After the ``generate`` call of one request (one row, or
several sharing its prompt: steering's rows on other adapters, rerank's candidates) the cache
keeps the keys and values of every token that call processed (its prompt, and its reply as far
as the rows agree), under the exact token ids and the state of the forward pass that made them
(the model, and per row the LoRA adapter and the version of its weights). A later request under
the same state reuses them up to the longest
common token prefix, and ``generate`` processes only the rest: transformers' cache continuation,
the full ``input_ids`` with a :class:`~transformers.DynamicCache` holding the first ``k``
positions (``generate(input_ids, cache=...)``; the "Re-use cache" recipe of its docs).

Why it is exact: under causal attention the keys and values at position ``i`` depend only on the
tokens ``0..i`` and the weights, so identical tokens under identical weights give the same keys
and values (the rest of the prompt is then multiplied as a shorter matrix: bit for bit equal
logits on this project's CPU, to rounding where a BLAS splits that product differently). A change of profile, memories
or system prompt changes the tokens from where it appears, and only the part before it is
reused; a retrained or refilled adapter slot has new weights, hence another state. Value heads
and logits processors read the model's outputs and never change keys or values.

Bounded: least recently used entries leave first, past :class:`PrefixCacheConfig`'s count or
bytes. Off: ``LocalBackend(prefix_cache=None)``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from personalign.errors import ValidationError

DEFAULT_MAX_ENTRIES = 32
DEFAULT_MAX_BYTES = 256 * 2**20  # about 5,000 SmolLM2-135M tokens in float32 (46 KiB a token)


@dataclass(frozen=True)
class PrefixCacheConfig:
    """How much the prompt cache may hold: at most ``max_entries`` prompts and ``max_bytes`` of
    keys and values (an entry larger than ``max_bytes`` is not kept)."""

    max_entries: int = DEFAULT_MAX_ENTRIES
    max_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self) -> None:
        for name in ("max_entries", "max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValidationError(
                    f"prefix_cache.{name}",
                    "must be a positive integer",
                    "pass a positive bound, or LocalBackend(prefix_cache=None) to turn the cache off",
                    value,
                )


def common_prefix(a: Any, b: Any) -> int:
    """The number of leading tokens two id sequences share.

    Args:
        a: ``(n,)`` token ids (a 1-D integer tensor).
        b: ``(m,)`` token ids.
    Returns:
        the largest ``k <= min(n, m)`` with ``a[:k] == b[:k]``.
    """
    n = min(a.shape[0], b.shape[0])
    differ = (a[:n] != b[:n]).nonzero()  # (d, 1)
    return int(differ[0, 0]) if differ.numel() else n


def rows_agree(seqs: Any) -> int:
    """The number of leading columns on which every row of ``seqs`` ``(R, L)`` has the same token."""
    differ = (seqs != seqs[:1]).any(dim=0).nonzero()  # (d, 1)
    return int(differ[0, 0]) if differ.numel() else int(seqs.shape[1])


def cacheable(cache: Any) -> bool:
    """Whether ``cache`` is a :class:`~transformers.DynamicCache` of full-attention layers only
    (sliding-window and linear-attention layers cannot be cut at an arbitrary prefix)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)


def prefix_of(cache: Any, length: int, config: Any = None) -> Any:
    """A new :class:`~transformers.DynamicCache` with the first ``length`` positions of ``cache``
    (copied: the stored entry is never written by ``generate``)."""
    from transformers import DynamicCache

    return DynamicCache(
        [
            (layer.keys[:, :, :length], layer.values[:, :, :length]) for layer in cache.layers
        ],  # (1, H, length, D)
        config=config,
    )


def cache_bytes(cache: Any) -> int:
    """Bytes held by a cache's keys and values."""
    return sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        if layer.is_initialized
        for t in (layer.keys, layer.values)
    )


@dataclass
class _Entry:
    ids: Any  # (n,) the tokens whose keys and values ``cache`` holds
    cache: Any  # DynamicCache, one batch row per row of the request (its steering rows)
    user: str | None
    nbytes: int
    pins: tuple[Any, ...]  # objects whose identity the state uses, kept alive so no id is reused


class PrefixCache:
    """An LRU map from (forward-pass state, token ids) to the keys and values of those tokens.

    ``state`` is any hashable value that changes whenever the weights a row runs with change
    (:meth:`GenerationEngine.forward_state <personalign.engine.GenerationEngine.forward_state>`).
    Not thread-safe on its own: the engine calls it under its generate lock.
    """

    def __init__(self, config: PrefixCacheConfig | None = None) -> None:
        self.config = config if config is not None else PrefixCacheConfig()
        self._entries: OrderedDict[tuple[Hashable, tuple[int, ...]], _Entry] = OrderedDict()
        self.nbytes = 0
        self.hits = 0  # lookups that reused at least one token
        self.misses = 0
        self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, state: Hashable, ids: Sequence[int], config: Any = None) -> tuple[Any, int]:
        """A fresh cache for a prompt ``ids``: the longest cached prefix under ``state`` (at most
        ``len(ids) - 1`` tokens: ``generate`` needs one token to process), and its length; an
        empty :class:`~transformers.DynamicCache` and 0 on a miss. ``config``: the model's config
        (the cache's layer types)."""
        import torch
        from transformers import DynamicCache

        wanted = torch.tensor(list(ids), dtype=torch.long)
        best, length = None, 0
        for key, entry in self._entries.items():
            if key[0] == state:
                k = min(common_prefix(entry.ids, wanted), len(ids) - 1)
                if k > length:
                    best, length = key, k
        if best is None:
            self.misses += 1
            return DynamicCache(config=config), 0
        self._entries.move_to_end(best)
        self.hits += 1
        self.reused_tokens += length
        return prefix_of(self._entries[best].cache, length, config), length

    def put(
        self, state: Hashable, ids: Any, cache: Any, user: str | None, pins: tuple[Any, ...] = ()
    ) -> None:
        """Keep ``cache`` (``len(ids)`` positions) for later prompts starting with ``ids``.

        An entry whose tokens are a prefix of ``ids`` under the same state is dropped: everything
        it could serve, this one serves too.
        """
        import torch

        ids = ids.detach().to("cpu", dtype=torch.long).reshape(-1)
        assert cache.get_seq_length() == ids.shape[0], "the cache must hold exactly the ids' positions"
        nbytes = cache_bytes(cache)
        if nbytes > self.config.max_bytes:
            return
        for key, entry in list(self._entries.items()):
            if (
                key[0] == state
                and entry.ids.shape[0] <= ids.shape[0]
                and common_prefix(entry.ids, ids) == entry.ids.shape[0]
            ):
                self._remove(key)
        key = (state, tuple(ids.tolist()))
        if key in self._entries:
            self._remove(key)
        self._entries[key] = _Entry(ids, cache, user, nbytes, pins)
        self.nbytes += nbytes
        while len(self._entries) > self.config.max_entries or self.nbytes > self.config.max_bytes:
            self._remove(next(iter(self._entries)))

    def forget(self, user: str) -> int:
        """Drop every entry made for ``user``'s requests; returns how many there were."""
        keys = [key for key, entry in self._entries.items() if entry.user == user]
        for key in keys:
            self._remove(key)
        return len(keys)

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def _remove(self, key: tuple[Hashable, tuple[int, ...]]) -> None:
        self.nbytes -= self._entries.pop(key).nbytes


__all__ = ["PrefixCache", "PrefixCacheConfig", "cacheable", "common_prefix", "prefix_of", "rows_agree"]
