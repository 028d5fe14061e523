"""Memories with a lifecycle: get, update, history, filters, de-duplication, supersession by key,
conflicts, export; the same from Python and HTTP, never across users or tenants.

The contract: search finds active memories only; a superseded or edited text stays in history
until forget, and forget leaves none of it on disk; bad input is a typed error (4xx over HTTP)
and changes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keyed_server import api_error, client, keyed_server
from personalign.errors import UnknownUserError, ValidationError
from personalign.memory.lifecycle import UnknownMemoryError
from personalign.server.config import TENANT_SEP

PARIS, BERLIN, LISBON = "I live in Paris.", "I moved to Berlin.", "I live in Lisbon now."
WHERE = "Which city do I live in?"
ACME, GLOBEX = "sk-acme-lifecycle-1", "sk-globex-lifecycle"
LIFECYCLE_KEYS = {"key", "status", "version", "valid_from", "valid_to", "updated_at", "source"}


def _snapshot(pz, user):
    """Everything stored for ``user``'s memories, every version included."""
    return sorted(pz.memory.texts(user)), [
        (r["id"], r["memory"], r["status"]) for r in pz.memories(user, status="all")["results"]
    ]


# --- Python ----------------------------------------------------------------------------------------


def test_result_shape_has_mem0_fields_and_lifecycle_fields(pz):
    [row] = pz.remember("ana", PARIS, metadata={"category": "home"}, key="home_city")["results"]
    assert {"id", "memory", "user_id", "created_at", "metadata", "event"} | LIFECYCLE_KEYS <= set(row)
    assert (row["event"], row["status"], row["key"], row["version"], row["valid_to"], row["source"]) == (
        "ADD",
        "active",
        "home_city",
        1,
        None,
        "python",
    )
    assert row["valid_from"] == row["created_at"] and row["metadata"] == {"category": "home"}
    assert pz.get_memory("ana", row["id"]) == {
        k: v for k, v in row.items() if k not in ("event", "supersedes")
    }
    assert json.dumps(pz.memories("ana")) and json.dumps(pz.memory_history("ana", row["id"]))


def test_restated_fact_is_stored_once(pz):
    first = pz.remember("ana", "I am vegetarian and I cook for two.")["results"][0]
    again = pz.remember(
        "ana", ["i am vegetarian and  I cook for two.", "I'm vegetarian and I cook for two."]
    )["results"]
    assert [r["event"] for r in again] == ["NONE", "NONE"] and {r["id"] for r in again} == {first["id"]}
    assert [r["memory"] for r in pz.memories("ana")["results"]] == ["I am vegetarian and I cook for two."]
    assert pz.memory.count("ana") == 1


def test_key_supersedes_and_search_returns_active_only(pz):
    paris = pz.remember("ana", PARIS, key="home_city")["results"][0]
    pz.remember("ana", "My car is a red hatchback.")
    moved = pz.remember("ana", BERLIN, key="home_city")["results"]
    assert [(r["event"], r["status"], r["memory"]) for r in moved] == [
        ("ADD", "active", BERLIN),
        ("DELETE", "superseded", PARIS),
    ]
    assert moved[0]["supersedes"] == [paris["id"]] and moved[1]["superseded_by"] == moved[0]["id"]
    assert moved[1]["valid_to"] == pytest.approx(moved[0]["valid_from"])
    found = [r["memory"] for r in pz.search_memories("ana", WHERE, top_k=10, threshold=-1.0)["results"]]
    assert BERLIN in found and PARIS not in found
    everything = [
        r["memory"]
        for r in pz.search_memories("ana", WHERE, top_k=10, threshold=-1.0, status="all")["results"]
    ]
    assert PARIS in everything
    assert [r["memory"] for r in pz.memories("ana", status="superseded")["results"]] == [PARIS]
    # the superseded memory keeps its history, and a chat retrieves only the current city
    history = pz.memory_history("ana", paris["id"])
    assert history["status"] == "superseded" and [v["event"] for v in history["versions"]] == [
        "ADD",
        "DELETE",
    ]
    assert (
        pz.respond(
            "ana", [{"role": "user", "content": WHERE}], max_new_tokens=1, memory_threshold=-1.0
        ).memories.count(PARIS)
        == 0
    )


