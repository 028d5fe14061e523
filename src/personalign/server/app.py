"""The FastAPI app: OpenAI-compatible chat plus user, comparison and memory endpoints.

    from personalign.server import ServerConfig, create_app
    app = create_app(Personalizer.load(store="./store"), ServerConfig(max_batch=16))

Non-streaming chats go through a :class:`Batcher` into ``Personalizer.respond_batch``;
streams join the same batches. Every user id in a path or body is checked and mapped to a
stored id in the caller's tenant (see :mod:`personalign.server.config` and
:mod:`personalign.server.ids`). A chat names its user by ``user``, ``safety_identifier``, the
``X-Personalign-User`` header or ``metadata.user_id``, in that order; a user with no profile
gets the generic answer, and nothing is stored for them. The answers themselves (``n`` choices,
``stop``, server-sent events) are built in :mod:`personalign.server.chat`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response

from personalign import __version__
from personalign.errors import UnknownUserError
from personalign.server import errors
from personalign.server.batcher import Batcher
from personalign.server.completions import add_routes as add_completion_routes
from personalign.server.config import Principal, ServerConfig, hash_key
from personalign.server.errors import ApiError
from personalign.server.ids import USER_ID_PATTERN, check_external_id
from personalign.server.limits import BodyLimit, json_problem
from personalign.server.schemas import (
    ChatCompletionRequest,
    ErrorBody,
    ModelCard,
    ModelList,
    RememberRequest,
)
from personalign.server.serving import GENERATING, Metrics, Serving

log = logging.getLogger("personalign.server")

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "Malformed request (bad JSON, wrong types, unsupported option)",
        401: "Missing or unknown API key",
        403: "The key may not write",
        404: "Unknown user, memory, model or route",
        413: "Request body too large, or too many comparisons or memories in one request",
        429: "Too many generation requests in flight: retry after the Retry-After header's seconds",
    }.items()
}


def principal(request: Request) -> Principal:
    """The caller, from ``Authorization: Bearer <key>`` (everyone is tenant-less on an open server)."""
    keys = request.app.state.keys
    if not keys:
        who = Principal(None)
    else:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                401,
                "missing API key. Fix: send 'Authorization: Bearer <key>' (the openai client's api_key)",
                "invalid_api_key",
            )
        entry = keys.get(hash_key(token.strip()))
        if entry is None:
            raise ApiError(
                401, "unknown API key. Fix: use a key from the server's key file", "invalid_api_key"
            )
        who = Principal(entry.tenant, entry.read_only)
    request.state.principal = who
    return who


def writer(who: Annotated[Principal, Depends(principal)]) -> Principal:
    if who.read_only:
        raise ApiError(
            403, "this API key is read-only. Fix: use a key without read_only for writes", "read_only_key"
        )
    return who


Reader = Annotated[Principal, Depends(principal)]
Writer = Annotated[Principal, Depends(writer)]
USER_HEADER = "X-Personalign-User"
# Chroma refuses these metadata keys (a 500 from deep inside it if they got that far).
_CHROMA_KEY_PREFIXES = ("$", "#", "chroma:")
_INT64 = range(-(2**63), 2**63)
_MAX_WARNED = 64  # distinct unknown chat fields ever named in the log


async def sane_json(request: Request) -> None:
    """Refuse, naming the field, a JSON body with text no encoder can take or a number too large for a float."""
    if request.method not in ("POST", "PUT", "PATCH"):
        return
    try:
        payload = await request.json()  # cached: FastAPI has parsed the body already
    except ValueError:
        return  # not JSON: the body's own validation answers
    problem = json_problem(payload)
    if problem is not None:
        where, what = problem
        raise ApiError(400, f"{where}: {what}. Fix: send valid text and numbers", "invalid_value", where)


def _header_text(header: str) -> str:
    """The ``X-Personalign-User`` header's id, checked (HTTP hands header bytes over as Latin-1; clients send UTF-8)."""
    try:
        text = header.encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise ApiError(
            400,
            f"the {USER_HEADER} header is not UTF-8 text. Fix: send the id as UTF-8",
            "invalid_value",
            USER_HEADER,
        ) from None
    return check_external_id(text, USER_HEADER)


def chat_user(body: ChatCompletionRequest, header: str | None) -> tuple[str | None, str | None]:
    """The chat's user id and where it came from: ``user``, ``safety_identifier``, the header, then ``metadata.user_id``."""
    # a malformed id is refused wherever it is sent, even where a field before it names the user
    header_user = None if header is None else _header_text(header)
    for name in ("user", "safety_identifier"):
        if getattr(body, name) is not None:
            check_external_id(getattr(body, name), name)
    if body.user is not None:
        return body.user, "user"
    if body.safety_identifier is not None:
        return body.safety_identifier, "safety_identifier"
    if header is not None:
        return header_user, USER_HEADER
    metadata = (body.model_extra or {}).get("metadata")
    if isinstance(metadata, dict) and "user_id" in metadata:
        if not isinstance(metadata["user_id"], str):
            raise ApiError(400, "metadata.user_id must be a string", "invalid_value", "metadata.user_id")
        return metadata["user_id"], "metadata.user_id"
    return None, None


