"""User-conditioned value heads (``user-vas``): VAS guided by the user's own inferred reward.

PAL describes a user as a softmax mixture of K prototype rewards, ``r_u = sum_k pi_u,k r_k``.
One VAS value head per prototype is trained on samples of the frozen generator, its return being
prototype k's reward of the finished answer (:func:`prototype_targets`). Because values are linear
in the return, the user's value is the same mixture of the heads' values,
``Q_u = sum_k pi_u,k Q_k``, so at decode time a row's guidance is the K heads with betas
``beta * pi_u`` (each row of a mixed batch its own user's), added to the top-k logits as VAS does
(:func:`~personalign.functional.steering.vas_logits`). The heads read the generator's own last
hidden state, so every row pays K small ``(r, V)`` matmuls, not another model.

Folder contract: ``user_vas_config.json`` (generator, the embedder's fingerprint, K, the target
scale, the default strength, provenance) and ``head-<k>/`` value-model folders
(:mod:`personalign.adapters.value`). Heads made for another generator or another embedder are
refused with :class:`UserHeadsError`, which says what to do.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from personalign.errors import (
    UserHeadsError,  # noqa: F401 (re-exported)
    ValidationError,
)
from personalign.training.loop import LoopConfig
from personalign.training.samples import Sample

METHOD = "user-vas"
CONFIG_FILE = "user_vas_config.json"
FORMAT_VERSION = 1


class UserVasConfig(BaseModel):
    """Training settings of the per-prototype value heads."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(default=16, ge=1, le=512)
    default_beta: float = Field(
        default=3.0, gt=0.0, le=100.0, description="guidance strength when a request does not set one"
    )
    gamma: float = Field(default=1.0, gt=0.0, le=1.0)
    lam: float = Field(default=0.95, ge=0.0, le=1.0)
    loop: LoopConfig = Field(
        default_factory=lambda: LoopConfig(epochs=12, learning_rate=2e-3, batch_size=16, name="user-vas")
    )


def embedder_fingerprint(embedder: Any) -> str:
    """A digest of what the heads' targets depend on: the embedder's method, featurizer and weights."""
    digest = hashlib.sha256(
        f"{embedder.name}:{json.dumps(embedder.featurizer.config.to_dict(), sort_keys=True)}".encode()
    )
    for name, tensor in sorted(embedder.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().float().numpy().tobytes())
    return f"{embedder.name}:{digest.hexdigest()[:16]}"


def check_embedder(embedder: Any) -> None:
    if getattr(embedder, "name", None) != "pal" or not hasattr(embedder.model, "prototype_rewards"):
        raise ValidationError(
            "embedder",
            f"is {getattr(embedder, 'name', type(embedder).__name__)!r}; user-vas needs PAL (one head per prototype)",
            "use a PAL embedder (personalign train pal), or rerank instead",
            None,
        )


