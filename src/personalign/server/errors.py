"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with their status codes.

| status | when | type / code |
|---|---|---|
| 400 | malformed JSON, wrong types, missing fields, unsupported OpenAI options | invalid_request_error |
| 400 | well-formed input our validation rejects (``personalign.errors.ValidationError``), an unpaired UTF-16 surrogate, a number too large for a float | invalid_request_error / invalid_value |
| 400 | the conversation does not fit the context | invalid_request_error / context_length_exceeded |
| 401 | missing or unknown API key | authentication_error / invalid_api_key |
| 403 | a read-only key asks for a write | permission_error / read_only_key |
| 404 | unknown user, memory, model or route | not_found_error / user_not_found, memory_not_found, model_not_found |
| 408 | the body did not arrive in full within ``body_timeout_s`` | invalid_request_error / request_timeout |
| 413 | request body over the limit, too many comparisons or memories in one request | invalid_request_error / request_too_large |
| 429 | too many chats, completions and embeddings in flight (``Retry-After`` says when to retry) | rate_limit_error / rate_limit_exceeded |
| 501 | an endpoint whose backing feature is not installed | not_implemented_error |
| 502 | the remote generation engine (llama.cpp server, vLLM) failed or is unreachable | api_error / engine_unavailable |
| 503 | the store is held by another process | service_unavailable |

A 500 only ever means a bug; bad input never produces one. Nothing answers 422: OpenAI answers
semantic errors with 400, and the ``openai`` client raises ``BadRequestError`` for it
(``UnprocessableEntityError`` for a 422).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from personalign.errors import (
    ContextLengthError,
    EngineError,
    StoreLockedError,
    UnknownUserError,
    ValidationError,
)

log = logging.getLogger("personalign.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    501: "not_implemented_error",
    502: "api_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """An error the API answers with ``status`` and OpenAI's error body."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param


def _encodable(text: str | None) -> str | None:
    """``text`` with anything UTF-8 cannot encode (an unpaired surrogate echoed from the input) escaped."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    error = {
        "message": _encodable(message),
        "type": _TYPES.get(status, "server_error"),
        "param": _encodable(param),
        "code": code,
    }
    return {"error": error}


def error_response(
    status: int,
    message: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer", **(headers or {})} if status == 401 else headers
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=headers)


# How pydantic tags the members of a union in an error's location (``stop: str | list[str]``): not field names.
_UNION_TAG = re.compile(
    r"(constrained-)?(str|int|float|bool|none)|(list|dict|tuple|set)\[.*\]|function-[a-z-]+\[.*\]"
)


def _is_tag(part: Any) -> bool:
    return isinstance(part, str) and _UNION_TAG.fullmatch(part) is not None


def _loc_text(loc: tuple[Any, ...]) -> str:
    parts = [p for p in loc if p not in ("body", "query", "path", "header") and not _is_tag(p)]
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _first_problem(errors: list[Any]) -> tuple[dict[str, Any], int]:
    """The first error, or for a value that matched no member of a union the most specific of its members' errors
    (``stop: [5]`` is ``stop[0]``, not ``stop.str``; five stop strings are "too long", not "not a string");
    and how many other problems there are."""
    first = errors[0] if errors else {}
    loc = tuple(first.get("loc", ()))
    tag = next((i for i, part in enumerate(loc) if _is_tag(part)), None)
    if tag is None:
        return first, len(errors) - 1
    same = [
        e
        for e in errors
        if tuple(e.get("loc", ()))[:tag] == loc[:tag]
        and len(e.get("loc", ())) > tag
        and _is_tag(e["loc"][tag])
    ]
    # the deepest, and of equally deep ones a broken rule (too long, too short) over "not of this member's type"
    return max(
        same, key=lambda e: (len(e.get("loc", ())), not str(e.get("type", "")).endswith("_type"))
    ), len(errors) - len(same)


def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    first, others = _first_problem(errors)
    kind = first.get("type", "")
    if kind == "json_invalid":
        ctx = first.get("ctx") or {}
        return error_response(
            400, f"the request body is not valid JSON ({ctx.get('error', 'parse error')})", "invalid_json"
        )
    where = _loc_text(tuple(first.get("loc", ())))
    message = first.get("msg", "invalid value")
    if kind == "missing" and not where:
        message = "the request needs a JSON body"
    text = f"{where}: {message}" if where else message
    more = f" (and {others} more problems)" if others > 0 else ""
    return error_response(400, text + more, kind or None, where or None)


def _allowed(request: Request) -> str:
    """Every method the routes of this path serve (the router's own ``Allow`` names only the first route that
    matched, and FastAPI makes one route per method). Of the templates that match, the most literal one is the
    path's (``/memories/search`` is not the memory ``search``), as in OpenAPI."""
    by_template: dict[str, set[str]] = {}
    for route in request.app.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE and getattr(route, "methods", None):
            by_template.setdefault(route.path, set()).update(route.methods)
    if not by_template:
        return ""
    literal = min(by_template, key=lambda path: path.count("{"))
    methods = by_template[literal]
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods))


def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    headers = exc.headers
    if exc.status_code == 405:
        headers = {**(headers or {}), "Allow": _allowed(request)}
    messages = {
        404: f"no route {request.url.path}",
        405: f"method {request.method} is not allowed on {request.url.path}",
    }
    message = messages.get(exc.status_code, str(exc.detail))
    codes = {
        404: "route_not_found",
        405: "method_not_allowed",
        408: "request_timeout",
        413: "request_too_large",
    }
    # the router's headers (a 405's ``Allow``, which RFC 9110 requires) go out with our body
    return error_response(exc.status_code, message, codes.get(exc.status_code), headers=headers)


def _api(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.code, exc.param)


def _validation(request: Request, exc: ValidationError) -> JSONResponse:
    return error_response(400, str(exc), "invalid_value", exc.field)


def _context(request: Request, exc: ContextLengthError) -> JSONResponse:
    return error_response(400, str(exc), "context_length_exceeded", "messages")


def _unknown_user(request: Request, exc: UnknownUserError) -> JSONResponse:
    principal = getattr(request.state, "principal", None)
    user = exc.user_id
    if principal is not None and principal.owns(user):
        user = principal.external_id(user)
    return error_response(
        404,
        f"user {user!r} is not enrolled. Fix: POST /v1/users/{{id}}/comparisons or /memories first",
        "user_not_found",
        "user",
    )


def _engine(request: Request, exc: EngineError) -> JSONResponse:
    log.warning("generation engine error on %s: %s", request.url.path, exc)
    return error_response(502, str(exc), "engine_unavailable")


def _locked(request: Request, exc: StoreLockedError) -> JSONResponse:
    return error_response(503, str(exc), "store_locked")


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception(
        "unhandled error on %s %s (request %s)",
        request.method,
        request.url.path,
        getattr(request.state, "request_id", "-"),
    )
    return error_response(
        500, "internal server error (a bug: the server log has the traceback)", "internal_error"
    )


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _request_validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http)  # type: ignore[arg-type]
    app.add_exception_handler(ApiError, _api)  # type: ignore[arg-type]
    app.add_exception_handler(ValidationError, _validation)  # type: ignore[arg-type]
    app.add_exception_handler(ContextLengthError, _context)  # type: ignore[arg-type]
    app.add_exception_handler(UnknownUserError, _unknown_user)  # type: ignore[arg-type]
    app.add_exception_handler(StoreLockedError, _locked)  # type: ignore[arg-type]
    app.add_exception_handler(EngineError, _engine)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)
