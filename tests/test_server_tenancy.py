"""Tenancy: API keys bound to tenants; every endpoint refuses to cross from one tenant to another."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from personalign.personalizer import Personalizer
from personalign.server import ServerConfig, ServerThread, create_app, load_api_keys
from personalign.server.config import hash_key

ACME, GLOBEX, ACME_READ_ONLY = "sk-acme-0001", "sk-globex-01", "sk-acme-read-only"
SECRET_MEMORY = "Acme's alice: my bank PIN hint is the colour of my first car."
CHAT = {
    "model": "personalign",
    "messages": [{"role": "user", "content": "What is my bank PIN hint?"}],
    "max_tokens": 4,
}


@pytest.fixture(scope="module")
def server(tiny_generator, encoder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tenancy")
    keys = folder / "keys.json"
    keys.write_text(
        json.dumps(
            {
                "keys": [
                    {"key": ACME, "tenant": "acme"},
                    {"key": GLOBEX, "tenant": "globex"},
                    {"key_sha256": hash_key(ACME_READ_ONLY), "tenant": "acme", "read_only": True},
                ]
            }
        )
    )
    config = ServerConfig(api_keys=load_api_keys(keys), max_tokens_cap=32, default_max_tokens=4)
    with (
        Personalizer(tiny_generator, encoder, store=folder / "store") as pz,
        ServerThread(create_app(pz, config)) as running,
    ):
        running.store = pz.store_path
        yield running


def _client(server, key):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def acme_alice(server):
    """Acme's user alice, with two comparisons and a secret memory; returns the memory id."""
    with _client(server, ACME) as acme:
        acme.delete("/v1/users/alice")
        comparisons = [
            {
                "prompt": "How do I boil an egg?",
                "chosen": "Nine minutes.",
                "rejected": "A long story about eggs.",
            },
            {
                "prompt": "Why is the sky blue?",
                "chosen": "Scattering.",
                "rejected": "A long story about light.",
            },
        ]
        assert acme.post("/v1/users/alice/comparisons", json={"comparisons": comparisons}).status_code == 200
        added = acme.post("/v1/users/alice/memories", json={"text": SECRET_MEMORY}).json()
        return added["results"][0]["id"]


def _acme_alice_intact(server, memory_id):
    with _client(server, ACME) as acme:
        profile = acme.get("/v1/users/alice").json()
        memories = acme.get("/v1/users/alice/memories").json()["results"]
    assert profile["id"] == "alice" and profile["n_comparisons"] == 2 and profile["n_memories"] == 1
    assert [(m["id"], m["memory"], m["user_id"]) for m in memories] == [(memory_id, SECRET_MEMORY, "alice")]


def test_every_endpoint_refuses_cross_tenant_reads_and_deletes(server, acme_alice):
    attempts = []
    with _client(server, GLOBEX) as globex:
        for name in ("alice", "acme.alice", "acme"):
            attempts += [
                globex.get(f"/v1/users/{name}"),
                globex.get(f"/v1/users/{name}/memories"),
                globex.get(f"/v1/users/{name}/memories", params={"query": "bank PIN"}),
                globex.delete(f"/v1/users/{name}/memories/{acme_alice}"),
                globex.delete(f"/v1/users/{name}/memories"),
                globex.delete(f"/v1/users/{name}"),
            ]
            # A chat naming another tenant's user is a chat with an unknown user of one's own: the generic answer.
            for source in ({"user": name}, {"safety_identifier": name}, {"metadata": {"user_id": name}}):
                reply = globex.post("/v1/chat/completions", json={**CHAT, **source, "memory_threshold": -1.0})
                assert reply.status_code == 200 and reply.json()["personalign"]["user_known"] is False
                assert (
                    reply.json()["personalign"]["memories"] == []
                    and reply.json()["personalign"]["shots"] == 0
                )
                attempts.append(reply)
            streamed = globex.post("/v1/chat/completions", json={**CHAT, "user": name, "stream": True})
            assert '"user_known": false' in streamed.text
            attempts.append(streamed)
        attempts.append(globex.post("/v1/users/../acme.alice/memories", json={"text": "x"}))
    for response in attempts:
        assert response.status_code in (200, 404), (
            response.request.method,
            response.request.url,
            response.text,
        )
        assert (
            SECRET_MEMORY not in response.text and "globex." not in response.text
        )  # no data, no internal ids
    with _client(server, GLOBEX) as globex:
        assert all(
            globex.get(f"/v1/users/{name}").status_code == 404 for name in ("alice", "acme.alice", "acme")
        )  # chats stored nothing
    _acme_alice_intact(server, acme_alice)