def check_memory_write(body: RememberRequest, limit: int) -> None:
    """What the memory store would fail on deep inside Chroma, refused before anything is written."""
    texts = [body.text] if isinstance(body.text, str) else body.text
    if len(texts) > limit:
        raise ApiError(
            413,
            f"{len(texts)} memories in one request; the limit is {limit}. Fix: send them in parts",
            "request_too_large",
            "text",
        )
    for key, value in (body.metadata or {}).items():
        if not key or key.startswith(_CHROMA_KEY_PREFIXES) or key == "chroma:document":
            fix = "use a non-empty key that does not start with '$', '#' or 'chroma:'"
            raise ApiError(
                400,
                f"metadata key {key!r} is reserved by the memory database. Fix: {fix}",
                "invalid_value",
                f"metadata.{key}",
            )
        if isinstance(value, int) and not isinstance(value, bool) and value not in _INT64:
            fix = "send integers within the signed 64-bit range, or the number as a string"
            raise ApiError(
                400,
                f"metadata.{key}: {value} does not fit in 64 bits. Fix: {fix}",
                "invalid_value",
                f"metadata.{key}",
            )


@dataclass(frozen=True)
class RouteContext:
    """What ``create_app`` shares with the route modules (``chat_routes``, ``user_routes``, ``job_routes``)."""

    pz: Any
    config: ServerConfig
    batcher: Batcher
    model_names: set[str]
    created: int
    warn_unknown: Callable[[set[str]], None]
    count_tokens: Callable[[str], int]
    known: Callable[[str], None]
    jobs: Any = None  # the adapter-training queue (personalign.jobs.JobQueue), if any


def create_app(personalizer: Any, config: ServerConfig | None = None, jobs: Any = None) -> FastAPI:
    """An app serving ``personalizer`` (which it does not close) under ``config``; ``jobs``: the
    queue that adapter trainings go to (:class:`personalign.jobs.JobQueue`; without one the
    training route answers 501)."""
    config = config or ServerConfig()
    pz = personalizer
    batcher = Batcher(pz.respond_batch, max_batch=config.max_batch, max_wait_s=config.batch_wait_ms / 1000)
    created = int(time.time())
    model_names = {config.served_model, str(getattr(pz.generator, "model_id", config.served_model))}
    warned: set[str] = set()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(batcher.stop)

    app = FastAPI(
        title="personalign",
        version=__version__,
        description="OpenAI-compatible chat with per-user personalisation, plus user, comparison and memory endpoints.",
        lifespan=lifespan,
        responses=_ERRORS,
        dependencies=[Depends(sane_json)],
        # No 307 to the path without its trailing slash: a redirect-following client's DELETE /v1/users/u/memories/
        # (an empty memory id) would become the wider DELETE of all of u's memories. A 404 instead.
        redirect_slashes=False,
    )
    app.state.personalizer = pz
    app.state.model_names = model_names
    app.state.config = config
    app.state.batcher = batcher
    app.state.keys = config.keys_by_digest()
    errors.install(app)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes, timeout_s=config.body_timeout_s)
    metrics = Metrics(batcher)
    app.add_middleware(
        Serving, max_pending=config.max_pending, batcher=batcher, metrics=metrics
    )  # outermost: every answer gets its request id
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]

    def warn_unknown(names: set[str]) -> None:
        """One log line per request naming its new unknown fields; at most ``_MAX_WARNED`` names are ever logged (a
        client sending thousands of made-up fields neither floods the log nor grows this set)."""
        new = sorted(names - warned)[: max(0, _MAX_WARNED - len(warned))]
        if not new:
            return
        warned.update(new)
        full = (
            " (the last one logged: further unknown fields are ignored silently)"
            if len(warned) >= _MAX_WARNED
            else ""
        )
        log.warning("ignoring unknown chat request field(s) %s%s", ", ".join(repr(n[:64]) for n in new), full)

    def count_tokens(text: str) -> int:
        """Tokens in ``text`` (a reply cut at a stop string counts what it kept)."""
        return len(pz.generator.tokenizer(text, add_special_tokens=False)["input_ids"])

    def known(store_id: str) -> None:
        """Raise ``UnknownUserError`` unless the user has a profile or memories."""
        if not pz.is_enrolled(store_id) and pz.memory_count(store_id) == 0:
            raise UnknownUserError(store_id)

    # --- models and health ------------------------------------------------------------------------

    @app.get("/health", tags=["server"])
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/metrics",
        tags=["server"],
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
    )
    def prometheus(who: Reader) -> Response:
        """Prometheus metrics: requests by route and status, latency, generation in flight, 429s, batches."""
        content, media_type = metrics.exposition()
        return Response(content, media_type=media_type)

    @app.get("/v1/models", response_model=ModelList, tags=["openai"])
    def models(who: Reader) -> ModelList:
        return ModelList(data=[ModelCard(id=config.served_model, created=created)])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, tags=["openai"])
    def model(model_id: str, who: Reader) -> ModelCard:
        """The served model (also under the generator's own id, which chats accept too)."""
        if model_id not in model_names:
            raise ApiError(
                404,
                f"the model {model_id!r} does not exist here. Fix: use {config.served_model!r} (see GET /v1/models)",
                "model_not_found",
                "model",
            )
        return ModelCard(id=model_id, created=created)

    @app.get("/v1/server/stats", tags=["server"])
    def stats(who: Reader) -> dict[str, Any]:
        """Batching statistics: how many chat batches ran and of which sizes."""
        return {**batcher.stats.snapshot(), "max_batch": config.max_batch}

    from personalign.server import (
        chat_routes,
        job_routes,
        user_routes,
    )  # they import this module's dependencies

    ctx = RouteContext(pz, config, batcher, model_names, created, warn_unknown, count_tokens, known, jobs)
    chat_routes.install(app, ctx)
    user_routes.install(app, ctx)
    job_routes.install(app, ctx)
    add_completion_routes(app, pz, config, model_names, principal)
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema without its default 422 (every validation error answers 400 in our error shape)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    _security(schema, app.state.config.auth_required)
    _user_id_rule(schema)
    _standard_bounds(schema)
    _served_models(schema, sorted(app.state.model_names), sorted(app.state.embedding_names))
    _embedding_size(schema, int(app.state.personalizer.encoder.dim))
    components = schema.get("components", {}).get("schemas", {})
    text = json.dumps(schema.get("paths", {}))
    for name in ("HTTPValidationError", "ValidationError"):
        if name in components and f"#/components/schemas/{name}" not in text:
            del components[name]
    app.openapi_schema = schema
    return schema


