"""The profile store: one JSON document per user, written atomically under a lock.

Layout: ``<store>/users/<user_id>/profile.json``. The user's folder is also where derived
artefacts (adapters, states) live, so deleting it forgets everything on disk.

:class:`Profiles` is what every profile store offers; :func:`open_profiles` picks one: this
JSON store (one process), or :class:`~personalign.memory.sql_profiles.SqlProfileStore` for a
``profiles_url`` (SQLite or PostgreSQL, several worker processes).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from threading import RLock
from typing import Protocol

from filelock import FileLock

from personalign.errors import UnknownUserError
from personalign.memory.locking import atomic_write_json
from personalign.types import UserProfile, validate_user_id

PROFILE_FILE = "profile.json"


class Profiles(Protocol):
    """A profile store: users' comparisons and settings, and the folders of their artefacts."""

    users_dir: Path

    def user_dir(self, user_id: str) -> Path: ...

    def exists(self, user_id: str) -> bool: ...

    def get(self, user_id: str) -> UserProfile: ...

    def update(
        self, user_id: str, change: Callable[[UserProfile], UserProfile], create: bool = True
    ) -> UserProfile: ...

    def delete(self, user_id: str) -> bool: ...

    def list_users(self) -> list[str]: ...

    def close(self) -> None: ...


def open_profiles(root: str | Path, url: str | None = None) -> Profiles:
    """The profile store of the store directory ``root``: JSON files (``url=None``), or the
    database at ``url`` (``sqlite:///path.db`` or ``postgresql://...``)."""
    if url is None:
        return ProfileStore(root)
    from personalign.memory.sql_profiles import SqlProfileStore

    return SqlProfileStore(url, root)


def changed(
    stored: UserProfile | None, user_id: str, change: Callable[[UserProfile], UserProfile], create: bool
) -> UserProfile:
    """``change`` applied to a copy of ``stored`` (a new profile when it is ``None`` and ``create``),
    its version one up and its time now: the step every profile store's ``update`` shares."""
    if stored is None:
        if not create:
            raise UnknownUserError(user_id)
        stored = UserProfile(user_id=user_id)
    updated = change(stored.model_copy(deep=True))
    updated.version = stored.version + 1
    updated.updated_at = time.time()
    return updated


class ProfileStore:
    """Users' comparisons and settings. Every update is read-modify-write under one lock."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.users_dir = self.root / "users"
        self.users_dir.mkdir(parents=True, exist_ok=True)
        self._file_lock = FileLock(str(self.root / "profiles.lock"))
        self._thread_lock = RLock()

    def user_dir(self, user_id: str) -> Path:
        return self.users_dir / validate_user_id(user_id)

    def exists(self, user_id: str) -> bool:
        return (self.user_dir(user_id) / PROFILE_FILE).is_file()

    def get(self, user_id: str) -> UserProfile:
        path = self.user_dir(user_id) / PROFILE_FILE
        if not path.is_file():
            raise UnknownUserError(user_id)
        return UserProfile.model_validate(json.loads(path.read_text(encoding="utf-8")))

    def update(
        self, user_id: str, change: Callable[[UserProfile], UserProfile], create: bool = True
    ) -> UserProfile:
        """Apply ``change`` to the stored profile (a new one if absent and ``create``) and persist it.

        If ``change`` raises, nothing is written.
        """
        with self._thread_lock, self._file_lock:
            stored = self.get(user_id) if self.exists(user_id) else None
            updated = changed(stored, user_id, change, create)
            atomic_write_json(self.user_dir(user_id) / PROFILE_FILE, updated.model_dump(mode="json"))
            return updated

    def delete(self, user_id: str) -> bool:
        """Remove the user's folder (profile and every derived artefact). True if it existed."""
        with self._thread_lock, self._file_lock:
            folder = self.user_dir(user_id)
            if not folder.exists():
                return False
            # Rename first so a crash mid-delete never leaves a half-removed but valid-looking user.
            doomed = folder.with_name(f".deleting-{folder.name}-{time.time_ns()}")
            folder.rename(doomed)
            shutil.rmtree(doomed)
            return True

    def list_users(self) -> list[str]:
        return sorted(
            p.parent.name
            for p in self.users_dir.glob(f"*/{PROFILE_FILE}")
            if not p.parent.name.startswith(".")
        )

    def close(self) -> None:
        """Nothing to release (the lock is held only inside each call)."""
