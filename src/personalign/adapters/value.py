"""VAS value models: ``Q(s, a)`` for one objective, trained only on samples of the frozen generator.

Two kinds, one protocol (``start``, ``q_topk``, ``advance``, ``sequence_q``):

- ``trunk``: a head on the generator's own last hidden state ``h_t`` (nearly free at decode
  time). ``Q(s_t, a) = b + v . h_t + (P h_t) . (R e_a)`` where ``e_a`` is the generator's frozen
  output embedding of token ``a``; ``R e_a`` for the whole vocabulary is computed once, so every
  candidate is scored by one ``(B, r) @ (r, V)`` matmul.
- ``gru``: a separate small model: a GRU over the response tokens (frozen generator input
  embeddings, projected), its state initialised from the mean prompt embedding.
  ``Q(s, a) = V(s + a)``: the top-k candidates advance the GRU cell in one batched call.

Folder contract: ``value_config.json`` + ``value.safetensors`` (trained weights only; the
frozen embedding tables come from the generator named in the config).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from personalign.errors import (
    ValueModelError,  # noqa: F401 (re-exported)
)

CONFIG_FILE = "value_config.json"
WEIGHTS_FILE = "value.safetensors"


class ValueConfig(BaseModel):
    """One objective's value model."""

    model_config = ConfigDict(extra="forbid")

    objective: str
    kind: Literal["trunk", "gru"] = "trunk"
    rank: int = Field(default=16, ge=1, le=512, description="trunk: rank of the token interaction")
    hidden: int = Field(default=256, ge=8, le=4096, description="gru: state size")
    proj: int = Field(default=128, ge=8, le=4096, description="gru: token projection size")
    base_model: str = ""
    embed_dim: int = Field(default=0, ge=0)
    vocab_size: int = Field(default=0, ge=0)
    score_mean: float = 0.0
    score_std: float = 1.0
    default_beta: float = Field(
        default=3.0, description="guidance strength at steering weight 1 (VAS's example uses 3)"
    )
    provenance: dict[str, Any] = Field(default_factory=dict)


