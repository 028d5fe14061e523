"""The HTTP server on loopback, driven by the official ``openai`` client and by plain HTTP.

One tiny-model Personalizer serves every test here; the server runs with uvicorn in a
background thread on a free port. Tenancy, load and faults have their own files.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from personalign.personalizer import Personalizer
from personalign.server import ServerConfig
from personalign.server.batcher import Batcher
from personalign.server.config import Principal, load_api_keys

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ServerConfig(
    max_tokens_cap=64, default_max_tokens=12, max_body_bytes=64_000, batch_wait_ms=20, default_temperature=0.0
)  # greedy, as respond
EGG = {
    "prompt": "How do I boil an egg?",
    "chosen": "Nine minutes.",
    "rejected": "A long story about eggs, water and patience.",
}
SKY = {
    "prompt": "Why is the sky blue?",
    "chosen": "Because air scatters blue light far more than red light, over a long path.",
    "rejected": "Scattering.",
}


@pytest.fixture(scope="module")
def personalizer(tiny_generator, encoder, tmp_path_factory):
    with Personalizer(tiny_generator, encoder, store=tmp_path_factory.mktemp("server-store")) as pz:
        yield pz


def _user(http, name, comparisons=(EGG,), memories=()):
    http.delete(f"/v1/users/{name}")
    assert (
        http.post(f"/v1/users/{name}/comparisons", json={"comparisons": list(comparisons)}).status_code == 200
    )
    for text in memories:
        assert http.post(f"/v1/users/{name}/memories", json={"text": text}).status_code == 200


def _is_openai_error(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


# --- the openai client -----------------------------------------------------------------------------


def test_models_and_openapi(client, http):
    assert [m.id for m in client.models.list().data] == ["personalign"]
    schema = http.get("/openapi.json").json()
    for path in (
        "/v1/chat/completions",
        "/v1/users/{user_id}/comparisons",
        "/v1/users/{user_id}/memories",
        "/v1/users/{user_id}/next-question",
    ):
        assert path in schema["paths"]
    chat = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"steer", "memory", "shots", "n_shots", "n_memories", "user", "max_tokens"} <= set(chat)
    assert {"safety_identifier", "n", "stop", "rerank", "rerank_temperature"} <= set(chat)
    assert "/v1/models/{model_id}" in schema["paths"]
    assert (
        "HTTPValidationError" not in schema["components"]["schemas"]
    )  # validation errors answer 400 in our error shape
    assert not [op for path in schema["paths"].values() for op in path.values() if "422" in op["responses"]]
    assert "X-Personalign-User" in [
        p["name"] for p in schema["paths"]["/v1/chat/completions"]["post"]["parameters"]
    ]
    assert schema["paths"]["/v1/chat/completions"]["post"]["responses"]["400"]["content"]["application/json"][
        "schema"
    ]["$ref"].endswith("ErrorBody")


def test_chat_personalised_with_memory_shots_and_steering(client, http, personalizer):
    _user(http, "ana", [EGG, SKY], ["I am vegetarian and I cook for two."])
    messages = [{"role": "user", "content": "Plan my dinner for two, I am vegetarian."}]
    reply = client.chat.completions.create(model="personalign", messages=messages, user="ana", max_tokens=6)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens <= 6 and reply.usage.prompt_tokens > 0
    assert reply.choices[0].finish_reason in ("stop", "length")
    extra = reply.model_extra["personalign"]
    assert (
        extra["user"] == "ana"
        and extra["memories"] == ["I am vegetarian and I cook for two."]
        and extra["shots"] == 2
    )
    # The same request through the SDK gives the same reply (greedy decoding).
    alone = personalizer.respond("ana", messages, max_new_tokens=6)
    assert reply.choices[0].message.content == alone.text and extra["steer"] == alone.steer
    # Extra body fields: steering weights, conditioning switches.
    steered = client.chat.completions.create(
        model="personalign",
        messages=messages,
        user="ana",
        max_tokens=6,
        extra_body={"steer": {"verbosity": 1.5}, "memory": False, "n_shots": 1},
    )
    extra = steered.model_extra["personalign"]
    assert extra["steer"] == {"verbosity": 1.5} and extra["memories"] == [] and extra["shots"] == 1
    assert (
        steered.choices[0].message.content
        == personalizer.respond(
            "ana", messages, steer={"verbosity": 1.5}, memory=False, n_shots=1, max_new_tokens=6
        ).text
    )
    off = client.chat.completions.create(
        model="personalign",
        messages=messages,
        user="ana",
        max_tokens=4,
        extra_body={"steer": {}, "shots": False},
    )
    assert off.model_extra["personalign"]["steer"] == {} and off.model_extra["personalign"]["shots"] == 0
    described = client.chat.completions.create(
        model="personalign",
        messages=messages,
        user="ana",
        max_tokens=4,
        extra_body={"describe": True, "fspo": False, "pplug": False},
    )
    assert (
        described.choices[0].message.content
        == personalizer.respond(
            "ana", messages, describe=True, fspo=False, pplug=False, max_new_tokens=4
        ).text
    )
    generic = client.chat.completions.create(model="personalign", messages=messages, max_tokens=4)
    assert (
        generic.model_extra["personalign"]["user"] is None
        and generic.model_extra["personalign"]["memories"] == []
    )


def test_content_parts_developer_role_and_sampling(client):
    reply = client.chat.completions.create(
        model="personalign",
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": " there"}]},
        ],
        max_tokens=5,
        temperature=0.8,
        top_p=0.9,
        seed=3,
    )
    again = client.chat.completions.create(
        model="personalign",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
        max_tokens=5,
        temperature=0.8,
        top_p=0.9,
        seed=3,
    )
    assert reply.choices[0].message.content == again.choices[0].message.content


def test_streaming_matches_the_batched_reply(client, http):
    _user(http, "bea", [SKY], ["I like short answers."])
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    pieces, finishes, ids = [], [], set()
    for chunk in client.chat.completions.create(
        model="personalign", messages=messages, user="bea", max_tokens=10, stream=True
    ):
        assert chunk.object == "chat.completion.chunk"
        ids.add(chunk.id)
        pieces.append(chunk.choices[0].delta.content or "")
        finishes.append(chunk.choices[0].finish_reason)
    whole = client.chat.completions.create(model="personalign", messages=messages, user="bea", max_tokens=10)
    assert "".join(pieces).strip() == whole.choices[0].message.content
    assert len(ids) == 1 and finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])


def test_streaming_wire_format(http):
    body = {
        "model": "personalign",
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": True,
        "max_tokens": 4,
        "steer": {"verbosity": -1},
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith(
            "text/event-stream"
        )
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    # A stream that cannot start answers with a status, not with a broken event stream.
    bad = http.post("/v1/chat/completions", json={**body, "model": "gpt-4o"})
    assert _is_openai_error(bad, 404)["code"] == "model_not_found"
    # The finish chunk says what conditioned the answer, as a completion's personalign object does.
    assert json.loads(events[-2][6:])["personalign"] == {
        "user": None,
        "user_source": None,
        "user_known": False,
        "memories": [],
        "shots": 0,
        "steer": {"verbosity": -1.0},
        "note": None,
        "personalization": None,
        "personalization_by_choice": None,
        "max_tokens_clamped": None,
    }


def test_openai_client_errors(client, server):
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.chat.completions.create(model="gpt-4o", messages=messages)
    with pytest.raises(openai.BadRequestError, match="steerable"):
        client.chat.completions.create(
            model="personalign", messages=messages, extra_body={"steer": {"kindness": 1}}
        )
    with pytest.raises(openai.BadRequestError, match="cap of 8 choices"):
        client.chat.completions.create(model="personalign", messages=messages, n=9)
    with pytest.raises(openai.BadRequestError, match="at most 4"):
        client.chat.completions.create(model="personalign", messages=messages, stop=["a", "b", "c", "d", "e"])
    with pytest.raises(openai.BadRequestError, match="not supported"):
        client.chat.completions.create(
            model="personalign", messages=messages, extra_body={"functions": [{"name": "f"}]}
        )
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="personalign", messages=[])
    with pytest.raises(openai.BadRequestError, match="last message"):
        client.chat.completions.create(model="personalign", messages=[{"role": "assistant", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError, match="user: contains a control character"):
        client.chat.completions.create(model="personalign", messages=messages, user="bob\n")
    with pytest.raises(openai.BadRequestError, match="n_shots"):
        client.chat.completions.create(model="personalign", messages=messages, extra_body={"n_shots": 1000})


# --- user endpoints --------------------------------------------------------------------------------


def test_user_endpoints_round_trip(http):
    http.delete("/v1/users/cara")
    enrolled = http.post("/v1/users/cara/comparisons", json={"comparisons": [EGG, SKY]}).json()
    assert enrolled["added"] == 2 and enrolled["comparisons"] == 2 and enrolled["version"] == 1
    assert enrolled["default_steer"]["verbosity"] != 0
    added = http.post(
        "/v1/users/cara/memories",
        json={"text": ["I cook for two.", "I run marathons."], "metadata": {"source": "chat"}},
    ).json()
    assert [r["memory"] for r in added["results"]] == ["I cook for two.", "I run marathons."]
    assert all(r["user_id"] == "cara" and r["metadata"] == {"source": "chat"} for r in added["results"])
    profile = http.get("/v1/users/cara").json()
    assert profile["id"] == "cara" and profile["n_comparisons"] == 2 and profile["n_memories"] == 2
    assert profile["comparisons"][0]["prompt"] == EGG["prompt"]
    found = http.get("/v1/users/cara/memories", params={"query": "running a marathon", "top_k": 1}).json()[
        "results"
    ]
    assert [r["memory"] for r in found] == ["I run marathons."] and found[0]["score"] > 0
    listed = http.get("/v1/users/cara/memories").json()["results"]
    assert len(listed) == 2
    assert http.delete(f"/v1/users/cara/memories/{listed[0]['id']}").json() == {"user": "cara", "deleted": 1}
    _is_openai_error(http.delete(f"/v1/users/cara/memories/{listed[0]['id']}"), 404)
    assert http.delete("/v1/users/cara/memories").json() == {"user": "cara", "deleted": 1}
    assert http.get("/v1/users/cara").json()["n_memories"] == 0
    forgotten = http.delete("/v1/users/cara").json()
    assert forgotten == {"id": "cara", "deleted": True, "memories_deleted": 0, "profile_deleted": True}
    for method, path in (
        ("GET", "/v1/users/cara"),
        ("DELETE", "/v1/users/cara"),
        ("GET", "/v1/users/cara/memories"),
        ("DELETE", "/v1/users/cara/memories"),
    ):
        assert _is_openai_error(http.request(method, path), 404)["code"] == "user_not_found"


def test_memory_first_user_and_enrol_all_or_nothing(http):
    http.delete("/v1/users/dan")
    assert http.post("/v1/users/dan/memories", json={"text": "I like tea."}).status_code == 200
    assert http.get("/v1/users/dan").json()["n_comparisons"] == 0
    bad = http.post(
        "/v1/users/dan/comparisons",
        json={"comparisons": [EGG, {"prompt": "x", "chosen": "same", "rejected": "same"}]},
    )
    error = _is_openai_error(bad, 400)
    assert error["param"] == "comparisons[1]" and "differ" in error["message"]
    assert http.get("/v1/users/dan").json()["n_comparisons"] == 0  # nothing of the batch was stored


DOOR = {
    "prompt": "How do I fix a squeaky door?",
    "a": "Oil the hinges.",
    "b": "Lift each hinge pin, clean off old grease and rust, coat it in silicone lubricant, tap it back in and swing the door to spread it.",
}
BOOK = {"prompt": "Name a sci-fi book.", "a": "Dune.", "b": "Hyperion."}


def test_next_question_ranks_candidates_by_information_gain(http, personalizer):
    http.delete("/v1/users/quinn")
    cold = http.post("/v1/users/quinn/next-question", json={"candidates": [BOOK, DOOR]})
    assert cold.status_code == 200, cold.text
    body = cold.json()
    assert body["user"] == "quinn" and body["embedder"] == "pal"
    gains = [q["gain"] for q in body["questions"]]
    assert gains == sorted(gains, reverse=True) and {q["index"] for q in body["questions"]} == {0, 1}
    # The same ranking as the Python API; asking created no user.
    direct = personalizer.next_question("quinn", [BOOK, DOOR])
    assert [q["index"] for q in direct] == [q["index"] for q in body["questions"]]
    assert http.get("/v1/users/quinn").status_code == 404
    assert (
        len(
            http.post("/v1/users/quinn/next-question", json={"candidates": [BOOK, DOOR], "top_k": 1}).json()[
                "questions"
            ]
        )
        == 1
    )
    for bad in (
        {"candidates": []},
        {"candidates": [{"prompt": "p", "a": "x"}]},
        {"candidates": [BOOK], "nope": 1},
        {"candidates": [BOOK], "top_k": 0},
        None,
    ):
        response = http.post("/v1/users/quinn/next-question", json=bad)
        assert 400 <= response.status_code < 500, (bad, response.text)
        assert "error" in response.json()
    same = _is_openai_error(
        http.post(
            "/v1/users/quinn/next-question", json={"candidates": [{"prompt": "p", "a": "x", "b": "x"}]}
        ),
        400,
    )
    assert same["param"] == "candidates[0]"


# --- bad input: always 4xx in OpenAI's shape, never 500 ----------------------------------------------

CHAT = "/v1/chat/completions"
BAD_REQUESTS = [
    ("POST", CHAT, b"{not json", 400),
    ("POST", CHAT, b"", 400),
    ("POST", CHAT, b"[]", 400),
    ("POST", CHAT, b"null", 400),
    ("POST", CHAT, json.dumps({"model": 1, "messages": []}).encode(), 400),
    ("POST", CHAT, json.dumps({"model": "personalign", "messages": "hello"}).encode(), 400),
    (
        "POST",
        CHAT,
        json.dumps({"model": "personalign", "messages": [{"role": "tool", "content": "x"}]}).encode(),
        400,
    ),
    (
        "POST",
        CHAT,
        json.dumps({"model": "personalign", "messages": [{"role": "user", "content": 5}]}).encode(),
        400,
    ),
    (
        "POST",
        CHAT,
        json.dumps(
            {"model": "personalign", "messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}
        ).encode(),
        400,
    ),
    (
        "POST",
        CHAT,
        json.dumps(
            {"model": "personalign", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}
        ).encode(),
        400,
    ),
    (
        "POST",
        CHAT,
        json.dumps(
            {"model": "personalign", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}
        ).encode(),
        400,
    ),
    (
        "POST",
        CHAT,
        json.dumps(
            {
                "model": "personalign",
                "messages": [{"role": "user", "content": "x"}],
                "steer": {"verbosity": "1"},
            }
        ).encode(),
        400,
    ),
    (
        "POST",
        CHAT,
        json.dumps(
            {"model": "personalign", "messages": [{"role": "user", "content": "x"}], "steer": [1]}
        ).encode(),
        400,
    ),
    (
        "POST",
        CHAT,
        json.dumps(
            {"model": "personalign", "messages": [{"role": "user", "content": "x"}], "user": 7}
        ).encode(),
        400,
    ),
    (
        "POST",
        CHAT,
        json.dumps(
            {
                "model": "personalign",
                "messages": [{"role": "user", "content": "x"}],
                "steer": {"verbosity": 1e9},
            }
        ).encode(),
        400,
    ),
    (
        "POST",
        CHAT,
        json.dumps(
            {"model": "personalign", "messages": [{"role": "user", "content": "x"}], "user": "a" * 257}
        ).encode(),
        400,
    ),
    (
        "POST",
        CHAT,
        json.dumps(
            {"model": "personalign", "messages": [{"role": "user", "content": "x"}], "repetition_penalty": -1}
        ).encode(),
        400,
    ),
    (
        "POST",
        CHAT,
        json.dumps(
            {"model": "personalign", "messages": [{"role": "user", "content": "x" * 70_000}]}
        ).encode(),
        413,
    ),
    (
        "POST",
        CHAT,
        json.dumps(
            {"model": "personalign", "messages": [{"role": "user", "content": "word " * 12_000}]}
        ).encode(),
        400,
    ),
    (
        "POST",
        CHAT,
        json.dumps(
            {"model": "personalign", "messages": [{"role": "user", "content": "x"}], "seed": 2**70}
        ).encode(),
        400,
    ),
    (
        "POST",
        CHAT,
        b'{"model": "personalign", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
        400,
    ),
    (
        "POST",
        CHAT,
        b'{"model": "personalign", "messages": [{"role": "user", "content": "x"}], "steer": {"verbosity": Infinity}}',
        400,
    ),
    (
        "POST",
        CHAT,
        json.dumps(
            {
                "model": "personalign",
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            }
        ).encode(),
        400,
    ),
    (
        "POST",
        CHAT,
        json.dumps(
            {"model": "personalign", "messages": [{"role": "user", "content": "x"}], "user": "bob\n"}
        ).encode(),
        400,
    ),
    ("POST", "/v1/users/eve/comparisons", b"{}", 400),
    ("POST", "/v1/users/eve/comparisons", json.dumps({"comparisons": []}).encode(), 400),
    ("POST", "/v1/users/eve/comparisons", json.dumps({"comparisons": "x"}).encode(), 400),
    (
        "POST",
        "/v1/users/eve/comparisons",
        json.dumps({"comparisons": [{"prompt": "p", "chosen": "a"}]}).encode(),
        400,
    ),
    ("POST", "/v1/users/eve/comparisons", json.dumps({"comparisons": [{**EGG, "weight": -1}]}).encode(), 400),
    ("POST", "/v1/users/eve/comparisons", json.dumps({"comparisons": [EGG], "extra": 1}).encode(), 400),
    ("POST", "/v1/users/eve/memories", json.dumps({"text": ""}).encode(), 400),
    ("POST", "/v1/users/eve/memories", json.dumps({"text": 3}).encode(), 400),
    (
        "POST",
        "/v1/users/eve/memories",
        json.dumps({"text": "x", "metadata": {"user_id": "mallory"}}).encode(),
        400,
    ),
    ("POST", "/v1/users/eve/memories", json.dumps({"text": "x", "metadata": {"a": [1]}}).encode(), 400),
    ("POST", "/v1/users/eve/memories", json.dumps({"text": "x" * 9000}).encode(), 400),
    ("POST", "/v1/users/..%2F..%2Fetc/memories", json.dumps({"text": "x"}).encode(), 404),
    ("POST", "/v1/users/../memories", json.dumps({"text": "x"}).encode(), 404),
    ("POST", f"/v1/users/{'a' * 257}/memories", json.dumps({"text": "x"}).encode(), 400),
    ("POST", "/v1/users/%20eve/memories", json.dumps({"text": "x"}).encode(), 400),
    ("POST", "/v1/users/eve%09/memories", json.dumps({"text": "x"}).encode(), 400),
    ("GET", "/v1/users/nobody-at-all", b"", 404),
    ("GET", "/v1/users/nobody-at-all/memories", b"", 404),
    ("GET", "/v1/users/ana/memories?top_k=0", b"", 400),
    ("GET", "/v1/users/ana/memories?top_k=abc", b"", 400),
    ("GET", "/v1/users/ana/memories?query=", b"", 400),
    ("DELETE", "/v1/users/nobody-at-all", b"", 404),
    ("DELETE", "/v1/users/ana/memories/not-a-memory", b"", 404),
    ("PUT", "/v1/users/ana", b"", 405),
    ("GET", "/v1/nothing-here", b"", 404),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    BAD_REQUESTS,
    ids=[f"{m} {p[:40]} {b[:30]!r}" for m, p, b, _ in BAD_REQUESTS],
)
def test_bad_input_is_4xx_in_openai_shape(http, method, path, body, status):
    _user(http, "ana", [EGG])
    response = http.request(method, path, content=body, headers={"content-type": "application/json"})
    _is_openai_error(response, status)


def test_trailing_slash_is_404_never_a_redirect_to_the_wider_delete(server):
    with httpx.Client(base_url=server.url, timeout=60, follow_redirects=True) as following:
        _user(following, "sly", [EGG], ["I keep my memories."])
        for method, path in (
            ("DELETE", "/v1/users/sly/memories/"),
            ("DELETE", "/v1/users/sly/"),
            ("GET", "/v1/users/sly/"),
            ("GET", "/v1/models/personalign/x"),
        ):
            response = following.request(method, path)
            assert not response.history and _is_openai_error(response, 404)["code"] in (
                "route_not_found",
                "model_not_found",
            ), (method, path)
        assert following.get("/v1/users/sly").json()["n_memories"] == 1  # nothing was deleted


def test_unknown_fields_are_logged_once_and_boundedly(http, caplog):
    body = {"model": "personalign", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    with caplog.at_level("WARNING", logger="personalign.server"):
        for start in range(0, 300, 100):
            assert (
                http.post(CHAT, json={**body, **{f"made_up_{start + i}": 1 for i in range(100)}}).status_code
                == 200
            )
        assert http.post(CHAT, json={**body, "made_up_0": 1}).status_code == 200
    lines = [r.getMessage() for r in caplog.records if "unknown chat request field" in r.getMessage()]
    assert len(lines) == 1 and lines[0].count("'made_up_") <= 64 and "ignored silently" in lines[0]


def test_oversize_bodies_declared_and_chunked(http):
    big = json.dumps({"text": "x" * 100_000}).encode()
    _is_openai_error(
        http.post("/v1/users/ana/memories", content=big, headers={"content-type": "application/json"}), 413
    )

    def chunks():
        for start in range(0, len(big), 8192):
            yield big[start : start + 8192]

    # No Content-Length: the body arrives chunked and is cut off once over the limit.
    response = http.post(
        "/v1/users/ana/memories", content=chunks(), headers={"content-type": "application/json"}
    )
    assert _is_openai_error(response, 413)["code"] == "request_too_large"
    assert http.get("/health").json() == {"status": "ok"}


# --- batcher, config -------------------------------------------------------------------------------


def test_batcher_groups_concurrent_requests_and_isolates_a_bad_one():
    calls = []

    def run_batch(requests):
        calls.append(len(requests))
        if any(r["bad"] for r in requests):
            raise ValueError("bad request in batch")
        time.sleep(0.05)
        return [r["n"] * 10 for r in requests]

    batcher = Batcher(run_batch, max_batch=8, max_wait_s=0.05)
    futures = [batcher.submit({"n": i, "bad": i == 3}) for i in range(12)]
    results = []
    for i, future in enumerate(futures):
        if i == 3:
            with pytest.raises(ValueError):
                future.result(10)
        else:
            results.append(future.result(10))
    batcher.stop()
    assert results == [i * 10 for i in range(12) if i != 3]
    assert max(calls) == 8 and batcher.stats.retried_alone == 1
    assert batcher.stats.snapshot()["max_batch_size"] >= 4


def test_batcher_groups_stay_together_in_order():
    """A group (a chat's n choices) runs in one run_batch call with other jobs, and is retried as a whole."""
    calls = []

    def run_batch(requests):
        calls.append([r["n"] for r in requests])
        if any(r["bad"] for r in requests):
            raise ValueError("bad request in batch")
        return [r["n"] * 10 for r in requests]

    batcher = Batcher(run_batch, max_batch=4, max_wait_s=0.05)
    with batcher.arriving():
        single = batcher.submit({"n": 0, "bad": False})
        group = batcher.submit_group([{"n": i, "bad": False} for i in (1, 2, 3)])
        big = batcher.submit_group(
            [{"n": i, "bad": False} for i in range(10, 16)]
        )  # over max_batch: a batch of its own
    assert (single.result(10), group.result(10), big.result(10)) == (
        0,
        [10, 20, 30],
        [100, 110, 120, 130, 140, 150],
    )
    assert calls == [[0, 1, 2, 3], list(range(10, 16))]
    calls.clear()
    with batcher.arriving():
        bad = batcher.submit_group([{"n": 1, "bad": False}, {"n": 2, "bad": True}])
        good = batcher.submit_group([{"n": 3, "bad": False}, {"n": 4, "bad": False}])
    with pytest.raises(ValueError):
        bad.result(10)
    assert good.result(10) == [30, 40] and calls == [[1, 2, 3, 4], [1, 2], [3, 4]]
    batcher.stop()
    assert batcher.stats.snapshot()["batch_sizes"] == {
        "2": 2,
        "4": 1,
        "6": 1,
    }  # the failed batch of 4 counts as its retries
    with pytest.raises(ValueError, match="at least one"):
        batcher.submit_group([])


def test_api_key_file_and_principal(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(
        json.dumps(
            {
                "keys": [
                    {"key": "sk-acme-secret", "tenant": "acme"},
                    {"key_sha256": "0" * 64, "tenant": "globex", "read_only": True},
                ]
            }
        )
    )
    keys = load_api_keys(path)
    assert [k.tenant for k in keys] == ["acme", "globex"] and keys[1].read_only
    for payload, field in (
        ({"keys": [{"key": "short", "tenant": "acme"}]}, "keys[0].key"),
        ({"keys": [{"key": "sk-long-enough", "tenant": "a.b"}]}, "keys[0].tenant"),
        ([], "--api-keys"),
    ):
        path.write_text(json.dumps(payload))
        with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
            load_api_keys(path)
    acme = Principal("acme")
    assert acme.store_id("bob") == "acme.bob" and acme.external_id("acme.bob") == "bob"
    assert not acme.owns("acmex.bob") and not acme.owns("globex.acme.bob")
    # An id too long for the store with the tenant prefix is hashed, not refused; the request's principal still names it.
    assert acme.store_id("b" * 123) == "acme." + "b" * 123 and acme.store_id("b" * 124).startswith(
        "acme.sha+"
    )
    assert acme.external_id(acme.store_id("b" * 124)) == "b" * 124
    with pytest.raises(ValueError, match="1-256 characters"):
        acme.store_id("b" * 257)
    assert Principal(None).store_id("acme.bob") == "acme.bob"


# --- the example client ----------------------------------------------------------------------------


def test_example_client_runs_against_the_server(server):
    command = [
        sys.executable,
        str(ROOT / "examples" / "client.py"),
        "--base-url",
        server.base_url,
        "--max-tokens",
        "6",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "personalised for sam" in done.stdout and "[DONE]" not in done.stdout


def test_serve_bench_in_process(personalizer):
    from personalign.bench.serve import format_report, run_serve_bench

    result = run_serve_bench(
        levels=(1, 4),
        requests_per_client=2,
        max_seconds=20,
        max_tokens=4,
        max_batch=4,
        personalizer=personalizer,
    )
    assert {lv["clients"] for lv in result["servers"]["batched"]["levels"]} == {1, 4}
    assert all(
        lv["errors"] == 0 and lv["requests"] == 8 for s in result["servers"].values() for lv in s["levels"]
    )
    assert result["servers"]["one_at_a_time"]["levels"][1]["mean_batch_size"] == 1.0
    assert "speed-up" in format_report(result)


def test_serve_bench_mixed_workload_reads_every_write_back(personalizer):
    from personalign.bench.serve import bench_users, format_report, run_serve_bench

    result = run_serve_bench(
        levels=(4,),
        requests_per_client=4,
        max_seconds=30,
        max_tokens=4,
        max_batch=4,
        personalizer=personalizer,
        mixed=True,
    )
    for server in result["servers"].values():
        level = server["levels"][0]
        assert level["errors"] == 0 and level["operations"] == {"chat": 12, "memory": 2, "enroll": 2}
        seeded = sum(len(d["comparisons"]) + len(d["memories"]) for d in bench_users(mixed=True).values())
        assert server["writes"] == {"checked": seeded + 4, "lost": 0, "duplicated": 0, "unexpected": 0}
    assert "0 lost" in format_report(result)


def test_concurrent_clients_do_not_block_health(server, http):
    results = []

    def chat():
        with httpx.Client(base_url=server.url, timeout=60) as c:
            results.append(
                c.post(
                    CHAT,
                    json={
                        "model": "personalign",
                        "messages": [{"role": "user", "content": "Hi"}],
                        "max_tokens": 8,
                    },
                ).status_code
            )

    threads = [threading.Thread(target=chat) for _ in range(6)]
    for t in threads:
        t.start()
    assert http.get("/health").status_code == 200
    for t in threads:
        t.join()
    assert results == [200] * 6


def test_stream_usage_chunk_and_concurrent_streams_share_batches(client, server, http):
    _user(http, "cai", [EGG])
    messages = [{"role": "user", "content": "How do I boil an egg?"}]
    chunks = list(
        client.chat.completions.create(
            model="personalign",
            messages=messages,
            user="cai",
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage is not None
    whole = client.chat.completions.create(model="personalign", messages=messages, user="cai", max_tokens=8)
    assert (usage.usage.prompt_tokens, usage.usage.completion_tokens) == (
        whole.usage.prompt_tokens,
        whole.usage.completion_tokens,
    )
    assert usage.usage.total_tokens == whole.usage.total_tokens

    before = http.get("/v1/server/stats").json()
    texts: dict[int, str] = {}

    def one(i):
        stream = client.chat.completions.create(
            model="personalign", messages=messages, user="cai", max_tokens=8, stream=True
        )
        texts[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # A streamed batch is counted when its generate call returns, which can be just after the
    # clients have read their last chunk: wait briefly for the count.
    deadline = time.monotonic() + 10
    after = http.get("/v1/server/stats").json()
    while after["requests"] - before["requests"] < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
        after = http.get("/v1/server/stats").json()
    assert (
        all(text.strip() == whole.choices[0].message.content for text in texts.values()) and len(texts) == 6
    )
    assert (
        after["requests"] - before["requests"] == 6 and after["batches"] - before["batches"] < 6
    )  # streams were batched


def test_stream_for_a_user_forgotten_while_queued_ends_with_an_error_event(server, personalizer, http):
    _user(http, "dov", [EGG])
    gate = threading.Lock()
    gate.acquire()
    original = personalizer.engine.prepare

    def slow_prepare(*args, **kwargs):
        with gate:  # hold the batch until the user is gone
            pass
        return original(*args, **kwargs)

    personalizer.engine.prepare = slow_prepare
    try:
        body = {
            "model": "personalign",
            "user": "dov",
            "messages": [{"role": "user", "content": "Hi"}],
            "stream": True,
            "max_tokens": 4,
        }
        with (
            httpx.Client(base_url=server.url, timeout=60) as other,
            other.stream("POST", "/v1/chat/completions", json=body) as response,
        ):
            assert response.status_code == 200
            personalizer.forget("dov")
            gate.release()
            events = [line for line in response.iter_lines() if line]
    finally:
        personalizer.engine.prepare = original
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][6:])["error"]
    assert "dov" in error["message"] and error["code"] == "not_found"
