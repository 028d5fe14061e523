"""The preference side of the facade: the embedder, each user's persisted state, reward,
predict and next_question. :class:`~personalign.personalizer.Personalizer` delegates here."""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from personalign.errors import ValidationError
from personalign.memory.profiles import ProfileStore
from personalign.models import Encoder, Generator
from personalign.preference.drift import DEFAULT_DRIFT, DriftConfig, infer_state
from personalign.preference.questions import check_text, parse_candidates
from personalign.types import UserProfile, validate_user_id

STATE_KEY = "state"


class Preferences:
    """One embedder (loaded on first use) over one profile store.

    ``drift``: how a user's state follows change (recency half-life, change detector; see
    :mod:`personalign.preference.drift`). A stored state made under other drift settings is
    re-inferred when read.
    """

    def __init__(
        self,
        profiles: ProfileStore,
        encoder: Encoder,
        generator: Generator,
        embedder: Any = None,
        drift: DriftConfig = DEFAULT_DRIFT,
    ) -> None:
        if not isinstance(drift, DriftConfig):
            raise ValidationError(
                "drift", "must be a DriftConfig", "pass personalign.preference.drift.DriftConfig(...)", drift
            )
        self.drift = drift
        self.profiles = profiles
        self.encoder = encoder
        self.generator = generator
        self._embedder_spec = embedder
        self._embedder: Any = None
        self._embedder_id = ""
        self._embedder_lock = threading.Lock()

    def embedder_and_id(self) -> tuple[Any, str]:
        """The preference embedder (loaded on first use) and an id that changes when it does."""
        with self._embedder_lock:
            if self._embedder is None:
                from personalign.preference import default_embedder_dir, load_embedder

                spec = self._embedder_spec
                if spec is None or isinstance(spec, str | Path):
                    folder = Path(spec) if spec is not None else default_embedder_dir()
                    self._embedder = load_embedder(folder, self.encoder, self.generator)
                    config = folder / f"{self._embedder.name}_config.json"
                    digest = hashlib.sha256(config.read_bytes()).hexdigest()[:16]
                    self._embedder_id = f"{self._embedder.name}:{digest}"
                else:
                    self._embedder = spec
                    self._embedder_id = f"{spec.name}:{id(spec):x}"
            return self._embedder, self._embedder_id

    def usable_embedder(self) -> tuple[Any, str]:
        """The embedder for enrollment; ``(None, "")`` when the shipped default does not fit this
        encoder (another encoder was loaded): enrollment then stores comparisons only, and
        :meth:`reward` and friends raise the loading error."""
        try:
            return self.embedder_and_id()
        except ValidationError:
            if self._embedder_spec is not None:
                raise
            return None, ""

    @property
    def embedder(self) -> Any:
        return self.embedder_and_id()[0]

    def state(self, user: str) -> Any:
        """``user``'s :class:`~personalign.preference.base.UserState` under the current embedder.

        The state stored at enrollment is used when it was made by this embedder; otherwise it
        is inferred from the stored comparisons (not written back). A user without comparisons
        has the embedder's prior. A stored state that is corrupt (NaN, wrong shape) raises
        ``ValidationError`` naming ``settings.state``; call :meth:`refresh_state` to rebuild it.
        """
        embedder, embedder_id = self.embedder_and_id()
        profile = self.profiles.get(user)
        return self.state_of(profile, embedder, embedder_id)

    def infer(self, embedder: Any, comparisons: Sequence[Any]) -> Any:
        """The state of a user with these comparisons (oldest first) under :attr:`drift`."""
        return infer_state(embedder, comparisons, self.drift)

    def _drift_matches(self, stored: Mapping[str, Any]) -> bool:
        """Whether a stored state was inferred under the current drift settings (a state without a
        note was inferred statically)."""
        note = (stored.get("extra") or {}).get("drift")
        if note is None:
            return not self.drift.detect and self.drift.half_life is None
        return {k: note.get(k) for k in self.drift.to_dict()} == self.drift.to_dict()

    def state_of(self, profile: UserProfile, embedder: Any, embedder_id: str) -> Any:
        from personalign.preference.base import UserState, check_state

        stored = profile.settings.get(STATE_KEY)
        if (
            isinstance(stored, Mapping)
            and stored.get("embedder") == embedder_id
            and self._drift_matches(stored)
        ):
            try:
                state = UserState.from_dict(stored)
                return check_state(state, embedder.name, embedder.prior().dim)
            except ValidationError as err:
                raise ValidationError(
                    f"users/{profile.user_id}/profile.json: settings.state",
                    f"is unusable ({err.problem})",
                    f"call refresh_state({profile.user_id!r}) to re-infer it from the comparisons",
                ) from None
        return self.infer(embedder, profile.comparisons) if profile.comparisons else embedder.prior()

    def refresh_state(self, user: str) -> Any:
        """Re-infer ``user``'s state from their stored comparisons and store it (replacing a corrupt one)."""
        embedder, embedder_id = self.embedder_and_id()
        profile = self.profiles.get(user)
        state = self.infer(embedder, profile.comparisons) if profile.comparisons else embedder.prior()

        def put(p: UserProfile) -> UserProfile:
            p.settings[STATE_KEY] = {"embedder": embedder_id, **state.to_dict()}
            return p

        self.profiles.update(user, put, create=False)
        return state

    def reward(self, user: str, prompt: str, responses: Sequence[str]) -> list[float]:
        """The user's reward of each response to ``prompt`` (higher = more to their taste).

        Rewards of one user are comparable with each other; use :meth:`predict` for a probability.
        """
        check_text(prompt, "prompt")
        if isinstance(responses, str) or not isinstance(responses, Sequence) or not responses:
            raise ValidationError(
                "responses",
                "must be a non-empty list of strings",
                'pass e.g. ["answer one", "answer two"]',
                responses,
            )
        for i, r in enumerate(responses):
            check_text(r, f"responses[{i}]")
        embedder, embedder_id = self.embedder_and_id()
        state = self.state_of(self.profiles.get(user), embedder, embedder_id)
        return [float(r) for r in embedder.reward([prompt] * len(responses), list(responses), state)]

    def predict(self, user: str, prompt: str, a: str, b: str) -> float:
        """Probability that ``user`` prefers response ``a`` over ``b`` for ``prompt``."""
        for value, name in ((prompt, "prompt"), (a, "a"), (b, "b")):
            check_text(value, name)
        embedder, embedder_id = self.embedder_and_id()
        state = self.state_of(self.profiles.get(user), embedder, embedder_id)
        return float(embedder.prob(prompt, a, b, state))

    def next_question(
        self, user: str, candidates: Sequence[Any], top_k: int | None = None, seed: int = 0
    ) -> list[dict[str, Any]]:
        """Rank candidate comparisons by how much ``user``'s answer would teach about them.

        ``candidates``: ``{"prompt", "a", "b"}`` mappings or ``(prompt, a, b)`` tuples. Returns
        them best first, each with ``gain`` (expected information gain in nats about the user's
        state, at most ln 2 = 0.693) and ``p_a`` (the current probability they pick ``a``). A user
        not enrolled yet is ranked under the embedder's prior (cold start); nothing is stored.
        """
        rows = parse_candidates(candidates)
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
            raise ValidationError(
                "top_k", "must be a positive integer", "omit it to rank every candidate", top_k
            )
        embedder, embedder_id = self.embedder_and_id()
        if not hasattr(embedder, "information_gain"):
            raise ValidationError(
                "embedder",
                f"{embedder.name!r} has no posterior to rank questions by",
                "use a PAL or VPL embedder",
            )
        validate_user_id(user)
        state = (
            self.state_of(self.profiles.get(user), embedder, embedder_id)
            if self.profiles.exists(user)
            else embedder.prior()
        )
        prompts, a, b = ([r[i] for r in rows] for i in range(3))
        gains = embedder.information_gain(prompts, a, b, state, seed=seed)
        rewards = embedder.reward(prompts + prompts, a + b, state)
        n = len(rows)
        order = sorted(range(n), key=lambda i: (-float(gains[i]), i))[: top_k or n]
        out = []
        for i in order:
            margin = float(rewards[i]) - float(rewards[n + i])
            out.append(
                {
                    "prompt": prompts[i],
                    "a": a[i],
                    "b": b[i],
                    "gain": float(gains[i]),
                    "p_a": 1.0 / (1.0 + math.exp(-max(min(margin, 50.0), -50.0))),
                    "index": i,
                }
            )
        return out
