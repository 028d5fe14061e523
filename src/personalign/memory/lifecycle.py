"""Memories with a lifecycle: versions, keys that supersede, de-duplication and conflicts.

Every result is mem0-shaped (``{"results": [{"id", "memory", "user_id", "event", ...}]}``) with
the lifecycle fields:

``status``      ``active`` (found by search), or ``superseded`` (kept for ``history`` until forget);
``valid_from``  when the current text became true (its version's time);
``valid_to``    when it stopped being true (``None`` while active);
``key``         the short identifier that makes a newer memory replace it (``None`` if unkeyed);
``version``     1 for a new memory, +1 on each ``update``; ``updated_at``; ``source``.

What ``add`` does with each text, in order (``event`` in the result):

1. **NONE**: the text re-states an active memory with the same key (or both unkeyed): the same
   text up to case, spacing, contractions and punctuation ("I'm vegetarian." re-states "i am
   vegetarian"). Near-identical texts are not dropped by default: "Fact 48a." and "Fact 48b."
   sit at cosine 0.98 and are two facts, so they are kept and listed in ``conflicts``. A caller
   who wants paraphrases dropped passes ``duplicate_threshold`` (e.g. 0.95); texts with
   different numbers are never duplicates ("I have 2 kids" / "I have 3 kids": 0.94).
   Nothing is written; the existing memory is returned.
2. **ADD**: the text becomes a new active memory. With a ``key``, every active memory with that
   key is superseded by it and reported as **DELETE** with ``status: "superseded"`` and
   ``superseded_by`` (it leaves search, not the store). Without a key, active memories at cosine
   >= ``conflict_threshold`` (0.6: "I live in Paris" / "I live in Berlin" is 0.58, "My favourite
   colour is blue" / "... green" 0.84) are listed in the new record's ``conflicts``; with
   ``on_conflict="supersede"`` they are superseded as a key would, with ``"keep"`` (the default)
   both stay active.

A keyed memory is embedded with its key as a topic label in front of the text (see
:func:`embedded_text`), so a question about ``home city`` finds "My new place is in Lisbon".

``update(id, text)`` keeps the id, stores the previous text as an earlier version and reports
**UPDATE** with ``previous_memory``; ``history(id)`` lists every version with its time and source.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any

from personalign.errors import PersonalignError, ValidationError
from personalign.memory.chroma import (
    _RESERVED,
    HISTORY_OF,
    INTERNAL,
    STATUS,
    MemoryStore,
    _check_metadata,
    _check_text,
    _record,
    check_limit,
    has_status,
    refreshing,
)
from personalign.types import validate_user_id

KEY = INTERNAL + "key"
VERSION = INTERNAL + "version"
VALID_FROM = INTERNAL + "valid_from"
VALID_TO = INTERNAL + "valid_to"
UPDATED_AT = INTERNAL + "updated_at"
SOURCE = INTERNAL + "source"
EVENT = INTERNAL + "event"  # the event that made this version: ADD or UPDATE
SUPERSEDED_BY = INTERNAL + "superseded_by"

KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # used with fullmatch: no trailing newline
SOURCE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}$")
MAX_MEMORY_ID_CHARS = 128
DUPLICATE_THRESHOLD = 1.0  # off: a near-identical text may be another fact ("Fact 48a." / "Fact 48b."), so it is a conflict, not dropped
CONFLICT_THRESHOLD = 0.6
CONFLICT_POLICIES = ("keep", "supersede")
_NEIGHBOURS = 5  # active memories compared with each new text


class UnknownMemoryError(PersonalignError, KeyError):
    """The user has no memory with this id (it may be another user's: ids are never shared)."""

    def __init__(self, user_id: str, memory_id: Any) -> None:
        self.user_id = user_id
        self.memory_id = memory_id
        super().__init__(memory_id)

    def __str__(self) -> str:
        shown = str(self.memory_id)[:MAX_MEMORY_ID_CHARS]
        return f"user {self.user_id!r} has no memory {shown!r}. Fix: use an id from memories() or search_memories() of this user"


def check_key(key: Any) -> str | None:
    """``key`` if it is ``None`` or a short identifier (1-64 of ``A-Za-z0-9_.-``, starting alphanumeric)."""
    if key is None:
        return None
    if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
        raise ValidationError(
            "key",
            "must be a short identifier: 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit",
            "e.g. key='home_city'",
            key,
        )
    return key


def check_source(source: Any) -> str:
    if not isinstance(source, str) or not SOURCE_PATTERN.match(source):
        raise ValidationError(
            "source", "must be a short label: 1-64 letters, digits or '_.:@-'", "e.g. source='chat'", source
        )
    return source


def check_add_options(key: Any, on_conflict: Any, source: Any, n_texts: int) -> None:
    """The options of :meth:`MemoryLifecycle.add`, checked before anything is written."""
    check_key(key)
    check_source(source)
    if on_conflict not in CONFLICT_POLICIES:
        raise ValidationError(
            "on_conflict",
            f"must be one of {CONFLICT_POLICIES}",
            "use 'keep' (report conflicts) or 'supersede'",
            on_conflict,
        )
    if key is not None and n_texts > 1:
        raise ValidationError(
            "key",
            "applies to one memory, but several texts were given",
            "store keyed facts one at a time",
            key,
        )


def embedded_text(text: str, key: str | None) -> str:
    """What is embedded for a memory: a keyed memory's text follows its key as a topic label
    (``home_city`` -> ``"home city: I moved to Lisbon."``), so a question about the topic finds it."""
    if key is None:
        return text
    return f"{key.replace('_', ' ').replace('.', ' ').replace('-', ' ')}: {text}"


def _now() -> float:
    """The time, to the microsecond (what the database gives back for a stored float)."""
    return round(time.time(), 6)


_CONTRACTIONS = (
    (r"n't\b", " not"),
    (r"'m\b", " am"),
    (r"'re\b", " are"),
    (r"'ve\b", " have"),
    (r"'ll\b", " will"),
    (r"'d\b", " would"),
)


def _normal(text: str) -> str:
    """Case, spacing, contractions and punctuation that does not change the statement removed."""
    text = text.lower().replace("\u2019", "'")
    for pattern, expanded in _CONTRACTIONS:
        text = re.sub(pattern, expanded, text)
    return " ".join(re.sub(r"[^\w\s'-]", " ", text).split())


def _same_text(a: str, b: str) -> bool:
    return _normal(a) == _normal(b)


def _same_numbers(a: str, b: str) -> bool:
    """Whether two texts hold the same numbers (in order). The encoder puts "I have 2 kids" and
    "I have 3 kids" at cosine 0.94 and "Fact c10-op3" and "Fact c1-op3" at 0.98: close paraphrases
    by the threshold, different facts by their numbers, so a change of number is never a duplicate."""
    return re.findall(r"\d+", a) == re.findall(r"\d+", b)


def lifecycle_record(
    user_id: str, memory_id: str, document: str, metadata: Mapping[str, Any]
) -> dict[str, Any]:
    """A memory as results show it: mem0's fields plus the lifecycle fields."""
    created = metadata.get("created_at")
    status = metadata.get(STATUS) or "active"
    record = _record(user_id, memory_id, document, metadata)
    record.update(
        key=metadata.get(KEY),
        status=status,
        version=int(metadata.get(VERSION, 1)),
        valid_from=metadata.get(VALID_FROM, created),
        valid_to=metadata.get(VALID_TO),
        updated_at=metadata.get(UPDATED_AT, created),
        source=metadata.get(SOURCE),
    )
    if SUPERSEDED_BY in metadata:
        record["superseded_by"] = metadata[SUPERSEDED_BY]
    return record


class MemoryLifecycle:
    """The lifecycle operations over one :class:`MemoryStore` (all writes under its lock)."""

    def __init__(
        self,
        store: MemoryStore,
        duplicate_threshold: float = DUPLICATE_THRESHOLD,
        conflict_threshold: float = CONFLICT_THRESHOLD,
    ) -> None:
        for name, value in (
            ("duplicate_threshold", duplicate_threshold),
            ("conflict_threshold", conflict_threshold),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or not -1.0 <= value <= 1.0:
                raise ValidationError(
                    name, "must be a cosine similarity in [-1, 1]", "use e.g. 0.95 and 0.6", value
                )
        if conflict_threshold > duplicate_threshold:
            raise ValidationError(
                "conflict_threshold",
                f"is above duplicate_threshold ({duplicate_threshold})",
                "use a lower conflict threshold",
                conflict_threshold,
            )
        self.store = store
        self.duplicate_threshold = float(duplicate_threshold)
        self.conflict_threshold = float(conflict_threshold)

    def drop_handle(self, user_id: str) -> None:
        """Forget the cached handle on the user's collection (see :func:`refreshing`)."""
        self.store.drop_handle(user_id)

    # --- reads -------------------------------------------------------------------------------

    def _current(
        self, user_id: str, memory_id: Any, embeddings: bool = False
    ) -> tuple[Any, str, dict[str, Any], Any]:
        """``(collection, document, metadata, embedding)`` of the memory's current version, or ``UnknownMemoryError``."""
        validate_user_id(user_id)
        if not isinstance(memory_id, str) or not memory_id or len(memory_id) > MAX_MEMORY_ID_CHARS:
            raise UnknownMemoryError(user_id, memory_id)
        collection = self.store._collection(user_id, create=False)
        if collection is None:
            raise UnknownMemoryError(user_id, memory_id)
        found = collection.get(
            ids=[memory_id], include=["documents", "metadatas", *(["embeddings"] if embeddings else [])]
        )
        if (
            not found["ids"]
            or found["metadatas"][0].get(STATUS) == "history"
            or found["metadatas"][0].get("user_id") != user_id
        ):
            raise UnknownMemoryError(user_id, memory_id)
        vector = found["embeddings"][0] if embeddings else None
        return collection, found["documents"][0], dict(found["metadatas"][0]), vector

    @refreshing
    def get(self, user_id: str, memory_id: str) -> dict[str, Any]:
        """One memory by id (any status), or ``UnknownMemoryError``."""
        _, doc, meta, _ = self._current(user_id, memory_id)
        return lifecycle_record(user_id, memory_id, doc, meta)

    @refreshing
    def history(self, user_id: str, memory_id: str) -> dict[str, Any]:
        """Every version of the memory, oldest first: ``{"id", "status", "versions": [...]}``.

        A version is ``{"version", "memory", "event", "valid_from", "valid_to", "source", "metadata"}``;
        ``event`` is ADD for the first, UPDATE for an edit, and DELETE closes a superseded memory.
        """
        collection, doc, meta, _ = self._current(user_id, memory_id)
        old = collection.get(where={HISTORY_OF: memory_id}, include=["documents", "metadatas"])
        versions = [self._version(d, m) for d, m in zip(old["documents"], old["metadatas"], strict=True)]
        versions.append(self._version(doc, meta))
        versions.sort(key=lambda v: v["version"])
        current = lifecycle_record(user_id, memory_id, doc, meta)
        if current["status"] == "superseded":
            versions.append(
                {
                    "version": None,
                    "memory": None,
                    "event": "DELETE",
                    "valid_from": current["valid_to"],
                    "valid_to": None,
                    "source": None,
                    "metadata": {},
                    "superseded_by": current.get("superseded_by"),
                }
            )
        return {
            "id": memory_id,
            "user_id": user_id,
            "key": current["key"],
            "status": current["status"],
            "versions": versions,
        }

    @staticmethod
    def _version(doc: str, meta: Mapping[str, Any]) -> dict[str, Any]:
        created = meta.get("created_at")
        return {
            "version": int(meta.get(VERSION, 1)),
            "memory": doc,
            "event": meta.get(EVENT, "ADD"),
            "valid_from": meta.get(VALID_FROM, created),
            "valid_to": meta.get(VALID_TO),
            "source": meta.get(SOURCE),
            "metadata": {k: v for k, v in meta.items() if k not in _RESERVED and not k.startswith(INTERNAL)},
        }

    def list(
        self,
        user_id: str,
        filters: Mapping[str, Any] | None = None,
        status: str = "active",
        limit: int | None = None,
    ) -> dict[str, Any]:
        """The user's memories of ``status``, oldest first, narrowed by metadata ``filters``."""
        check_limit(limit)
        rows = [lifecycle_record(user_id, i, d, m) for i, d, m in self.store.rows(user_id, status, filters)]
        return {"results": rows[:limit] if limit else rows}

    def search(
        self,
        user_id: str,
        query: str,
        top_k: int = 5,
        threshold: float | None = None,
        filters: Mapping[str, Any] | None = None,
        status: str = "active",
    ) -> dict[str, Any]:
        """The closest memories to ``query`` (active ones unless ``status`` says otherwise), with ``score``."""
        found = self.store.query(user_id, query, top_k, threshold, filters, status)
        return {"results": [lifecycle_record(user_id, i, d, m) | {"score": s} for i, d, m, s in found]}

    # --- writes ------------------------------------------------------------------------------

    @refreshing
    def add(
        self,
        user_id: str,
        texts: str | list[str],
        metadata: Mapping[str, Any] | None = None,
        key: str | None = None,
        on_conflict: str = "keep",
        source: str = "api",
    ) -> dict[str, Any]:
        """Store fact(s), de-duplicated, superseding by ``key`` (see the module docstring).

        Everything is validated before anything is written.
        """
        docs, extra = self.store.validate(user_id, texts, metadata)
        check_add_options(key, on_conflict, source, len(docs))
        vectors = self.store._ef([embedded_text(d, key) for d in docs])  # encode before touching the database
        with self.store._lock:
            # Decide every text first, then write every new one in one insert: a request's texts are
            # stored all or none (a crash between two inserts used to keep half of a request).
            decided: list[tuple[str, Any, Any]] = []  # (doc, vector, the restated record or the neighbours)
            fresh: dict[
                str, int
            ] = {}  # normalised text -> index in decided, for restatements within the request
            for doc, vector in zip(docs, vectors, strict=True):
                if _normal(doc) in fresh:
                    decided.append((doc, vector, fresh[_normal(doc)]))
                    continue
                decided.append((doc, vector, self._restated(user_id, doc, vector, key)))
                if isinstance(decided[-1][2], list):
                    fresh[_normal(doc)] = len(decided) - 1
            now = _now()
            meta = {
                **extra,
                "user_id": user_id,
                "created_at": now,
                STATUS: "active",
                VERSION: 1,
                VALID_FROM: now,
                UPDATED_AT: now,
                SOURCE: source,
                EVENT: "ADD",
            }
            if key is not None:
                meta[KEY] = key
            new = [k for k, (_, _, d) in enumerate(decided) if isinstance(d, list)]
            ids = (
                self.store.insert(
                    user_id,
                    [decided[k][0] for k in new],
                    [dict(meta) for _ in new],
                    [decided[k][1] for k in new],
                )
                if new
                else []
            )
            new_ids = dict(zip(new, ids, strict=True))
            results: list[dict[str, Any]] = []
            for k, (doc, _, decision) in enumerate(decided):
                if isinstance(decision, dict):
                    results.append(decision)
                elif isinstance(decision, int):  # the same text earlier in this request
                    results.append(
                        lifecycle_record(user_id, new_ids[decision], doc, meta) | {"event": "NONE"}
                    )
                else:
                    results += self._settle(user_id, new_ids[k], doc, meta, decision, key, on_conflict, now)
        return {"results": results}

    def _restated(self, user_id: str, doc: str, vector: Any, key: str | None) -> dict[str, Any] | list[Any]:
        """The active memory ``doc`` re-states (its record, ``event: NONE``), else the nearest active memories."""
        neighbours = self.store.query(user_id, doc, _NEIGHBOURS, None, None, "active", embedding=vector)
        for memory_id, old_doc, meta, score in neighbours:
            # A keyed restatement must be the same text (the key label makes every value of a key look
            # alike to the encoder); an unkeyed one may, if the caller asks, be a near-identical paraphrase.
            near = key is None and score >= self.duplicate_threshold and _same_numbers(old_doc, doc)
            if meta.get(KEY) == key and (_same_text(old_doc, doc) or near):
                return lifecycle_record(user_id, memory_id, old_doc, meta) | {"event": "NONE"}
        return list(neighbours)

    def _settle(
        self,
        user_id: str,
        new_id: str,
        doc: str,
        meta: dict[str, Any],
        neighbours: list[Any],
        key: str | None,
        on_conflict: str,
        now: float,
    ) -> list[dict[str, Any]]:
        """The new memory's record, with its conflicts, and the memories it supersedes."""
        added = lifecycle_record(user_id, new_id, doc, meta) | {"event": "ADD"}
        if key is not None:
            collection = self.store._collection(user_id, create=False)
            # The key's records, active ones picked here: a status clause in Chroma's filter would
            # list every record of the user (see chroma._nearest_of_status).
            same = collection.get(where={KEY: key}, include=["documents", "metadatas"])
            doomed = [
                (i, d, m)
                for i, d, m in zip(same["ids"], same["documents"], same["metadatas"], strict=True)
                if i != new_id and has_status(m, "active")
            ]
        else:
            conflicts = [(i, d, m, s) for i, d, m, s in neighbours if s >= self.conflict_threshold]
            added["conflicts"] = [
                {"id": i, "memory": d, "key": m.get(KEY), "score": s} for i, d, m, s in conflicts
            ]
            doomed = [(i, d, m) for i, d, m, _ in conflicts] if on_conflict == "supersede" else []
        if key is not None or doomed:
            added["supersedes"] = [i for i, _, _ in doomed]
        return [added, *self._supersede(user_id, doomed, new_id, now)]

    def _supersede(
        self, user_id: str, doomed: list[tuple[str, str, dict[str, Any]]], by: str, now: float
    ) -> list[dict[str, Any]]:
        if not doomed:
            return []
        collection = self.store._collection(user_id, create=False)
        metas = [
            {**m, STATUS: "superseded", VALID_TO: now, UPDATED_AT: now, SUPERSEDED_BY: by}
            for _, _, m in doomed
        ]
        collection.update(ids=[i for i, _, _ in doomed], metadatas=metas)
        return [
            lifecycle_record(user_id, i, d, m) | {"event": "DELETE"}
            for (i, d, _), m in zip(doomed, metas, strict=True)
        ]

    @refreshing
    def update(
        self,
        user_id: str,
        memory_id: str,
        text: str,
        metadata: Mapping[str, Any] | None = None,
        source: str = "api",
    ) -> dict[str, Any]:
        """Replace the memory's text (and metadata, when given), keeping its id and key.

        The previous text becomes an earlier version in :meth:`history`. Unchanged text and
        metadata give ``event: "NONE"`` and write nothing. ``UnknownMemoryError`` for an id this
        user does not have (another user's included); nothing is written for bad input.
        """
        _check_text(text, "text")
        extra = None if metadata is None else _check_metadata(metadata)
        source = check_source(source)
        with self.store._lock:
            collection, doc, meta, old_vector = self._current(user_id, memory_id, embeddings=True)
            current = {k: v for k, v in meta.items() if k not in _RESERVED and not k.startswith(INTERNAL)}
            if doc == text and (extra is None or extra == current):
                return {"results": [lifecycle_record(user_id, memory_id, doc, meta) | {"event": "NONE"}]}
            [vector] = self.store._ef([embedded_text(text, meta.get(KEY))])
            now = _now()
            version = int(meta.get(VERSION, 1))
            old = {**meta, STATUS: "history", HISTORY_OF: memory_id, VERSION: version, VALID_TO: now}
            old.setdefault(VALID_FROM, meta.get("created_at", now))
            old.setdefault(EVENT, "ADD")
            # The earlier version first, under a fixed id: a crash before the next write leaves a
            # duplicate of the current version in history at worst, and retrying overwrites it.
            collection.upsert(
                ids=[f"{memory_id}~v{version}"], documents=[doc], metadatas=[old], embeddings=[old_vector]
            )
            lifecycle = {k: v for k, v in meta.items() if k in _RESERVED or k.startswith(INTERNAL)}
            new = {
                **(current if extra is None else extra),
                **lifecycle,
                VERSION: version + 1,
                VALID_FROM: now,
                UPDATED_AT: now,
                SOURCE: source,
                EVENT: "UPDATE",
            }
            collection.update(ids=[memory_id], documents=[text], metadatas=[new], embeddings=[vector])
        return {
            "results": [
                lifecycle_record(user_id, memory_id, text, new) | {"event": "UPDATE", "previous_memory": doc}
            ]
        }

    @refreshing
    def texts(self, user_id: str) -> list[str]:
        """Every text of the user that was encoded: each version as stored, and as embedded (a keyed one with its key)."""
        validate_user_id(user_id)
        collection = self.store._collection(user_id, create=False)
        if collection is None:
            return []
        found = collection.get(include=["documents", "metadatas"])
        out = list(found["documents"])
        out += [
            embedded_text(d, m[KEY])
            for d, m in zip(found["documents"], found["metadatas"], strict=True)
            if m.get(KEY) is not None
        ]
        return out

    def export(self, user_id: str) -> list[dict[str, Any]]:
        """Every memory of the user (active and superseded), each with its versions."""
        out = []
        for memory_id, doc, meta in self.store.rows(user_id, "all"):
            record = lifecycle_record(user_id, memory_id, doc, meta)
            record["history"] = self.history(user_id, memory_id)["versions"]
            out.append(record)
        return out
