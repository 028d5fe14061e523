"""Adapter training off the request path: a job queue (huey, on SQLite in the store) and its worker.

``personalign serve`` enqueues ``train_adapter`` jobs (``POST /v1/users/{id}/adapter``, or a
comparisons request with ``"adapter": true``) and answers at once with a job id; a worker process
(``personalign worker``, which ``serve`` starts beside itself unless told not to) loads the
generator, trains the user's LoRA on their stored comparisons and publishes it atomically, then
notes it in the profile. The serving process never trains, so chats keep their latency (the
worker runs torch on ``threads`` CPU threads, 1 by default); the serving Personalizer sees the new
adapter note in the profile and uses the new weights from the user's next request on (on a remote
llama.cpp engine the adapter is converted and loaded on that request).

Jobs live in ``<store>/jobs.db`` (huey's SQLite storage, so no broker to run), or in any huey
storage passed as ``queue``. A job's record (``status``: queued, running, succeeded, failed; the
user; the tenant; the result or the error) is kept under its id.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personalign.errors import PersonalignError

logger = logging.getLogger(__name__)

JOBS_FILE = "jobs.db"
STATUSES = ("queued", "running", "succeeded", "failed")


class UnknownJobError(PersonalignError, KeyError):
    """No job with this id (for this tenant)."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(job_id)

    def __str__(self) -> str:
        return f"job {self.job_id!r} does not exist. Fix: use the id a training request returned"


@dataclass
class WorkerSpec:
    """What a worker needs to open the store and the generator the server uses."""

    store: str
    model: str | None = None
    device: str | None = "cpu"
    profiles_url: str | None = None
    threads: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


_GENERATORS: dict[tuple[str | None, str | None], Any] = {}


def _generator(model: str | None, device: str | None) -> Any:
    """The worker's generator, loaded once per process."""
    from personalign.models import load_generator

    key = (model, device)
    if key not in _GENERATORS:
        _GENERATORS[key] = load_generator(model, device=device)
    return _GENERATORS[key]


def _profiles(store: str, profiles_url: str | None) -> Any:
    if profiles_url:
        from personalign.memory.sql_profiles import SqlProfileStore

        return SqlProfileStore(profiles_url, store)
    from personalign.memory.profiles import ProfileStore

    return ProfileStore(store)


def train_adapter_job(spec: Mapping[str, Any], user: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """Train ``user``'s adapter on their stored comparisons and note it in their profile (in the worker).

    Only the profile store and the adapter folder are touched (not the memories), so the worker
    needs no claim on the store that the serving process holds.
    """
    import torch

    from personalign.adapters.config import LoraTrainConfig
    from personalign.adapters.store import AdapterManager
    from personalign.chat import validated
    from personalign.errors import ValidationError
    from personalign.personalizer import _adapter_summary

    torch.set_num_threads(int(spec.get("threads", 1)))
    generator = _generator(spec.get("model"), spec.get("device"))
    profiles = _profiles(spec["store"], spec.get("profiles_url"))
    comparisons = profiles.get(user).comparisons
    if not comparisons:
        raise ValidationError("comparisons", f"user {user!r} has none", "enroll comparisons before training")
    adapters = AdapterManager(generator, profiles.users_dir, max_resident=1)
    meta = adapters.train(user, comparisons, validated(LoraTrainConfig, dict(config), "config"))

    def note(profile: Any) -> Any:
        profile.settings["adapter"] = _adapter_summary(meta)
        return profile

    profile = profiles.update(user, note, create=False)
    return {"pairs": meta.get("pairs"), "profile_version": profile.version, "adapter": _adapter_summary(meta)}


class JobQueue:
    """A huey queue of training jobs with a record per job (see the module docstring)."""

    def __init__(self, spec: WorkerSpec, queue: Any = None) -> None:
        from huey import SqliteHuey

        self.spec = spec
        self.huey = (
            queue
            if queue is not None
            else SqliteHuey("personalign", filename=str(Path(spec.store) / JOBS_FILE))
        )
        self._train = self.huey.task(name="train_adapter", context=True)(self._run)

    # -- the record of a job -------------------------------------------------------------------------
    def _key(self, job_id: str) -> str:
        return f"personalign-job:{job_id}"

    def _write(self, job_id: str, record: dict[str, Any]) -> None:
        self.huey.put(self._key(job_id), record)

    def record(self, job_id: str, tenant: str | None = None) -> dict[str, Any]:
        """The job's record; ``UnknownJobError`` when there is none, or it is another tenant's."""
        record = self.huey.get(self._key(job_id), peek=True)
        if record is None or (tenant is not None and record.get("tenant") != tenant):
            raise UnknownJobError(job_id)
        return record

    # -- the task ---------------------------------------------------------------------------------
    def _run(self, job_id: str, user: str, config: dict[str, Any], task: Any = None) -> dict[str, Any]:
        record = self.record(job_id)
        record.update(status="running", started_at=time.time())
        self._write(job_id, record)
        try:
            result = train_adapter_job(vars(self.spec), user, config)
        except Exception as err:
            record.update(status="failed", finished_at=time.time(), error=f"{type(err).__name__}: {err}")
            self._write(job_id, record)
            logger.warning("job %s (adapter of %s) failed: %s", job_id, user, err)
            return record
        record.update(status="succeeded", finished_at=time.time(), result=result)
        self._write(job_id, record)
        return record

    def submit(
        self, user: str, config: Mapping[str, Any] | None = None, tenant: str | None = None
    ) -> dict[str, Any]:
        """Queue a training of ``user``'s adapter; the new job's record (``status`` queued)."""
        job_id = f"job_{uuid.uuid4().hex}"
        record = {
            "id": job_id,
            "kind": "train_adapter",
            "user": user,
            "tenant": tenant,
            "status": "queued",
            "created_at": time.time(),
        }
        self._write(job_id, record)
        self._train(job_id, user, dict(config or {}))
        return record

    def wait(self, job_id: str, timeout: float = 600.0, poll: float = 0.2) -> dict[str, Any]:
        """Block until the job has finished (tests, scripts); its record."""
        deadline = time.monotonic() + timeout
        while True:
            record = self.record(job_id)
            if record["status"] in ("succeeded", "failed"):
                return record
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {record['status']} after {timeout:.0f} s")
            time.sleep(poll)

    def consumer(self, workers: int = 1) -> Any:
        """huey's consumer for this queue (``run()`` blocks; ``personalign worker`` runs it)."""
        return self.huey.create_consumer(workers=workers, worker_type="thread", periodic=False)


def _exit_with(parent: int) -> None:
    """End this process when ``parent`` has gone (a server killed with SIGKILL leaves no worker behind)."""
    import os
    import threading

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(parent, 0)
            except ProcessLookupError:
                os._exit(0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, name="personalign-parent-watch", daemon=True).start()


def run_worker(spec: WorkerSpec, workers: int = 1, parent: int | None = None) -> None:
    """Run jobs until interrupted (``personalign worker``); with ``parent``, also until that process ends."""
    if parent is not None:
        _exit_with(parent)
    queue = JobQueue(spec)
    logger.warning(
        "personalign worker: jobs in %s, generator %s", Path(spec.store) / JOBS_FILE, spec.model or "embedded"
    )
    queue.consumer(workers).run()
