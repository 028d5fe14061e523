"""Who a chat is for, and input that used to reach the store or the encoder and fail there.

The server on loopback, driven by the ``openai`` client and plain HTTP as in test_server.py:
users the server has never seen get the generic answer (and nothing is stored for them); the
user comes from ``user``, ``safety_identifier``, the ``X-Personalign-User`` header or
``metadata.user_id``; ids from identity providers (``auth0|...``, ``org:42``) are accepted and
stored under safe names; input that used to give a 500 (unpaired surrogates, integers too large
for a float, metadata keys Chroma refuses, too many memories at once) is a 4xx naming the field,
and leaves the store as it was.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import openai
import pytest

from personalign.personalizer import Personalizer
from personalign.server import ServerConfig
from personalign.server.ids import (
    EXTERNAL_ID_MAX_LEN,
    check_external_id,
    escape,
    external_form,
    stored_form,
    unescape,
)
from personalign.types import validate_user_id

CONFIG = ServerConfig(
    max_tokens_cap=64,
    default_max_tokens=8,
    max_body_bytes=64_000,
    batch_wait_ms=20,
    max_memories_per_request=4,
    default_temperature=0.0,
)
EGG = {
    "prompt": "How do I boil an egg?",
    "chosen": "Nine minutes.",
    "rejected": "A long story about eggs, water and patience.",
}
HI = [{"role": "user", "content": "What should I cook tonight?"}]
FOREIGN_IDS = [
    "auth0|5f7c8ec7c33c6c004bbafe82",
    "org:42",
    "google-oauth2|1043",
    "a..b",
    ".hidden",
    "ève",
    "名前",
    "user 7",
    "esc+x",
]


@pytest.fixture(scope="module")
def personalizer(tiny_generator, encoder, tmp_path_factory):
    with Personalizer(tiny_generator, encoder, store=tmp_path_factory.mktemp("identity-store")) as pz:
        yield pz


def _stored(personalizer) -> list[str]:
    """Every user folder in the store, plus the memory collections' count: what a refused request must not change."""
    users = Path(personalizer.store_path) / "users"
    folders = sorted(p.name for p in users.iterdir()) if users.exists() else []
    return [*folders, f"collections={len(personalizer.memory.client.list_collections())}"]


def _error(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


# --- the id mapping ------------------------------------------------------------------------------------


def test_id_mapping_is_safe_and_one_to_one():
    """Safe ids map to themselves; others are escaped (or hashed when too long); distinct ids never share a stored id."""
    assert (
        stored_form("alice", 128) == "alice"
        and stored_form("alice.smith+news@example.com", 128) == "alice.smith+news@example.com"
    )
    assert (
        stored_form("auth0|5f7c", 128) == "esc+auth0+7C5f7c" and stored_form("org:42", 128) == "esc+org+3A42"
    )
    assert stored_form("ève", 128) == "esc++C3+A8ve" and unescape(escape("ève")) == "ève"
    candidates = [
        *FOREIGN_IDS,
        "alice",
        "esc+org+3A42",
        "sha+" + "0" * 64,
        "a" * 200,
        "a" * 201,
        "../etc/passwd",
        "x" * 124,
    ]
    stored = {name: stored_form(name, 123) for name in candidates}
    assert len(set(stored.values())) == len(candidates)
    for name, safe in stored.items():
        assert validate_user_id(safe) == safe and len(safe) <= 123 and "/" not in safe
        assert external_form(safe) in (name, None)  # a hashed id keeps only its digest
    assert stored["a" * 200].startswith("sha+") and stored["esc+org+3A42"] == "esc+esc+2Borg+2B3A42"
    for bad in (
        "",
        "bob\n",
        "tab\there",
        " lead",
        "trail ",
        "\ud800",
        "a" * (EXTERNAL_ID_MAX_LEN + 1),
        7,
        None,
    ):
        with pytest.raises(ValueError, match="user"):
            check_external_id(bad)


# --- cold start -------------------------------------------------------------------------------------------


def test_unknown_user_gets_the_generic_answer_and_nothing_is_stored(client, http, personalizer):
    before = _stored(personalizer)
    reply = client.chat.completions.create(model="personalign", messages=HI, user="first-visit", max_tokens=6)
    extra = reply.model_extra["personalign"]
    assert extra["user"] == "first-visit" and extra["user_source"] == "user" and extra["user_known"] is False
    assert extra["memories"] == [] and extra["shots"] == 0 and "generic answer" in extra["note"]
    assert reply.choices[0].message.content == personalizer.respond(None, HI, max_new_tokens=6).text
    streamed = list(
        client.chat.completions.create(
            model="personalign", messages=HI, user="first-visit", max_tokens=6, stream=True
        )
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in streamed if c.choices).strip()
        == reply.choices[0].message.content
    )
    assert [
        c.model_extra["personalign"]["user_known"] for c in streamed if c.model_extra.get("personalign")
    ] == [False]
    assert _stored(personalizer) == before and http.get("/v1/users/first-visit").status_code == 404
    # Once the user has a memory (or comparisons) they are known, and the answer uses it.
    http.delete("/v1/users/memo-only")
    assert http.post("/v1/users/memo-only/memories", json={"text": "I am vegetarian."}).status_code == 200
    memo = client.chat.completions.create(
        model="personalign",
        messages=HI,
        user="memo-only",
        max_tokens=4,
        extra_body={"memory_threshold": -1.0},
    )
    extra = memo.model_extra["personalign"]
    assert (
        extra["user_known"] is True
        and extra["memories"] == ["I am vegetarian."]
        and extra["shots"] == 0
        and extra["note"] is None
    )


