"""User memory on Chroma: free-text facts retrieved by meaning, one collection per user.

Each user's records live in their own collection, so every read is scoped to one user by
construction (no filter to forget) and ``forget`` drops the collection. Embeddings come
from our own encoder through a registered embedding function: nothing is downloaded.
Results are shaped like mem0's: ``{"results": [{"id", "memory", "user_id", ...}]}``.

Lifecycle data (a memory's key, status, versions; see :mod:`personalign.memory.lifecycle`) is
stored in the same collection under metadata keys starting with ``personalign:``: a memory's
current version is the record under its id, each earlier version a record ``<id>~v<n>`` with
status ``history``. Listing and search here see current versions only (active ones by default),
so dropping the collection on ``forget`` removes every version.

Collection handles are cached per user. When several processes share one Chroma server, another
process may drop a user's collection (``forget``) and maybe create it again: a cached handle then
names a collection that no longer exists. Every public read or write is :func:`refreshing`: on
Chroma's ``NotFoundError`` it drops the handle and runs once more on a fresh lookup (reads find
no collection, writes create it).

A search asks Chroma for its nearest records without a status filter when it can (see
:func:`_nearest_of_status`): Chroma lists every record that matches a filter before a filtered
query, nearly all of the user's records for "active" (docs/performance.md, "Memory writes").
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import shutil
import sqlite3
import time
import uuid
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from threading import RLock
from typing import Any, Protocol, TypeVar

from chromadb.api.types import Documents, EmbeddingFunction, Embeddings
from chromadb.errors import NotFoundError
from chromadb.utils.embedding_functions import register_embedding_function

from personalign.errors import ValidationError
from personalign.memory.filters import check_fields, check_filters, combine
from personalign.models import Encoder
from personalign.types import validate_user_id

MAX_MEMORY_CHARS = 8000
MAX_TOP_K = 1000
_RESERVED = {"user_id", "created_at"}
INTERNAL = "personalign:"  # prefix of lifecycle metadata keys (never a caller's metadata)
STATUS = INTERNAL + "status"  # active | superseded | history (legacy records have none: active)
STATUSES = ("active", "superseded", "all")
HISTORY_OF = INTERNAL + "of"  # on an earlier version: the id of its memory
EF_NAME = "personalign-sentence-encoder"
SPARE = 2  # an unfiltered search asks for SPARE * top_k records, so other statuses can be dropped
_UUID_DIR = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# Encoders already loaded in this process, by name: Chroma rebuilds the embedding function from
# its stored config on every collection open, and that must not load the model again.
_LOADED: weakref.WeakValueDictionary[str, Encoder] = weakref.WeakValueDictionary()


@register_embedding_function
class EncoderEmbeddingFunction(EmbeddingFunction[Documents]):
    """Chroma embedding function backed by a personalign :class:`Encoder` (unique registered name)."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        _LOADED.setdefault(encoder.name, encoder)

    def __call__(self, input: Documents) -> Embeddings:  # noqa: A002 (chroma's signature)
        return list(self.encoder.encode(list(input)))

    @staticmethod
    def name() -> str:
        return EF_NAME

    def get_config(self) -> dict[str, Any]:
        return {"encoder": self.encoder.name}

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> EncoderEmbeddingFunction:
        from personalign.models import load_encoder

        name = config.get("encoder")
        encoder = _LOADED.get(name) if isinstance(name, str) else None
        return EncoderEmbeddingFunction(encoder or load_encoder(name))

    def default_space(self) -> str:
        return "cosine"

    def supported_spaces(self) -> list[str]:
        return ["cosine"]


def collection_name(user_id: str) -> str:
    """A Chroma-safe, fixed-length collection name for a user."""
    return "u-" + hashlib.sha256(validate_user_id(user_id).encode()).hexdigest()[:40]


# What the database itself refuses (a raw chromadb error deep inside a write otherwise).
_CHROMA_PREFIXES = ("$", "#", "chroma:")
_INT64 = range(-(2**63), 2**63)


