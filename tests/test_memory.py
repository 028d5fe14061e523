"""MemoryStore on an embedded Chroma database with the real all-MiniLM-L6-v2 encoder.

The contract: a memory written is a memory found (by meaning), never by another user; it
survives re-opening (in this process and from another one); deleting makes it gone from disk.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from personalign.errors import ValidationError
from personalign.memory.chroma import (
    MAX_MEMORY_CHARS,
    MAX_TOP_K,
    STATUS,
    MemoryStore,
    collection_name,
    has_status,
    status_where,
)

FACTS = [
    "I am vegetarian and I cook for two.",
    "My car is a red hatchback.",
    "I work as a nurse on night shifts.",
]
DINNER = "What should I cook for dinner tonight?"
SECRET = "My locker code is zebra-ornithopter-4417."
RECORD_KEYS = {"id", "memory", "user_id", "created_at", "metadata"}


@pytest.fixture()
def store(encoder, tmp_path):
    return MemoryStore(encoder, path=tmp_path / "chroma")


def _files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_written_memory_is_found_by_meaning(store):
    added = store.add("alice", FACTS, metadata={"source": "chat"})
    assert [r["memory"] for r in added["results"]] == FACTS
    assert all(r["event"] == "ADD" and r["user_id"] == "alice" for r in added["results"])

    found = store.search("alice", DINNER, top_k=3)["results"]
    assert [r["memory"] for r in found][0] == "I am vegetarian and I cook for two."
    assert len(found) == 3
    scores = [r["score"] for r in found]
    assert scores == sorted(scores, reverse=True)
    assert all(-1.0 <= s <= 1.0 + 1e-6 for s in scores)
    car = store.search("alice", "What colour is my vehicle?", top_k=1)["results"]
    assert [r["memory"] for r in car] == ["My car is a red hatchback."]


def test_result_shapes(store):
    added = store.add(
        "alice", "I am vegetarian and I cook for two.", metadata={"source": "chat", "n": 2, "ok": True}
    )
    [row] = added["results"]
    assert set(added) == {"results"}
    assert set(row) == RECORD_KEYS | {"event"}
    assert row["metadata"] == {
        "source": "chat",
        "n": 2,
        "ok": True,
    }  # reserved keys are not echoed as metadata
    assert isinstance(row["created_at"], float) and len(row["id"]) == 32

    [hit] = store.search("alice", DINNER)["results"]
    assert set(hit) == RECORD_KEYS | {"score"}
    assert (hit["id"], hit["memory"], hit["user_id"], hit["metadata"]) == (
        row["id"],
        row["memory"],
        "alice",
        row["metadata"],
    )
    assert hit["created_at"] == pytest.approx(row["created_at"])

    listed = store.get_all("alice")
    assert set(listed) == {"results"}
    [item] = listed["results"]
    assert set(item) == RECORD_KEYS
    assert item["id"] == row["id"] and item["user_id"] == "alice"


def test_never_found_by_another_user(store):
    [alice] = store.add("alice", SECRET)["results"]
    # bob without any memory: nothing, even for the exact text
    assert store.search("bob", SECRET)["results"] == []
    assert store.get_all("bob")["results"] == []
    assert store.delete("bob", alice["id"]) is False
    store.add("bob", "Bob plays the trombone.")
    # bob with memories of his own: still only his
    assert [r["memory"] for r in store.search("bob", SECRET, top_k=MAX_TOP_K)["results"]] == [
        "Bob plays the trombone."
    ]
    assert [r["memory"] for r in store.get_all("bob")["results"]] == ["Bob plays the trombone."]
    assert store.delete("bob", alice["id"]) is False  # another user's id deletes nothing
    assert [r["id"] for r in store.get_all("alice")["results"]] == [alice["id"]]
    assert store.count("alice") == 1 and store.count("bob") == 1
    assert collection_name("alice") != collection_name("bob")


def test_reopen_in_same_process(encoder, tmp_path):
    first = MemoryStore(encoder, path=tmp_path / "chroma")
    first.add("alice", FACTS)
    again = MemoryStore(encoder, path=tmp_path / "chroma")
    assert again is not first and again.count("alice") == 3
    assert again.search("alice", DINNER, top_k=1)["results"][0]["memory"] == FACTS[0]


CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from personalign.memory.chroma import MemoryStore
    from personalign.models import Encoder

    path, vectors_file, name = sys.argv[1:4]
    table = json.loads(open(vectors_file, encoding="utf-8").read())

    class Frozen:  # the real encoder's vectors, computed by the parent: no model load in the child
        def encode(self, texts, **kwargs):
            return np.array([table[t] for t in texts], dtype=np.float32)

    store = MemoryStore(Encoder(Frozen(), name), path=path)
    print(json.dumps(store.add("alice", list(table), metadata={"from": "child"})))
    """
)


