"""Chroma's on-disk layout is the one ``forget``'s purge relies on (``MemoryStore._purge_local``).

The purge reads Chroma's private SQLite schema: it keeps the folders named by an id in the
``segments`` table of ``chroma.sqlite3`` and deletes every other UUID-named folder. If a Chroma
release names its index folders otherwise, or drops or renames that table, the purge would delete
**live** indexes. These tests run against the installed Chroma and fail loudly first; pyproject
caps ``chromadb<2`` for the same reason. Fix on failure: update ``_purge_local`` to the new layout
(or drop the folder sweep and keep only ``VACUUM``) before lifting the cap.
"""

from __future__ import annotations

import sqlite3
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest

from personalign.memory.chroma import _UUID_DIR, MemoryStore

LAYOUT_HINT = "Chroma's on-disk layout changed: forget's purge (memory/chroma.py _purge_local) would delete live indexes"


def _uuid_folders(path: Path) -> set[str]:
    return {p.name for p in path.iterdir() if p.is_dir() and _UUID_DIR.match(p.name)}


def _segments(path: Path) -> dict[str, tuple[str, str]]:
    with sqlite3.connect(path / "chroma.sqlite3") as conn:
        return {
            row[0]: (row[1], row[2]) for row in conn.execute("SELECT id, scope, collection FROM segments")
        }


def test_the_chroma_release_is_under_the_declared_cap():
    major = int(version("chromadb").split(".")[0])
    assert major < 2, (
        f"chromadb {version('chromadb')} is past the cap <2 that pyproject declares; {LAYOUT_HINT}?"
    )


def test_index_folders_are_named_by_the_segments_table(tmp_path):
    import chromadb
    from chromadb.config import Settings

    client = chromadb.PersistentClient(path=str(tmp_path), settings=Settings(anonymized_telemetry=False))
    rng = np.random.default_rng(0)
    for name in ("user-alice", "user-bob"):
        collection = client.get_or_create_collection(
            name, embedding_function=None, configuration={"hnsw": {"space": "cosine"}}
        )
        collection.add(
            ids=[f"{name}-{i}" for i in range(4)],
            embeddings=rng.normal(size=(4, 8)).tolist(),
            documents=["fact"] * 4,
        )
    assert (tmp_path / "chroma.sqlite3").is_file(), LAYOUT_HINT
    try:
        segments = _segments(tmp_path)
    except sqlite3.OperationalError as err:  # no table segments, or no such columns
        pytest.fail(f"{LAYOUT_HINT} ({err})")
    folders = _uuid_folders(tmp_path)
    vector = {sid for sid, (scope, _) in segments.items() if scope == "VECTOR"}
    assert len(folders) == 2, (
        f"{LAYOUT_HINT}: expected one UUID-named index folder per collection, found {sorted(folders)}"
    )
    assert folders <= set(segments), (
        f"{LAYOUT_HINT}: index folders {sorted(folders - set(segments))} are not named by a segment id"
    )
    assert folders == vector, (
        f"{LAYOUT_HINT}: index folders {sorted(folders)} are not the vector segments {sorted(vector)}"
    )
    bob = client.get_collection("user-bob").id
    client.delete_collection("user-bob")
    assert all(str(bob) != c for _, c in _segments(tmp_path).values()), (
        f"{LAYOUT_HINT}: a deleted collection keeps its segments"
    )


def test_forget_purges_only_the_forgotten_users_index(tmp_path, encoder):
    """End to end through ``MemoryStore``: the other user's index folder survives, and their
    memories are still found after the store is reopened."""
    store = MemoryStore(encoder, path=tmp_path)
    store.add("alice", ["I am vegetarian.", "I cook for two."])
    store.add("bob", ["I run marathons.", "I live in Lisbon."])
    before = _uuid_folders(tmp_path)
    assert len(before) == 2, LAYOUT_HINT
    assert store.delete_all("bob") == 2
    after = _uuid_folders(tmp_path)
    assert len(after) == 1 and after < before and after <= set(_segments(tmp_path)), LAYOUT_HINT
    reopened = MemoryStore(encoder, path=tmp_path)
    found = reopened.search("alice", "What do I eat?", top_k=2)["results"]
    assert {r["memory"] for r in found} == {"I am vegetarian.", "I cook for two."}
    assert reopened.count("bob") == 0