# --- where the user comes from ----------------------------------------------------------------------------


def test_user_from_safety_identifier_header_metadata_and_extra_body(client, http, server):
    for name in ("sid-user", "header-user", "meta-user", "plain-user"):
        http.delete(f"/v1/users/{name}")
        assert http.post(f"/v1/users/{name}/comparisons", json={"comparisons": [EGG]}).status_code == 200
        assert http.post(f"/v1/users/{name}/memories", json={"text": f"I am {name}."}).status_code == 200

    def used(**kwargs):
        reply = client.chat.completions.create(
            model="personalign", messages=HI, max_tokens=4, extra_body={"memory_threshold": -1.0}, **kwargs
        )
        extra = reply.model_extra["personalign"]
        return extra["user"], extra["user_source"], extra["user_known"], extra["memories"]

    assert used(safety_identifier="sid-user") == ("sid-user", "safety_identifier", True, ["I am sid-user."])
    assert used(extra_headers={"X-Personalign-User": "header-user"}) == (
        "header-user",
        "X-Personalign-User",
        True,
        ["I am header-user."],
    )
    assert used(metadata={"user_id": "meta-user"}) == (
        "meta-user",
        "metadata.user_id",
        True,
        ["I am meta-user."],
    )
    # What LiteLLM sends for an OpenAI-compatible model: `user` is dropped, extra_body is merged into the body.
    raw = {
        "model": "personalign",
        "messages": HI,
        "max_tokens": 4,
        "memory_threshold": -1.0,
        "user": "plain-user",
    }
    assert http.post("/v1/chat/completions", json=raw).json()["personalign"]["memories"] == [
        "I am plain-user."
    ]
    # Precedence: user, then safety_identifier, then the header, then metadata.user_id.
    assert used(user="plain-user", safety_identifier="sid-user")[0] == "plain-user"
    assert (
        used(safety_identifier="sid-user", extra_headers={"X-Personalign-User": "header-user"})[0]
        == "sid-user"
    )
    assert (
        used(metadata={"user_id": "meta-user"}, extra_headers={"X-Personalign-User": "header-user"})[0]
        == "header-user"
    )
    for body, param in (
        ({"safety_identifier": "bad\nid"}, "safety_identifier"),
        ({"metadata": {"user_id": 7}}, "metadata.user_id"),
    ):
        assert (
            _error(
                http.post("/v1/chat/completions", json={"model": "personalign", "messages": HI, **body}), 400
            )["param"]
            == param
        )
    with pytest.raises(openai.BadRequestError, match="X-Personalign-User"):
        used(extra_headers={"X-Personalign-User": "tab\there"})
    # Header bytes are read as UTF-8, not as Latin-1 (which would silently name another user).
    http.delete(f"/v1/users/{quote('ève', safe='')}")
    http.post(f"/v1/users/{quote('ève', safe='')}/memories", json={"text": "I am ève."})
    raw = {"model": "personalign", "messages": HI, "max_tokens": 4, "memory_threshold": -1.0}
    reply = http.post(
        "/v1/chat/completions", json=raw, headers={"X-Personalign-User": "ève".encode()}
    ).json()["personalign"]
    assert (reply["user"], reply["user_known"], reply["memories"]) == ("ève", True, ["I am ève."])
    assert (
        _error(http.post("/v1/chat/completions", json=raw, headers={"X-Personalign-User": b"\xff"}), 400)[
            "param"
        ]
        == "X-Personalign-User"
    )