def test_memory_written_by_another_process_is_read_here(encoder, tmp_path):
    vectors = {text: vector.tolist() for text, vector in zip(FACTS, encoder.encode(FACTS), strict=True)}
    table = tmp_path / "vectors.json"
    table.write_text(json.dumps(vectors), encoding="utf-8")
    path = tmp_path / "chroma"
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(table), encoder.name],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    written = json.loads(done.stdout.strip().splitlines()[-1])["results"]

    store = MemoryStore(encoder, path=path)
    listed = store.get_all("alice")["results"]
    assert {r["id"] for r in listed} == {r["id"] for r in written}
    assert all(r["metadata"] == {"from": "child"} for r in listed)
    [best] = store.search("alice", DINNER, top_k=1)["results"]
    assert best["memory"] == FACTS[0]
    assert store.search("bob", DINNER)["results"] == []


def test_delete_one(store):
    ids = [r["id"] for r in store.add("alice", FACTS)["results"]]
    assert store.delete("alice", ids[0]) is True
    assert store.delete("alice", ids[0]) is False
    assert store.delete("alice", "no-such-id") is False
    assert store.delete("alice", 12) is False
    remaining = store.get_all("alice")["results"]
    assert {r["id"] for r in remaining} == set(ids[1:])
    assert FACTS[0] not in [r["memory"] for r in store.search("alice", DINNER, top_k=10)["results"]]


def test_delete_all_leaves_no_text_on_disk(store, encoder):
    store.add("alice", [SECRET, *FACTS])
    store.add("bob", "Bob keeps his trombone-walrus-9 in the attic.")
    root = store.path
    assert _files_containing(root, b"zebra-ornithopter-4417")  # the text is really on disk before
    vector = encoder.encode([SECRET])[0].tobytes()[:64]
    assert _files_containing(root, vector)

    assert store.delete_all("alice") == 4
    assert _files_containing(root, b"zebra-ornithopter-4417") == []
    assert _files_containing(root, b"vegetarian") == []
    assert _files_containing(root, vector) == []  # nor its embedding
    assert store.get_all("alice")["results"] == [] and store.count("alice") == 0
    assert store.search("alice", SECRET)["results"] == []
    assert store.delete_all("alice") == 0
    # other users are untouched, and alice can start again
    assert _files_containing(root, b"trombone-walrus-9")
    assert store.count("bob") == 1
    store.add("alice", "A fresh start.")
    assert [r["memory"] for r in store.get_all("alice")["results"]] == ["A fresh start."]


@pytest.mark.parametrize(
    ("metadata", "field"),
    [
        ({"user_id": "bob"}, "metadata.user_id"),
        ({"created_at": 1.0}, "metadata.created_at"),
        ({1: "x"}, "metadata.1"),
        ({"tags": ["a", "b"]}, "metadata.tags"),
        ({"nested": {"a": 1}}, "metadata.nested"),
        ({"none": None}, "metadata.none"),
        ({"score": math.nan}, "metadata.score"),
        ({"score": math.inf}, "metadata.score"),
        ("source=chat", "metadata"),
    ],
)
def test_bad_metadata_writes_nothing(store, metadata, field):
    with pytest.raises(ValidationError) as info:
        store.add("alice", "I am vegetarian.", metadata=metadata)
    assert info.value.field == field and "Fix: " in str(info.value)
    assert store.count("alice") == 0