_BOUNDS = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}


def _standard_bounds(node: Any) -> None:
    """JSON Schema's names for the bounds pydantic writes as ``ge``/``gt``/``le``/``lt`` on a union
    (``temperature: int | float``), which validators and generators would otherwise ignore; int64 bounds exact."""
    if isinstance(node, dict):
        if "anyOf" in node:
            for short, standard in _BOUNDS.items():
                if short in node:
                    node[standard] = node.pop(short)
        # FastAPI writes bounds as floats; the int64 ones (seeds, metadata) as exact integers, or validators and
        # generators round them to 2**63 and disagree with the server at the edge
        if isinstance(node.get("minimum"), float) and node["minimum"] <= -(2**63):
            node["minimum"] = -(2**63)
        if isinstance(node.get("maximum"), float) and node["maximum"] >= 2**63 - 1:
            node["maximum"] = 2**63 - 1
        for value in node.values():
            _standard_bounds(value)
    elif isinstance(node, list):
        for value in node:
            _standard_bounds(value)


def _served_models(schema: dict[str, Any], names: list[str], embedding_names: list[str]) -> None:
    """The ``model`` of a chat, completion or embedding request is one this server serves (404 otherwise)."""
    components = schema.get("components", {}).get("schemas", {})
    for body, served in (
        ("ChatCompletionRequest", names),
        ("CompletionRequest", names),
        ("EmbeddingRequest", embedding_names),
    ):
        model = components.get(body, {}).get("properties", {}).get("model")
        if model is not None:
            model["enum"] = [n for n in served if n]
            model.setdefault("description", "The served model (GET /v1/models) or the generator's own id")


def _embedding_size(schema: dict[str, Any], dim: int) -> None:
    """``dimensions`` of an embedding request, when sent, is the encoder's own size (nothing is truncated)."""
    request = schema.get("components", {}).get("schemas", {}).get("EmbeddingRequest", {})
    for member in request.get("properties", {}).get("dimensions", {}).get("anyOf", []):
        if member.get("type") == "integer":
            member["enum"] = [dim]


def _user_id_rule(schema: dict[str, Any]) -> None:
    """State the user id rule (``personalign.server.ids``) wherever a user id is taken: paths, the chat's header and body."""
    rule = {"minLength": 1, "maxLength": 256, "pattern": USER_ID_PATTERN}
    chat = schema.get("components", {}).get("schemas", {}).get("ChatCompletionRequest", {})
    for name in ("user", "safety_identifier"):
        for member in chat.get("properties", {}).get(name, {}).get("anyOf", []):
            if member.get("type") == "string":
                member.update(rule)
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "header" and parameter.get("name") == USER_HEADER:
                    for member in parameter["schema"].get("anyOf", []):
                        if member.get("type") == "string":
                            member.update(rule)
                if parameter.get("in") == "path" and parameter.get("name") == "user_id":
                    parameter["schema"].update(rule)
                    parameter["description"] = (
                        "The user: 1-256 characters, no control characters, no whitespace at either end"
                    )


def _security(schema: dict[str, Any], required: bool) -> None:
    """Declare the bearer key (the ``openai`` client's ``api_key``) and which operations take it.

    With API keys every operation but ``/health`` needs it; on an open server it is optional (``{}`` first).
    """
    schema.setdefault("components", {})["securitySchemes"] = {
        "bearerAuth": {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key from the server's key file (the openai client's api_key)",
        }
    }
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            if path != "/health":
                operation["security"] = [{"bearerAuth": []}] if required else [{}, {"bearerAuth": []}]
            if path not in GENERATING:
                operation.get("responses", {}).pop("429", None)