def test_unkeyed_close_match_is_a_reported_conflict(pz):
    blue = pz.remember("ana", "My favourite colour is blue.")["results"][0]
    [green] = pz.remember("ana", "My favourite colour is green.")["results"]
    assert [c["id"] for c in green["conflicts"]] == [blue["id"]] and green["conflicts"][0]["score"] > 0.6
    assert {r["memory"] for r in pz.memories("ana")["results"]} == {
        "My favourite colour is blue.",
        "My favourite colour is green.",
    }
    red = pz.remember("ana", "My favourite colour is red.", on_conflict="supersede")["results"]
    assert [r["event"] for r in red] == ["ADD", "DELETE", "DELETE"]
    assert [r["memory"] for r in pz.memories("ana")["results"]] == ["My favourite colour is red."]


def test_update_keeps_id_and_history_records_every_version(pz):
    row = pz.remember("ana", "I work as a nurse.", key="job", metadata={"category": "work"})["results"][0]
    first = pz.update_memory("ana", row["id"], "I work as a teacher.", source="cli")["results"][0]
    assert (first["event"], first["id"], first["version"], first["previous_memory"], first["key"]) == (
        "UPDATE",
        row["id"],
        2,
        "I work as a nurse.",
        "job",
    )
    assert first["metadata"] == {"category": "work"}  # kept when not given
    pz.update_memory("ana", row["id"], "I work as a head teacher.", metadata={"category": "career"})
    assert pz.update_memory("ana", row["id"], "I work as a head teacher.")["results"][0]["event"] == "NONE"
    history = pz.memory_history("ana", row["id"])
    assert [(v["version"], v["memory"], v["event"], v["source"]) for v in history["versions"]] == [
        (1, "I work as a nurse.", "ADD", "python"),
        (2, "I work as a teacher.", "UPDATE", "cli"),
        (3, "I work as a head teacher.", "UPDATE", "python"),
    ]
    times = [(v["valid_from"], v["valid_to"]) for v in history["versions"]]
    assert times[0][1] == times[1][0] and times[1][1] == times[2][0] and times[2][1] is None
    # only the current text is searchable; one memory, three stored texts
    assert [
        r["memory"] for r in pz.search_memories("ana", "What is my job?", top_k=5, threshold=-1.0)["results"]
    ] == ["I work as a head teacher."]
    assert pz.memory.count("ana") == 1 and len(pz.memory.texts("ana")) == 3
    assert pz.memories("ana", filters={"category": "career"})["results"][0]["id"] == row["id"]


def test_filters_on_search_and_listing(pz):
    pz.remember("ana", "I am vegetarian.", metadata={"category": "diet", "priority": 3})
    pz.remember("ana", "I run marathons.", metadata={"category": "sport", "priority": 1})
    pz.remember("ana", "I drink oat milk.", metadata={"category": "diet", "priority": 1})
    listed = lambda f: [r["memory"] for r in pz.memories("ana", filters=f)["results"]]  # noqa: E731
    assert listed({"category": "diet"}) == ["I am vegetarian.", "I drink oat milk."]
    assert listed({"category": "diet", "priority": {"gte": 2}}) == ["I am vegetarian."]
    assert listed({"category": {"in": ["sport"]}}) == ["I run marathons."]
    assert listed({"priority": {"$lt": 2}}) == ["I run marathons.", "I drink oat milk."]
    found = pz.search_memories(
        "ana", "What do I eat?", top_k=5, threshold=-1.0, filters={"category": "sport"}
    )["results"]
    assert [r["memory"] for r in found] == ["I run marathons."]


@pytest.mark.parametrize(
    ("filters", "field"),
    [
        ({"categry": "diet"}, "filters.categry"),
        ({"category": {"like": "d%"}}, "filters.category.like"),
        ({"category": {"eq": "a", "ne": "b"}}, "filters.category"),
        ({"priority": {"gte": "2"}}, "filters.priority.gte"),
        ({"category": {"in": []}}, "filters.category.in"),
        ({"category": ["diet"]}, "filters.category"),
        ({"$or": [{"category": "diet"}]}, "filters.$or"),
        ("category=diet", "filters"),
    ],
)
def test_bad_filters_are_validation_errors(pz, filters, field):
    pz.remember("ana", "I am vegetarian.", metadata={"category": "diet", "priority": 3})
    for call in (
        lambda: pz.memories("ana", filters=filters),
        lambda: pz.search_memories("ana", "food", filters=filters),
    ):
        with pytest.raises(ValidationError) as info:
            call()
        assert info.value.field == field and "Fix: " in str(info.value)


