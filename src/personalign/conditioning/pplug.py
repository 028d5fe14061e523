"""Persona-Plug (PPlug): a user's history as one soft token prepended to a frozen LM's input.

Liu et al., "LLMs + Persona-Plug = Personalized LLMs" (ACL 2025, arXiv 2409.11901). A user's
history items (memories, past turns, chosen responses: plain strings) are embedded by the frozen
sentence encoder; for each request they are pooled by attention against the request's encoder
vector, projected into the generator's input-embedding space, and inserted as ONE input
embedding before the prompt. The generator is never changed.

    q'  = W_q q                       W_q trainable, initialised to the identity
    a_i = softmax_i(h_i . q')         padding items masked to -inf
    P   = sum_i a_i MLP(h_i)          MLP = Linear(d_enc, hidden) -> GELU -> Linear(hidden, d_model)
    P_u = embed_norm * P / ||P||_2    embed_norm = mean L2 norm of the generator's input embeddings

``h_i`` and ``q`` are the encoder's unit vectors of the items and of the query (the last user
message). Differences from the official code (``code/ModelForPer.py``): there the query encoder
is a trainable copy of the item encoder; here the encoder stays frozen (it is shared with memory
search) and ``W_q`` learns the query side. There is one soft token, no instruction token. ``P``
is normalised and then scaled to ``embed_norm``, where the official code multiplies it by a
constant near the backbone's embedding norm; here the soft token's norm is exactly
``embed_norm`` whatever the projector learns.

Artefact: a folder with ``plug_config.json`` + ``plug.safetensors`` (:func:`save_plug`,
:func:`load_plug`). Training: :mod:`personalign.conditioning.pplug_train`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from personalign.artefacts import atomic_write_bytes
from personalign.errors import EmptyHistoryError, PlugError, PlugFileError, PlugMismatchError, ValidationError  # noqa: F401 (re-exported)
from personalign.functional.plug import plug_attention, pool, rescale_to_norm

CONFIG_FILE = "plug_config.json"
WEIGHTS_FILE = "plug.safetensors"
PPLUG_ENV = "PERSONALIGN_PPLUG_DIR"


def pplug_dir() -> Path:
    """Where ``Personalizer`` looks for a projector by default: ``$PERSONALIGN_PPLUG_DIR`` or the package's ``data/pplug``."""
    env = os.environ.get(PPLUG_ENV)
    return Path(env) if env else Path(__file__).resolve().parent.parent / "data" / "pplug"


FORMAT_VERSION = 1

SoftRows = torch.Tensor | Sequence[torch.Tensor | None] | None
"""Soft tokens for a batch: a ``(B, model_dim)`` tensor, one ``(model_dim,)`` tensor or ``None`` per row, or ``None``."""


