"""Everything stored about one user as one JSON document (``Personalizer.export``).

The document (``format: "personalign.user-export"``, ``format_version: 1``):

``user_id``, ``exported_at``, ``package_version``;
``profile``      ``created_at``, ``updated_at``, ``version`` of the profile (file or database row);
``comparisons``  every comparison, oldest first, as stored;
``state``        the inferred preference state (embedder id, vector, variance, mixture), or ``None``;
``steering``     ``stored`` (set by the caller), ``inferred`` (from the comparisons) and ``default``
                 (what a chat without steering applies);
``settings``     the profile's settings verbatim (the three above come from here);
``memories``     every memory, active and superseded, each with its lifecycle fields and ``history``
                 (every version with its time and source);
``adapter``      the per-user adapter's summary and metadata (training data hash, report), or ``None``;
``files``        every file in the user's folder (path relative to it, bytes): weights are listed,
                 not inlined.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from personalign.errors import UnknownUserError
from personalign.memory.lifecycle import MemoryLifecycle
from personalign.memory.profiles import Profiles
from personalign.types import validate_user_id

FORMAT = "personalign.user-export"
FORMAT_VERSION = 1


def export_user(
    user: str,
    profiles: Profiles,
    memories: MemoryLifecycle,
    adapter_metadata: Callable[[str], dict[str, Any] | None],
    default_steer: Callable[[str], dict[str, float]],
) -> dict[str, Any]:
    """The export document of ``user`` (``UnknownUserError`` if nothing is stored about them)."""
    from personalign import __version__

    validate_user_id(user)
    profile = profiles.get(user) if profiles.exists(user) else None
    stored_memories = memories.export(user)
    if profile is None and not stored_memories:
        raise UnknownUserError(user)
    settings = dict(profile.settings) if profile is not None else {}
    folder = profiles.user_dir(user)
    files = (
        sorted(
            (
                {"path": p.relative_to(folder).as_posix(), "bytes": p.stat().st_size}
                for p in folder.rglob("*")
                if p.is_file()
            ),
            key=lambda f: f["path"],
        )
        if folder.is_dir()
        else []
    )
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "exported_at": time.time(),
        "user_id": user,
        "profile": None
        if profile is None
        else {"created_at": profile.created_at, "updated_at": profile.updated_at, "version": profile.version},
        "comparisons": []
        if profile is None
        else [c.model_dump(mode="json", exclude_none=True) for c in profile.comparisons],
        "state": settings.get("state"),
        "steering": {
            "stored": settings.get("steer"),
            "inferred": settings.get("inferred_steer"),
            "default": default_steer(user) if profile is not None else {},
        },
        "settings": settings,
        "memories": stored_memories,
        "adapter": None,
        "files": files,
    }
    try:
        meta = adapter_metadata(user)
    except (OSError, ValueError):  # an adapter folder without its metadata file (copied in by hand)
        meta = None
    if meta is not None or "adapter" in settings:
        document["adapter"] = {"summary": settings.get("adapter"), "metadata": meta}
    json.dumps(document, allow_nan=False)  # a document every JSON reader takes, or a loud failure here
    return document