@pytest.mark.parametrize("key", ["", "has space", "x" * 65, "-lead", "a/b", 3, "ünï"])
def test_bad_keys_write_nothing(pz, key):
    pz.remember("ana", PARIS, key="home_city")
    before = _snapshot(pz, "ana")
    with pytest.raises(ValidationError) as info:
        pz.remember("ana", BERLIN, key=key)
    assert info.value.field == "key"
    assert _snapshot(pz, "ana") == before


def test_bad_options_write_nothing(pz):
    pz.remember("ana", PARIS, key="home_city")
    before = _snapshot(pz, "ana")
    for kwargs, field in (
        ({"text": [BERLIN, LISBON], "key": "home_city"}, "key"),
        ({"text": BERLIN, "on_conflict": "merge"}, "on_conflict"),
        ({"text": BERLIN, "metadata": {"personalign:status": "x"}}, "metadata.personalign:status"),
        ({"text": BERLIN, "source": "a b"}, "source"),
    ):
        with pytest.raises(ValidationError) as info:
            pz.remember("ana", **kwargs)
        assert info.value.field == field
    with pytest.raises(ValidationError):
        pz.memories("ana", status="deleted")
    assert _snapshot(pz, "ana") == before


def test_another_users_memory_is_unknown_and_unchanged(pz):
    secret = pz.remember("ana", "My locker code is zebra-4417.")["results"][0]
    pz.remember("bob", "Bob plays the trombone.")
    before = _snapshot(pz, "ana"), _snapshot(pz, "bob")
    for call in (
        lambda: pz.get_memory("bob", secret["id"]),
        lambda: pz.update_memory("bob", secret["id"], "Overwritten by bob."),
        lambda: pz.memory_history("bob", secret["id"]),
        lambda: pz.update_memory("ana", "no-such-id", "x"),
        lambda: pz.get_memory("ana", secret["id"] + "~v1"),  # an earlier version is not a memory
        lambda: pz.get_memory("nobody", secret["id"]),
    ):
        with pytest.raises(UnknownMemoryError) as info:
            call()
        assert isinstance(info.value, KeyError) and "Fix: " in str(info.value)
    assert pz.delete_memory("bob", secret["id"]) is False
    with pytest.raises(ValidationError):
        pz.update_memory("ana", secret["id"], "   ")
    assert (_snapshot(pz, "ana"), _snapshot(pz, "bob")) == before


def _files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_forget_purges_every_version_from_disk_and_cache(pz):
    row = pz.remember("ana", "My old locker code is walrus-1111.", key="locker")["results"][0]
    pz.update_memory("ana", row["id"], "My old locker code is walrus-2222.")
    pz.remember("ana", "My locker code is walrus-3333.", key="locker")
    assert (
        _files_containing(pz.store_path, b"walrus-1111")
        and "locker: My old locker code is walrus-1111." in pz.encoder._cache
    )
    pz.forget("ana")
    for code in (b"walrus-1111", b"walrus-2222", b"walrus-3333"):
        assert _files_containing(pz.store_path, code) == []
    codes = ("walrus-1111", "walrus-2222", "walrus-3333")  # (another user's walrus text may stay)
    assert not [
        t for t in pz.encoder._cache if any(c in t for c in codes)
    ]  # as stored and as embedded (with the key label)
    assert pz.memories("ana", status="all")["results"] == [] and pz.memory.texts("ana") == []


def test_delete_removes_the_memory_and_its_versions(pz):
    row = pz.remember("ana", "I work as a nurse.")["results"][0]
    pz.update_memory("ana", row["id"], "I work as a teacher.")
    assert pz.delete_memory("ana", row["id"]) is True
    assert pz.memory.texts("ana") == [] and pz.memory.count("ana") == 0


