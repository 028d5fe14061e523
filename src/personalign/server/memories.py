"""Memory lifecycle and export routes: get, update, history and search of one user's memories,
and ``GET /v1/users/{id}/export``. :func:`install` adds them to the app of :mod:`.app`.

Every route maps the path's user into the caller's tenant first, so an id of another user or
tenant is simply not found (404 ``memory_not_found``) and nothing is changed.

No ``from __future__ import annotations`` here: the routes' ``who`` annotations are the app's
``Reader``/``Writer`` passed in, which FastAPI must see as objects, not as names to look up.
"""

import json
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException

from personalign.memory.lifecycle import MAX_MEMORY_ID_CHARS, UnknownMemoryError
from personalign.server.config import Principal
from personalign.server.errors import ApiError
from personalign.server.schemas import (
    MemoryHistory,
    MemoryList,
    RememberRequest,
    SearchMemoriesRequest,
    UpdateMemoryRequest,
)


def parse_filters(text: str | None) -> dict[str, Any] | None:
    """The ``filters`` query parameter (JSON text) as a mapping, or a 400 naming it."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        raise ApiError(
            400,
            'filters: is not JSON. Fix: send e.g. filters={"category": "diet"} (URL-encoded)',
            "invalid_value",
            "filters",
        ) from None
    if not isinstance(value, dict):
        raise ApiError(
            400,
            'filters: must be a JSON object. Fix: send e.g. filters={"category": "diet"}',
            "invalid_value",
            "filters",
        )
    return value


SEARCH = "search"  # /memories/search is its own path (POST), never the memory "search"


def not_a_memory_route(memory_id: str) -> None:
    """A GET, PUT or DELETE of ``/memories/search`` is a 405 (``Allow: POST``), not memory "search"."""
    if memory_id == SEARCH:
        raise StarletteHTTPException(405)


def external_record(record: dict[str, Any], who: Principal) -> dict[str, Any]:
    return {**record, "user_id": who.external_id(record["user_id"])}


def install(
    app: FastAPI,
    pz: Any,
    reader: Any,
    writer: Any,
    known: Callable[[str], None],
    check_write: Callable[[RememberRequest, int], None],
) -> None:
    """Add the lifecycle and export routes (``reader``/``writer``: the app's principal dependencies)."""

    def not_found(user_id: str, memory_id: str) -> ApiError:
        return ApiError(
            404,
            f"user {user_id!r} has no memory {memory_id[:MAX_MEMORY_ID_CHARS]!r}",
            "memory_not_found",
            "memory_id",
        )

    def listed(records: dict[str, Any], who: Principal) -> MemoryList:
        return MemoryList(results=[external_record(r, who) for r in records["results"]])

    @app.post("/v1/users/{user_id}/memories/search", response_model=MemoryList, tags=["memories"])
    def search_memories(user_id: str, body: SearchMemoriesRequest, who: reader) -> MemoryList:  # type: ignore[valid-type]
        """Search by meaning: active memories by default, narrowed by metadata ``filters``."""
        store_id = who.store_id(user_id, "user_id")
        known(store_id)
        found = pz.search_memories(
            store_id,
            body.query,
            top_k=body.top_k,
            threshold=body.threshold,
            filters=body.filters,
            status=body.status,
        )
        return listed(found, who)

    @app.get("/v1/users/{user_id}/memories/{memory_id}", response_model=MemoryList, tags=["memories"])
    def get_memory(user_id: str, memory_id: str, who: reader) -> MemoryList:  # type: ignore[valid-type]
        """One memory by id, any status (``{"results": [memory]}``)."""
        not_a_memory_route(memory_id)
        store_id = who.store_id(user_id, "user_id")
        known(store_id)
        try:
            return listed({"results": [pz.get_memory(store_id, memory_id)]}, who)
        except UnknownMemoryError:
            raise not_found(user_id, memory_id) from None

    @app.put("/v1/users/{user_id}/memories/{memory_id}", response_model=MemoryList, tags=["memories"])
    def update_memory(user_id: str, memory_id: str, body: UpdateMemoryRequest, who: writer) -> MemoryList:  # type: ignore[valid-type]
        """Replace a memory's text (and metadata, when given); the previous text stays in its history."""
        not_a_memory_route(memory_id)
        store_id = who.store_id(user_id, "user_id")
        known(store_id)
        check_write(RememberRequest(text=body.text, metadata=body.metadata), 1)
        try:
            return listed(
                pz.update_memory(store_id, memory_id, body.text, metadata=body.metadata, source="http"), who
            )
        except UnknownMemoryError:
            raise not_found(user_id, memory_id) from None

    @app.get(
        "/v1/users/{user_id}/memories/{memory_id}/history", response_model=MemoryHistory, tags=["memories"]
    )
    def memory_history(user_id: str, memory_id: str, who: reader) -> MemoryHistory:  # type: ignore[valid-type]
        """Every version of a memory, oldest first, with its time and source."""
        store_id = who.store_id(user_id, "user_id")
        known(store_id)
        try:
            return MemoryHistory(**external_record(pz.memory_history(store_id, memory_id), who))
        except UnknownMemoryError:
            raise not_found(user_id, memory_id) from None

    @app.get("/v1/users/{user_id}/export", tags=["users"])
    def export_user(user_id: str, who: reader) -> dict[str, Any]:  # type: ignore[valid-type]
        """Everything stored about the user as one JSON document (see docs/memory.md)."""
        store_id = who.store_id(user_id, "user_id")
        known(store_id)
        document = pz.export(store_id)
        document["user_id"] = who.external_id(store_id)
        document["memories"] = [external_record(m, who) for m in document["memories"]]
        return document


__all__ = ["install", "parse_filters"]