class PlugConfig(BaseModel):
    """The projector's shape and what it was built for (stored in ``plug_config.json``).

    ``hidden`` defaults to ``model_dim`` (the official code's MLP is d_enc -> d_llm -> d_llm).
    ``embed_norm`` is measured on the generator when the projector is built
    (:func:`input_embedding_norm`). ``max_items``: a user's most recent items kept (the last
    ones of the list).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    encoder_dim: int = Field(ge=1, le=65_536)
    model_dim: int = Field(ge=1, le=65_536)
    hidden: int = Field(ge=1, le=65_536)
    base_model: str = Field(min_length=1)
    encoder: str = Field(min_length=1)
    embed_norm: float = Field(gt=0.0, allow_inf_nan=False)
    max_items: int = Field(default=64, ge=1, le=4096)

    @model_validator(mode="before")
    @classmethod
    def _hidden_defaults_to_model_dim(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("hidden") is None and "model_dim" in data:
            return {**data, "hidden": data["model_dim"]}
        return data


class PersonaPlug(nn.Module):
    """History items ``(B, N, d_enc)`` + query ``(B, d_enc)`` -> one soft token ``(B, model_dim)`` each."""

    def __init__(self, config: PlugConfig) -> None:
        super().__init__()
        self.config = config
        d = config.encoder_dim
        self.query_map = nn.Linear(d, d, bias=False)  # W_q
        with torch.no_grad():
            self.query_map.weight.copy_(torch.eye(d))
        self.project = nn.Sequential(
            nn.Linear(d, config.hidden), nn.GELU(), nn.Linear(config.hidden, config.model_dim)
        )

    def attention(self, items: torch.Tensor, item_mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """``(B, N)`` attention weights ``a_i`` (0 on padding); which items shaped each soft token."""
        items = self._checked(items, item_mask, query)
        return plug_attention(items, item_mask, self.query_map(query))

    def forward(self, items: torch.Tensor, item_mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Soft tokens ``(B, model_dim)``, each of L2 norm ``config.embed_norm``.

        Args:
            items: ``(B, N, encoder_dim)`` item vectors; padding rows may hold anything.
            item_mask: ``(B, N)`` bool, True on real items; every row needs at least one.
            query: ``(B, encoder_dim)`` the query's encoder vector.
        """
        items = self._checked(items, item_mask, query)
        weights = plug_attention(items, item_mask, self.query_map(query))  # (B, N)
        values = self.project(items)  # (B, N, model_dim): projected before pooling, as the official code
        return rescale_to_norm(pool(values, weights), self.config.embed_norm)  # (B, model_dim)

    def _checked(self, items: torch.Tensor, item_mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Validate shapes, reject users without items; padding items zeroed (no NaN can leak)."""
        d = self.config.encoder_dim
        if (
            items.dim() != 3
            or query.dim() != 2
            or item_mask.shape != items.shape[:2]
            or query.shape[0] != items.shape[0]
        ):
            raise ValidationError(
                "items",
                f"shapes items {tuple(items.shape)}, item_mask {tuple(item_mask.shape)}, query {tuple(query.shape)} do not fit",
                "pass items (B, N, d), item_mask (B, N) and query (B, d)",
            )
        if items.shape[-1] != d or query.shape[-1] != d:
            raise PlugMismatchError(
                "items",
                f"have {items.shape[-1]} dimensions, the projector expects {d} (encoder {self.config.encoder!r})",
                f"embed the items with {self.config.encoder!r}, or train a projector for this encoder",
            )
        if item_mask.dtype != torch.bool:
            raise ValidationError(
                "item_mask", f"has dtype {item_mask.dtype}", "pass a bool mask (True on real items)"
            )
        empty = (~item_mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise EmptyHistoryError(
                f"items[{empty[0]}]",
                "has no history items",
                "give the user at least one history item, or generate without the plug (soft=None)",
            )
        return items.masked_fill(~item_mask[..., None], 0.0)


# --- the generator side ----------------------------------------------------------------------------


def _lm(model: Any) -> Any:
    """The torch model of a :class:`~personalign.models.Generator`, or ``model`` itself (HF or PEFT model)."""
    return model if hasattr(model, "get_input_embeddings") else model.model


def input_embedding_dim(model: Any) -> int:
    """Width of the generator's input embeddings (``hidden_size`` for most models)."""
    return int(_lm(model).get_input_embeddings().weight.shape[1])


def input_embedding_norm(model: Any, chunk: int = 8192) -> float:
    """Mean L2 norm of the generator's input embeddings over the whole vocabulary.

    Measured on the embedding module's output (not its weight matrix), so models that scale
    their embeddings inside the module (Gemma) are measured as they feed the first layer.
    """
    embed = _lm(model).get_input_embeddings()
    vocab = int(embed.weight.shape[0])
    total = 0.0
    with torch.no_grad():
        for start in range(0, vocab, chunk):
            ids = torch.arange(start, min(start + chunk, vocab), device=embed.weight.device)
            total += float(embed(ids).float().norm(dim=-1).sum())
    return total / vocab


def build_plug(
    generator: Any, encoder: Any, hidden: int | None = None, max_items: int = 64, seed: int = 0
) -> PersonaPlug:
    """A fresh (untrained) projector for ``generator`` and ``encoder``, on the generator's device.

    Seeded without touching the global torch RNG.
    """
    model = _lm(generator)
    config = PlugConfig(
        encoder_dim=encoder.dim,
        model_dim=input_embedding_dim(model),
        hidden=hidden,
        base_model=generator.model_id,
        encoder=encoder.name,
        embed_norm=input_embedding_norm(model),
        max_items=max_items,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        plug = PersonaPlug(config)
    return plug.to(next(model.parameters()).device)


def _rows_of(soft: torch.Tensor | Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    return list(soft.unbind(0)) if isinstance(soft, torch.Tensor) and soft.dim() == 2 else list(soft)


def _soft_rows(soft: SoftRows, batch: int, dim: int) -> list[torch.Tensor | None]:
    if soft is None:
        return [None] * batch
    rows = _rows_of(soft)
    if len(rows) != batch:
        raise ValidationError(
            "soft", f"has {len(rows)} rows, input_ids has {batch}", "pass one soft token (or None) per row"
        )
    for index, row in enumerate(rows):
        if row is not None and tuple(row.shape) != (dim,):
            raise PlugMismatchError(
                f"soft[{index}]",
                f"has shape {tuple(row.shape)}, the generator's input embeddings are {dim}-d",
                "use a projector trained for this generator",
            )
    return rows


def _first_tokens(mask: torch.Tensor) -> list[int]:
    """Index of each row's first attended token; each row's attended tokens must be one run."""
    attended = mask.bool()  # (B, T)
    counts = attended.sum(dim=1)  # (B,)
    starts = attended.int().argmax(dim=1)  # (B,) first True
    positions = torch.arange(mask.shape[1], device=mask.device)[None, :]  # (1, T)
    run = (positions >= starts[:, None]) & (positions < (starts + counts)[:, None])  # (B, T)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValidationError(
            f"attention_mask[{empty[0]}]", "attends to no token", "give every row at least one prompt token"
        )
    holes = (run != attended).any(dim=1).nonzero().flatten().tolist()
    if holes:
        raise ValidationError(
            f"attention_mask[{holes[0]}]",
            "has padding inside the prompt",
            "pad on the left (tokenizer.padding_side = 'left')",
        )
    return starts.tolist()


def _insert_at(mask: torch.Tensor, plugged: Sequence[bool]) -> list[int]:
    """Where each row's extra position goes: before its first attended token if plugged, else at 0."""
    starts = _first_tokens(mask)
    return [start if plug else 0 for start, plug in zip(starts, plugged, strict=True)]


def plug_inputs(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, soft: SoftRows
) -> tuple[torch.Tensor, torch.Tensor]:
    """The input embeddings of a batch with each row's soft token inserted; every row grows by one.

    A row with a soft token gets it right before its first attended token (inputs are left
    padded for generation: ``[pad.., P_u, prompt..]``); a row whose soft token is ``None`` gets
    one more masked position on the left instead (a zero vector: ``[0, pad.., prompt..]``), so
    it computes exactly what it computes without this function. ``generate`` derives position
    ids from the attention mask, so the soft token takes position 0 and the prompt keeps its
    positions shifted by one. Right-padded rows (training, all rows plugged) work too.

    Args:
        model: a Hugging Face causal LM (or PEFT model, or :class:`~personalign.models.Generator`).
        input_ids: ``(B, T)`` token ids.
        attention_mask: ``(B, T)`` 1 on tokens, 0 on padding; ``None`` means no padding.
        soft: ``(B, model_dim)``, or a list of ``(model_dim,)``/``None`` per row, or ``None``.
    Returns:
        ``(inputs_embeds (B, T + 1, model_dim), attention_mask (B, T + 1))`` for
        ``model(inputs_embeds=..., attention_mask=...)`` or ``model.generate(...)``. Given only
        these, ``generate`` returns only the new tokens, and logits processors (repetition
        penalty, VAS) see no prompt; pass ``input_ids=plug_input_ids(...)`` as well to keep
        them exact (``generate`` then returns those ids followed by the new tokens).
    """
    embeds = _lm(model).get_input_embeddings()(input_ids)  # (B, T, D)
    batch, _, dim = embeds.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
    rows = _soft_rows(soft, batch, dim)
    out_embeds, out_mask = [], []
    for b, at in enumerate(_insert_at(mask, [row is not None for row in rows])):
        token = (
            embeds.new_zeros(1, dim)
            if rows[b] is None
            else rows[b].to(embeds.device, embeds.dtype).reshape(1, dim)
        )
        flag = mask.new_zeros(1) if rows[b] is None else mask.new_ones(1)
        out_embeds.append(torch.cat([embeds[b, :at], token, embeds[b, at:]]))  # (T + 1, D)
        out_mask.append(torch.cat([mask[b, :at], flag, mask[b, at:]]))  # (T + 1,)
    return torch.stack(out_embeds), torch.stack(out_mask)


def plug_input_ids(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, soft: SoftRows
) -> torch.Tensor:
    """``(B, T + 1)`` token ids laid out like :func:`plug_inputs`' embeddings, to pass beside them.

    The inserted position repeats the token right after it (the row's first prompt token for a
    plugged row, its first column for the others), so every row holds the same set of token ids
    as before: the repetition penalty, which penalises each distinct id of ``input_ids`` once,
    is unchanged, and rows without a plug decode exactly as plain ``generate``. The model never
    reads these ids at the prompt step (``inputs_embeds`` wins there).
    """
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
    plugged = [False] * input_ids.shape[0] if soft is None else [row is not None for row in _rows_of(soft)]
    if len(plugged) != input_ids.shape[0]:
        raise ValidationError(
            "soft",
            f"has {len(plugged)} rows, input_ids has {input_ids.shape[0]}",
            "pass one soft token (or None) per row",
        )
    rows = [
        torch.cat([ids[:at], ids[at : at + 1], ids[at:]])
        for ids, at in zip(input_ids, _insert_at(mask, plugged), strict=True)
    ]
    return torch.stack(rows)


# --- users ------------------------------------------------------------------------------------------


def encode_histories(
    encoder: Any, histories: Sequence[Sequence[str]], queries: Sequence[str], max_items: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encoder vectors of users' last ``max_items`` items and their queries, padded to one batch.

    Every text is encoded once per call (through the encoder's cache).
    Returns ``(items (B, N, d), item_mask (B, N) bool, query (B, d))`` on the CPU.
    """
    if isinstance(queries, str):
        raise ValidationError("queries", "is a single string", "pass one query per user (a list)")
    histories, queries = [list(h) for h in histories], list(queries)
    if len(histories) != len(queries):
        raise ValidationError(
            "queries", f"has {len(queries)} items, histories has {len(histories)}", "pass one query per user"
        )
    if not histories:
        raise ValidationError("histories", "is empty", "pass at least one user")
    for u, (history, query) in enumerate(zip(histories, queries, strict=True)):
        if not history:
            raise EmptyHistoryError(
                f"histories[{u}]",
                "has no history items",
                "give the user at least one history item, or generate without the plug",
            )
        for i, text in enumerate([*history, query]):
            if not isinstance(text, str) or not text.strip():
                name = f"histories[{u}][{i}]" if i < len(history) else f"queries[{u}]"
                raise ValidationError(name, "is not a non-empty string", "pass plain, non-blank texts", text)
    kept = [h[-max_items:] for h in histories]
    texts = list(dict.fromkeys([t for h in kept for t in h] + queries))
    index = {t: i for i, t in enumerate(texts)}
    vectors = torch.from_numpy(encoder.encode(texts)).float()  # (U, d)
    width = max(len(h) for h in kept)
    items = torch.zeros(len(kept), width, vectors.shape[1])  # (B, N, d)
    mask = torch.zeros(len(kept), width, dtype=torch.bool)  # (B, N)
    for b, history in enumerate(kept):
        items[b, : len(history)] = vectors[[index[t] for t in history]]
        mask[b, : len(history)] = True
    return items, mask, vectors[[index[q] for q in queries]]


def embed_users(
    plug: PersonaPlug, encoder: Any, histories: Sequence[Sequence[str]], queries: Sequence[str]
) -> torch.Tensor:
    """Soft tokens ``(B, model_dim)`` of ``B`` users, each for its own query (no gradients)."""
    if encoder.dim != plug.config.encoder_dim:
        raise PlugMismatchError(
            "encoder",
            f"makes {encoder.dim}-d vectors, the projector was trained on {plug.config.encoder_dim}-d ({plug.config.encoder!r})",
            f"load the encoder {plug.config.encoder!r}, or train a projector for this one",
        )
    items, mask, query = encode_histories(encoder, histories, queries, plug.config.max_items)
    device = next(plug.parameters()).device
    with torch.no_grad():
        return plug(items.to(device), mask.to(device), query.to(device))


def embed_user(plug: PersonaPlug, encoder: Any, items: Sequence[str], query: str) -> torch.Tensor:
    """One user's soft token ``(model_dim,)`` for ``query`` (items oldest first; the last ``max_items`` count)."""
    if isinstance(items, str):
        raise ValidationError("items", "is a single string", "pass a list of history items")
    return embed_users(plug, encoder, [items], [query])[0]


# --- artefact -----------------------------------------------------------------------------------


def save_plug(plug: PersonaPlug, folder: str | Path, provenance: dict[str, Any] | None = None) -> Path:
    """Write ``plug_config.json`` + ``plug.safetensors`` into ``folder``.

    Everything is serialised (and non-finite weights refused) before anything is written; each
    file then replaces its predecessor atomically (temp file + ``os.replace``), weights first.
    The config records the weights' SHA-256, so the one window a crash could leave (new
    weights, old config) is caught by :func:`load_plug` as a :class:`PlugFileError` instead of
    loading a mixed projector.
    """
    from safetensors.torch import save

    from personalign import __version__

    folder = Path(folder)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in plug.state_dict().items()}
    if not all(bool(torch.isfinite(v).all()) for v in state.values()):
        raise PlugError(
            "plug",
            "has NaN or infinite weights",
            "retrain it (e.g. with a lower learning rate); nothing was written",
        )
    config = plug.config
    data = save(
        state,
        metadata={
            "format": "pt",
            "base_model": config.base_model,
            "encoder": config.encoder,
            "package_version": __version__,
        },
    )
    stamped = {
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "config": config.model_dump(),
        "weights_sha256": hashlib.sha256(data).hexdigest(),
        "provenance": dict(provenance or {}),
    }
    try:
        payload = (json.dumps(stamped, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
    except (TypeError, ValueError) as err:
        raise ValidationError(
            "provenance", f"is not JSON-serialisable ({err})", "pass plain strings, numbers, lists and dicts"
        ) from None
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / WEIGHTS_FILE, data)
    atomic_write_bytes(folder / CONFIG_FILE, payload)
    return folder


def read_plug_config(folder: str | Path) -> dict[str, Any]:
    """The stamped ``plug_config.json`` of a projector folder (config, versions, provenance)."""
    path = Path(folder) / CONFIG_FILE
    fix = "pass a folder written by save_plug (`personalign train pplug`), or retrain the projector"
    if not path.is_file():
        raise PlugFileError("projector", f"{Path(folder)} has no {CONFIG_FILE}", fix, str(folder))
    try:
        stamped = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PlugFileError(
            CONFIG_FILE, f"is unreadable ({type(err).__name__}: {err})", fix, str(path)
        ) from None
    if not isinstance(stamped, dict) or stamped.get("format_version") != FORMAT_VERSION:
        version = stamped.get("format_version") if isinstance(stamped, dict) else None
        raise PlugFileError(
            f"{CONFIG_FILE}.format_version", f"is {version!r}, this version reads {FORMAT_VERSION}", fix
        )
    return stamped


def load_plug(
    folder: str | Path,
    model_id: str | None = None,
    encoder_name: str | None = None,
    model_dim: int | None = None,
    encoder_dim: int | None = None,
    device: str | torch.device | None = None,
) -> PersonaPlug:
    """Load a projector written by :func:`save_plug` (in eval mode, on ``device``, default CPU).

    Each given ``model_id``/``encoder_name``/``model_dim``/``encoder_dim`` is checked against
    what the projector was built for (:class:`PlugMismatchError`). A missing, truncated or
    corrupted file raises :class:`PlugFileError`.
    """
    from pydantic import ValidationError as PydanticError
    from safetensors.torch import load

    folder = Path(folder)
    stamped = read_plug_config(folder)
    fix = "retrain the projector with `personalign train pplug`, or restore the folder"
    try:
        config = PlugConfig.model_validate(stamped.get("config"))
    except PydanticError as err:
        raise PlugFileError(f"{CONFIG_FILE}.config", f"is invalid ({err.errors()[0]['msg']})", fix) from None
    _check_match(config, model_id, encoder_name, model_dim, encoder_dim)
    path = folder / WEIGHTS_FILE
    try:
        data = path.read_bytes()
    except OSError as err:
        raise PlugFileError(WEIGHTS_FILE, f"is unreadable ({type(err).__name__})", fix, str(path)) from None
    if hashlib.sha256(data).hexdigest() != stamped.get("weights_sha256"):
        raise PlugFileError(
            WEIGHTS_FILE,
            f"does not match {CONFIG_FILE} (truncated, corrupted, or written by an interrupted save)",
            fix,
            str(path),
        )
    plug = PersonaPlug(config)
    try:
        plug.load_state_dict(load(data))
    except Exception as err:  # safetensors header/shape errors, missing or unexpected keys
        raise PlugFileError(
            WEIGHTS_FILE, f"does not fit {CONFIG_FILE} ({type(err).__name__}: {err})", fix, str(path)
        ) from None
    if not all(bool(torch.isfinite(p).all()) for p in plug.parameters()):
        raise PlugFileError(WEIGHTS_FILE, "holds NaN or infinite weights", fix, str(path))
    return plug.to(device or "cpu").eval()


def _check_match(
    config: PlugConfig,
    model_id: str | None,
    encoder_name: str | None,
    model_dim: int | None,
    encoder_dim: int | None,
) -> None:
    if model_id is not None and model_id != config.base_model:
        raise PlugMismatchError(
            "projector.base_model",
            f"trained for base model {config.base_model!r}, this generator is {model_id!r}",
            f"train one with `personalign train pplug --model {model_id}`",
        )
    if encoder_name is not None and encoder_name != config.encoder:
        raise PlugMismatchError(
            "projector.encoder",
            f"trained with encoder {config.encoder!r}, this encoder is {encoder_name!r}",
            f"load the encoder {config.encoder!r}, or train a projector with `personalign train pplug --encoder {encoder_name}`",
        )
    if model_dim is not None and model_dim != config.model_dim:
        raise PlugMismatchError(
            "projector.model_dim",
            f"makes {config.model_dim}-d soft tokens, this generator's input embeddings are {model_dim}-d",
            f"train one for this generator with `personalign train pplug --model {model_id or '<model>'}`",
        )
    if encoder_dim is not None and encoder_dim != config.encoder_dim:
        raise PlugMismatchError(
            "projector.encoder_dim",
            f"reads {config.encoder_dim}-d encoder vectors, this encoder makes {encoder_dim}-d",
            f"load the encoder {config.encoder!r}, or train a projector for this one",
        )


def check_plug(plug: PersonaPlug, generator: Any, encoder: Any) -> PersonaPlug:
    """Raise :class:`PlugMismatchError` unless ``plug`` was built for this generator and encoder."""
    _check_match(plug.config, generator.model_id, encoder.name, input_embedding_dim(generator), encoder.dim)
    return plug
