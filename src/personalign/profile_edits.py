"""Writes to a user's profile behind :class:`~personalign.personalizer.Personalizer`'s verbs:
enrolling and editing comparisons (with the derived steering and preference state recomputed in
the same atomic write), and training, refitting or importing the user's adapter.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personalign.adapters.bank import LoraBank
from personalign.adapters.lora import LoraTrainConfig
from personalign.chat import validated
from personalign.errors import ValidationError
from personalign.preference.service import STATE_KEY
from personalign.steering.objectives import infer_weights
from personalign.types import Comparison, UserProfile, parse_comparisons, validate_user_id

if TYPE_CHECKING:
    from personalign.personalizer import Personalizer


def _adapter_summary(meta: Mapping[str, Any]) -> dict[str, Any]:
    """What the profile records about the user's adapter (the full record sits beside the adapter)."""
    summary = {"trained_at": meta["trained_at"], "pairs": meta["pairs"], "data_hash": meta["data_hash"]}
    if "bank" in meta:
        return {**summary, "kind": "bank", "bases": meta["bank"]["bases"], "weights": meta["bank"]["weights"]}
    return {**summary, "kind": "lora", "holdout_accuracy": meta["report"]["holdout_accuracy"][-1:]}


def _comparison_indices(remove: Any, replace: Any) -> tuple[list[int], dict[int, Any]]:
    """``edit_comparisons``' ``remove`` (a sequence of indices) and ``replace`` (indices to comparisons), checked."""
    fix = "pass remove=[0, 2] and/or replace={1: Comparison(...)}"
    if isinstance(remove, str | bytes | Mapping) or not isinstance(remove, Sequence):
        raise ValidationError("remove", "must be a sequence of comparison indices", fix, remove)
    if replace is not None and not isinstance(replace, Mapping):
        raise ValidationError("replace", "must be a mapping of comparison index to comparison", fix, replace)
    for field, indices in (("remove", list(remove)), ("replace", list(replace or {}))):
        for index in indices:
            if isinstance(index, bool) or not isinstance(index, int):
                raise ValidationError(field, f"index {index!r} is not an integer", fix, index)
    return list(remove), dict(replace or {})


def enroll(
    pz: Personalizer,
    user: str,
    comparisons: Sequence[Comparison | dict[str, Any]],
    adapter: bool | LoraBank = False,
    adapter_config: LoraTrainConfig | Mapping[str, Any] | None = None,
) -> UserProfile:
    """The body of :meth:`Personalizer.enroll <personalign.personalizer.Personalizer.enroll>`."""
    config = (
        adapter_config
        if isinstance(adapter_config, LoraTrainConfig)
        else validated(LoraTrainConfig, adapter_config or {}, "adapter_config")
    )
    validate_user_id(user)
    if isinstance(comparisons, Comparison | dict):
        comparisons = [comparisons]
    parsed = parse_comparisons(comparisons)
    now = time.time()
    stamped = [c.stamped(now) for c in parsed]

    summary: dict[str, Any] | None = None
    if adapter:
        # Train before storing anything: a failed training leaves the profile and the previous adapter as they were.
        existing = pz.profiles.get(user).comparisons if pz.profiles.exists(user) else []
        with pz._generate_lock:
            if isinstance(adapter, LoraBank):
                meta = pz.adapters.install_bank(user, adapter, [*existing, *stamped])
            else:
                meta = pz.adapters.train(user, [*existing, *stamped], config)
        summary = _adapter_summary(meta)

    embedder, embedder_id = pz.preferences.usable_embedder()
    # The state is inferred outside the store lock (it runs the encoder), from the profile as
    # read now; if another write to this user lands in between, it is inferred again inside.
    base, state = (-1, -1), None
    if embedder is not None:
        current = pz.profiles.get(user) if pz.profiles.exists(user) else None
        before = current.comparisons if current is not None else []
        base = (current.version if current is not None else 0, len(before))
        state = pz.preferences.infer(embedder, [*before, *stamped])

    def add(profile: UserProfile) -> UserProfile:
        profile.comparisons.extend(stamped)
        # Derived, recomputable from the comparisons: the user's inferred objective weights and preference state.
        profile.settings["inferred_steer"] = infer_weights(profile.comparisons)
        if embedder is not None:
            unchanged = (profile.version, len(profile.comparisons) - len(stamped)) == base
            fresh = (
                state
                if unchanged and state is not None
                else pz.preferences.infer(embedder, profile.comparisons)
            )
            profile.settings[STATE_KEY] = {"embedder": embedder_id, **fresh.to_dict()}
        if summary is not None:
            profile.settings["adapter"] = summary
        return profile

    return pz.profiles.update(user, add)


