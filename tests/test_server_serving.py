"""Serving under load on the real server: 429 with ``Retry-After`` past ``max_pending``, request ids,
Prometheus ``/metrics`` and the OpenAPI security scheme.

Generation is held at a gate (the module's personalizer waits on an event before each batch), so
the test decides exactly how many chats are in flight.
"""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from personalign.personalizer import Personalizer
from personalign.server import ServerConfig
from personalign.server.serving import request_id, retry_after

CONFIG = ServerConfig(max_tokens_cap=8, default_max_tokens=4, batch_wait_ms=5, max_pending=1)
CHAT = {
    "model": "personalign",
    "messages": [{"role": "user", "content": "Hi"}],
    "max_tokens": 2,
    "temperature": 0,
}
GATE = threading.Event()


@pytest.fixture(scope="module")
def personalizer(tiny_generator, encoder, tmp_path_factory):
    with Personalizer(tiny_generator, encoder, store=tmp_path_factory.mktemp("serving-store")) as pz:
        real = pz.respond_batch

        def gated(requests):
            assert GATE.wait(30), "the test never opened the gate"
            return real(requests)

        pz.respond_batch = gated  # the batcher calls it as given to create_app
        GATE.set()
        yield pz


def _in_flight(http) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("personalign_generation_in_flight "):
            return float(line.split()[1])
    raise AssertionError("no in-flight gauge")


def test_request_id_is_echoed_or_made(http):
    assert http.get("/health", headers={"X-Request-Id": "abc-123"}).headers["x-request-id"] == "abc-123"
    made = http.get("/v1/nope").headers["x-request-id"]
    assert made.startswith("req_") and len(made) == 36
    assert (
        http.post("/v1/chat/completions", json={"model": 1}).headers["x-request-id"].startswith("req_")
    )  # errors carry it too
    assert request_id([(b"x-request-id", b"has space")]).startswith("req_") and request_id(
        [(b"x-request-id", b"x" * 129)]
    ).startswith("req_")


def test_retry_after_grows_with_the_queue():
    assert retry_after(1, 16, 0.2) == 1 and retry_after(64, 16, 1.5) == 6


def test_past_max_pending_a_chat_gets_429_and_other_routes_still_answer(server, http):
    GATE.clear()
    first: dict[str, httpx.Response] = {}
    worker = threading.Thread(
        target=lambda: first.setdefault(
            "r", httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, timeout=60)
        )
    )
    worker.start()
    try:
        deadline = time.monotonic() + 20
        while _in_flight(http) < 1:
            assert time.monotonic() < deadline, "the first chat never got in flight"
            time.sleep(0.02)
        refused = http.post("/v1/chat/completions", json=CHAT)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert (
            refused.json()["error"]["code"] == "rate_limit_exceeded"
            and "Retry-After" in refused.json()["error"]["message"]
        )
        assert http.post("/v1/embeddings", json={"model": "personalign", "input": "x"}).status_code == 429
        started = time.perf_counter()
        assert http.get("/health").status_code == 200 and http.get("/v1/models").status_code == 200
        assert time.perf_counter() - started < 1.0
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(**CHAT)
    finally:
        GATE.set()
        worker.join(60)
    assert first["r"].status_code == 200
    assert (
        http.post("/v1/chat/completions", json=CHAT).status_code == 200
    )  # admitted again once the first is done


def test_metrics_count_requests_by_route_template(http):
    http.get("/v1/users/someone-unknown")
    text = http.get("/metrics").text
    assert 'personalign_requests_total{method="GET",route="/v1/users/{user_id}",status="404"}' in text
    assert "someone-unknown" not in text  # user ids never become labels
    assert (
        "personalign_rejected_total" in text
        and "personalign_request_seconds_bucket" in text
        and "personalign_batches " in text
    )


def test_openapi_declares_the_bearer_scheme(http):
    schema = http.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": "An API key from the server's key file (the openai client's api_key)"
    }  # fmt: skip
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    assert chat["security"] == [{}, {"bearerAuth": []}] and "429" in chat["responses"]
    assert (
        "security" not in schema["paths"]["/health"]["get"]
        and "429" not in schema["paths"]["/v1/models"]["get"]["responses"]
    )


def test_openapi_requires_the_key_when_keys_are_set(personalizer):
    from personalign.server import create_app
    from personalign.server.config import ApiKey

    app = create_app(
        personalizer, CONFIG.model_copy(update={"api_keys": (ApiKey(key="sk-test-123456", tenant="acme"),)})
    )
    assert app.openapi()["paths"]["/v1/models"]["get"]["security"] == [{"bearerAuth": []}]


def test_a_body_that_never_finishes_is_408(personalizer):
    """A client that declares 100 bytes and sends 10 gets 408 after body_timeout_s, and holds nothing after."""
    import socket

    from personalign.server import ServerThread, create_app

    with ServerThread(create_app(personalizer, CONFIG.model_copy(update={"body_timeout_s": 0.3}))) as running:
        host, port = running.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                b'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"model": '
            )
            started = time.perf_counter()
            reply = sock.recv(65536).decode()
            waited = time.perf_counter() - started
        assert (
            reply.startswith("HTTP/1.1 408")
            and "request_timeout" in reply
            and "x-request-id" in reply.lower()
        ), reply
        assert 0.25 < waited < 5
        # a complete body is unaffected, and so is a slow stream after its body arrived
        assert httpx.post(f"{running.url}/v1/chat/completions", json=CHAT, timeout=30).status_code == 200
