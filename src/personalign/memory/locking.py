"""Process locks for a store directory (atomic writes live in :mod:`personalign.artefacts`)."""

from __future__ import annotations

from pathlib import Path

from filelock import FileLock, Timeout

from personalign.artefacts import atomic_write_bytes, atomic_write_json  # noqa: F401 (re-exported)
from personalign.errors import StoreLockedError


class StoreLock:
    """An exclusive, process-wide claim on a store directory, held while an embedded store is open.

    Embedded Chroma is not safe with several writer processes on one directory, and JSON profiles
    are written by one process, so a second opener gets :class:`StoreLockedError` at once instead
    of corrupting the store. A shared store (profiles in a database and memories on a Chroma
    server, see :class:`~personalign.memory.store.UserStore`) takes no such lock.
    """

    def __init__(self, root: Path) -> None:
        self.path = root / "store.lock"
        self._lock = FileLock(str(self.path), timeout=0, is_singleton=False)

    def acquire(self) -> None:
        try:
            self._lock.acquire()
        except Timeout:
            raise StoreLockedError(
                f"the store {self.path.parent} is open in another process or Personalizer. "
                "Fix: close the other one (Personalizer.close()), use a different store=, "
                "run one `personalign serve` and talk to it over HTTP, or share the store: "
                "profiles_url= (a database) with memory_client= (a Chroma server), see docs/scaling.md"
            ) from None

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release(force=True)