def test_identity_provider_ids_are_accepted_and_stored_safely(client, http, personalizer):
    users = Path(personalizer.store_path) / "users"
    for name in FOREIGN_IDS:
        path = f"/v1/users/{quote(name, safe='')}"
        http.delete(path)
        assert http.post(f"{path}/comparisons", json={"comparisons": [EGG]}).status_code == 200, name
        added = http.post(f"{path}/memories", json={"text": f"Fact of {name}."}).json()["results"]
        assert added[0]["user_id"] == name
        assert http.get(path).json()["id"] == name
        found = http.get(f"{path}/memories", params={"query": "fact"}).json()["results"]
        assert [(m["memory"], m["user_id"]) for m in found] == [(f"Fact of {name}.", name)]
        reply = client.chat.completions.create(
            model="personalign", messages=HI, user=name, max_tokens=4, extra_body={"memory_threshold": -1.0}
        )
        assert reply.model_extra["personalign"]["user_known"] is True and reply.model_extra["personalign"][
            "memories"
        ] == [f"Fact of {name}."]
    for folder in users.iterdir():  # every folder is a safe id directly under users/
        assert folder.parent == users and validate_user_id(folder.name) == folder.name
    assert {"esc+auth0+7C5f7c8ec7c33c6c004bbafe82", "esc+org+3A42", "esc+a+2E+2Eb", "esc+esc+2Bx"} <= {
        p.name for p in users.iterdir()
    }
    assert http.delete(f"/v1/users/{quote('org:42', safe='')}").json()["profile_deleted"] is True
    assert not (users / "esc+org+3A42").exists()
    # An id with a slash cannot be a path segment, but a chat may name it (and, unknown, gets the generic answer).
    slash = client.chat.completions.create(
        model="personalign", messages=HI, user="../etc/passwd", max_tokens=4
    ).model_extra["personalign"]
    assert slash["user"] == "../etc/passwd" and slash["user_known"] is False


# --- 400, not 422; never 500 --------------------------------------------------------------------------------


def test_semantic_errors_are_400_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="steerable") as caught:
        client.chat.completions.create(
            model="personalign", messages=HI, extra_body={"steer": {"kindness": 1}}
        )
    assert caught.value.status_code == 400 and caught.value.body["param"] == "steer.kindness"


SURROGATE = "\ud800"
CHAT = {"model": "personalign", "messages": HI}
# (path, body, the field the error names). json.dumps writes a lone surrogate as the escape "\ud800", as a client would.
REFUSED = [
    (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": "hi" + SURROGATE}]},
        "messages[0].content",
        400,
    ),
    (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]},
        "messages[0].content[0].text",
        400,
    ),
    ("/v1/chat/completions", {**CHAT, "user": "bob" + SURROGATE}, "user", 400),
    ("/v1/chat/completions", {**CHAT, "steer": {"verbosity": 10**400}}, "steer.verbosity", 400),
    (
        "/v1/chat/completions",
        {**CHAT, "steer": {"weights": {"verbosity": -(10**400)}}},
        "steer.weights.verbosity",
        400,
    ),
    ("/v1/chat/completions", {**CHAT, "memory_threshold": 10**400}, "memory_threshold", 400),
    (
        "/v1/users/new-user/comparisons",
        {"comparisons": [{**EGG, "weight": 10**400}]},
        "comparisons[0].weight",
        400,
    ),
    (
        "/v1/users/new-user/comparisons",
        {"comparisons": [{**EGG, "prompt": SURROGATE}]},
        "comparisons[0].prompt",
        400,
    ),
    (
        "/v1/users/new-user/comparisons",
        {"comparisons": [{**EGG, "rejected": "x" + SURROGATE}]},
        "comparisons[0].rejected",
        400,
    ),
    ("/v1/users/new-user/memories", {"text": "x" + SURROGATE}, "text", 400),
    ("/v1/users/new-user/memories", {"text": ["fine", SURROGATE]}, "text[1]", 400),
    ("/v1/users/new-user/memories", {"text": "x", "metadata": {"source": SURROGATE}}, "metadata.source", 400),
    ("/v1/users/new-user/memories", {"text": "x", "metadata": {"k" + SURROGATE: 1}}, "metadata", 400),
    ("/v1/users/new-user/memories", {"text": "x", "metadata": {"": 1}}, "metadata.", 400),
    ("/v1/users/new-user/memories", {"text": "x", "metadata": {"$where": 1}}, "metadata.$where", 400),
    ("/v1/users/new-user/memories", {"text": "x", "metadata": {"#tag": 1}}, "metadata.#tag", 400),
    (
        "/v1/users/new-user/memories",
        {"text": "x", "metadata": {"chroma:document": "x"}},
        "metadata.chroma:document",
        400,
    ),
    ("/v1/users/new-user/memories", {"text": "x", "metadata": {"big": 2**70}}, "metadata.big", 400),
    ("/v1/users/new-user/memories", {"text": "x", "metadata": {"huge": 10**400}}, "metadata.huge", 400),
    ("/v1/users/new-user/memories", {"text": ["one", "two", "three", "four", "five"]}, "text", 413),
    (
        "/v1/users/new-user/next-question",
        {"candidates": [{"prompt": SURROGATE, "a": "x", "b": "y"}]},
        "candidates[0].prompt",
        400,
    ),
    # json.dumps writes these as the bare NaN and Infinity that Python's parser accepts and JSON does not
    (
        "/v1/users/new-user/comparisons",
        {"comparisons": [{**EGG, "created_at": float("nan")}]},
        "comparisons[0].created_at",
        400,
    ),
    (
        "/v1/users/new-user/comparisons",
        {"comparisons": [{**EGG, "created_at": float("inf")}]},
        "comparisons[0].created_at",
        400,
    ),
    (
        "/v1/users/new-user/memories",
        {"text": "x", "metadata": {"score": float("-inf")}},
        "metadata.score",
        400,
    ),
    ("/v1/chat/completions", {**CHAT, "temperature": float("nan")}, "temperature", 400),
]


