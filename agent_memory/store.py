"""The durable queue: one SQLite file (WAL) with items, feeds, bakes and probe results.

The daemon is the only writer; the CLI opens the file read-only. Every write method commits
before it returns, so an acknowledgement sent after it means the row is on disk
(`synchronous = FULL`: it survives a power cut too, not only a killed process).

Schema changes are ordered migration functions in `MIGRATIONS`; `PRAGMA user_version` holds how
many have run (the schema version). Add a function at the end, never edit one that shipped.

Item and bake statuses, and item kinds: records.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

from sqlite_utils import Database

from .errors import ConflictError, NotFound, UserError
from .records import PASSED, RETRYABLE, UNFINISHED_BAKE_STATES, BakeStatus, ItemKind, ItemStatus
from .versions import EMPTY_VERSION, Version


_UNFINISHED_BAKE_SQL = f"status in ({', '.join('?' * len(UNFINISHED_BAKE_STATES))})"
BUSY_TIMEOUT_S = 10.0
MAX_SQLITE_INT = 2**63 - 1

# Columns a caller may set when adding an item (the rest are the store's own bookkeeping).
ITEM_FIELDS = {
    "title", "source", "source_ref", "feed_id", "messages", "published_at", "valid_at",
    "parent_id", "supersedes", "truncated", "truncated_reason", "status", "status_reason",
}
FEED_FIELDS = {
    "title", "interval_s", "etag", "last_modified", "next_poll_at", "failures", "backoff_s",
    "last_error", "last_polled_at", "last_ok_at", "enabled", "origin",
}
BAKE_FIELDS = {
    "version", "status", "started_at", "finished_at", "item_ids", "config", "metrics",
    "verdict", "reason", "delta_path", "adapter_path",
}
JSON_COLUMNS = {"messages", "item_ids", "config", "metrics"}


def utcnow() -> str:
    """Timestamps are ISO 8601 UTC strings of one fixed shape, so they sort and compare as text."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def content_hash(kind: str, text: str) -> str:
    """Hash of what an item says: case and whitespace do not make a new item."""
    normal = " ".join(text.split()).casefold()
    return hashlib.sha256(f"{kind}\n{normal}".encode()).hexdigest()


# --- migrations --------------------------------------------------------------------------


def _migration_1_initial(db: Database) -> None:
    db["items"].create(
        {
            "id": int, "kind": str, "text": str, "title": str,
            "source": str,  # who sent it: feed title, agent name, "cli"
            "source_ref": str,  # where exactly: feed entry link or id, URL, conversation ref
            "feed_id": int,
            "dedup_key": str,  # stable identity across edits (feed entry id / link / title+date)
            "content_hash": str,
            "messages": str,  # conversations: the OpenAI-style messages, JSON
            "received_at": str, "published_at": str, "valid_at": str, "updated_at": str,
            "status": str, "status_reason": str, "bake_id": int,
            "supersedes": int, "superseded_by": int,
            "parent_id": int,  # facts extracted from a conversation: its item id
            "truncated": int, "truncated_reason": str,
        },
        pk="id",
        not_null=["kind", "text", "content_hash", "received_at", "status", "truncated"],
        defaults={"status": ItemStatus.PENDING.value, "truncated": 0},
    )
    db["items"].create_index(["status", "id"])
    db["items"].create_index(["dedup_key"])
    db["items"].create_index(["content_hash"])
    db["items"].create_index(["parent_id"])
    db["items"].create_index(["bake_id"])

    db["feeds"].create(
        {
            "id": int, "url": str, "title": str, "interval_s": float,
            "etag": str, "last_modified": str,
            "next_poll_at": str, "failures": int, "backoff_s": float,
            "last_error": str, "last_polled_at": str, "last_ok_at": str,
            "enabled": int, "origin": str,  # origin: "file" (feeds.toml) or "user"
            "added_at": str,
        },
        pk="id",
        not_null=["url", "interval_s", "failures", "enabled"],
        defaults={"failures": 0, "backoff_s": 0, "enabled": 1, "origin": "user"},
    )
    db["feeds"].create_index(["url"], unique=True)

    db["bakes"].create(
        {
            "id": int, "version": int, "status": str,
            "started_at": str, "finished_at": str,
            "item_ids": str, "config": str, "metrics": str,  # JSON
            "verdict": str, "reason": str,
            "delta_path": str,  # this bake's own delta
            "adapter_path": str,  # the composed adapter it made live (if any)
        },
        pk="id",
        not_null=["status"],
    )
    db["probe_results"].create(
        {
            "id": int, "bake_id": int, "probe_set": str, "model": str,
            "question": str, "expected": str, "answer": str,
            "correct": int, "score": float, "created_at": str,
        },
        pk="id",
    )
    db["probe_results"].create_index(["bake_id"])