class TrunkValueHead(nn.Module):
    """``Q(s_t, .)`` over the vocabulary from the generator's hidden state ``h_t``."""

    def __init__(self, config: ValueConfig, output_embeddings: torch.Tensor) -> None:
        super().__init__()
        self.config = config
        dim = output_embeddings.shape[1]
        self.state = nn.Linear(dim, 1)
        self.query = nn.Linear(dim, config.rank, bias=False)
        self.key = nn.Linear(dim, config.rank, bias=False)
        nn.init.zeros_(self.state.weight)
        nn.init.zeros_(self.state.bias)
        nn.init.normal_(self.query.weight, std=dim**-0.5)
        nn.init.zeros_(self.key.weight)
        self.register_buffer("embeddings", output_embeddings.detach().float(), persistent=False)  # (V, H)
        self._keys: torch.Tensor | None = None

    def token_keys(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """``R e_a``: ``(V, r)`` for the vocabulary, or ``ids.shape + (r,)`` for some tokens."""
        if ids is not None:
            return self.key(self.embeddings[ids])
        return self.key(self.embeddings)

    def freeze_keys(self) -> None:
        """Cache ``R e_a`` for the whole vocabulary (call after training, before decoding)."""
        with torch.no_grad():
            self._keys = self.token_keys()  # (V, r)

    def q_all(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(B, H)`` hidden states to ``(B, V)`` values of every next token."""
        keys = self._keys if self._keys is not None else self.token_keys()
        h = hidden.float()
        return self.state(h) + self.query(h) @ keys.T  # (B, 1) + (B, r) @ (r, V)

    def q_taken(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``(B, T, H)`` states and ``(B, T)`` taken tokens to ``(B, T)`` values (training)."""
        h = hidden.float()
        return self.state(h).squeeze(-1) + (self.query(h) * self.token_keys(ids)).sum(-1)


class GruValueModel(nn.Module):
    """A separate small value model: a GRU over response tokens, prompt-initialised."""

    def __init__(self, config: ValueConfig, input_embeddings: torch.Tensor) -> None:
        super().__init__()
        self.config = config
        dim = input_embeddings.shape[1]
        self.register_buffer("embeddings", input_embeddings.detach().float(), persistent=False)  # (V, H)
        self.proj = nn.Linear(dim, config.proj)
        self.init = nn.Linear(dim, config.hidden)
        self.cell = nn.GRUCell(config.proj, config.hidden)
        self.head = nn.Linear(config.hidden, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def start(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """Initial state ``(B, hidden)`` from the mean embedding of each prompt's real tokens."""
        emb = self.embeddings[prompt_ids]  # (B, T, H)
        m = prompt_mask.to(emb.dtype).unsqueeze(-1)  # (B, T, 1)
        pooled = (emb * m).sum(1) / m.sum(1).clamp(min=1)  # (B, H)
        return torch.tanh(self.init(pooled))

    def step(self, state: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Advance ``(N, hidden)`` states by ``(N,)`` tokens."""
        return self.cell(self.proj(self.embeddings[ids]), state)

    def value(self, state: torch.Tensor) -> torch.Tensor:
        return self.head(state).squeeze(-1)

    def q_candidates(self, state: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``Q(s, a) = V(s + a)`` for ``(B, k)`` candidates in one batched cell call: ``(B, k)``."""
        b, k = ids.shape
        expanded = state.unsqueeze(1).expand(b, k, state.shape[-1]).reshape(b * k, -1)  # (B k, hidden)
        return self.value(self.step(expanded, ids.reshape(-1))).reshape(b, k)

    def q_taken(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` response tokens to ``(B, T)`` values ``V(s_t + a_t)`` (training)."""
        state = self.start(prompt_ids, prompt_mask)
        out = []
        for t in range(ids.shape[1]):
            state = self.step(state, ids[:, t])
            out.append(self.value(state))
        return torch.stack(out, dim=1)


ValueModel = TrunkValueHead | GruValueModel


def build_value_model(config: ValueConfig, generator_model: Any) -> ValueModel:
    """A fresh value model for ``config`` on the generator's frozen embedding tables."""
    if config.kind == "trunk":
        return TrunkValueHead(config, generator_model.get_output_embeddings().weight)
    return GruValueModel(config, generator_model.get_input_embeddings().weight)


def save_value_model(model: ValueModel, folder: Path | str) -> Path:
    """Write ``value_config.json`` + ``value.safetensors`` (trained weights only), each atomically."""
    from personalign.artefacts import atomic_save_safetensors, atomic_write_text

    folder = Path(folder)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_save_safetensors(folder / WEIGHTS_FILE, state)
    atomic_write_text(folder / CONFIG_FILE, json.dumps(model.config.model_dump(), indent=1))
    return folder


def load_value_model(folder: Path | str, generator: Any) -> ValueModel:
    """Load a value model for ``generator``; refuses one made for another base model."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        config = ValueConfig.model_validate_json((folder / CONFIG_FILE).read_text())
        state = load_file(str(folder / WEIGHTS_FILE))
    except Exception as err:  # missing, truncated or malformed files
        raise ValueModelError(
            f"value model at {folder} is unreadable ({type(err).__name__}: {err}). Fix: retrain it with `personalign train vas`"
        ) from None
    if config.base_model and not generator.is_base(config.base_model):
        raise ValueModelError(
            f"value model at {folder} was trained on {config.base_model!r}, not {generator.model_id!r}. "
            "Fix: train one for this generator with `personalign train vas`"
        )
    base = getattr(generator.model, "get_base_model", lambda: generator.model)()
    model = build_value_model(config, base)
    if config.embed_dim and model.embeddings.shape != (config.vocab_size, config.embed_dim):
        raise ValueModelError(
            f"value model at {folder} expects embeddings {config.vocab_size}x{config.embed_dim}, the generator has "
            f"{tuple(model.embeddings.shape)}. Fix: train one for this generator with `personalign train vas`"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueModelError(
            f"value model at {folder} does not match its config ({err}). Fix: retrain it"
        ) from None
    model.eval()
    if isinstance(model, TrunkValueHead):
        model.freeze_keys()
    return model