@pytest.mark.parametrize(
    ("texts", "field"),
    [
        ("", "texts[0]"),
        ("   ", "texts[0]"),
        (["fine", ""], "texts[1]"),
        (["fine", 3], "texts[1]"),
        (["fine", "x" * (MAX_MEMORY_CHARS + 1)], "texts[1]"),
        ([], "texts"),
        (None, "texts"),
    ],
)
def test_bad_texts_write_nothing(store, texts, field):
    with pytest.raises(ValidationError) as info:
        store.add("alice", texts)
    assert info.value.field == field
    assert store.count("alice") == 0


@pytest.mark.parametrize("user", ["../bob", "a/b", "", None])
def test_bad_user_ids_are_rejected_everywhere(store, user):
    for call in (
        lambda: store.add(user, "x"),
        lambda: store.search(user, "x"),
        lambda: store.get_all(user),
        lambda: store.delete(user, "x"),
        lambda: store.delete_all(user),
    ):
        with pytest.raises(ValidationError):
            call()


@pytest.mark.parametrize("top_k", [0, -1, MAX_TOP_K + 1, 2.0, "5", True, None])
def test_top_k_bounds(store, top_k):
    store.add("alice", FACTS)
    with pytest.raises(ValidationError) as info:
        store.search("alice", DINNER, top_k=top_k)
    assert info.value.field == "top_k"


def test_top_k_limits_and_accepts_more_than_stored(store):
    store.add("alice", FACTS)
    assert len(store.search("alice", DINNER, top_k=1)["results"]) == 1
    assert len(store.search("alice", DINNER, top_k=MAX_TOP_K)["results"]) == 3


def test_threshold(store):
    store.add("alice", FACTS)
    everything = store.search("alice", DINNER, top_k=3, threshold=-1.0)["results"]
    assert len(everything) == 3
    cut = (everything[0]["score"] + everything[1]["score"]) / 2
    kept = store.search("alice", DINNER, top_k=3, threshold=cut)["results"]
    assert [r["memory"] for r in kept] == [FACTS[0]]
    assert all(r["score"] >= cut for r in kept)
    assert store.search("alice", DINNER, threshold=0.999)["results"] == []


@pytest.mark.parametrize("threshold", [math.nan, 1.5, -2.0, "0.2", True])
def test_bad_threshold(store, threshold):
    store.add("alice", FACTS)
    with pytest.raises(ValidationError) as info:
        store.search("alice", DINNER, threshold=threshold)
    assert info.value.field == "threshold"


def test_bad_query_and_limit(store):
    store.add("alice", FACTS)
    with pytest.raises(ValidationError, match="^query"):
        store.search("alice", "   ")
    assert len(store.get_all("alice", limit=2)["results"]) == 2
    for limit in (0, -1, 1.5, True):
        with pytest.raises(ValidationError) as info:
            store.get_all("alice", limit=limit)
        assert info.value.field == "limit"


def test_needs_exactly_one_of_path_or_client(encoder, tmp_path):
    with pytest.raises(ValidationError, match="exactly one of path or client"):
        MemoryStore(encoder)
    with pytest.raises(ValidationError, match="exactly one of path or client"):
        MemoryStore(encoder, path=tmp_path, client=object())


# --- what a search costs: one Chroma query, without a status filter when it can --------------------


STATUS_CASES = {"a": "active", "s": "superseded", "h": "history", "legacy": None}


@pytest.mark.parametrize("status", ["active", "superseded", "all"])
def test_has_status_matches_chromas_status_filter(store, encoder, status):
    """Parity: the Python check that replaces Chroma's ``where`` keeps exactly the records the
    filter keeps, legacy records without a status (active) included."""
    store.add("alice", FACTS[0])  # creates the collection
    collection = store._collection("alice", create=False)
    metas = [{"user_id": "alice"} | ({STATUS: s} if s else {}) for s in STATUS_CASES.values()]
    collection.add(
        ids=list(STATUS_CASES),
        documents=list(STATUS_CASES),
        metadatas=metas,
        embeddings=encoder.encode(list(STATUS_CASES)),
    )
    found = collection.get(where=status_where(status), include=["metadatas"])
    by_chroma = set(found["ids"])
    everything = collection.get(include=["metadatas"])
    by_python = {
        i for i, m in zip(everything["ids"], everything["metadatas"], strict=True) if has_status(m, status)
    }
    assert by_python == by_chroma


