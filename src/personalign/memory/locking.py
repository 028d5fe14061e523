"""Atomic file writes and process locks for a store directory."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from personalign.errors import StoreLockedError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a mix.

    The bytes go to a temporary file in the same directory, are fsynced, and replace the target
    with one ``os.replace``; the directory is fsynced so the rename survives a power cut.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, json.dumps(payload, ensure_ascii=False, indent=1).encode("utf-8"))


class StoreLock:
    """An exclusive, process-wide claim on a store directory, held while a store is open.

    Embedded Chroma is not safe with several writer processes on one directory, so a second
    opener gets :class:`StoreLockedError` at once instead of corrupting the store.
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
                "or run one `personalign serve` and talk to it over HTTP"
            ) from None

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release(force=True)