def test_writes_land_in_the_callers_own_tenant(server, acme_alice):
    with _client(server, GLOBEX) as globex:
        globex.delete("/v1/users/alice")
        enrolled = globex.post(
            "/v1/users/alice/comparisons",
            json={"comparisons": [{"prompt": "Tea?", "chosen": "Yes.", "rejected": "No, never."}]},
        )
        assert (
            enrolled.status_code == 200 and enrolled.json()["comparisons"] == 1
        )  # a new globex user, not acme's two
        assert (
            globex.post("/v1/users/alice/memories", json={"text": "Globex's alice likes tea."}).status_code
            == 200
        )
        profile = globex.get("/v1/users/alice").json()
        assert profile["n_comparisons"] == 1 and profile["n_memories"] == 1
        reply = globex.post(
            "/v1/chat/completions", json={**CHAT, "user": "alice", "memory_threshold": -1.0}
        ).json()
        assert reply["personalign"]["memories"] == ["Globex's alice likes tea."]
        found = globex.get("/v1/users/alice/memories", params={"query": "bank PIN hint", "top_k": 10}).json()[
            "results"
        ]
        assert [m["memory"] for m in found] == ["Globex's alice likes tea."] and found[0][
            "user_id"
        ] == "alice"
        # Deleting acme's memory id through globex's own alice finds nothing.
        assert globex.delete(f"/v1/users/alice/memories/{acme_alice}").status_code == 404
        assert globex.delete("/v1/users/alice").json()["profile_deleted"] is True
    with _client(server, ACME) as acme:
        reply = acme.post(
            "/v1/chat/completions", json={**CHAT, "user": "alice", "memory_threshold": -1.0}
        ).json()
        assert reply["personalign"]["memories"] == [SECRET_MEMORY] and reply["personalign"]["user"] == "alice"
    _acme_alice_intact(server, acme_alice)
    on_disk = sorted(p.name for p in (server.store / "users").iterdir() if not p.name.startswith("."))
    assert (
        "acme.alice" in on_disk
        and "alice" not in on_disk
        and all(n.startswith(("acme.", "globex.")) for n in on_disk)
    )


def test_openai_client_with_tenant_keys(server, acme_alice):
    acme = openai.OpenAI(base_url=server.url + "/v1", api_key=ACME, max_retries=0)
    globex = openai.OpenAI(base_url=server.url + "/v1", api_key=GLOBEX, max_retries=0)
    reply = acme.chat.completions.create(
        model="personalign",
        messages=CHAT["messages"],
        user="alice",
        max_tokens=4,
        extra_body={"memory_threshold": -1.0},
    )
    assert reply.model_extra["personalign"]["memories"] == [SECRET_MEMORY]
    generic = globex.chat.completions.create(
        model="personalign",
        messages=CHAT["messages"],
        user="alice",
        max_tokens=4,
        extra_body={"memory_threshold": -1.0},
    )
    assert (
        generic.model_extra["personalign"]["user_known"] is False
        and generic.model_extra["personalign"]["memories"] == []
    )
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong-key", max_retries=0).models.list()


ENDPOINTS = [
    ("GET", "/v1/models", None),
    ("GET", "/v1/server/stats", None),
    ("POST", "/v1/chat/completions", {**CHAT, "user": "alice"}),
    (
        "POST",
        "/v1/users/alice/comparisons",
        {"comparisons": [{"prompt": "p", "chosen": "a", "rejected": "b"}]},
    ),
    ("GET", "/v1/users/alice", None),
    ("DELETE", "/v1/users/alice", None),
    ("POST", "/v1/users/alice/memories", {"text": "x"}),
    ("GET", "/v1/users/alice/memories", None),
    ("DELETE", "/v1/users/alice/memories", None),
    ("DELETE", "/v1/users/alice/memories/abc", None),
    ("POST", "/v1/users/alice/next-question", None),
]


@pytest.mark.parametrize(
    "key", [None, "sk-not-a-key", "Basic " + ACME], ids=["missing", "unknown", "wrong-scheme"]
)
def test_every_endpoint_needs_a_valid_key(server, acme_alice, key):
    headers = {} if key is None else {"Authorization": key if key.startswith("Basic") else f"Bearer {key}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
        for method, path, body in ENDPOINTS:
            response = client.request(method, path, json=body)
            assert response.status_code == 401, (method, path, response.text)
            assert response.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/health").status_code == 200
    _acme_alice_intact(server, acme_alice)


def test_read_only_key_reads_its_tenant_and_cannot_write(server, acme_alice):
    with _client(server, ACME_READ_ONLY) as reader:
        assert reader.get("/v1/users/alice").json()["n_comparisons"] == 2
        assert reader.get("/v1/users/alice/memories").json()["results"][0]["memory"] == SECRET_MEMORY
        assert reader.post("/v1/chat/completions", json={**CHAT, "user": "alice"}).status_code == 200
        for method, path, body in ENDPOINTS:
            if method in ("DELETE",) or path.endswith(("comparisons", "memories")) and method == "POST":
                response = reader.request(method, path, json=body)
                assert response.status_code == 403 and response.json()["error"]["code"] == "read_only_key", (
                    method,
                    path,
                )
    _acme_alice_intact(server, acme_alice)


def test_long_and_foreign_user_ids_stay_in_the_tenant(server):
    """An id longer than the store allows after the tenant prefix is hashed, any other id escaped; both stay under acme."""
    longest = "u" * (128 - len("acme."))
    with _client(server, ACME) as acme, _client(server, GLOBEX) as globex:
        for name in (longest, longest + "x", "auth0|5f7c8ec7c33c6c004bbafe82"):
            assert (
                acme.post(f"/v1/users/{name}/memories", json={"text": f"fact of {name}"}).status_code == 200
            )
            listed = acme.get(f"/v1/users/{name}/memories").json()["results"]
            assert [(m["memory"], m["user_id"]) for m in listed] == [(f"fact of {name}", name)]
            assert globex.get(f"/v1/users/{name}").status_code == 404
    on_disk = {p.name for p in (server.store / "users").iterdir()}
    assert {"acme." + longest, "acme.esc+auth0+7C5f7c8ec7c33c6c004bbafe82"} <= on_disk
    assert any(n.startswith("acme.sha+") for n in on_disk)
