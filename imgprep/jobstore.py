"""Persisted jobs and images: embedded SQLite, one versioned JSON record per job.

Each update is one SQLite transaction (atomic and durable with synchronous=FULL), so
after a crash the record shows exactly which steps started and which finished.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from imgprep import statedir
from imgprep.errors import InvalidInput

# 2: the request stored whole (``request``), the chain in three parts (``always``,
# ``always_results``). Version-1 records are read (``upgrade``) and recovered.
RECORD_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    uuid TEXT PRIMARY KEY,
    vm_uuid TEXT NOT NULL,
    image_uuid TEXT,
    execution TEXT NOT NULL,
    created_at TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_vm ON jobs (vm_uuid);
CREATE TABLE IF NOT EXISTS images (
    uuid TEXT PRIMARY KEY,
    job_uuid TEXT,
    state TEXT NOT NULL,
    manifest TEXT NOT NULL,
    file_path TEXT,
    created_at TEXT NOT NULL
);
"""

Record = dict[str, Any]


def upgrade(record: Record) -> Record:
    """A stored record in the current shape; refuses one newer than this imgprep."""
    version = record.get("v", 1)
    if not isinstance(version, int) or version > RECORD_VERSION:
        raise InvalidInput(
            f"job {record.get('uuid')}: record version {version!r} is newer than this imgprep reads "
            f"({RECORD_VERSION}); use the imgprep that wrote it",
            code="RecordVersion",
        )
    if version == 1:
        params = record.get("params", {})
        # v1 kept neither the script (it is not needed after inject) nor the host-key choice
        record["request"] = {**params, "script": "", "script_is_default": False, "accept_new_host_key": False}
        for key in ("always", "always_results"):
            record.setdefault(key, [])
        record["v"] = RECORD_VERSION
    return record


class JobStore:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / "imgprep.sqlite"
        self._init_lock = threading.Lock()
        files = [self.path.name + suffix for suffix in ("", "-wal", "-shm", "-journal")]
        statedir.secure(state_dir, files)
        try:
            db = sqlite3.connect(self.path, timeout=30)
            try:
                db.executescript(_SCHEMA)
            finally:
                db.close()
        except (OSError, sqlite3.Error) as exc:
            raise InvalidInput(f"state directory {state_dir}: cannot use it: {exc}") from None
        statedir.secure(state_dir, files)  # the database files, whoever created them: 0600

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    # --- jobs -------------------------------------------------------------------

    def save(self, record: Record) -> None:
        """Insert or replace the record (atomically)."""
        record["v"] = RECORD_VERSION
        with self._connect() as db:
            db.execute(
                "INSERT INTO jobs (uuid, vm_uuid, image_uuid, execution, created_at, record)"
                " VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(uuid) DO UPDATE SET execution=excluded.execution,"
                " image_uuid=excluded.image_uuid, record=excluded.record",
                (
                    record["uuid"],
                    record["params"]["vm_uuid"],
                    record["params"].get("image_uuid"),
                    record["execution"],
                    record["created_at"],
                    json.dumps(record, sort_keys=True),
                ),
            )

    def get(self, job_uuid: str) -> Record:
        with self._connect() as db:
            row = db.execute("SELECT record FROM jobs WHERE uuid = ?", (job_uuid,)).fetchone()
        if row is None:
            raise InvalidInput(f"no job {job_uuid}", code="ResourceNotFound")
        return upgrade(json.loads(row[0]))

    def list_jobs(self, vm_uuid: str | None = None) -> list[Record]:
        query = "SELECT record FROM jobs"
        args: tuple[str, ...] = ()
        if vm_uuid is not None:
            query += " WHERE vm_uuid = ?"
            args = (vm_uuid,)
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY created_at", args).fetchall()
        return [upgrade(json.loads(r[0])) for r in rows]

    # --- images -----------------------------------------------------------------

    def save_image(self, image_uuid: str, job_uuid: str, state: str, manifest: Record, file_path: str | None) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT INTO images (uuid, job_uuid, state, manifest, file_path, created_at)"
                " VALUES (?, ?, ?, ?, ?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))"
                " ON CONFLICT(uuid) DO UPDATE SET state=excluded.state,"
                " manifest=excluded.manifest, file_path=excluded.file_path",
                (image_uuid, job_uuid, state, json.dumps(manifest, sort_keys=True), file_path),
            )

    def get_image(self, image_uuid: str) -> tuple[Record, str | None, str]:
        """(manifest, file path, job uuid) of an image."""
        with self._connect() as db:
            row = db.execute(
                "SELECT manifest, file_path, job_uuid FROM images WHERE uuid = ?", (image_uuid,)
            ).fetchone()
        if row is None:
            raise InvalidInput(f"no image {image_uuid}", code="ResourceNotFound")
        return json.loads(row[0]), row[1], row[2]

    def list_images(self) -> list[Record]:
        with self._connect() as db:
            rows = db.execute("SELECT manifest FROM images ORDER BY created_at").fetchall()
        return [json.loads(r[0]) for r in rows]

    def delete_image(self, image_uuid: str) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM images WHERE uuid = ?", (image_uuid,))
