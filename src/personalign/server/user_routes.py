"""The user routes: enrol and edit comparisons, read the profile, forget, the next question to ask; and the
basic memory routes (add, list, delete; the lifecycle routes are in ``memories``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI, Query

from personalign.server import job_routes, memories
from personalign.server.app import Reader, Writer, check_memory_write
from personalign.server.config import Principal
from personalign.server.errors import ApiError
from personalign.server.schemas import (
    DeletedMemories,
    EditComparisonsRequest,
    EditComparisonsResponse,
    EnrollRequest,
    EnrollResponse,
    ForgetResponse,
    MemoryList,
    NextQuestionRequest,
    NextQuestionResponse,
    ProfileResponse,
    RankedQuestion,
    RememberRequest,
)
from personalign.types import comparison_from_row


def install(app: FastAPI, ctx: Any) -> None:
    """Add the routes (``ctx``: what ``create_app`` shares with them, see ``RouteContext``)."""
    pz, config, known = ctx.pz, ctx.config, ctx.known
    # --- users -----------------------------------------------------------------------------------

    def within_limit(count: int, what: str, field: str) -> None:
        """413 when one request carries more than ``max_comparisons_per_request`` ``what`` (in ``field``)."""
        if count > config.max_comparisons_per_request:
            limit = config.max_comparisons_per_request
            raise ApiError(
                413,
                f"{count} {what} in one request; the limit is {limit}. Fix: send them in parts",
                "request_too_large",
                field,
            )

    @app.post("/v1/users/{user_id}/comparisons", response_model=EnrollResponse, tags=["users"])
    def enroll(user_id: str, body: EnrollRequest, who: Writer) -> EnrollResponse:
        """Add comparisons (TRL format) to a user, creating them if new. All are stored or none."""
        store_id = who.store_id(user_id, "user_id")
        within_limit(len(body.comparisons), "comparisons", "comparisons")
        if body.adapter and ctx.jobs is None:
            job_routes.queue_training(ctx, who, store_id, None)  # the 501, before anything is stored
        profile = pz.enroll(store_id, body.comparisons)
        job = job_routes.queue_training(ctx, who, store_id, None) if body.adapter else None
        return EnrollResponse(
            user=user_id,
            added=len(body.comparisons),
            comparisons=len(profile.comparisons),
            version=profile.version,
            default_steer=pz.default_steer(store_id),
            job=job,
        )

    @app.patch("/v1/users/{user_id}/comparisons", response_model=EditComparisonsResponse, tags=["users"])
    def edit_comparisons(user_id: str, body: EditComparisonsRequest, who: Writer) -> EditComparisonsResponse:
        """Remove and/or replace comparisons by index (the order ``GET /v1/users/{id}`` lists them in); the
        inferred steering and state are recomputed in the same atomic write. On any error nothing changes."""
        store_id = who.store_id(user_id, "user_id")
        known(store_id)
        within_limit(len(body.replace), "replacements", "replace")
        replace = {int(key): comparison_from_row(row, f"replace.{key}") for key, row in body.replace.items()}
        profile = pz.edit_comparisons(store_id, remove=body.remove, replace=replace)
        return EditComparisonsResponse(
            user=user_id,
            removed=len(set(body.remove)),
            replaced=len(replace),
            comparisons=len(profile.comparisons),
            version=profile.version,
            default_steer=pz.default_steer(store_id),
        )

    @app.get("/v1/users/{user_id}", response_model=ProfileResponse, tags=["users"])
    def get_user(user_id: str, who: Reader) -> ProfileResponse:
        store_id = who.store_id(user_id, "user_id")
        profile = pz.profile(store_id)
        return ProfileResponse(
            id=user_id,
            comparisons=[c.model_dump(mode="json", exclude_none=True) for c in profile.comparisons],
            n_comparisons=len(profile.comparisons),
            n_memories=pz.memory_count(store_id),
            settings=profile.settings,
            default_steer=pz.default_steer(store_id),
            created_at=profile.created_at,
            updated_at=profile.updated_at,
            version=profile.version,
        )

    @app.delete("/v1/users/{user_id}", response_model=ForgetResponse, tags=["users"])
    def forget(user_id: str, who: Writer) -> ForgetResponse:
        """Forget everything about a user: memories (deleted from disk) and profile."""
        store_id = who.store_id(user_id, "user_id")
        known(store_id)
        outcome = pz.forget(store_id)
        return ForgetResponse(
            id=user_id,
            deleted=True,
            memories_deleted=int(outcome["memories_deleted"]),
            profile_deleted=bool(outcome["profile_deleted"]),
        )

    # --- active enrolment ------------------------------------------------------------------------

    @app.post("/v1/users/{user_id}/next-question", response_model=NextQuestionResponse, tags=["users"])
    def next_question(user_id: str, who: Reader, body: NextQuestionRequest) -> NextQuestionResponse:
        """Rank candidate comparisons by how much this user's answer would teach (expected information gain)."""
        store_id = who.store_id(user_id, "user_id")
        ranked = pz.next_question(store_id, [c.model_dump() for c in body.candidates], top_k=body.top_k)
        return NextQuestionResponse(
            user=user_id, embedder=pz.embedder.name, questions=[RankedQuestion(**q) for q in ranked]
        )

    # --- memories --------------------------------------------------------------------------------

    def external(records: dict[str, Any], who: Principal) -> MemoryList:
        return MemoryList(
            results=[{**r, "user_id": who.external_id(r["user_id"])} for r in records["results"]]
        )

    @app.post("/v1/users/{user_id}/memories", response_model=MemoryList, tags=["memories"])
    def remember(user_id: str, body: RememberRequest, who: Writer) -> MemoryList:
        """Store one fact or several (creating the user if new); mem0-shaped results."""
        store_id = who.store_id(user_id, "user_id")
        check_memory_write(body, config.max_memories_per_request)
        return external(
            pz.remember(
                store_id, body.text, body.metadata, key=body.key, on_conflict=body.on_conflict, source="http"
            ),
            who,
        )

    @app.get("/v1/users/{user_id}/memories", response_model=MemoryList, tags=["memories"])
    def list_memories(
        user_id: str,
        who: Reader,
        query: Annotated[
            str | None,
            Query(min_length=1, max_length=8000, description="Search by meaning instead of listing all"),
        ] = None,
        top_k: Annotated[int, Query(ge=1, le=1000)] = 5,
        threshold: Annotated[float | None, Query(ge=-1.0, le=1.0)] = None,
        limit: Annotated[int | None, Query(ge=1)] = None,
        filters: Annotated[
            str | None,
            Query(
                max_length=8000,
                description='Metadata filter as JSON: {"field": value} or {"field": {"gte": 2}}',
            ),
        ] = None,
        status: Annotated[
            str,
            Query(pattern="^(active|superseded|all)$", description="active (the default), superseded or all"),
        ] = "active",
    ) -> MemoryList:
        store_id = who.store_id(user_id, "user_id")
        known(store_id)
        where = memories.parse_filters(filters)
        if query is not None:
            return external(
                pz.search_memories(
                    store_id, query, top_k=top_k, threshold=threshold, filters=where, status=status
                ),
                who,
            )
        return external(pz.memories(store_id, filters=where, status=status, limit=limit), who)

    @app.delete("/v1/users/{user_id}/memories", response_model=DeletedMemories, tags=["memories"])
    def delete_memories(user_id: str, who: Writer) -> DeletedMemories:
        """Delete all of a user's memories (the profile and comparisons stay)."""
        store_id = who.store_id(user_id, "user_id")
        known(store_id)
        return DeletedMemories(user=user_id, deleted=pz.forget_memories(store_id))

    @app.delete("/v1/users/{user_id}/memories/{memory_id}", response_model=DeletedMemories, tags=["memories"])
    def delete_memory(user_id: str, memory_id: str, who: Writer) -> DeletedMemories:
        memories.not_a_memory_route(memory_id)
        store_id = who.store_id(user_id, "user_id")
        known(store_id)
        if len(memory_id) > 128 or not pz.delete_memory(store_id, memory_id):
            raise ApiError(
                404, f"user {user_id!r} has no memory {memory_id[:128]!r}", "memory_not_found", "memory_id"
            )
        return DeletedMemories(user=user_id, deleted=1)

    memories.install(
        app, pz, Reader, Writer, known, check_memory_write
    )  # get, update, history, search; export