def _spy_queries(store, user, monkeypatch):
    collection = store._collection(user, create=False)
    calls = []
    query = collection.query

    def spy(**kwargs):
        calls.append(kwargs)
        return query(**kwargs)

    monkeypatch.setattr(collection, "query", spy)
    monkeypatch.setattr(collection, "count", lambda: pytest.fail("count() before every search"))
    return calls


def test_search_asks_chroma_once_without_a_status_filter(store, monkeypatch):
    """A filtered Chroma query lists every matching record first (all the user's active ones)."""
    store.add("alice", FACTS)
    calls = _spy_queries(store, "alice", monkeypatch)
    [best] = store.search("alice", DINNER, top_k=1)["results"]
    assert best["memory"] == FACTS[0]
    assert [(c["where"], c["n_results"]) for c in calls] == [(None, 2)]
    assert "embeddings" not in calls[0]["include"]


def test_search_falls_back_to_the_filter_when_other_versions_crowd_the_query(store, encoder, monkeypatch):
    """Twelve earlier versions sit exactly on the query; the active memories are further away.
    The unfiltered nearest records are all history, so the filtered query runs and finds them."""
    store.add("alice", FACTS)
    collection = store._collection("alice", create=False)
    vector = encoder.encode([DINNER])[0]
    collection.add(
        ids=[f"old~v{i}" for i in range(12)],
        documents=[f"Old version {i}." for i in range(12)],
        metadatas=[{"user_id": "alice", STATUS: "history"} for _ in range(12)],
        embeddings=[vector] * 12,
    )
    calls = _spy_queries(store, "alice", monkeypatch)
    found = store.search("alice", DINNER, top_k=3, threshold=-1.0)["results"]
    assert sorted(r["memory"] for r in found) == sorted(FACTS)
    assert [c["where"] for c in calls] == [None, status_where("active")]
    assert store.search("alice", DINNER, top_k=3, status="all")["results"][0]["memory"] == FACTS[0]
    # a threshold the nearest history record already misses needs no second query
    calls.clear()
    assert (
        store.search("alice", "Completely unrelated: quantum chromodynamics.", top_k=3, threshold=0.99)[
            "results"
        ]
        == []
    )
    assert len(calls) == 1


def test_bench_memory_interleaves_its_cases_and_alternates_the_baseline():
    """``bench memory``: search and add take turns (which first rotating per round), each beside
    one uncached encoder call on the same text (which first alternating), so both see the same load."""
    from personalign.bench.memory import _interleaved

    events = []

    class Encoder:
        def evict(self, texts):
            events.append(("evict", *texts))

        def encode_uncached(self, texts):
            events.append(("encode", *texts))

    def op(name):
        return lambda text: events.append((name, text)) or f"{name}:{text}"

    timings = _interleaved(Encoder(), [(["q0", "q1", "q2"], op("search")), (["t0", "t1"], op("add"))])
    assert [e for e in events if e[0] != "evict"] == [
        ("search", "q0"), ("encode", "q0"), ("add", "t0"), ("encode", "t0"),  # round 0: op first
        ("encode", "t1"), ("add", "t1"), ("encode", "q1"), ("search", "q1"),  # round 1: rotated
        ("search", "q2"), ("encode", "q2"),  # round 2: add has no third text
    ]  # fmt: skip
    assert events.count(("evict", "q1")) == 1 and events.index(("evict", "q1")) < events.index(
        ("encode", "q1")
    )
    (search_s, encode_s, found), (add_s, _, added) = timings
    assert found == ["search:q0", "search:q1", "search:q2"] and added == ["add:t0", "add:t1"]
    assert len(search_s) == len(encode_s) == 3 and len(add_s) == 2 and min(search_s + add_s) >= 0