def test_export_holds_everything_stored(pz):
    pz.enroll(
        "ana",
        [
            {
                "prompt": "How do I boil an egg?",
                "chosen": "Nine minutes.",
                "rejected": "A long story about eggs.",
            }
        ],
    )
    pz.set_steering("ana", {"verbosity": -1.0})
    pz.remember("ana", PARIS, key="home_city")
    pz.remember("ana", BERLIN, key="home_city")
    doc = pz.export("ana")
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc
    assert doc["format"] == "personalign.user-export" and doc["user_id"] == "ana"
    assert [c["chosen"] for c in doc["comparisons"]] == ["Nine minutes."]
    assert doc["steering"]["stored"] is not None and doc["steering"]["default"] == {"verbosity": -1.0}
    assert doc["state"] is not None and doc["state"]["n_comparisons"] == 1
    assert {(m["memory"], m["status"]) for m in doc["memories"]} == {
        (PARIS, "superseded"),
        (BERLIN, "active"),
    }
    assert all(m["history"] for m in doc["memories"])
    assert "profile.json" in {f["path"] for f in doc["files"]} and doc["adapter"] is None
    with pytest.raises(UnknownUserError):
        pz.export("nobody")


# --- HTTP ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_generator, encoder, tmp_path_factory):
    keys = [{"key": ACME, "tenant": "acme"}, {"key": GLOBEX, "tenant": "globex"}]
    with keyed_server(tiny_generator, encoder, tmp_path_factory.mktemp("lifecycle"), keys) as running:
        yield running


def test_http_lifecycle_matches_python(server):
    with client(server, ACME) as http:
        http.delete("/v1/users/cara")
        added = http.post(
            "/v1/users/cara/memories",
            json={"text": PARIS, "key": "home_city", "metadata": {"category": "home"}},
        ).json()["results"]
        assert added[0]["event"] == "ADD" and added[0]["user_id"] == "cara" and added[0]["source"] == "http"
        paris_id = added[0]["id"]
        moved = http.post(
            "/v1/users/cara/memories",
            json={"text": BERLIN, "key": "home_city", "metadata": {"category": "home"}},
        ).json()["results"]
        assert [(r["event"], r["status"]) for r in moved] == [("ADD", "active"), ("DELETE", "superseded")]
        assert (
            http.post("/v1/users/cara/memories", json={"text": BERLIN, "key": "home_city"}).json()["results"][
                0
            ]["event"]
            == "NONE"
        )
        berlin_id = moved[0]["id"]
        updated = http.put(f"/v1/users/cara/memories/{berlin_id}", json={"text": LISBON}).json()["results"][0]
        assert (updated["event"], updated["previous_memory"], updated["version"]) == ("UPDATE", BERLIN, 2)
        got = http.get(f"/v1/users/cara/memories/{berlin_id}").json()["results"][0]
        assert (got["memory"], got["status"], got["user_id"]) == (LISBON, "active", "cara")
        history = http.get(f"/v1/users/cara/memories/{berlin_id}/history").json()
        assert [v["memory"] for v in history["versions"]] == [BERLIN, LISBON] and history["user_id"] == "cara"
        listed = http.get(
            "/v1/users/cara/memories", params={"filters": json.dumps({"category": "home"})}
        ).json()["results"]
        assert [r["memory"] for r in listed] == [LISBON]
        everything = http.get(
            "/v1/users/cara/memories", params={"filters": json.dumps({"category": "home"}), "status": "all"}
        ).json()["results"]
        assert [r["memory"] for r in everything] == [PARIS, LISBON]
        found = http.get(
            "/v1/users/cara/memories", params={"query": WHERE, "threshold": -1, "top_k": 10}
        ).json()["results"]
        assert [r["memory"] for r in found] == [LISBON]
        searched = http.post(
            "/v1/users/cara/memories/search",
            json={"query": WHERE, "filters": {"category": "home"}, "status": "all", "threshold": -1},
        ).json()["results"]
        assert {r["memory"] for r in searched} == {PARIS, LISBON}
        export = http.get("/v1/users/cara/export").json()
        assert export["user_id"] == "cara" and {m["id"] for m in export["memories"]} == {paris_id, berlin_id}
        assert all(m["user_id"] == "cara" for m in export["memories"])
        assert not any(
            "acme" in json.dumps(m) for m in export["memories"]
        )  # the stored (tenant) id never leaks
        # the same lifecycle, read through Python under the stored id
        assert server.pz.get_memory(f"acme{TENANT_SEP}cara", berlin_id)["memory"] == LISBON


