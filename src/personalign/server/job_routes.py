"""Background jobs over HTTP: queue a training of a user's adapter, read a job (see :mod:`personalign.jobs`)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from personalign.server.app import Reader, Writer
from personalign.server.config import Principal
from personalign.server.errors import ApiError
from personalign.server.schemas import JobResponse, TrainAdapterRequest


def job_response(record: dict[str, Any], who: Principal) -> JobResponse:
    """A job's record as the caller sees it (their own id for the user, never the stored one)."""
    fields = {k: v for k, v in record.items() if k in JobResponse.model_fields and k != "user"}
    return JobResponse(**fields, user=who.external_id(record["user"]))


def queue_training(ctx: Any, who: Principal, store_id: str, config: dict[str, Any] | None) -> JobResponse:
    """Queue ``store_id``'s adapter training (checked first: the user exists and has comparisons)."""
    from personalign.adapters.config import LoraTrainConfig
    from personalign.chat import validated
    from personalign.errors import ValidationError

    if ctx.jobs is None:
        raise ApiError(
            400,
            "adapter: this server does not train adapters (no job queue). Fix: leave out adapter, or run "
            "`personalign serve` with its worker (the default; not --no-jobs), or pass "
            "create_app(..., jobs=JobQueue(...))",
            "adapter_training_off",
            "adapter",
        )
    validated(LoraTrainConfig, config or {}, "config")  # a bad config is a 400 now, not a failed job
    profile = ctx.pz.profile(store_id)  # 404 for an unknown user
    if not profile.comparisons:
        raise ValidationError(
            "comparisons", "the user has none", "enroll comparisons before training an adapter"
        )
    return job_response(ctx.jobs.submit(store_id, config, tenant=who.tenant), who)


def install(app: FastAPI, ctx: Any) -> None:
    @app.post("/v1/users/{user_id}/adapter", response_model=JobResponse, status_code=202, tags=["users"])
    def train_adapter(user_id: str, body: TrainAdapterRequest, who: Writer) -> JobResponse:
        """Queue a training of the user's LoRA adapter on their stored comparisons; answers at once
        with the job. Chats go on meanwhile (with the previous adapter, or none); the first chat
        after the job succeeds uses the new adapter."""
        store_id = who.store_id(user_id, "user_id")
        config = body.config.model_dump(mode="json", exclude_unset=True) if body.config is not None else None
        return queue_training(ctx, who, store_id, config)

    @app.get("/v1/jobs/{job_id}", response_model=JobResponse, tags=["users"])
    def get_job(job_id: str, who: Reader) -> JobResponse:
        """A job's status (and its result or error once finished). Another tenant's job is a 404."""
        from personalign.jobs import UnknownJobError

        if ctx.jobs is None:
            raise ApiError(
                404, f"job {job_id!r} does not exist (this server has no job queue)", "job_not_found"
            )
        try:
            record = ctx.jobs.record(job_id, tenant=who.tenant)
        except UnknownJobError as err:
            raise ApiError(404, str(err), "job_not_found", "job_id") from None
        return job_response(record, who)