def edit_comparisons(
    pz: Personalizer,
    user: str,
    remove: Sequence[int] = (),
    replace: Mapping[int, Comparison | dict[str, Any]] | None = None,
) -> UserProfile:
    """The body of :meth:`Personalizer.edit_comparisons <personalign.personalizer.Personalizer.edit_comparisons>`."""
    validate_user_id(user)
    remove, replace = _comparison_indices(remove, replace)
    fresh = (
        dict(zip(replace, parse_comparisons(list(replace.values()), "replace"), strict=True))
        if replace
        else {}
    )
    removed = set(remove)
    if not removed and not fresh:
        raise ValidationError("remove", "and replace are both empty", "name at least one comparison index")
    if removed & set(fresh):
        raise ValidationError(
            "replace",
            f"indices {sorted(removed & set(fresh))} are also removed",
            "remove or replace an index, not both",
        )
    embedder, embedder_id = pz.preferences.usable_embedder()
    now = time.time()

    def edit(profile: UserProfile) -> UserProfile:
        n = len(profile.comparisons)
        for index in sorted(removed | set(fresh)):
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
                field = "remove" if index in removed else "replace"
                raise ValidationError(
                    field,
                    f"index {index!r} is not a comparison of {user!r}",
                    f"use indices 0..{n - 1}",
                    index,
                )
        kept = [
            fresh[i].stamped(now) if i in fresh else c
            for i, c in enumerate(profile.comparisons)
            if i not in removed
        ]
        profile.comparisons = kept
        profile.settings["inferred_steer"] = infer_weights(kept)
        if embedder is not None:
            if kept:
                profile.settings[STATE_KEY] = {
                    "embedder": embedder_id,
                    **pz.preferences.infer(embedder, kept).to_dict(),
                }
            else:
                profile.settings.pop(STATE_KEY, None)
        return profile

    return pz.profiles.update(user, edit, create=False)


def train_adapter(
    pz: Personalizer,
    user: str,
    adapter_config: LoraTrainConfig | Mapping[str, Any] | None = None,
    bank: LoraBank | None = None,
    extra: Sequence[Comparison] = (),
) -> UserProfile:
    """The body of :meth:`Personalizer.train_adapter <personalign.personalizer.Personalizer.train_adapter>`."""
    config = (
        adapter_config
        if isinstance(adapter_config, LoraTrainConfig)
        else validated(LoraTrainConfig, adapter_config or {}, "adapter_config")
    )
    comparisons = [
        *pz.profiles.get(user).comparisons,
        *(parse_comparisons(extra, "extra") if extra else []),
    ]
    if not comparisons:
        raise ValidationError(
            "comparisons", f"user {user!r} has none", "enroll comparisons before training an adapter"
        )
    with pz._generate_lock:
        meta = (
            pz.adapters.install_bank(user, bank, comparisons)
            if bank is not None
            else pz.adapters.train(user, comparisons, config)
        )

    def note(profile: UserProfile) -> UserProfile:
        profile.settings["adapter"] = _adapter_summary(meta)
        return profile

    return pz.profiles.update(user, note, create=False)


def import_adapter(pz: Personalizer, user: str, folder: str | Path) -> UserProfile:
    """The body of :meth:`Personalizer.import_adapter <personalign.personalizer.Personalizer.import_adapter>`."""
    profile = pz.profiles.get(user)
    with pz._generate_lock:
        meta = pz.adapters.install(user, folder, profile.comparisons)

    def note(p: UserProfile) -> UserProfile:
        p.settings["adapter"] = {
            "trained_at": meta["trained_at"],
            "pairs": meta["pairs"],
            "data_hash": meta["data_hash"],
            "kind": "imported",
        }
        return p

    return pz.profiles.update(user, note, create=False)
