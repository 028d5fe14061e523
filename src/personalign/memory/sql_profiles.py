"""The profile store in a SQL database (SQLite in WAL mode, or PostgreSQL), for several worker processes.

Same interface as :class:`~personalign.memory.profiles.ProfileStore`. One row per user in the
table ``personalign_profiles``: ``user_id`` (primary key), ``version`` (the profile's version,
one more on every update), ``updated_at`` and ``document`` (the profile as a JSON document).
The users' artefact folders (adapters) stay on the filesystem under ``<store>/users/<id>/``,
which several hosts must then share.

Every update is a read-modify-write inside one transaction that holds the user's row:

- SQLite: ``BEGIN IMMEDIATE`` takes the database's write lock before the read (WAL mode, so
  readers never wait for it), ``busy_timeout`` makes other writers queue for it;
- PostgreSQL: the row is read ``FOR UPDATE``; a new user's row is first inserted empty with
  ``ON CONFLICT DO NOTHING``, so two workers creating the same user queue on one row too.

No concurrent update is lost, and if ``change`` raises the transaction rolls back: nothing is written.
A commit is durable before ``update`` returns (SQLite ``synchronous=FULL``), so a worker killed
after answering loses nothing it acknowledged.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from personalign.errors import UnknownUserError, ValidationError
from personalign.memory.profiles import PROFILE_FILE, changed
from personalign.types import UserProfile, validate_user_id

TABLE = "personalign_profiles"
BUSY_TIMEOUT_MS = 60_000  # how long a SQLite writer queues for the write lock before failing
_WRITE = "personalign_write"  # execution option: this transaction writes (SQLite: BEGIN IMMEDIATE)
_CREATE_LOCK = 0x7065727301  # PostgreSQL advisory lock key held while creating the table
URL_FIX = "pass sqlite:///path/to/profiles.db or postgresql://user:password@host:5432/dbname"


def shown(url: str) -> str:
    """``url`` with its password masked, for messages and logs."""
    return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", url)


def sql_url(url: str) -> Any:
    """The SQLAlchemy URL for a ``profiles_url``: ``sqlite:///file.db`` or ``postgresql://...``
    (driven by psycopg 3); anything else is a ``ValidationError`` naming ``profiles_url``."""
    from sqlalchemy.engine import make_url  # SqlProfileStore names the extra when it is missing
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValidationError("profiles_url", "is not a database URL", URL_FIX, shown(url)) from None
    if parsed.drivername == "postgres":  # the scheme many hosting providers hand out
        parsed = parsed.set(drivername="postgresql")
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise ValidationError(
                "profiles_url",
                "names no database file (an in-memory database is private to one connection)",
                URL_FIX,
                url,
            )
        return parsed
    if backend == "postgresql":
        return parsed.set(drivername="postgresql+psycopg") if parsed.drivername == "postgresql" else parsed
    raise ValidationError("profiles_url", f"has an unsupported database {backend!r}", URL_FIX, shown(url))


def _engine(url: Any) -> Any:
    """An engine for ``url``; for SQLite, with WAL mode, a busy timeout and ``BEGIN IMMEDIATE`` writes."""
    from sqlalchemy import create_engine, event

    if url.get_backend_name() != "sqlite":
        try:
            return create_engine(url, pool_pre_ping=True)
        except ModuleNotFoundError as err:
            raise ValidationError(
                "profiles_url",
                f"needs the database driver {err.name}, which is not installed",
                "pip install 'personalign[postgres]'",
                url.render_as_string(hide_password=True),
            ) from None
    Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    # Writers queue inside SQLite (busy_timeout) holding a connection each: enough connections that
    # a queue of writers never leaves a server's request threads waiting on the pool instead.
    engine = create_engine(
        url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000}, pool_size=16, max_overflow=48
    )

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves (pysqlite's own is DEFERRED)
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")

    return engine


class SqlProfileStore:
    """Users' comparisons and settings in a SQL database; safe for several processes and hosts.

    ``url``: ``sqlite:///path.db`` (one host; WAL mode) or ``postgresql://...`` (several hosts).
    ``root``: the store directory; users' artefact folders live under ``root/users/<id>/``.
    Profiles already in ``root/users/<id>/profile.json`` (the JSON store) are imported on open
    once (:meth:`import_json_profiles`).
    """

    def __init__(self, url: str, root: str | Path) -> None:
        try:
            import sqlalchemy as sa
        except ModuleNotFoundError:
            raise ValidationError(
                "profiles_url",
                "needs SQLAlchemy, which is not installed",
                "pip install 'personalign[serve]' (PostgreSQL: 'personalign[postgres]')",
                shown(url),
            ) from None

        self.url = sql_url(url)
        self.root = Path(root)
        self.users_dir = self.root / "users"
        self.users_dir.mkdir(parents=True, exist_ok=True)
        self.dialect = self.url.get_backend_name()
        self._engine = _engine(self.url)
        self._writer = self._engine.execution_options(**{_WRITE: True})
        meta = sa.MetaData()
        self.table = sa.Table(
            TABLE,
            meta,
            sa.Column("user_id", sa.String(128), primary_key=True),
            sa.Column("version", sa.Integer, nullable=False),
            sa.Column("updated_at", sa.Float, nullable=False),
            # SQL NULL (not JSON null): a row reserved by an update in flight, never seen committed
            sa.Column("document", sa.JSON(none_as_null=True), nullable=True),
        )
        try:
            with self._writer.begin() as conn:
                if self.dialect == "postgresql":  # two workers creating the table at once would collide
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _CREATE_LOCK})
                meta.create_all(conn)
        except sa.exc.OperationalError as err:
            self._engine.dispose()
            raise ValidationError(
                "profiles_url",
                f"cannot be opened ({str(err.orig).strip().splitlines()[0]})",
                "check that the database server runs and the URL's host, port, user, password and database "
                "name (for SQLite: that the folder is writable)",
                self.url.render_as_string(hide_password=True),
            ) from None
        self.import_json_profiles()

    # --- reads -----------------------------------------------------------------------------

    def user_dir(self, user_id: str) -> Path:
        return self.users_dir / validate_user_id(user_id)

    def _document(self, conn: Any, user_id: str, lock: bool = False) -> dict[str, Any] | None:
        query = self.table.select().where(self.table.c.user_id == validate_user_id(user_id))
        if lock and self.dialect == "postgresql":
            query = query.with_for_update()
        row = conn.execute(query).first()
        return None if row is None else row.document

    def exists(self, user_id: str) -> bool:
        import sqlalchemy as sa

        query = sa.select(self.table.c.user_id).where(
            self.table.c.user_id == validate_user_id(user_id), self.table.c.document.is_not(None)
        )
        with self._engine.connect() as conn:
            return conn.execute(query).first() is not None

    def get(self, user_id: str) -> UserProfile:
        with self._engine.connect() as conn:
            document = self._document(conn, user_id)
        if document is None:
            raise UnknownUserError(user_id)
        return UserProfile.model_validate(document)

    def list_users(self) -> list[str]:
        import sqlalchemy as sa

        query = sa.select(self.table.c.user_id).where(self.table.c.document.is_not(None))
        with self._engine.connect() as conn:
            return sorted(conn.execute(query).scalars())

    # --- writes ----------------------------------------------------------------------------

    def _reserve(self, conn: Any, user_id: str) -> None:
        """Insert an empty row for ``user_id`` unless one exists (PostgreSQL: the row to lock)."""
        from sqlalchemy.dialects.postgresql import insert

        row = {"user_id": user_id, "version": 0, "updated_at": time.time(), "document": None}
        conn.execute(insert(self.table).values(**row).on_conflict_do_nothing(index_elements=["user_id"]))

    def update(
        self, user_id: str, change: Callable[[UserProfile], UserProfile], create: bool = True
    ) -> UserProfile:
        """Apply ``change`` to the stored profile (a new one if absent and ``create``) and persist it.

        If ``change`` raises, nothing is written. Concurrent updates of one user queue on the
        user's row (PostgreSQL) or the database's write lock (SQLite); none is lost.
        """
        validate_user_id(user_id)
        with self._writer.begin() as conn:
            if create and self.dialect == "postgresql":
                self._reserve(conn, user_id)
            document = self._document(conn, user_id, lock=True)
            stored = UserProfile.model_validate(document) if document is not None else None
            updated = changed(stored, user_id, change, create)
            self._write(conn, updated, exists=document is not None or self.dialect == "postgresql")
            return updated

    def _write(self, conn: Any, profile: UserProfile, exists: bool) -> None:
        values = {
            "version": profile.version,
            "updated_at": profile.updated_at,
            "document": profile.model_dump(mode="json"),
        }
        if exists:
            conn.execute(self.table.update().where(self.table.c.user_id == profile.user_id).values(**values))
        else:
            conn.execute(self.table.insert().values(user_id=profile.user_id, **values))

    def delete(self, user_id: str) -> bool:
        """Remove the user's row and folder (every derived artefact). True if either existed."""
        folder = self.user_dir(user_id)
        with self._writer.begin() as conn:
            removed = conn.execute(self.table.delete().where(self.table.c.user_id == user_id)).rowcount > 0
        if folder.exists():
            # Rename first so a crash mid-delete never leaves a half-removed but valid-looking folder.
            doomed = folder.with_name(f".deleting-{folder.name}-{time.time_ns()}")
            try:
                folder.rename(doomed)
            except FileNotFoundError:  # another worker removed it first
                return removed
            shutil.rmtree(doomed, ignore_errors=True)
            return True
        return removed

    def import_json_profiles(self) -> list[str]:
        """Import ``users/<id>/profile.json`` files of users the database does not have yet (a store
        that used the JSON profile store); each imported file is renamed ``profile.json.imported``
        so that it is not mistaken for the live profile. Returns the imported ids."""
        imported = []
        for path in sorted(self.users_dir.glob(f"*/{PROFILE_FILE}")):
            if path.parent.name.startswith("."):
                continue
            profile = UserProfile.model_validate(json.loads(path.read_text(encoding="utf-8")))
            with self._writer.begin() as conn:
                if self.dialect == "postgresql":
                    self._reserve(conn, profile.user_id)
                if self._document(conn, profile.user_id, lock=True) is None:
                    self._write(conn, profile, exists=self.dialect == "postgresql")
                    imported.append(profile.user_id)
            try:
                path.rename(path.with_name(PROFILE_FILE + ".imported"))
            except FileNotFoundError:  # another worker imported it at the same time
                pass
        return imported

    def close(self) -> None:
        self._engine.dispose()