def test_http_bad_input_is_4xx_and_changes_nothing(server):
    with client(server, ACME) as http:
        http.delete("/v1/users/dora")
        row = http.post(
            "/v1/users/dora/memories",
            json={"text": PARIS, "key": "home_city", "metadata": {"category": "home"}},
        ).json()["results"][0]
        http.post("/v1/users/erin/memories", json={"text": "Erin likes tea."})
        before = http.get("/v1/users/dora/export").json()["memories"]
        api_error(
            http.put(f"/v1/users/erin/memories/{row['id']}", json={"text": "stolen"}), 404, "memory_not_found"
        )
        api_error(http.get(f"/v1/users/erin/memories/{row['id']}"), 404, "memory_not_found")
        api_error(http.get(f"/v1/users/erin/memories/{row['id']}/history"), 404, "memory_not_found")
        api_error(
            http.put("/v1/users/dora/memories/not-a-memory", json={"text": "x"}), 404, "memory_not_found"
        )
        api_error(
            http.put(f"/v1/users/nobody-here/memories/{row['id']}", json={"text": "x"}), 404, "user_not_found"
        )
        api_error(
            http.post("/v1/users/dora/memories", json={"text": BERLIN, "key": "not a key"}),
            400,
            "invalid_value",
        )
        api_error(http.post("/v1/users/dora/memories", json={"text": BERLIN, "on_conflict": "merge"}), 400)
        api_error(http.put(f"/v1/users/dora/memories/{row['id']}", json={"text": ""}), 400)
        api_error(
            http.put(f"/v1/users/dora/memories/{row['id']}", json={"text": "x", "metadata": {"$bad": 1}}), 400
        )
        assert (
            api_error(
                http.get("/v1/users/dora/memories", params={"filters": json.dumps({"categry": "home"})}), 400
            )["param"]
            == "filters.categry"
        )
        api_error(http.get("/v1/users/dora/memories", params={"filters": "{not json"}), 400)
        api_error(http.get("/v1/users/dora/memories", params={"status": "deleted"}), 400)
        api_error(
            http.post(
                "/v1/users/dora/memories/search", json={"query": "x", "filters": {"category": {"like": "h"}}}
            ),
            400,
        )
        assert http.get("/v1/users/dora/export").json()["memories"] == before
    with client(server, GLOBEX) as globex:  # another tenant: the same path names another user
        api_error(globex.get(f"/v1/users/dora/memories/{row['id']}"), 404)
        api_error(globex.put(f"/v1/users/dora/memories/{row['id']}", json={"text": "globex was here"}), 404)
        api_error(globex.get("/v1/users/dora/export"), 404, "user_not_found")
        globex.post("/v1/users/dora/memories", json={"text": "Globex's dora."})
        api_error(
            globex.put(f"/v1/users/dora/memories/{row['id']}", json={"text": "globex was here"}),
            404,
            "memory_not_found",
        )
        assert [m["memory"] for m in globex.get("/v1/users/dora/export").json()["memories"]] == [
            "Globex's dora."
        ]
    with client(server, ACME) as http:
        assert http.get("/v1/users/dora/export").json()["memories"] == before


# --- CLI -------------------------------------------------------------------------------------------


