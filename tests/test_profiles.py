"""ProfileStore: atomic read-modify-write under a lock, all-or-nothing updates, deletion, typed errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from personalign import artefacts
from personalign.artefacts import atomic_save_safetensors, atomic_write_bytes, atomic_write_json
from personalign.errors import PersonalignError, UnknownUserError, ValidationError
from personalign.memory.profiles import PROFILE_FILE, ProfileStore
from personalign.types import Comparison, UserProfile

PAIR = Comparison(prompt="How do I boil an egg?", chosen="Nine minutes.", rejected="It depends.")


def _add_pair(profile: UserProfile) -> UserProfile:
    profile.comparisons.append(PAIR)
    return profile


def _visible(folder):
    return sorted(p.name for p in folder.iterdir())


def test_update_creates_then_changes(tmp_path):
    store = ProfileStore(tmp_path)
    assert not store.exists("alice")
    first = store.update("alice", _add_pair)
    assert first.version == 1 and first.comparisons == [PAIR]
    second = store.update("alice", _add_pair)
    assert second.version == 2 and second.comparisons == [PAIR, PAIR]
    assert second.updated_at >= first.updated_at and second.created_at == first.created_at
    loaded = store.get("alice")
    assert loaded == second
    on_disk = json.loads((tmp_path / "users" / "alice" / PROFILE_FILE).read_text(encoding="utf-8"))
    assert on_disk["version"] == 2 and len(on_disk["comparisons"]) == 2
    assert store.list_users() == ["alice"]


def test_change_gets_a_copy(tmp_path):
    store = ProfileStore(tmp_path)
    store.update("alice", _add_pair)
    seen = []

    def mutate_then_fail(profile: UserProfile) -> UserProfile:
        profile.comparisons.clear()
        profile.settings["x"] = 1
        seen.append(profile)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        store.update("alice", mutate_then_fail)
    assert seen and store.get("alice").comparisons == [PAIR] and store.get("alice").settings == {}


def test_failing_change_leaves_stored_profile_untouched(tmp_path):
    store = ProfileStore(tmp_path)
    store.update("alice", _add_pair)
    path = tmp_path / "users" / "alice" / PROFILE_FILE
    before = path.read_bytes()

    def fail(profile: UserProfile) -> UserProfile:
        profile.comparisons.append(PAIR)
        raise ValueError("the change failed")

    with pytest.raises(ValueError, match="the change failed"):
        store.update("alice", fail)
    assert path.read_bytes() == before
    assert store.get("alice").version == 1
    assert _visible(path.parent) == [PROFILE_FILE]  # no temp file left behind


def test_failing_change_for_new_user_creates_nothing(tmp_path):
    store = ProfileStore(tmp_path)

    def fail(profile: UserProfile) -> UserProfile:
        raise KeyError("nope")

    with pytest.raises(KeyError):
        store.update("bob", fail)
    assert not store.exists("bob")
    assert not (tmp_path / "users" / "bob").exists()
    assert store.list_users() == []


def test_unknown_users(tmp_path):
    store = ProfileStore(tmp_path)
    with pytest.raises(UnknownUserError) as info:
        store.get("ghost")
    err = info.value
    assert isinstance(err, KeyError) and isinstance(err, PersonalignError)
    assert err.user_id == "ghost" and "'ghost' is not enrolled" in str(err) and "Fix:" in str(err)
    with pytest.raises(KeyError):
        store.update("ghost", _add_pair, create=False)
    assert not store.exists("ghost")
    assert store.delete("ghost") is False


def test_delete_removes_the_folder(tmp_path):
    store = ProfileStore(tmp_path)
    store.update("alice", _add_pair)
    store.update("bob", _add_pair)
    artefact = store.user_dir("alice") / "adapter" / "adapter_model.safetensors"
    artefact.parent.mkdir(parents=True)
    artefact.write_bytes(b"weights")
    assert store.delete("alice") is True
    assert not (tmp_path / "users" / "alice").exists()
    assert _visible(tmp_path / "users") == ["bob"]  # nothing half-deleted left beside it
    assert store.list_users() == ["bob"]
    with pytest.raises(UnknownUserError):
        store.get("alice")
    assert store.delete("alice") is False


@pytest.mark.parametrize("user", ["../outside", "a/b", "..", ""])
def test_user_ids_never_act_as_paths(tmp_path, user):
    store = ProfileStore(tmp_path / "store")
    with pytest.raises(ValidationError):
        store.update(user, _add_pair)
    with pytest.raises(ValidationError):
        store.delete(user)
    assert not (tmp_path / "outside").exists()
    assert list((tmp_path / "store" / "users").iterdir()) == []


def test_atomic_write_leaves_no_temp_files(tmp_path):
    target = tmp_path / "deep" / "file.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert _visible(target.parent) == ["file.bin"]
    atomic_write_json(tmp_path / "x.json", {"a": "☃"})
    assert json.loads((tmp_path / "x.json").read_text(encoding="utf-8")) == {"a": "☃"}


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    atomic_write_bytes(target, b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(artefacts.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert _visible(tmp_path) == ["file.bin"]


def test_atomic_safetensors_failure_keeps_old_file(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    target = tmp_path / "w.safetensors"
    atomic_save_safetensors(target, {"w": torch.ones(2)}, {"k": "v"})
    monkeypatch.setattr(artefacts.os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        atomic_save_safetensors(target, {"w": torch.zeros(2)})
    assert torch.equal(load_file(str(target))["w"], torch.ones(2))
    assert _visible(tmp_path) == ["w.safetensors"]


def test_concurrent_thread_updates_lose_nothing(tmp_path):
    # Two store objects on one directory (separate locks objects, one lock file), four threads each.
    stores = [ProfileStore(tmp_path), ProfileStore(tmp_path)]
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(n: int) -> None:
        try:
            start.wait()
            for i in range(10):

                def append(profile: UserProfile, item: str = f"{n}-{i}") -> UserProfile:
                    profile.settings.setdefault("items", []).append(item)
                    return profile

                stores[n % 2].update("alice", append)
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    profile = ProfileStore(tmp_path).get("alice")
    assert sorted(profile.settings["items"]) == sorted(f"{n}-{i}" for n in range(8) for i in range(10))
    assert profile.version == 80
    assert _visible(tmp_path / "users" / "alice") == [PROFILE_FILE]


WRITER = textwrap.dedent(
    """
    import sys
    from personalign.memory.profiles import ProfileStore

    root, tag = sys.argv[1:3]
    store = ProfileStore(root)
    for i in range(15):
        store.update("alice", lambda p, i=i: (p.settings.setdefault("items", []).append(f"{tag}-{i}"), p)[1])
    """
)


def test_concurrent_process_updates_lose_nothing(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), tag], env=env) for tag in ("p", "q")
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    profile = ProfileStore(tmp_path).get("alice")
    assert sorted(profile.settings["items"]) == sorted(f"{t}-{i}" for t in ("p", "q") for i in range(15))
    assert profile.version == 30