def _utf8(text: str) -> bool:
    """False for text with an unpaired surrogate (``"\\ud800"``), which no UTF-8 store or encoder takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise ValidationError(
            "metadata", "must be a mapping", "pass a dict of str keys to str/int/float/bool values", metadata
        )
    clean: dict[str, Any] = {}
    for key, value in metadata.items():
        if (
            not isinstance(key, str)
            or key in _RESERVED
            or key.startswith(INTERNAL)
            or not key
            or key.startswith(_CHROMA_PREFIXES)
            or not _utf8(key)
        ):
            fix = (
                f"use non-empty string keys other than {sorted(_RESERVED)}, "
                f"not starting with {INTERNAL!r}, '$', '#' or 'chroma:'"
            )
            raise ValidationError(f"metadata.{key}", "is a reserved or non-string key", fix, key)
        if (
            not isinstance(value, str | int | float | bool)
            or (isinstance(value, float) and not math.isfinite(value))
            or (isinstance(value, int) and not isinstance(value, bool) and value not in _INT64)
            or (isinstance(value, str) and not _utf8(value))
        ):
            raise ValidationError(
                f"metadata.{key}",
                "must be a str (valid UTF-8), a 64-bit int, a finite float or a bool",
                "flatten or stringify the value",
                value,
            )
        clean[key] = value
    return clean


def _check_text(text: Any, field: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise ValidationError(field, "must be a non-empty string", "pass the fact as text", text)
    if not _utf8(text):
        raise ValidationError(
            field, "contains an unpaired UTF-16 surrogate", "pass valid Unicode text", text[:40]
        )
    if len(text) > MAX_MEMORY_CHARS:
        raise ValidationError(
            field,
            f"is longer than {MAX_MEMORY_CHARS} characters",
            "split it into several memories",
            len(text),
        )
    return text


def status_where(status: str) -> dict[str, Any]:
    """Chroma's ``where`` for memories of ``status`` (``all``: every current version, no history)."""
    if status not in STATUSES:
        raise ValidationError(
            "status", f"must be one of {STATUSES}", "pass status='active' (the default) or 'all'", status
        )
    if status == "active":
        return {STATUS: {"$nin": ["superseded", "history"]}}  # legacy records without a status are active
    if status == "superseded":
        return {STATUS: "superseded"}
    return {STATUS: {"$ne": "history"}}


def has_status(metadata: Mapping[str, Any], status: str) -> bool:
    """Whether a record's ``metadata`` matches :func:`status_where` (``status``), checked here."""
    found = metadata.get(STATUS)
    if status == "active":
        return found not in ("superseded", "history")
    if status == "superseded":
        return found == "superseded"
    return found != "history"


class _Handles(Protocol):
    def drop_handle(self, user_id: str) -> None: ...


_H = TypeVar("_H", bound=_Handles)
_R = TypeVar("_R")


def refreshing(method: Callable[..., _R]) -> Callable[..., _R]:
    """Run ``method(self, user_id, ...)`` once more, on a fresh collection lookup, when the cached
    handle's collection is gone (Chroma's ``NotFoundError``: another process sharing the Chroma
    server forgot the user). A handle that fails the second time is a real error and raises."""

    @functools.wraps(method)
    def run(self: _H, user_id: str, *args: Any, **kwargs: Any) -> _R:
        try:
            return method(self, user_id, *args, **kwargs)
        except NotFoundError:
            self.drop_handle(user_id)
            return method(self, user_id, *args, **kwargs)

    return run


def _record(user_id: str, memory_id: str, document: str, metadata: Mapping[str, Any]) -> dict[str, Any]:
    extra = {k: v for k, v in metadata.items() if k not in _RESERVED and not k.startswith(INTERNAL)}
    return {
        "id": memory_id,
        "memory": document,
        "user_id": user_id,
        "created_at": metadata.get("created_at"),
        "metadata": extra,
    }


