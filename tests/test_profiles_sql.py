"""SqlProfileStore on SQLite (WAL) and on a real PostgreSQL server: the ProfileStore contract,
concurrent updates from several processes with no update lost, JSON profiles imported, typed errors."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
from pathlib import Path

import pytest

from personalign.errors import StoreLockedError, UnknownUserError, ValidationError
from personalign.memory.profiles import PROFILE_FILE, ProfileStore, open_profiles
from personalign.memory.sql_profiles import SqlProfileStore
from personalign.server.run import bound_socket
from personalign.types import Comparison, UserProfile
from postgres_server import postgres_url  # noqa: F401 (a fixture)

PAIR = Comparison(prompt="How do I boil an egg?", chosen="Nine minutes.", rejected="It depends.")
PROCESSES, UPDATES = 4, 25


def _add_pair(profile: UserProfile) -> UserProfile:
    profile.comparisons.append(PAIR)
    return profile


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'profiles.db'}"
    server = request.getfixturevalue("postgres_url")
    database = f"t{abs(hash(str(tmp_path))) % 10**9}"  # a fresh database per test on the module's server
    import psycopg

    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {database}")
    return server.rsplit("/", 1)[0] + f"/{database}"


@pytest.fixture()
def store(url, tmp_path):
    opened = SqlProfileStore(url, tmp_path / "store")
    yield opened
    opened.close()


# --- the ProfileStore contract -------------------------------------------------------------------


def test_update_creates_then_changes(store):
    assert not store.exists("alice") and store.list_users() == []
    first = store.update("alice", _add_pair)
    assert first.version == 1 and first.comparisons == [PAIR]
    second = store.update("alice", _add_pair)
    assert second.version == 2 and second.comparisons == [PAIR, PAIR]
    assert second.created_at == first.created_at and second.updated_at >= first.updated_at
    assert store.get("alice") == second and store.exists("alice")
    assert store.list_users() == ["alice"]
    assert store.user_dir("alice") == store.root / "users" / "alice"


def test_a_change_that_raises_writes_nothing(store):
    def fail(profile: UserProfile) -> UserProfile:
        profile.comparisons.clear()
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        store.update("newcomer", fail)  # not created
    assert not store.exists("newcomer") and store.list_users() == []
    store.update("alice", _add_pair)
    with pytest.raises(RuntimeError):
        store.update("alice", fail)
    assert store.get("alice").comparisons == [PAIR] and store.get("alice").version == 1


def test_unknown_users_and_bad_ids(store):
    with pytest.raises(UnknownUserError):
        store.get("ghost")
    with pytest.raises(UnknownUserError):
        store.update("ghost", _add_pair, create=False)
    assert not store.exists("ghost") and store.delete("ghost") is False
    with pytest.raises(ValidationError, match="user: contains"):
        store.update("../escape", _add_pair)


def test_delete_removes_the_row_and_the_artefact_folder(store):
    store.update("alice", _add_pair)
    (store.user_dir("alice") / "adapter").mkdir(parents=True)
    (store.user_dir("alice") / "adapter" / "w.bin").write_bytes(b"x")
    store.update("bob", _add_pair)
    assert store.delete("alice") is True
    assert not store.exists("alice") and not store.user_dir("alice").exists()
    assert store.list_users() == ["bob"] and list(store.users_dir.iterdir()) == []
    assert store.update("alice", _add_pair).version == 1  # a new user, from scratch


def test_same_answers_as_the_json_store(store, tmp_path):
    json_store = ProfileStore(tmp_path / "json")
    for target in (store, json_store):
        target.update("alice", _add_pair)
        target.update("bob", lambda p: p)
        target.update("alice", lambda p: (p.settings.update(steer={"verbosity": -1.0}), p)[1])
        target.delete("bob")
    sql, plain = store.get("alice"), json_store.get("alice")
    assert sql.model_dump(exclude={"created_at", "updated_at"}) == plain.model_dump(
        exclude={"created_at", "updated_at"}
    )
    assert store.list_users() == json_store.list_users() == ["alice"]


# --- several processes ---------------------------------------------------------------------------


def _writer(url: str, root: str, tag: int) -> None:
    """One process's updates: UPDATES appends to a shared user, to a user all create at once, and to its own."""
    store = SqlProfileStore(url, root)
    for i in range(UPDATES):
        for user in ("shared", f"own{tag}", *(("racing",) if i == 0 else ())):

            def append(profile: UserProfile, item: str = f"{tag}-{i}") -> UserProfile:
                profile.settings.setdefault("items", []).append(item)
                return profile

            store.update(user, append)
    store.close()


