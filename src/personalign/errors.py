"""Typed errors. Every error names what was wrong and how to fix it.

Each subclass also inherits the matching builtin, so callers that catch
``ValueError`` or ``KeyError`` keep working.
"""

from __future__ import annotations

from typing import Any


class PersonalignError(Exception):
    """Base class of every error personalign raises on purpose."""


class ValidationError(PersonalignError, ValueError):
    """An input failed validation.

    Attributes:
        field: dotted path of the offending field (``comparisons[2].chosen``).
        value: the offending value (shortened in the message).
        fix: one sentence telling the caller what to do.
    """

    def __init__(self, field: str, problem: str, fix: str, value: Any = None) -> None:
        self.field = field
        self.value = value
        self.problem = problem
        self.fix = fix
        shown = "" if value is None else f" (got {_short(value)})"
        super().__init__(f"{field}: {problem}{shown}. Fix: {fix}")


class EngineError(PersonalignError, RuntimeError):
    """The generation engine behind a remote backend failed, could not be reached, or could not be
    built or fed an adapter (a 502 over HTTP; the message names the engine and the fix)."""


class UnknownUserError(PersonalignError, KeyError):
    """The user id has no profile in this store."""

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        super().__init__(user_id)

    def __str__(self) -> str:
        return (
            f"user {self.user_id!r} is not enrolled in this store. "
            "Fix: call enroll() or remember() for this user first, or pass user=None for a generic answer."
        )


class ModelNotFoundError(PersonalignError, FileNotFoundError):
    """A model could not be found locally (personalign never downloads at run time)."""


class StoreLockedError(PersonalignError, RuntimeError):
    """Another process (or another open Personalizer) holds this store."""


class ContextLengthError(PersonalignError, ValueError):
    """The conversation does not fit in the model's context window, even without shots or memories."""


class UserHeadsError(PersonalignError, ValueError):
    """User value heads that cannot be used here (another generator or embedder, a broken folder).

    Raised by ``personalign.steering.uservas``."""


class HeadError(PersonalignError, ValueError):
    """A reward-head folder that cannot be used.

    Raised by ``personalign.steering.heads``."""


class ValueModelError(PersonalignError, ValueError):
    """A value-model folder that cannot be used with this generator.

    Raised by ``personalign.adapters.value``."""


class AdapterError(PersonalignError, ValueError):
    """An adapter on disk cannot be used with this model (corrupt, mismatched, or for another base).

    Raised by ``personalign.adapters.store``."""


class PlugError(ValidationError):
    """A Persona-Plug projector that cannot be used here (the base of the two errors below).

    Raised by ``personalign.conditioning.pplug``."""


class PlugMismatchError(PlugError):
    """The projector was trained for another generator or encoder, or its dimensions differ.

    Raised by ``personalign.conditioning.pplug``."""


class PlugFileError(PlugError):
    """The projector folder is missing, truncated or corrupted.

    Raised by ``personalign.conditioning.pplug``."""


class EmptyHistoryError(ValidationError):
    """A user has no history items, so there is nothing to pool (the plug would be NaN).

    Raised by ``personalign.conditioning.pplug``."""


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