def _migration_2_leases_and_events(db: Database) -> None:
    # A lease row makes "one bake at a time" hold across processes, not only threads; it expires
    # so a crashed holder cannot block bakes forever.
    db["leases"].create({"name": str, "owner": str, "acquired_at": str, "expires_at": str}, pk="name")
    # History events that are not bakes: rollbacks and forgets.
    db["events"].create({"id": int, "kind": str, "at": str, "data": str}, pk="id")


def _migration_3_attempts(db: Database) -> None:
    # Bakes an item was in that failed for infrastructure reasons (not the gate's verdict): the
    # item goes back to pending until it has failed `bake.max_attempts` times.
    db["items"].add_column("attempts", int, not_null_default=0)


def _migration_4_probe_kinds(db: Database) -> None:
    # What each probe asks (direct, reverse, neighbour, control, stale ...) and its grade (correct /
    # incorrect / not_attempted): the gate's leak, hallucination and supersession checks read them.
    db["probe_results"].add_column("kind", str)
    db["probe_results"].add_column("grade", str)


def _migration_5_probe_items(db: Database) -> None:
    # The item an item probe asks about: the gate judges items one by one, and a restart settles a
    # bake that was cut off after its swap from these rows (Bakery.recover).
    db["probe_results"].add_column("item", int)