@pytest.mark.parametrize(
    ("path", "body", "param", "status"),
    REFUSED,
    ids=[f"{p.rsplit('/', 1)[-1]}-{f}-{s}" for p, _, f, s in REFUSED],
)
def test_input_that_used_to_500_is_refused_naming_the_field_and_stores_nothing(
    http, personalizer, path, body, param, status
):
    before = _stored(personalizer)
    response = http.post(
        path, content=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    error = _error(response, status)
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert (
        _stored(personalizer) == before and http.get("/v1/users/new-user").status_code == 404
    )  # a refused write creates no user
    assert http.get("/health").json() == {"status": "ok"}  # the connection and the server are fine


def test_memory_write_at_the_cap_and_safe_metadata_pass(http):
    http.delete("/v1/users/capped")
    texts = ["one", "two", "three", "four"]
    added = http.post(
        "/v1/users/capped/memories",
        json={"text": texts, "metadata": {"source": "chat", "n": 2**63 - 1, "tag:x": True}},
    ).json()
    assert [r["memory"] for r in added["results"]] == texts and added["results"][0]["metadata"] == {
        "source": "chat",
        "n": 2**63 - 1,
        "tag:x": True,
    }
    assert ServerConfig().max_memories_per_request == 256


def test_litellm_carries_the_user_by_safety_identifier_extra_body_or_header(server, http):
    """LiteLLM drops `user` for OpenAI-compatible models; the three documented ways through it work (skipped without litellm)."""
    litellm = pytest.importorskip("litellm")
    http.delete("/v1/users/ll-user")
    http.post("/v1/users/ll-user/comparisons", json={"comparisons": [EGG]})
    http.post("/v1/users/ll-user/memories", json={"text": "I am vegetarian."})
    ways = {
        "safety_identifier": {"safety_identifier": "ll-user"},
        "user": {"extra_body": {"user": "ll-user"}},
        "X-Personalign-User": {"extra_headers": {"X-Personalign-User": "ll-user"}},
    }
    for source, kwargs in ways.items():
        reply = litellm.completion(
            model="openai/personalign",
            api_base=server.base_url,
            api_key="x",
            messages=HI,
            max_tokens=4,
            memory_threshold=-1.0,
            **kwargs,
        )
        extra = reply.personalign
        assert (extra["user"], extra["user_source"], extra["memories"]) == (
            "ll-user",
            source,
            ["I am vegetarian."],
        )
    dropped = litellm.completion(
        model="openai/personalign",
        api_base=server.base_url,
        api_key="x",
        messages=HI,
        max_tokens=4,
        user="ll-user",
    )
    assert dropped.personalign["user"] is None  # what the docs warn about
