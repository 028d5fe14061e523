"""A store directory: the process lock, the profile store and the memory, opened together."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from personalign.memory.chroma import MemoryStore
from personalign.memory.lifecycle import MemoryLifecycle, check_add_options
from personalign.memory.locking import StoreLock
from personalign.memory.profiles import open_profiles
from personalign.models import Encoder
from personalign.types import validate_user_id


def is_shared(memory_server: bool, profiles_url: str | None) -> bool:
    """Whether a store may be opened by several processes: profiles in a database and memories
    on a Chroma server. Anything embedded (JSON profiles, an embedded Chroma) has one writer."""
    return memory_server and profiles_url is not None


class UserStore:
    """Everything stored about users under one directory (or memories on a Chroma server).

    Layout: ``store.lock``, ``profiles.lock``, ``users/<id>/profile.json`` (or the database at
    ``profiles_url``, :mod:`personalign.memory.sql_profiles`) and ``chroma/``.

    Embedded (profiles as JSON files, or memories in ``chroma/``): one process at a time; an
    open UserStore holds the store exclusively (``StoreLockedError`` for a second opener).
    Shared (``profiles_url`` names a database and ``memory_client`` is a Chroma server): no
    store lock, so several worker processes or hosts can open the same store (``users/`` on
    storage they all see).
    """

    def __init__(
        self, root: str | Path, encoder: Encoder, memory_client: Any = None, profiles_url: str | None = None
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.shared = is_shared(memory_client is not None, profiles_url)
        self._lock = None if self.shared else StoreLock(self.root)
        if self._lock is not None:
            self._lock.acquire()
        try:
            self.profiles = open_profiles(self.root, profiles_url)
            if memory_client is None:
                self.memory = MemoryStore(encoder, path=self.root / "chroma")
            else:
                self.memory = MemoryStore(encoder, client=memory_client)
            self.memories = MemoryLifecycle(self.memory)
        except BaseException:
            self.close()
            raise

    def remember(
        self,
        user: str,
        text: str | list[str],
        metadata: Mapping[str, Any] | None = None,
        key: str | None = None,
        on_conflict: str = "keep",
        source: str = "api",
    ) -> dict[str, Any]:
        """Store fact(s) about ``user``, creating the user's profile if new (see :meth:`MemoryLifecycle.add`)."""
        docs, _ = self.memory.validate(user, text, metadata)  # nothing is written for bad input
        check_add_options(key, on_conflict, source, len(docs))
        if not self.profiles.exists(user):  # profile first: a crash never leaves memories without a user
            self.profiles.update(user, lambda p: p)
        return self.memories.add(user, text, metadata, key=key, on_conflict=on_conflict, source=source)

    def forget(self, user: str) -> dict[str, int | bool]:
        """Remove every trace of ``user``: memories (collection dropped, database vacuumed) and files."""
        validate_user_id(user)
        texts = self.memories.texts(user)  # every version of every memory, as stored and as embedded
        if self.profiles.exists(user):
            texts += [
                t for c in self.profiles.get(user).comparisons for t in (c.prompt_text, c.chosen, c.rejected)
            ]
        memories = self.memory.delete_all(user)
        removed = self.profiles.delete(user)
        self.memory.encoder.evict(texts)  # nothing of the user stays in this process's caches
        return {"memories_deleted": memories, "profile_deleted": removed}

    def close(self) -> None:
        profiles = getattr(self, "profiles", None)
        if profiles is not None:
            profiles.close()
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> UserStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
