"""Decode-time steering as ``transformers`` logits processors.

``VerbosityProcessor`` steers length by shifting the end-of-turn logits:
``logits[:, eos] -= strength * w`` for verbosity weight ``w`` (``w < 0``: shorter answers,
ending at natural stops; ``w > 0``: longer). A zero weight builds no processor at all, so
unsteered decoding is exactly plain ``generate``.

Per-row decoding (OpenAI's sampling controls) lives in :mod:`personalign.steering.row_decoding`,
constrained decoding in :mod:`personalign.steering.grammar`; every name stays importable from here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from personalign.adapters.store import BASE
from personalign.errors import ValidationError
from personalign.steering.grammar import (
    compile_grammar,
    grammar_compiler,
)
from personalign.steering.methods import LOGIT_STEERABLE, MAX_WEIGHT  # noqa: F401  (MAX_WEIGHT re-exported for callers of decoding)
from personalign.steering.row_decoding import (
    SEED_MODULUS,
    RowControls,
    RowDecoder,
    TokenLogprob,
    derived_seed,
    openai_penalties,
    sample_row,
)

__all__ = [
    "STEERABLE",
    "MAX_WEIGHT",
    "DEFAULT_VERBOSITY_STRENGTH",
    "eos_token_ids",
    "eos_shift",
    "VerbosityProcessor",
    "validate_steer",
    "steering_processors",
    "top_p_sample",
    "HiddenCapture",
    "mix_terms",
    "output_head",
    "head_mixable",
    "MixedHead",
    "SteeringProcessor",
    "SEED_MODULUS",
    "derived_seed",
    "openai_penalties",
    "sample_row",
    "RowControls",
    "TokenLogprob",
    "RowDecoder",
    "grammar_compiler",
    "compile_grammar",
]


STEERABLE = LOGIT_STEERABLE  # what the end-of-turn shift steers (one list, in methods.py)
DEFAULT_VERBOSITY_STRENGTH = 4.0


def eos_token_ids(tokenizer: Any, model_config: Any = None) -> list[int]:
    """Token ids that end a turn: the tokenizer's EOS and any in the model's generation config."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    extra = getattr(model_config, "eos_token_id", None) if model_config is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif isinstance(extra, list | tuple):
        ids.update(int(i) for i in extra)
    return sorted(ids)


def eos_shift(scores: torch.Tensor, eos_ids: list[int], shift: float | torch.Tensor) -> torch.Tensor:
    """``scores`` with ``shift`` added to the EOS columns.

    Args:
        scores: ``(batch, vocab)`` next-token logits.
        eos_ids: end-of-turn token ids.
        shift: a float, or ``(batch,)`` for one shift per row.
    Returns:
        ``(batch, vocab)``, a new tensor.
    """
    out = scores.clone()
    if isinstance(shift, torch.Tensor):
        out[:, eos_ids] += shift.to(out.dtype).unsqueeze(1)  # (B, 1) broadcast over the EOS columns
    else:
        out[:, eos_ids] += shift
    return out