def prototype_targets(embedder: Any, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
    """``(N, K)`` each prototype's reward of each answer (PAL's ``r_k``; item offsets, which do not
    depend on the user, left out)."""
    check_embedder(embedder)
    phi = torch.from_numpy(embedder.featurizer.features(list(prompts), list(responses)))
    with torch.no_grad():
        return embedder.model.prototype_rewards(phi).float()  # (N, K)


def mixture(state: Any) -> np.ndarray:
    """``(K,)`` a PAL user's prototype weights ``softmax(W_u)``."""
    vector = np.asarray(state.vector, dtype=np.float64)
    if not np.all(np.isfinite(vector)):
        raise ValidationError(
            "state",
            "has non-finite values",
            "refresh the user's state: Personalizer.refresh_state(user)",
            vector.tolist(),
        )
    e = np.exp(vector - vector.max())
    return e / e.sum()


class UserHeads:
    """K trunk value heads, one per PAL prototype, for one generator and one embedder."""

    def __init__(self, heads: Sequence[Any], meta: dict[str, Any]) -> None:
        self.heads = list(heads)
        self.meta = meta

    @property
    def default_beta(self) -> float:
        return float(self.meta["default_beta"])

    @property
    def fingerprint(self) -> str:
        return str(self.meta["embedder"])

    def betas(self, state: Any, strength: float | None = None) -> list[float]:
        """Per-head guidance strengths of one user: ``beta * pi_u`` (``(K,)``)."""
        pi = mixture(state)
        if pi.shape != (len(self.heads),):
            raise UserHeadsError(
                f"the user's state has {pi.shape[0]} prototypes, the heads {len(self.heads)}; train user-vas heads for this embedder"
            )
        beta = self.default_beta if strength is None else strength
        return [float(beta * p) for p in pi]

    def save(self, folder: str | Path) -> Path:
        from personalign.adapters.value import save_value_model

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for k, head in enumerate(self.heads):
            save_value_model(head, folder / f"head-{k}")
        tmp = folder / (CONFIG_FILE + ".tmp")
        tmp.write_text(json.dumps(self.meta, indent=1) + "\n")
        tmp.replace(folder / CONFIG_FILE)
        return folder

    @classmethod
    def load(cls, folder: str | Path, generator: Any, embedder: Any) -> UserHeads:
        """The heads in ``folder``, checked against ``generator`` and ``embedder``."""
        from personalign.adapters.value import load_value_model

        folder = Path(folder)
        path = folder / CONFIG_FILE
        if not path.is_file():
            raise UserHeadsError(
                f"{folder} has no {CONFIG_FILE}; train heads with: personalign train user-vas --out {folder}"
            )
        try:
            meta = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserHeadsError(
                f"{path} is not valid JSON ({err}); train the heads again: personalign train user-vas"
            ) from None
        if meta.get("base_model") != generator.model_id:
            raise UserHeadsError(
                f"the user-vas heads in {folder} were trained for {meta.get('base_model')!r}, not {generator.model_id!r}; train heads for this generator: personalign train user-vas"
            )
        check_embedder(embedder)
        if meta.get("embedder") != embedder_fingerprint(embedder):
            raise UserHeadsError(
                f"the user-vas heads in {folder} were trained for embedder {meta.get('embedder')!r}, this one is {embedder_fingerprint(embedder)!r}; "
                "train heads for this embedder: personalign train user-vas --embedder <its folder>"
            )
        heads = [load_value_model(folder / f"head-{k}", generator) for k in range(int(meta["prototypes"]))]
        return cls(heads, meta)


def samples_from_pool(generator: Any, pool: dict[str, list[str]]) -> list[Sample]:
    """Pooled answers as :class:`Sample` rows (token ids re-encoded from the text, end of turn appended)."""
    from personalign.steering.decoding import eos_token_ids
    from personalign.training.samples import chat_ids

    tokenizer = generator.tokenizer
    end = eos_token_ids(tokenizer, getattr(generator.model, "generation_config", None))[0]
    out = []
    for prompt, answers in pool.items():
        head = chat_ids(tokenizer, prompt)
        for text in answers:
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [end]
            out.append(Sample(prompt, head, ids, text, True))
    return out


def train_user_heads(
    generator: Any,
    samples: Sequence[Sample],
    embedder: Any,
    config: UserVasConfig | None = None,
    provenance: dict[str, Any] | None = None,
) -> UserHeads:
    """One value head per prototype of ``embedder`` on ``samples`` of the frozen generator."""
    from personalign.steering.vas import VasTrainConfig, response_hidden_states, train_value_model

    config = config or UserVasConfig()
    if len(samples) < 2:
        raise ValidationError(
            "samples", "needs at least 2 samples", "sample more answers (answer_pool)", len(samples)
        )
    targets = prototype_targets(embedder, [s.prompt for s in samples], [s.text for s in samples])  # (N, K)
    scale = float(targets.std()) or 1.0  # one scale for all heads keeps sum_k pi_k Q_k the user's value
    hidden = response_hidden_states(generator, samples)  # (N, T, H), read by every head
    heads, losses = [], []
    for k in range(targets.shape[1]):
        vas = VasTrainConfig(
            objective=f"prototype-{k}",
            rank=config.rank,
            gamma=config.gamma,
            lam=config.lam,
            default_beta=config.default_beta,
            loop=config.loop,
        )
        head, report = train_value_model(
            generator,
            samples,
            targets[:, k] / scale,
            vas,
            0.0,
            scale,
            {"method": METHOD, "prototype": k},
            hidden=hidden,
        )
        heads.append(head)
        losses.append(report.epoch_loss[-1] if report.epoch_loss else None)
    from personalign import __version__

    meta = {
        "format_version": FORMAT_VERSION,
        "method": METHOD,
        "package_version": __version__,
        "base_model": generator.model_id,
        "embedder": embedder_fingerprint(embedder),
        "prototypes": int(targets.shape[1]),
        "target_scale": scale,
        "default_beta": config.default_beta,
        "rank": config.rank,
        "samples": len(samples),
        "prompts": len({s.prompt for s in samples}),
        "final_losses": losses,
        "provenance": dict(provenance or {}),
    }
    return UserHeads(heads, meta)


def default_heads_dir() -> Path:
    """Where shipped heads live: ``$PERSONALIGN_USER_VAS_DIR``, else the package's ``data/user_vas``."""
    import os
    from importlib import resources

    if os.environ.get("PERSONALIGN_USER_VAS_DIR"):
        return Path(os.environ["PERSONALIGN_USER_VAS_DIR"])
    return Path(str(resources.files("personalign") / "data" / "user_vas"))