class MemoryStore:
    """Per-user memories in a Chroma database (embedded ``path`` or a ``client`` such as HttpClient)."""

    def __init__(self, encoder: Encoder, path: str | Path | None = None, client: Any = None) -> None:
        import chromadb
        from chromadb.config import Settings

        if (path is None) == (client is None):
            raise ValidationError(
                "memory",
                "needs exactly one of path or client",
                "pass path=<dir> or client=chromadb.HttpClient(...)",
            )
        self.encoder = encoder
        self._ef = EncoderEmbeddingFunction(encoder)
        self.path = Path(path) if path is not None else None
        self.client = client or chromadb.PersistentClient(
            path=str(path), settings=Settings(anonymized_telemetry=False)
        )
        self._collections: dict[str, Any] = {}
        self._lock = RLock()

    def _collection(self, user_id: str, create: bool) -> Any | None:
        name = collection_name(user_id)
        with self._lock:
            if name in self._collections:
                return self._collections[name]
            if create:
                found = self.client.get_or_create_collection(
                    name,
                    embedding_function=self._ef,
                    metadata={"user_id": user_id},
                    configuration={"hnsw": {"space": "cosine"}},
                )
            else:
                try:
                    found = self.client.get_collection(name, embedding_function=self._ef)
                except Exception as err:  # chroma raises NotFoundError (or ValueError on older pins)
                    if "does not exist" in str(err) or type(err).__name__ == "NotFoundError":
                        return None
                    raise
            self._collections[name] = found
            return found

    def drop_handle(self, user_id: str) -> None:
        """Forget this process's cached handle on the user's collection (the next use looks it up)."""
        with self._lock:
            self._collections.pop(collection_name(user_id), None)

    def validate(
        self, user_id: str, texts: str | list[str], metadata: Mapping[str, Any] | None = None
    ) -> tuple[list[str], dict[str, Any]]:
        """Check what :meth:`add` would store; returns the texts and metadata, or raises."""
        validate_user_id(user_id)
        items = [texts] if isinstance(texts, str) else texts
        if not isinstance(items, list) or not items:
            raise ValidationError(
                "texts", "must be a non-empty string or list of strings", "pass the fact(s) as text"
            )
        return [_check_text(t, f"texts[{i}]") for i, t in enumerate(items)], _check_metadata(metadata)

    def add(
        self, user_id: str, texts: str | list[str], metadata: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Store one or more facts for ``user_id``; all are validated before any is written."""
        docs, extra = self.validate(user_id, texts, metadata)
        now = time.time()
        metas = [{**extra, "user_id": user_id, "created_at": now, STATUS: "active"} for _ in docs]
        embeddings = self._ef(docs)  # encode before touching the database
        ids = self.insert(user_id, docs, metas, embeddings)
        return {
            "results": [
                {**_record(user_id, i, d, m), "event": "ADD"}
                for i, d, m in zip(ids, docs, metas, strict=True)
            ]
        }

    @refreshing
    def insert(
        self, user_id: str, docs: list[str], metas: list[dict[str, Any]], embeddings: Any
    ) -> list[str]:
        """Write checked records under new ids; returns the ids."""
        # Time-ordered ids (nanoseconds, then a random tail): get_all's order is insertion order.
        stamp = time.time_ns()
        ids = [f"{stamp + i:016x}{uuid.uuid4().hex[:16]}" for i in range(len(docs))]
        collection = self._collection(user_id, create=True)
        collection.add(ids=ids, documents=docs, metadatas=metas, embeddings=embeddings)
        return ids

    def where(
        self, user_id: str, status: str = "active", filters: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """The checked Chroma ``where`` for ``status`` and metadata ``filters`` (see :mod:`.filters`)."""
        clauses = [status_where(status), *check_filters(filters)]
        if filters:
            check_fields(filters, self.metadata_keys(user_id))
        where = combine(clauses)
        assert where is not None
        return where

    @refreshing
    def metadata_keys(self, user_id: str) -> set[str]:
        """Every caller metadata key some current memory of the user carries."""
        collection = self._collection(user_id, create=False)
        if collection is None:
            return set()
        found = collection.get(where=status_where("all"), include=["metadatas"])
        return {k for m in found["metadatas"] for k in m if k not in _RESERVED and not k.startswith(INTERNAL)}

    def search(
        self,
        user_id: str,
        query: str,
        top_k: int = 5,
        threshold: float | None = None,
        filters: Mapping[str, Any] | None = None,
        status: str = "active",
    ) -> dict[str, Any]:
        """The user's memories closest in meaning to ``query``, best first, with cosine ``score``.

        Only active memories unless ``status`` is ``"superseded"`` or ``"all"``; ``filters``
        narrows by metadata (see :mod:`personalign.memory.filters`).
        """
        return {
            "results": [
                _record(user_id, i, d, m) | {"score": s}
                for i, d, m, s in self.query(user_id, query, top_k, threshold, filters, status)
            ]
        }

    @refreshing
    def query(
        self,
        user_id: str,
        query: str,
        top_k: int = 5,
        threshold: float | None = None,
        filters: Mapping[str, Any] | None = None,
        status: str = "active",
        embedding: Any = None,
    ) -> list[tuple[str, str, dict[str, Any], float]]:
        """``(id, document, metadata, score)`` of the closest current memories, best first.

        ``embedding`` is the query's vector when the caller has it (then nothing is encoded).
        """
        validate_user_id(user_id)
        _check_text(query, "query")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
            raise ValidationError(
                "top_k", f"must be an integer in 1..{MAX_TOP_K}", "pass e.g. top_k=5", top_k
            )
        if threshold is not None and (
            isinstance(threshold, bool)
            or not isinstance(threshold, int | float)
            or not -1.0 <= threshold <= 1.0
        ):
            raise ValidationError(
                "threshold",
                "must be a number in [-1, 1] (cosine similarity)",
                "pass e.g. threshold=0.2, or None",
                threshold,
            )
        collection = self._collection(user_id, create=False)
        if collection is None:
            status_where(status)
            check_filters(filters)
            return []
        where = self.where(user_id, status, filters)
        vector = self._ef([query]) if embedding is None else [embedding]
        if filters or status == "superseded":  # a narrow filter: Chroma lists few records
            found = _nearest(collection, vector, top_k, where)
        else:
            found = _nearest_of_status(collection, vector, top_k, status, where, threshold)
        return [
            (memory_id, doc, meta, score)
            for memory_id, doc, meta, score in found
            # defence in depth: collections are per user already
            if meta.get("user_id") == user_id and (threshold is None or score >= threshold)
        ]

    @refreshing
    def rows(
        self, user_id: str, status: str = "active", filters: Mapping[str, Any] | None = None
    ) -> list[tuple[str, str, dict[str, Any]]]:
        """``(id, document, metadata)`` of the user's current memories of ``status``, oldest first."""
        validate_user_id(user_id)
        collection = self._collection(user_id, create=False)
        if collection is None:
            status_where(status)
            check_filters(filters)
            return []
        found = collection.get(where=self.where(user_id, status, filters), include=["documents", "metadatas"])
        rows = [
            (i, d, m)
            for i, d, m in zip(found["ids"], found["documents"], found["metadatas"], strict=True)
            if m.get("user_id") == user_id
        ]
        return sorted(rows, key=lambda r: r[0])  # ids are time-ordered

    def get_all(
        self,
        user_id: str,
        limit: int | None = None,
        filters: Mapping[str, Any] | None = None,
        status: str = "active",
    ) -> dict[str, Any]:
        """Every memory of the user, oldest first (active ones unless ``status`` says otherwise)."""
        validate_user_id(user_id)
        check_limit(limit)
        rows = [_record(user_id, i, d, m) for i, d, m in self.rows(user_id, status, filters)]
        return {"results": rows[:limit] if limit else rows}

    @refreshing
    def texts(self, user_id: str) -> list[str]:
        """Every text stored for the user: all memories and all their earlier versions."""
        validate_user_id(user_id)
        collection = self._collection(user_id, create=False)
        return [] if collection is None else list(collection.get(include=["documents"])["documents"])

    @refreshing
    def delete(self, user_id: str, memory_id: str) -> bool:
        """Delete one memory of this user. False if the user has no memory with that id."""
        validate_user_id(user_id)
        collection = self._collection(user_id, create=False)
        if collection is None or not isinstance(memory_id, str):
            return False
        found = collection.get(ids=[memory_id], include=["metadatas"])
        if not found["ids"] or found["metadatas"][0].get(STATUS) == "history":
            return False
        with self._lock:
            collection.delete(where={HISTORY_OF: memory_id})  # its earlier versions
            collection.delete(ids=[memory_id])
        return True

    @refreshing
    def delete_all(self, user_id: str) -> int:
        """Drop every memory of the user (the whole collection); returns how many there were."""
        validate_user_id(user_id)
        collection = self._collection(user_id, create=False)
        if collection is None:
            return 0
        count = self.count(user_id)
        with self._lock:
            self.client.delete_collection(collection_name(user_id))
            self.drop_handle(user_id)
            self._purge_local()
        return count

    def _purge_local(self) -> None:
        """Make deletions final on disk for an embedded store.

        SQLite keeps deleted rows in free pages and Chroma may leave the dropped collection's
        vector-index folder behind; ``VACUUM`` rewrites the database without them and orphaned
        index folders are removed, so a forgotten user's text and vectors are gone from disk.
        """
        if self.path is None:
            return
        db = self.path / "chroma.sqlite3"
        with sqlite3.connect(db, timeout=30) as conn:
            live = {row[0] for row in conn.execute("SELECT id FROM segments")}
        conn.close()
        vacuum = sqlite3.connect(db, timeout=30, isolation_level=None)
        try:
            vacuum.execute("VACUUM")
        finally:
            vacuum.close()
        for child in self.path.iterdir():
            if child.is_dir() and _UUID_DIR.match(child.name) and child.name not in live:
                shutil.rmtree(child, ignore_errors=True)

    @refreshing
    def count(self, user_id: str) -> int:
        validate_user_id(user_id)
        collection = self._collection(user_id, create=False)
        if collection is None:
            return 0
        return len(
            collection.get(where=status_where("all"), include=[])["ids"]
        )  # memories, not their earlier versions


Row = tuple[str, str, dict[str, Any], float]  # (id, document, metadata, cosine score)


def _nearest(collection: Any, vector: Any, n: int, where: Mapping[str, Any] | None) -> list[Row]:
    """Chroma's ``n`` nearest records to ``vector`` (matching ``where`` when given), best first."""
    found = collection.query(
        query_embeddings=vector,
        n_results=n,  # Chroma returns fewer when the collection holds fewer: no count() first
        where=where,
        include=["documents", "metadatas", "distances"],
    )
    rows = zip(
        found["ids"][0], found["documents"][0], found["metadatas"][0], found["distances"][0], strict=True
    )
    return [(i, d, m, 1.0 - float(dist)) for i, d, m, dist in rows]


def _nearest_of_status(
    collection: Any, vector: Any, top_k: int, status: str, where: Mapping[str, Any], threshold: float | None
) -> list[Row]:
    """The ``top_k`` nearest records of ``status``, with Chroma's status filter only when needed.

    A filtered Chroma query first lists every record that matches the filter (for ``active``,
    nearly all of the user's records: 18 ms at 10,000 on a Xeon core), then searches among them.
    So ask for the ``SPARE * top_k`` nearest with no filter and drop other statuses here. That is
    the filtered answer when ``top_k`` are left, when the collection had no more records, or when
    the farthest one returned is already below ``threshold``; otherwise (many superseded versions
    near the query) the filtered query runs after all.
    """
    n = SPARE * top_k
    nearest = _nearest(collection, vector, n, None)
    kept = [row for row in nearest if has_status(row[2], status)]
    complete = len(nearest) < n or (threshold is not None and nearest[-1][3] < threshold)
    if len(kept) >= top_k or complete:
        return kept[:top_k]
    return _nearest(collection, vector, top_k, where)


def check_limit(limit: Any) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValidationError(
            "limit", "must be a positive integer or None", "pass e.g. limit=100, or None for all", limit
        )
