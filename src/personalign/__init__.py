"""personalign: personalised alignment for chat apps.

Importing the package loads no model and opens no database; :meth:`Personalizer.load` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from personalign.errors import (
    ContextLengthError,
    ModelNotFoundError,
    PersonalignError,
    StoreLockedError,
    UnknownUserError,
    ValidationError,
)
from personalign.types import (
    ChatMessage,
    Comparison,
    UserProfile,
    comparison_from_row,
    from_dataset,
    read_preferences,
    to_dataset,
    write_preferences,
)

__version__ = "0.1.0"

if TYPE_CHECKING:
    from personalign.personalizer import GenerationParams, Personalizer

__all__ = [
    "ChatMessage",
    "Comparison",
    "ContextLengthError",
    "GenerationParams",
    "ModelNotFoundError",
    "PersonalignError",
    "Personalizer",
    "StoreLockedError",
    "UnknownUserError",
    "UserProfile",
    "ValidationError",
    "comparison_from_row",
    "from_dataset",
    "read_preferences",
    "to_dataset",
    "write_preferences",
]


def __getattr__(name: str) -> Any:
    # The facade pulls in torch and transformers; load it on first use, not at import.
    if name in ("Personalizer", "GenerationParams"):
        from personalign import personalizer

        return getattr(personalizer, name)
    raise AttributeError(f"module 'personalign' has no attribute {name!r}")