def test_cli_memory_commands_match_python(tmp_path):
    from typer.testing import CliRunner

    from personalign.cli import app

    runner, store = CliRunner(), str(tmp_path / "store")

    def run(*args, code=0):
        out = runner.invoke(app, [*args, "--store", store])
        assert out.exit_code == code, out.output
        return json.loads(out.stdout) if code == 0 and out.stdout.lstrip().startswith("{") else out

    paris = run(
        "memory", "add", "--user", "fay", "--key", "home_city", "--metadata", '{"category": "home"}', PARIS
    )["results"][0]
    moved = run("memory", "add", "--user", "fay", "--key", "home_city", BERLIN)["results"]
    assert [r["event"] for r in moved] == ["ADD", "DELETE"] and moved[0]["source"] == "cli"
    updated = run("memory", "update", "--user", "fay", moved[0]["id"], LISBON)["results"][0]
    assert updated["event"] == "UPDATE" and updated["previous_memory"] == BERLIN
    assert [v["memory"] for v in run("memory", "history", "--user", "fay", moved[0]["id"])["versions"]] == [
        BERLIN,
        LISBON,
    ]
    assert run("memory", "get", "--user", "fay", paris["id"])["results"][0]["status"] == "superseded"
    assert [r["memory"] for r in run("memory", "list", "--user", "fay")["results"]] == [LISBON]
    assert [
        r["memory"]
        for r in run(
            "memory", "list", "--user", "fay", "--filters", '{"category": "home"}', "--status", "all"
        )["results"]
    ] == [PARIS]
    assert run("memory", "search", "--user", "fay", WHERE)["results"][0]["memory"] == LISBON
    document = run("export-user", "--user", "fay")
    assert document["user_id"] == "fay" and len(document["memories"]) == 2
    # errors: an unknown id is 1, a bad option 2; nothing changes
    assert (
        "has no memory" in run("memory", "update", "--user", "gus", moved[0]["id"], "stolen", code=1).output
    )
    assert "--filters" in run("memory", "list", "--user", "fay", "--filters", "{oops", code=2).output
    assert (
        "filters.categry"
        in run("memory", "list", "--user", "fay", "--filters", '{"categry": "x"}', code=1).output
    )
    assert run("export-user", "--user", "fay")["memories"] == document["memories"]


def test_a_changed_number_is_a_new_fact_not_a_duplicate(pz):
    """Near-identical texts that differ in a number are different facts (the encoder puts them
    above the duplicate threshold: "Fact c10-op3" / "Fact c1-op3" at 0.98)."""
    first = pz.remember("ana", "Fact c1-op3 about ana.")["results"][0]
    second = pz.remember("ana", "Fact c10-op3 about ana.")["results"][0]
    assert first["event"] == second["event"] == "ADD" and first["id"] != second["id"]
    assert sorted(m["memory"] for m in pz.memories("ana")["results"]) == [
        "Fact c1-op3 about ana.",
        "Fact c10-op3 about ana.",
    ]


def test_a_key_with_a_trailing_newline_is_refused(pz):
    with pytest.raises(ValidationError, match="key"):
        pz.remember("ana", "My home city is Lyon.", key="home_city\n")


def test_search_is_a_path_not_a_memory_id(server):
    """GET, PUT or DELETE of /memories/search is a 405 naming POST, never the memory "search"."""
    with client(server, ACME) as http:
        http.post("/v1/users/cara/memories", json={"text": PARIS})
        for method in ("GET", "PUT", "DELETE"):
            answer = http.request(method, "/v1/users/cara/memories/search", json={"text": "x"})
            assert answer.status_code == 405 and answer.headers["allow"] == "POST", (method, answer.text)
        assert (
            http.post("/v1/users/cara/memories/search", json={"query": "Where do I live?"}).status_code == 200
        )


def test_a_key_supersedes_its_active_memory_only(pz):
    """The key's earlier versions (history) and the memories it already superseded stay as they
    are: the new memory supersedes the one active memory with its key, picked by status here."""
    paris = pz.remember("ana", PARIS, key="home_city")["results"][0]
    pz.update_memory("ana", paris["id"], "I live in Paris, near the river.")  # a history version
    berlin = pz.remember("ana", BERLIN, key="home_city")["results"]
    assert berlin[0]["supersedes"] == [paris["id"]] and [r["event"] for r in berlin] == ["ADD", "DELETE"]
    lisbon = pz.remember("ana", LISBON, key="home_city")["results"]
    assert lisbon[0]["supersedes"] == [berlin[0]["id"]] and [r["event"] for r in lisbon] == ["ADD", "DELETE"]
    assert pz.get_memory("ana", paris["id"])["superseded_by"] == berlin[0]["id"]  # not re-superseded
    assert [v["event"] for v in pz.memory_history("ana", paris["id"])["versions"]] == [
        "ADD",
        "UPDATE",
        "DELETE",
    ]
    assert [r["memory"] for r in pz.memories("ana")["results"]] == [LISBON]
