"""Schema migrations, written once in SQL that SQLite and PostgreSQL both accept.

Each migration is a numbered list of statements applied in one transaction; the applied
versions are recorded in `schema_migrations`. Append new migrations; never edit applied ones.
Types are chosen to mean the same in both: TEXT, BIGINT, INTEGER (0/1 booleans),
DOUBLE PRECISION (UNIX timestamps in seconds).
"""

from __future__ import annotations

import time

from common.db import Database

Statement = str | dict[str, str]  # one SQL for both, or {dialect: SQL} where they differ

MIGRATIONS: list[tuple[int, list[Statement]]] = [
    (
        1,
        [
            """CREATE TABLE hosts (
                uuid TEXT PRIMARY KEY,
                name_label TEXT NOT NULL,
                address TEXT NOT NULL,
                heartbeat DOUBLE PRECISION NOT NULL,
                created DOUBLE PRECISION NOT NULL)""",
            """CREATE TABLE srs (
                uuid TEXT PRIMARY KEY,
                ref TEXT NOT NULL UNIQUE,
                name_label TEXT NOT NULL,
                type TEXT NOT NULL,
                shared INTEGER NOT NULL DEFAULT 0,
                host TEXT,
                path TEXT NOT NULL,
                supported_image_formats TEXT NOT NULL,
                default_image_format TEXT NOT NULL,
                created DOUBLE PRECISION NOT NULL)""",
            """CREATE TABLE vdis (
                uuid TEXT PRIMARY KEY,
                ref TEXT NOT NULL UNIQUE,
                name_label TEXT NOT NULL,
                sr TEXT NOT NULL REFERENCES srs(uuid),
                virtual_size BIGINT NOT NULL,
                image_format TEXT NOT NULL,
                read_only INTEGER NOT NULL DEFAULT 0,
                is_a_snapshot INTEGER NOT NULL DEFAULT 0,
                snapshot_of TEXT,
                parent TEXT,
                path TEXT NOT NULL,
                generation BIGINT NOT NULL DEFAULT 0,
                locked_by TEXT,
                created DOUBLE PRECISION NOT NULL)""",
            "CREATE INDEX vdis_sr ON vdis(sr)",
            """CREATE TABLE tasks (
                uuid TEXT PRIMARY KEY,
                ref TEXT NOT NULL UNIQUE,
                name_label TEXT NOT NULL,
                status TEXT NOT NULL,
                progress DOUBLE PRECISION NOT NULL DEFAULT 0,
                created DOUBLE PRECISION NOT NULL,
                finished DOUBLE PRECISION,
                result TEXT,
                error_info TEXT NOT NULL DEFAULT '[]',
                bytes_transferred BIGINT NOT NULL DEFAULT 0,
                owner TEXT,
                host TEXT,
                vdi TEXT,
                running INTEGER NOT NULL DEFAULT 0)""",
            "CREATE INDEX tasks_status ON tasks(status, finished)",
            """CREATE TABLE users (
                username TEXT PRIMARY KEY,
                password_hash TEXT NOT NULL,
                role TEXT NOT NULL,
                created DOUBLE PRECISION NOT NULL)""",
            """CREATE TABLE revoked_sessions (
                jti TEXT PRIMARY KEY,
                expires DOUBLE PRECISION NOT NULL)""",
        ],
    ),
    (
        2,
        [
            # A VDI deleted while others still read through its file: kept as a hidden
            # layer of their chains until the last of them is gone.
            "ALTER TABLE vdis ADD COLUMN hidden INTEGER NOT NULL DEFAULT 0",
            "CREATE INDEX vdis_parent ON vdis(parent)",
        ],
    ),
    (
        3,
        [
            # Resumable uploads: the import's task is the upload resource. upload_offset is
            # the number of stream bytes that are durable; the decoder's state at that
            # offset is saved beside the VDI (see transfer/checkpoints.py).
            "ALTER TABLE tasks ADD COLUMN resumable INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE tasks ADD COLUMN upload_offset BIGINT NOT NULL DEFAULT 0",
            "ALTER TABLE tasks ADD COLUMN upload_length BIGINT",
            "ALTER TABLE tasks ADD COLUMN upload_format TEXT",
            "ALTER TABLE tasks ADD COLUMN upload_chunked INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE tasks ADD COLUMN last_activity DOUBLE PRECISION",
        ],
    ),
    (
        4,
        [
            # Pool-wide settings, e.g. the session signing secret every host must share.
            "CREATE TABLE pool_settings (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
        ],
    ),
    (
        5,
        [
            # Exports reading a VDI, on any host: a writer on another host of the pool
            # must wait for them (the writer's own lock is vdis.locked_by). A lease of a
            # host without a heartbeat no longer counts; a host drops its own at start.
            """CREATE TABLE vdi_readers (
                id TEXT PRIMARY KEY,
                vdi TEXT NOT NULL,
                host TEXT NOT NULL,
                started DOUBLE PRECISION NOT NULL)""",
            "CREATE INDEX vdi_readers_vdi ON vdi_readers(vdi)",
            # What the owning host last measured, for hosts that cannot see its disks.
            "ALTER TABLE vdis ADD COLUMN physical_utilisation BIGINT",
            "ALTER TABLE srs ADD COLUMN physical_size BIGINT",
            # Each host looks for cancels of the transfers it runs.
            "CREATE INDEX tasks_host ON tasks(host, running)",
        ],
    ),
    (
        6,
        [
            # The XenAPI event log (transfer/events.py): one row per change of a record
            # that event.from reports; ids grow in commit order (see EventLog.record).
            {
                "sqlite": """CREATE TABLE events (
                    id INTEGER PRIMARY KEY AUTOINCREMENT,
                    class TEXT NOT NULL,
                    uuid TEXT NOT NULL,
                    ref TEXT,
                    operation TEXT NOT NULL,
                    created DOUBLE PRECISION NOT NULL)""",
                "postgresql": """CREATE TABLE events (
                    id BIGSERIAL PRIMARY KEY,
                    class TEXT NOT NULL,
                    uuid TEXT NOT NULL,
                    ref TEXT,
                    operation TEXT NOT NULL,
                    created DOUBLE PRECISION NOT NULL)""",
            },
            "CREATE INDEX events_created ON events(created)",
            # Hosts get an OpaqueRef like every other XenAPI object (set at registration).
            "ALTER TABLE hosts ADD COLUMN ref TEXT",
        ],
    ),
    (
        7,
        [
            # Changed block tracking (transfer/cbt.py): tracking on for this (writable) VDI;
            # the version whose epoch precedes this one's; this epoch's log is complete.
            "ALTER TABLE vdis ADD COLUMN cbt_enabled INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE vdis ADD COLUMN cbt_prev TEXT",
            "ALTER TABLE vdis ADD COLUMN cbt_complete INTEGER NOT NULL DEFAULT 0",
        ],
    ),
    (
        8,
        [
            # VDI.data_destroy: the snapshot's data is gone, its record and change log stay
            # (type cbt_metadata), as a base for incremental exports and changed blocks.
            "ALTER TABLE vdis ADD COLUMN data_destroyed INTEGER NOT NULL DEFAULT 0",
        ],
    ),
    (
        9,
        [
            # Coalescing (transfer/coalesce.py): set on a layer while its merge with its only
            # child is switching files, so a restart finishes or undoes the switch.
            "ALTER TABLE vdis ADD COLUMN merging_into TEXT",
        ],
    ),
    (
        10,
        [
            # An upload sent as parts over several connections (transfer/parts.py): how many
            # parts it has, and those durable so far (a JSON list of their numbers).
            "ALTER TABLE tasks ADD COLUMN upload_parts INTEGER",
            "ALTER TABLE tasks ADD COLUMN upload_parts_done TEXT",
        ],
    ),
]


async def migrate(db: Database) -> int:
    """Apply the migrations this database lacks; return the schema version now in force."""
    await db.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        "version INTEGER PRIMARY KEY, applied DOUBLE PRECISION NOT NULL)"
    )
    current = 0
    for version, statements in MIGRATIONS:
        async with db.transaction() as tx:
            if db.dialect == "postgresql":
                # Hosts of a pool may start together: one migrates, the others wait.
                await tx.execute("SELECT pg_advisory_xact_lock(7230951)")
            # Re-checked inside the transaction: another host or CLI may have just applied it.
            if await tx.fetchone("SELECT 1 FROM schema_migrations WHERE version = ?", version):
                current = version
                continue
            for statement in statements:
                sql = statement if isinstance(statement, str) else statement[db.dialect]
                await tx.execute(sql)
            await tx.execute(
                "INSERT INTO schema_migrations (version, applied) VALUES (?, ?)",
                version,
                time.time(),
            )
            current = version
    return current