MIGRATIONS = [_migration_1_initial, _migration_2_leases_and_events, _migration_3_attempts, _migration_4_probe_kinds,
              _migration_5_probe_items]
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(db: Database) -> int:
    """Run the migrations this file has not run yet, each in its own transaction."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise UserError(
            f"the database has schema version {version}, newer than this agent-memory knows "
            f"({SCHEMA_VERSION}): upgrade agent-memory"
        )
    for number, migration in enumerate(MIGRATIONS[version:], start=version + 1):
        with db.atomic():
            migration(db)
            db.execute(f"PRAGMA user_version = {number}")
    return SCHEMA_VERSION


# --- the store ---------------------------------------------------------------------------


class Store:
    """All reads and writes of the agent-memory database.

    One connection, shared by the daemon's threads (API workers, scheduler) under a lock:
    SQLite allows one writer anyway, and this keeps every method a simple transaction.
    """

    def __init__(self, db_path: str | Path, *, readonly: bool = False):
        self.path = Path(db_path)
        self.readonly = readonly
        self._lock = threading.RLock()
        if readonly:
            if not self.path.exists():
                raise UserError(f"no database at {self.path}: has the daemon run yet?")
            uri = f"{self.path.resolve().as_uri()}?mode=ro"
            conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, check_same_thread=False)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, check_same_thread=False)
        self.db = Database(conn)
        self.db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        if readonly:
            version = self.schema_version
            if version == 0:
                raise UserError(f"{self.path} is not an agent-memory database (yet)")
        else:
            self.db.enable_wal()
            self.db.execute("PRAGMA synchronous = FULL")
            migrate(self.db)

    @property
    def schema_version(self) -> int:
        with self._lock:
            return self.db.execute("PRAGMA user_version").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[Database]:
        """One atomic write: committed when the block ends. Nested blocks join the outer one."""
        if self.readonly:
            raise UserError("the database is open read-only; writes go through the daemon")
        with self._lock, self.db.atomic():
            yield self.db

    def _rows(self, sql: str, params: Iterable | dict = ()) -> list[dict]:
        with self._lock:
            return [_decode(row) for row in self.db.query(sql, params)]

    def _one(self, sql: str, params: Iterable | dict = ()) -> dict | None:
        rows = self._rows(sql, params)
        return rows[0] if rows else None

    # --- items ---

    def add_item(
        self, kind: str, text: str, *, dedup_key: str | None = None,
        update_pending: bool = False, **fields,
    ) -> tuple[dict, str]:
        """Queue an item unless it is already known; returns (item, outcome).

        outcome is "new", "duplicate" (the existing item is returned), or "updated": an item with
        the same `dedup_key` whose text changed (an edited feed entry) while it was still pending
        and `update_pending` is set. A baked (or baking) item is never rewritten.
        Known means: the same `dedup_key` (any status, so a forgotten feed entry stays forgotten),
        else the same kind and text (`content_hash`) in any status but forgotten.
        """
        if kind not in tuple(ItemKind):
            raise ValueError(f"unknown item kind {kind!r}")
        unknown = set(fields) - ITEM_FIELDS
        if unknown:
            raise ValueError(f"unknown item fields: {sorted(unknown)}")
        digest = content_hash(kind, text)
        with self.transaction() as db:
            existing = self._find_known(kind, digest, dedup_key)
            if existing is None:
                row = {
                    "kind": kind, "text": text, "dedup_key": dedup_key, "content_hash": digest,
                    "received_at": utcnow(), "status": ItemStatus.PENDING, **fields,
                }
                row["truncated"] = int(bool(row.get("truncated")))
                item_id, outcome = db["items"].insert(_encode(row)).last_pk, "new"
            elif (
                update_pending and dedup_key and existing["dedup_key"] == dedup_key
                and existing["status"] == ItemStatus.PENDING and existing["content_hash"] != digest
            ):
                changes = {"text": text, "content_hash": digest, "updated_at": utcnow(),
                           "status_reason": "edited at the source", **fields}
                changes["truncated"] = int(bool(changes.get("truncated")))
                db["items"].update(existing["id"], _encode(changes))
                item_id, outcome = existing["id"], "updated"
            else:
                item_id, outcome = existing["id"], "duplicate"
        return self.get_item(item_id), outcome

    def _find_known(self, kind: str, digest: str, dedup_key: str | None) -> dict | None:
        if dedup_key:
            row = self._one("select * from items where dedup_key = ? order by id limit 1", [dedup_key])
            if row:
                return row
        return self._one(
            "select * from items where kind = ? and content_hash = ? and status != ? order by id limit 1",
            [kind, digest, ItemStatus.FORGOTTEN],
        )

    def get_item(self, item_id: int) -> dict | None:
        return self._one("select * from items where id = ?", [item_id])

    def list_items(
        self, status: str | Iterable[str] | None = None, kind: str | None = None,
        limit: int = 100, *, bake_id: int | None = None, parent_id: int | None = None,
        oldest_first: bool = False,
    ) -> list[dict]:
        """Items, newest first (or oldest first: queue order), filtered by what is given."""
        where, params = [], []
        if status is not None:
            statuses = [status] if isinstance(status, str) else list(status)
            where.append(f"status in ({', '.join('?' for _ in statuses)})")
            params += statuses
        for column, value in (("kind", kind), ("bake_id", bake_id), ("parent_id", parent_id)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        sql = "select * from items"
        if where:
            sql += " where " + " and ".join(where)
        sql += f" order by id {'asc' if oldest_first else 'desc'} limit ?"  # limit -1: all
        return self._rows(sql, params + [limit])

    def counts_by_status(self) -> dict[str, int]:
        counts = dict.fromkeys(ItemStatus, 0)
        for row in self._rows("select status, count(*) as n from items group by status"):
            counts[row["status"]] = row["n"]
        return counts

    def claim_pending(self, limit: int, bake_id: int | None = None) -> list[dict]:
        """Take up to `limit` pending items, oldest first, and mark them baking."""
        with self.transaction() as db:
            ids = [row["id"] for row in self._rows(
                "select id from items where status = ? order by id limit ?", [ItemStatus.PENDING, limit])]
            self._set_status(db, ids, ItemStatus.BAKING, None, bake_id)
        return [self.get_item(i) for i in ids]

    def mark_items(
        self, ids: Iterable[int], status: ItemStatus, reason: str | None = None,
        bake_id: int | None = None,
    ) -> int:
        """Set the status (and reason, and bake id when given) of these items; returns how many."""
        if status not in tuple(ItemStatus):
            raise ValueError(f"unknown item status {status!r}")
        with self.transaction() as db:
            return self._set_status(db, list(ids), status, reason, bake_id)

    def _set_status(self, db: Database, ids: list[int], status: ItemStatus, reason, bake_id) -> int:
        if not ids:
            return 0
        marks = ", ".join("?" for _ in ids)
        # A pending item belongs to no bake; otherwise the bake id is kept unless a new one is given.
        keep_bake = "null" if status == ItemStatus.PENDING else "coalesce(?, bake_id)"
        params = [status, reason] + ([] if status == ItemStatus.PENDING else [bake_id]) + [utcnow(), *ids]
        cursor = db.execute(
            f"update items set status = ?, status_reason = ?, bake_id = {keep_bake}, "
            f"updated_at = ? where id in ({marks})",
            params,
        )
        return cursor.rowcount

    def requeue(self, ids: Iterable[int], why: str, max_attempts: int,
                final: ItemStatus = ItemStatus.FAILED) -> dict[str, list[int]]:
        """A bake left these items unsettled (it failed, or went live without learning them): each
        goes back to pending, or to `final` once `max_attempts` bakes have left it so (`retry` takes
        it out of `failed`, `retry --rejected` out of `rejected`). Returns {status: ids}."""
        ids = list(ids)
        if not ids:
            return {}
        marks = ", ".join("?" for _ in ids)
        with self.transaction() as db:
            db.execute(f"update items set attempts = attempts + 1 where id in ({marks})", ids)
            rows = self._rows(f"select id, attempts from items where id in ({marks})", ids)
            out = {ItemStatus.PENDING: [r["id"] for r in rows if r["attempts"] < max_attempts],
                   final: [r["id"] for r in rows if r["attempts"] >= max_attempts]}
            self._set_status(db, out[ItemStatus.PENDING], ItemStatus.PENDING, f"{why}; back in the queue"[:500], None)
            self._set_status(db, out[final], final, f"{why}; {max_attempts} bakes have not settled it"[:500], None)
        return out

    def retry(self, ids: Iterable[int] | None = None,
              statuses: Iterable[ItemStatus] = (ItemStatus.FAILED,)) -> list[int]:
        """Put failed or rejected items back in the queue (all of `statuses`, or these ids, which
        must be failed or rejected); their attempt count starts again. Returns the ids requeued."""
        with self.transaction() as db:
            if ids is None:
                statuses = list(statuses)
                found = [r["id"] for r in self._rows(
                    f"select id from items where status in ({', '.join('?' for _ in statuses)})", statuses)]
            else:
                ids = list(ids)
                rows = {r["id"]: r["status"] for r in self._rows(
                    f"select id, status from items where id in ({', '.join('?' for _ in ids)})", ids)} if ids else {}
                unknown = [i for i in ids if i not in rows]
                if unknown:
                    raise NotFound(f"no item {unknown[0]}")
                stuck = [i for i in ids if rows[i] not in RETRYABLE]
                if stuck:
                    raise ConflictError(f"item {stuck[0]} is {rows[stuck[0]]}: only failed or rejected items are retried")
                found = ids
            if found:
                db.execute(f"update items set attempts = 0 where id in ({', '.join('?' for _ in found)})", found)
            self._set_status(db, found, ItemStatus.PENDING, "retried", None)
        return found

    def requeue_stale_baking(self) -> int:
        """After a crash: items left in `baking` belong to no running bake; queue them again."""
        with self.transaction() as db:
            cursor = db.execute(
                "update items set status = ?, bake_id = null, updated_at = ?, "
                "status_reason = 'requeued: its bake did not finish' where status = ?",
                [ItemStatus.PENDING, utcnow(), ItemStatus.BAKING],
            )
            return cursor.rowcount

    def supersede(self, old_id: int, new_id: int) -> None:
        """Record that item `new_id` replaces what `old_id` said (arrested -> released).

        Statuses do not change: the old item stays history (and stays in a bake if it was in one);
        `memory_prompt` marks it as no longer current.
        """
        if old_id == new_id:
            raise ValueError("an item cannot supersede itself")
        with self.transaction() as db:
            for item_id in (old_id, new_id):
                if self.get_item(item_id) is None:
                    raise NotFound(f"no item {item_id}")
            db["items"].update(old_id, {"superseded_by": new_id, "updated_at": utcnow()})
            db["items"].update(new_id, {"supersedes": old_id})

    # --- feeds ---

    def add_feed(
        self, url: str, *, interval_s: float, title: str | None = None, origin: str = "user",
        reenable: bool = True,
    ) -> tuple[dict, bool]:
        """Add a feed (due at once); returns (feed, created).

        A removed feed with the same URL comes back when `reenable` (a user adding it again),
        and stays removed when not (seeding from feeds.toml at every start).
        """
        with self.transaction() as db:
            existing = self._one("select * from feeds where url = ?", [url])
            if existing is None:
                feed_id = db["feeds"].insert({
                    "url": url, "title": title, "interval_s": interval_s, "origin": origin,
                    "enabled": 1, "failures": 0, "backoff_s": 0,
                    "next_poll_at": utcnow(), "added_at": utcnow(),
                }).last_pk
                created = True
            elif reenable and not existing["enabled"]:
                feed_id, created = existing["id"], True
                db["feeds"].update(feed_id, {
                    "enabled": 1, "interval_s": interval_s, "title": title or existing["title"],
                    "next_poll_at": utcnow(), "failures": 0, "backoff_s": 0, "last_error": None,
                })
            else:
                feed_id, created = existing["id"], False
        return self.get_feed(feed_id), created

    def get_feed(self, feed_id: int) -> dict | None:
        return self._one("select * from feeds where id = ?", [feed_id])

    def list_feeds(self, include_removed: bool = False) -> list[dict]:
        sql = "select * from feeds" + ("" if include_removed else " where enabled = 1")
        return self._rows(sql + " order by id")

    def due_feeds(self, now: str) -> list[dict]:
        return self._rows(
            "select * from feeds where enabled = 1 and (next_poll_at is null or next_poll_at <= ?) "
            "order by next_poll_at, id",
            [now],
        )

    def update_feed(self, feed_id: int, **fields) -> dict:
        unknown = set(fields) - FEED_FIELDS
        if unknown:
            raise ValueError(f"unknown feed fields: {sorted(unknown)}")
        with self.transaction() as db:
            if self.get_feed(feed_id) is None:
                raise NotFound(f"no feed {feed_id}")
            db["feeds"].update(feed_id, fields)
        return self.get_feed(feed_id)

    def remove_feed(self, feed_id: int) -> bool:
        """Stop polling a feed. The row stays (its items point at it; feeds.toml must not
        bring it back at the next start). Returns False when there is no such enabled feed."""
        with self.transaction() as db:
            cursor = db.execute("update feeds set enabled = 0 where id = ? and enabled = 1", [feed_id])
            return cursor.rowcount == 1

    # --- bakes and probe results (filled by the baker) ---

    def create_bake(self, item_ids: Iterable[int] = (), config: dict | None = None, *,
                    status: BakeStatus = BakeStatus.QUEUED, **fields) -> dict:
        row = {"status": status, "started_at": utcnow(), "item_ids": list(item_ids),
               "config": config or {}, **fields}
        _check_fields(row, BAKE_FIELDS)
        with self.transaction() as db:
            bake_id = db["bakes"].insert(_encode(row)).last_pk
        return self.get_bake(bake_id)

    def update_bake(self, bake_id: int, **fields) -> dict:
        _check_fields(fields, BAKE_FIELDS)
        with self.transaction() as db:
            if self._one("select id from bakes where id = ?", [bake_id]) is None:
                raise NotFound(f"no bake {bake_id}")
            db["bakes"].update(bake_id, _encode(fields))
        return self.get_bake(bake_id)

    def get_bake(self, bake_id: int) -> dict | None:
        """The bake, with its probe results under "probe_results"."""
        bake = self._one("select * from bakes where id = ?", [bake_id])
        if bake is not None:
            bake["probe_results"] = self._rows(
                "select * from probe_results where bake_id = ? order by id", [bake_id])
        return bake

    def list_bakes(self, limit: int = 50) -> list[dict]:
        return self._rows("select * from bakes order by id desc limit ?", [limit])

    def last_bake(self, statuses: Iterable[str]) -> dict | None:
        """The latest bake in one of these states, without its probe rows."""
        statuses = list(statuses)
        return self._one(f"select * from bakes where status in ({', '.join('?' for _ in statuses)}) "
                         "order by id desc limit 1", statuses)

    def add_probe_results(self, bake_id: int, results: Iterable[dict]) -> int:
        """Rows with probe_set, question, answer, correct, score (and optionally model, expected)."""
        columns = set(self.db["probe_results"].columns_dict)
        rows = [{"bake_id": bake_id, "created_at": utcnow(), **{k: v for k, v in r.items() if k in columns}}
                for r in results]
        for row in rows:
            row["correct"] = None if row.get("correct") is None else int(bool(row["correct"]))
        with self.transaction() as db:
            db["probe_results"].insert_all(rows)
        return len(rows)


    # -- the live loop's bookkeeping: leases and history ---------------------------------

    LEASE_S = 6 * 3600  # longer than any bake; a crashed holder's lease lapses after this

    def acquire_lease(self, name: str, owner: str) -> bool:
        now = utcnow()
        expires = datetime.fromtimestamp(datetime.now(timezone.utc).timestamp() + self.LEASE_S,
                                         timezone.utc).isoformat(timespec="seconds")
        with self.transaction() as db:
            held = db.execute("select owner from leases where name = ? and expires_at > ?",
                              [name, now]).fetchone()
            if held:
                return False
            db["leases"].upsert({"name": name, "owner": owner, "acquired_at": now, "expires_at": expires},
                                pk="name")
            return True

    def release_lease(self, name: str) -> None:
        with self.transaction() as db:
            db.execute("delete from leases where name = ?", [name])

    def release_dead_leases(self) -> int:
        """At daemon start: leases whose holder process is gone (kill -9) are released now."""
        dead = [r["name"] for r in self._rows("select name, owner from leases")
                if not _pid_alive(r["owner"].split(":")[0])]
        with self.transaction() as db:
            for name in dead:
                db.execute("delete from leases where name = ?", [name])
        return len(dead)

    def unfinished_bakes(self) -> list[dict]:
        return self._rows(f"select * from bakes where {_UNFINISHED_BAKE_SQL} order by id",
                          list(UNFINISHED_BAKE_STATES))

    def abandon_unfinished_bakes(self) -> int:
        """At start: bakes a crash or stop cut off are marked abandoned (their items requeued)."""
        with self.transaction() as db:
            cursor = db.execute(
                "update bakes set status = ?, verdict = ?, finished_at = ?, "
                f"reason = 'the daemon stopped before this bake finished' where {_UNFINISHED_BAKE_SQL}",
                [BakeStatus.ABANDONED, BakeStatus.ABANDONED.verdict, utcnow(), *UNFINISHED_BAKE_STATES])
            return cursor.rowcount

    def last_bake_started(self) -> float | None:
        row = self._one("select max(started_at) as t from bakes where started_at is not null")
        if not row or not row["t"]:
            return None
        return datetime.fromisoformat(row["t"]).timestamp()

    def last_bake_finished(self, verdicts: tuple[str, ...]) -> float | None:
        """When the last bake with one of these verdicts finished (a Unix timestamp)."""
        row = self._one(f"select max(finished_at) as t from bakes where verdict in ({', '.join('?' for _ in verdicts)})",
                        list(verdicts))
        return datetime.fromisoformat(row["t"]).timestamp() if row and row["t"] else None

    def bake_results(self) -> dict[str, int]:
        rows = self._rows("select verdict, count(*) as n from bakes where verdict is not null group by verdict")
        return {r["verdict"]: r["n"] for r in rows}

    def live_probe_accuracy(self, version: str) -> dict[str, float]:
        """Probe accuracy per set of the live version `version`: the candidate's scores of the bake
        that made it, or, for a version no bake made (v0000, a forget's recomposition), the live
        scores the last bake on top of it recorded; {} when no bake has probed it."""
        row = self._one("select metrics from bakes where verdict = ? and version = ? order by id desc limit 1",
                        [PASSED, Version(version).number])
        if row and row["metrics"]:
            return row["metrics"].get("probes", {})  # (JSON columns come back decoded)
        for bake in self._rows("select metrics from bakes where metrics is not null order by id desc limit 50"):
            metrics = json.loads(bake["metrics"]) if isinstance(bake["metrics"], str) else bake["metrics"]
            if metrics.get("live_version") == version and metrics.get("live_probes"):
                return metrics["live_probes"]
        return {}

    def previous_live_version(self, current: str) -> Version | None:
        """The version that was live before `current` (from passed bakes and events)."""
        versions = [Version(r["version"]) for r in self._rows(
            "select version from bakes where verdict = ? and version is not null order by id", [PASSED])]
        history = [EMPTY_VERSION, *versions]
        if current in history:
            i = history.index(current)
            return history[i - 1] if i > 0 else None
        return history[-1] if history else None

    def probe_results(self, bake_id: int) -> list[dict]:
        return self._rows("select * from probe_results where bake_id = ? order by id", [bake_id])

    def record_event(self, kind: str, data: dict) -> None:
        with self.transaction() as db:
            db["events"].insert({"kind": kind, "at": utcnow(), "data": json.dumps(data)})

    def list_events(self, limit: int = 50) -> list[dict]:
        rows = self._rows("select * from events order by id desc limit ?", [limit])
        return [{**r, "data": json.loads(r["data"])} for r in rows]


def _pid_alive(pid_text: str) -> bool:
    """Lease owners are "PID:what"; is that process still running?"""
    try:
        os.kill(int(pid_text), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _check_fields(fields: dict, allowed: set[str]) -> None:
    unknown = set(fields) - allowed
    if unknown:
        raise ValueError(f"unknown fields: {sorted(unknown)}")


def _encode(row: dict) -> dict:
    return {k: json.dumps(v) if k in JSON_COLUMNS and v is not None else v for k, v in row.items()}


def _decode(row: dict) -> dict:
    for column in JSON_COLUMNS & row.keys():
        if isinstance(row[column], str):
            row[column] = json.loads(row[column])
    for column in ("truncated", "enabled"):
        if row.get(column) is not None:
            row[column] = bool(row[column])
    return row