class VerbosityProcessor(LogitsProcessor):
    """Shift end-of-turn logits by ``-strength * weight`` (one weight, or one per batch row)."""

    def __init__(
        self, eos_ids: list[int], weight: float | list[float], strength: float = DEFAULT_VERBOSITY_STRENGTH
    ) -> None:
        if not eos_ids:
            raise ValidationError("eos_ids", "is empty", "give the tokenizer an eos_token")
        self.eos_ids = list(eos_ids)
        if isinstance(weight, list):
            self.shift: float | torch.Tensor = -strength * torch.tensor(weight, dtype=torch.float32)  # (B,)
        else:
            self.shift = -strength * weight

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if isinstance(self.shift, torch.Tensor) and self.shift.shape[0] != scores.shape[0]:
            # generate() expands rows for num_return_sequences / beams: repeat each row's shift.
            self.shift = self.shift.repeat_interleave(scores.shape[0] // self.shift.shape[0])
        return eos_shift(
            scores,
            self.eos_ids,
            self.shift.to(scores.device) if isinstance(self.shift, torch.Tensor) else self.shift,
        )


def validate_steer(steer: Mapping[str, Any] | None, field: str = "steer") -> dict[str, float]:
    """The weights of a steering request (any form :func:`~personalign.steering.schema.parse_steering`
    reads); ``None`` is no steering."""
    if steer is None:
        return {}
    from personalign.steering.schema import parse_steering

    return parse_steering(steer, field).weights


def steering_processors(
    steer: Mapping[str, float] | Sequence[Mapping[str, float]], tokenizer: Any, model_config: Any = None
) -> LogitsProcessorList:
    """The processors for validated steering: one request, or one per batch row.

    Empty when every weight is zero, so unsteered decoding runs no processor at all.
    """
    processors = LogitsProcessorList()
    if isinstance(steer, Mapping):
        weight = steer.get("verbosity", 0.0)
        if weight != 0.0:
            processors.append(VerbosityProcessor(eos_token_ids(tokenizer, model_config), weight))
        return processors
    weights = [row.get("verbosity", 0.0) for row in steer]
    if any(w != 0.0 for w in weights):
        processors.append(VerbosityProcessor(eos_token_ids(tokenizer, model_config), weights))
    return processors


def top_p_sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """One token per row: greedy where ``temperature == 0``, else nucleus sampling.

    Args:
        logits: ``(B, V)``; temperature, top_p: ``(B,)``.
    Returns:
        ``(B,)`` token ids.
    """
    greedy = logits.argmax(dim=-1)  # (B,)
    if bool((temperature <= 0).all()):
        return greedy
    scaled = logits / temperature.clamp(min=1e-6).unsqueeze(-1)  # (B, V)
    probs = torch.softmax(scaled.float(), dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep = (sorted_probs.cumsum(-1) - sorted_probs) < top_p.unsqueeze(-1)  # always keeps the first
    sorted_probs = sorted_probs * keep
    choice = order.gather(-1, torch.multinomial(sorted_probs, 1)).squeeze(-1)  # (B,)
    return torch.where(temperature > 0, choice, greedy)


class HiddenCapture:
    """Keeps the generator's last hidden state at the newest position (the input of its LM head).

    A forward pre-hook on the output embedding: the trunk value heads read ``last`` ``(B, H)``.
    """

    def __init__(self, model: Any) -> None:
        self.last: torch.Tensor | None = None
        self._handle = output_head(model).register_forward_pre_hook(self._hook)

    def _hook(self, module: Any, inputs: tuple[Any, ...]) -> None:
        self.last = inputs[0][:, -1, :]

    def close(self) -> None:
        self._handle.remove()


def mix_terms(
    own: str, objectives: Sequence[tuple[str, float]], tolerance: float = 1e-9
) -> list[tuple[str, float]]:
    """The rows one mixing request needs, as ``(adapter, coefficient)``, zero coefficients left out.

    ``log pi_own + sum_k w_k (log pi_k - log pi_base)`` is, before normalisation, the same
    combination of the rows' raw logits: the request's own row (its user's adapter, or the
    base) weighs 1, each objective adapter ``w_k``, the base ``-sum_k w_k``; when the own row
    is the base, the two base terms add up to ``1 - sum_k w_k``. The log-softmax normalisers
    only add one constant per request, which no softmax, top-k or top-p sees.

    Coefficients sum to 1, so a head bias passes through, and at least one row remains. A
    row whose coefficient is 0 is not run: weights on the simplex (MODPO's ``sum_k w_k = 1``)
    need no base row, and weight 1 on one objective is that adapter's row alone.

    Args:
        own: the request's adapter (``"__base__"`` for none).
        objectives: ``(objective adapter, weight)`` pairs.
        tolerance: coefficients at most this far from 0 count as 0.
    Returns:
        ``(adapter, coefficient)`` per row to run, the own row first when it is kept.
    """
    total = sum(w for _, w in objectives)
    terms = [(own, 1.0 - total)] if own == BASE else [(own, 1.0), (BASE, -total)]
    terms += list(objectives)
    return [(name, c) for name, c in terms if abs(c) > tolerance]


def output_head(model: Any) -> Any:
    """The output embedding (LM head) of ``model``, under a PEFT wrapper if there is one."""
    return getattr(model, "get_base_model", lambda: model)().get_output_embeddings()


def head_mixable(model: Any) -> bool:
    """Whether logits are an affine map of the last hidden state, so mixing can precede the head.

    True for a plain ``nn.Linear`` output head (tied or not, with or without bias, packed or not) and no
    final logit soft-capping (Gemma 2's ``tanh`` cap is not linear). A LoRA on the head makes
    it differ per row, so that is excluded too.
    """
    from personalign.packed_linear import PackedLinear

    config = getattr(getattr(model, "get_base_model", lambda: model)(), "config", None)
    return (
        type(output_head(model)) in (torch.nn.Linear, PackedLinear)
        and getattr(config, "final_logit_softcapping", None) is None
    )


class MixedHead:
    """Mixes the rows' last hidden states before the output head, which then runs once per request.

    The head is affine (:func:`head_mixable`), so ``head(sum_n C[i, n] h_n)`` equals
    ``sum_n C[i, n] head(h_n)``: the mixed logits of :class:`SteeringProcessor`, for the price
    of one head row per request instead of one per batch row (the head is the largest matmul
    of a small model: 49152 x 576 for SmolLM2). Every row of request ``i`` then receives its
    mixed logits, so the processor reads them on the primary row. Register it after a
    :class:`HiddenCapture`, which must see the unmixed rows.
    """

    def __init__(self, model: Any, coefficients: torch.Tensor, owner: list[int]) -> None:
        head = output_head(model)
        self.coefficients = coefficients.to(head.weight.device)  # (R, N)
        self.owner = torch.tensor(owner, device=head.weight.device)  # (N,) request of each row
        self._handles = [head.register_forward_pre_hook(self._mix), head.register_forward_hook(self._expand)]

    def _mix(self, module: Any, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = inputs[0]  # (N, T, H)
        n, *rest = hidden.shape
        if n != self.coefficients.shape[1]:
            raise RuntimeError(
                f"MixedHead was set up for a batch of {self.coefficients.shape[1]} rows, got {n}"
            )
        mixed = self.coefficients.to(hidden.dtype) @ hidden.reshape(n, -1)  # (R, T * H)
        return (mixed.reshape(self.coefficients.shape[0], *rest), *inputs[1:])

    def _expand(self, module: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return output[self.owner]  # (N, T, V): each row gets its request's mixed logits

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


class SteeringProcessor(LogitsProcessor):
    """Mixing, VAS guidance and EOS shift for a batch whose requests may span several rows.

    Request ``i`` owns rows ``groups[i]``: its primary row first, then (for logit mixing) the
    plain base row when the primary runs a user's adapter, then one row per objective adapter.
    Per step, for each request: ``l = log pi_primary + sum_k w_k (log pi_k - log pi_base)``
    (:func:`mix_logprobs`; without ``mix_weights`` the primary row's logits are used as they
    are, which is where a :class:`MixedHead` puts the mix), then ``l += sum_j beta_j (Q_j - mean_topk Q_j)`` on the top-k
    (:func:`vas_logits`), then the EOS shift. When any request has extra rows, the token is
    chosen here (``temperature``/``top_p`` per request) and every row of the group is forced
    to it, so ``generate`` must run greedy; otherwise the steered logits are returned.
    """

    def __init__(
        self,
        groups: list[list[int]],
        mix_weights: list[list[float]] | None = None,
        base_rows: list[int | None] | None = None,
        value_models: list[Any] | None = None,
        betas: list[list[float]] | None = None,
        capture: HiddenCapture | None = None,
        prompt_ids: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        eos_ids: list[int] | None = None,
        eos_shift: list[float] | None = None,
        temperature: list[float] | None = None,
        top_p: list[float] | None = None,
        top_k: int = 20,
    ) -> None:
        self.groups = groups
        self.primary = torch.tensor([g[0] for g in groups])  # (R,)
        self.expanded = any(len(g) > 1 for g in groups)
        self.mix_weights = mix_weights
        self.base_rows = base_rows
        self.value_models = value_models or []
        self.betas = torch.tensor(betas, dtype=torch.float32) if betas else None  # (R, n_value)
        self.capture = capture
        self.prompt_ids, self.prompt_mask = prompt_ids, prompt_mask
        self.eos_ids = eos_ids or []
        self.eos_shift = (
            torch.tensor(eos_shift, dtype=torch.float32) if eos_shift and any(eos_shift) else None
        )  # (R,)
        self.temperature = torch.tensor(temperature or [0.0] * len(groups), dtype=torch.float32)
        self.top_p = torch.tensor(top_p or [1.0] * len(groups), dtype=torch.float32)
        self.top_k = top_k
        self._states: list[torch.Tensor | None] = [None] * len(self.value_models)
        self._prompt_width: int | None = None

    def _mixed(self, scores: torch.Tensor) -> torch.Tensor:
        """``(R, V)`` per-request logits after mixing (the primary rows when nothing mixes)."""
        from personalign.functional.steering import mix_logprobs

        out = scores[self.primary.to(scores.device)].float()  # (R, V)
        if self.mix_weights is None:
            return out
        rows = []
        for i, group in enumerate(self.groups):
            weights = self.mix_weights[i]
            if not any(weights):
                rows.append(out[i])
                continue
            objective_rows = group[len(group) - len(weights) :]
            base_row = self.base_rows[i] if self.base_rows else None
            base = scores[base_row if base_row is not None else group[0]]
            mixed = mix_logprobs(
                base.unsqueeze(0).float(),
                scores[objective_rows].unsqueeze(0).float(),
                torch.tensor([weights], device=scores.device),
            )[0]
            if base_row is not None:
                # A user's adapter on the primary row: l = log pi_user + sum_k w_k (log pi_k - log pi_base).
                mixed = (
                    mixed
                    - torch.log_softmax(base.float(), -1)
                    + torch.log_softmax(scores[group[0]].float(), -1)
                )
            rows.append(mixed)
        return torch.stack(rows)

    def _values(self, input_ids: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``(R, k, n)`` centred values of the top-k candidates under each value model."""
        from personalign.adapters.value import TrunkValueHead

        out = []
        primary = self.primary.to(input_ids.device)
        for j, model in enumerate(self.value_models):
            if isinstance(model, TrunkValueHead):
                if self.capture is None or self.capture.last is None:
                    raise RuntimeError("a trunk value head needs the HiddenCapture of this generate call")
                q = model.q_all(self.capture.last[primary]).gather(-1, ids)  # (R, k)
            else:
                if self._states[j] is None:
                    self._states[j] = model.start(
                        self.prompt_ids[primary.cpu()].to(input_ids.device),
                        self.prompt_mask[primary.cpu()].to(input_ids.device),
                    )
                elif input_ids.shape[1] > (self._prompt_width or 0):
                    self._states[j] = model.step(self._states[j], input_ids[primary, -1])
                q = model.q_candidates(self._states[j], ids)  # (R, k)
            out.append(q - q.mean(dim=-1, keepdim=True))
        return torch.stack(out, dim=-1)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        from personalign.functional.steering import vas_logits

        if self._prompt_width is None:
            self._prompt_width = input_ids.shape[1]
        logits = self._mixed(scores)  # (R, V)
        if self.value_models:
            ids = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).indices  # (R, k)
            logits = vas_logits(logits, ids, self._values(input_ids, ids), self.betas.to(logits.device))
        if self.eos_shift is not None:
            logits = eos_shift(logits, self.eos_ids, self.eos_shift.to(logits.device))
        if not self.expanded:
            return logits.to(scores.dtype)
        tokens = top_p_sample(
            logits, self.temperature.to(logits.device), self.top_p.to(logits.device)
        )  # (R,)
        forced = torch.full_like(scores, -float("inf"))
        for i, group in enumerate(self.groups):
            forced[group, tokens[i]] = 0.0
        return forced