def test_concurrent_updates_from_processes_lose_nothing(url, tmp_path):
    root = tmp_path / "store"
    SqlProfileStore(url, root).close()  # the table exists before the race (the workers would queue on it too)
    spawn = multiprocessing.get_context("spawn")
    workers = [spawn.Process(target=_writer, args=(url, str(root), t)) for t in range(PROCESSES)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [w.exitcode for w in workers] == [0] * PROCESSES
    store = SqlProfileStore(url, root)
    shared = store.get("shared")
    expected = [f"{t}-{i}" for t in range(PROCESSES) for i in range(UPDATES)]
    # Every acknowledged update is there exactly once: none lost, none applied twice.
    assert sorted(shared.settings["items"]) == sorted(expected) and shared.version == PROCESSES * UPDATES
    racing = store.get("racing")
    assert (
        sorted(racing.settings["items"]) == [f"{t}-0" for t in range(PROCESSES)]
        and racing.version == PROCESSES
    )
    for t in range(PROCESSES):
        assert store.get(f"own{t}").settings["items"] == [f"{t}-{i}" for i in range(UPDATES)]
    assert store.list_users() == sorted(["racing", "shared", *(f"own{t}" for t in range(PROCESSES))])


# --- opening -------------------------------------------------------------------------------------


def test_sqlite_runs_in_wal_mode(tmp_path):
    SqlProfileStore(f"sqlite:///{tmp_path / 'p.db'}", tmp_path).update("alice", _add_pair)
    with sqlite3.connect(tmp_path / "p.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_json_profiles_are_imported_once(url, tmp_path):
    root = tmp_path / "store"
    old = ProfileStore(root)
    old.update("alice", _add_pair)
    old.update("alice", _add_pair)
    (old.user_dir("alice") / "adapter").mkdir()
    store = open_profiles(root, url)
    assert (
        store.get("alice").version == 2
        and store.get("alice").comparisons == [PAIR, PAIR]
        and store.list_users() == ["alice"]
    )
    folder = root / "users" / "alice"
    assert not (folder / PROFILE_FILE).exists() and (folder / "adapter").is_dir()
    assert json.loads((folder / f"{PROFILE_FILE}.imported").read_text())["version"] == 2
    store.update("alice", _add_pair)
    store.close()
    assert SqlProfileStore(url, root).get("alice").version == 3  # reopening imports nothing again


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ("mysql://u:secret@host/db", "unsupported database 'mysql'"),
        ("sqlite://", "names no database file"),
        ("not a url", "is not a database URL"),
    ],
)
def test_bad_urls_name_the_field_and_the_fix(bad, problem, tmp_path):
    with pytest.raises(ValidationError, match="profiles_url") as err:
        SqlProfileStore(bad, tmp_path)
    assert problem in str(err.value) and "Fix: pass sqlite:///" in str(err.value)
    assert "secret" not in str(err.value)


def test_a_sql_store_with_embedded_chroma_is_still_one_process(encoder, tmp_path):
    from personalign.memory.store import UserStore

    url = f"sqlite:///{tmp_path / 'p.db'}"
    with UserStore(tmp_path / "store", encoder, profiles_url=url) as first:
        assert not first.shared
        first.profiles.update("alice", _add_pair)
        with pytest.raises(StoreLockedError):
            UserStore(tmp_path / "store", encoder, profiles_url=url)
    assert isinstance(first.profiles, SqlProfileStore) and Path(tmp_path / "p.db").is_file()


def test_an_unreachable_database_names_the_field_and_hides_the_password(tmp_path):
    with bound_socket() as sock:  # a port nothing listens on once it is closed
        port = sock.getsockname()[1]
    with pytest.raises(ValidationError, match="profiles_url: cannot be opened") as err:
        SqlProfileStore(f"postgres://me:secret@127.0.0.1:{port}/db", tmp_path)  # postgres:// is accepted
    assert "secret" not in str(err.value) and "Fix: check that the database server runs" in str(err.value)


def test_the_profile_command_reads_the_database(url, tmp_path):
    """`personalign profile --profiles-url` prints a profile kept in the database (the JSON files of
    an imported store are renamed, so reading them would find no user)."""
    from typer.testing import CliRunner

    from personalign.cli import app

    root = tmp_path / "store"
    ProfileStore(root).update("alice", _add_pair)
    store = SqlProfileStore(url, root)  # imports alice
    store.update("alice", _add_pair)
    store.close()
    common = ["--store", str(root), "--profiles-url", url]
    out = CliRunner().invoke(app, ["profile", "--user", "alice", *common])
    assert out.exit_code == 0, out.output
    shown = json.loads(out.output)
    assert shown["user_id"] == "alice" and shown["version"] == 2 and len(shown["comparisons"]) == 2
    out = CliRunner().invoke(app, ["profile", "--user", "bob", *common])
    assert out.exit_code == 1 and "not enrolled" in out.output
    out = CliRunner().invoke(app, ["profile", "--user", "alice", "--store", str(root)])  # the JSON files
    assert out.exit_code == 1 and "not enrolled" in out.output


def test_the_profile_command_refuses_a_missing_sqlite_file(tmp_path):
    from typer.testing import CliRunner

    from personalign.cli import app

    (tmp_path / "store" / "users").mkdir(parents=True)
    missing = f"sqlite:///{tmp_path / 'nope.db'}"
    out = CliRunner().invoke(
        app, ["profile", "-u", "alice", "--store", str(tmp_path / "store"), "--profiles-url", missing]
    )
    assert out.exit_code == 2 and "--profiles-url: names a SQLite file that does not exist" in out.output
    assert not (tmp_path / "nope.db").exists()
