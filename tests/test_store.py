"""The SQLite store, on real database files."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from agent_memory import store as store_mod
from agent_memory.errors import UserError
from agent_memory.store import NotFound, Store


def test_new_database_is_migrated_with_wal_and_busy_timeout(store):
    assert store.schema_version == store_mod.SCHEMA_VERSION == len(store_mod.MIGRATIONS)
    assert store.db.journal_mode == "wal"
    assert store.db.execute("PRAGMA busy_timeout").fetchone()[0] == 10_000
    assert {"items", "feeds", "bakes", "probe_results"} <= set(store.db.table_names())


def test_reopening_keeps_data_and_runs_only_new_migrations(cfg, monkeypatch):
    with_item = Store(cfg.db_path)
    with_item.add_item("fact", "kept across restarts")
    with_item.close()

    def add_priority(db):
        db["items"].add_column("priority", int)

    monkeypatch.setattr(store_mod, "MIGRATIONS", [*store_mod.MIGRATIONS, add_priority])
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", len(store_mod.MIGRATIONS))
    upgraded = Store(cfg.db_path)
    assert upgraded.schema_version == len(store_mod.MIGRATIONS)
    assert "priority" in upgraded.db["items"].columns_dict
    assert upgraded.list_items()[0]["text"] == "kept across restarts"
    upgraded.close()
    Store(cfg.db_path).close()  # running again does not re-run migration 2 (would fail: duplicate column)


def test_newer_schema_is_refused(cfg):
    Store(cfg.db_path).close()
    with sqlite3.connect(cfg.db_path) as conn:
        conn.execute(f"PRAGMA user_version = {store_mod.SCHEMA_VERSION + 1}")
    with pytest.raises(UserError, match="newer than this agent-memory knows"):
        Store(cfg.db_path)


def test_dedup_by_content(store):
    first, outcome = store.add_item("fact", "Durov was arrested at Le Bourget.", source="agent-a")
    assert outcome == "new" and first["status"] == "pending" and first["source"] == "agent-a"
    again, outcome = store.add_item("fact", "  durov was ARRESTED at   le bourget. ")
    assert outcome == "duplicate" and again["id"] == first["id"]
    other_kind, outcome = store.add_item("prompt", "Durov was arrested at Le Bourget.")
    assert outcome == "new" and other_kind["id"] != first["id"]
    # Forgotten: saying it again queues it again.
    store.mark_items([first["id"]], "forgotten", "user asked")
    back, outcome = store.add_item("fact", "Durov was arrested at Le Bourget.")
    assert outcome == "new" and back["id"] not in (first["id"], other_kind["id"])


def test_dedup_key_updates_pending_only(store):
    item, _ = store.add_item("headline", "v1", dedup_key="feed:1:id:x", update_pending=True)
    updated, outcome = store.add_item("headline", "v2", dedup_key="feed:1:id:x", update_pending=True,
                                      title="T2")
    assert outcome == "updated" and updated["id"] == item["id"]
    assert (updated["text"], updated["title"]) == ("v2", "T2")
    assert updated["content_hash"] == store_mod.content_hash("headline", "v2")

    store.mark_items([item["id"]], "baked")
    _, outcome = store.add_item("headline", "v3", dedup_key="feed:1:id:x", update_pending=True)
    assert outcome == "duplicate" and store.get_item(item["id"])["text"] == "v2"
    # Without update_pending (or once forgotten) the key alone makes it a duplicate.
    store.mark_items([item["id"]], "forgotten")
    _, outcome = store.add_item("headline", "v4", dedup_key="feed:1:id:x")
    assert outcome == "duplicate" and len(store.list_items()) == 1


def test_bad_item_input_is_refused(store):
    with pytest.raises(ValueError, match="kind"):
        store.add_item("opinion", "x")
    with pytest.raises(ValueError, match="fields"):
        store.add_item("fact", "x", colour="red")
    with pytest.raises(ValueError, match="status"):
        store.mark_items([1], "done")


def test_queue_lifecycle(store):
    ids = [store.add_item("fact", f"fact {n}")[0]["id"] for n in range(5)]
    assert store.counts_by_status()["pending"] == 5

    claimed = store.claim_pending(3, bake_id=7)
    assert [i["id"] for i in claimed] == ids[:3]  # oldest first
    assert {(i["status"], i["bake_id"]) for i in claimed} == {("baking", 7)}
    assert [i["id"] for i in store.claim_pending(10)] == ids[3:]
    assert store.claim_pending(10) == []

    assert store.mark_items(ids[:2], "baked", bake_id=7) == 2
    assert store.mark_items([ids[2]], "rejected", "probe score fell") == 1
    counts = store.counts_by_status()
    assert counts == {"pending": 0, "baking": 2, "baked": 2, "failed": 0, "rejected": 1, "forgotten": 0}
    assert store.get_item(ids[2])["status_reason"] == "probe score fell"
    assert [i["id"] for i in store.list_items(bake_id=7, oldest_first=True)] == ids[:3]
    assert [i["id"] for i in store.list_items(status=["baked", "rejected"])] == ids[2::-1]
    assert len(store.list_items(limit=2)) == 2

    # Back to pending: it belongs to no bake any more.
    store.mark_items([ids[1]], "pending", "bake cancelled")
    assert (store.get_item(ids[1])["bake_id"], store.get_item(ids[1])["status"]) == (None, "pending")
    store.mark_items([ids[1]], "baked", bake_id=7)

    # A crash leaves two items in baking; the next start gives them back.
    assert store.requeue_stale_baking() == 2
    requeued = store.get_item(ids[3])
    assert (requeued["status"], requeued["bake_id"]) == ("pending", None)
    assert requeued["status_reason"].startswith("requeued")
    assert store.get_item(ids[0])["status"] == "baked"


def test_supersede(store):
    arrested, _ = store.add_item("fact", "Durov is held in custody in France.", valid_at="2024-08-24")
    released, _ = store.add_item("fact", "Durov was released on bail.", valid_at="2024-08-28")
    store.supersede(arrested["id"], released["id"])
    assert store.get_item(arrested["id"])["superseded_by"] == released["id"]
    assert store.get_item(released["id"])["supersedes"] == arrested["id"]
    assert store.get_item(arrested["id"])["status"] == "pending"
    with pytest.raises(NotFound):
        store.supersede(arrested["id"], 999)
    with pytest.raises(ValueError):
        store.supersede(arrested["id"], arrested["id"])


def test_readonly_reader_sees_commits_and_cannot_write(cfg, store):
    reader = Store(cfg.db_path, readonly=True)
    assert reader.list_items() == []
    item, _ = store.add_item("fact", "committed before the ack")
    assert reader.get_item(item["id"])["text"] == "committed before the ack"  # another connection
    with pytest.raises(UserError, match="read-only"):
        reader.add_item("fact", "nope")
    reader.close()


def test_readonly_without_database(tmp_path):
    with pytest.raises(UserError, match="has the daemon run"):
        Store(tmp_path / "missing.db", readonly=True)


def test_concurrent_writers_lose_nothing(store):
    errors = []

    def write(worker):
        try:
            for n in range(25):
                store.add_item("fact", f"worker {worker} fact {n}")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.counts_by_status()["pending"] == 100


def test_feeds_table(store):
    feed, created = store.add_feed("https://example.org/rss", interval_s=60, title="Example")
    assert created and feed["enabled"] is True and feed["next_poll_at"]
    same, created = store.add_feed("https://example.org/rss", interval_s=120)
    assert not created and same["id"] == feed["id"] and same["interval_s"] == 60

    assert [f["id"] for f in store.due_feeds("9999")] == [feed["id"]]
    store.update_feed(feed["id"], next_poll_at="3000-01-01T00:00:00+00:00")
    assert store.due_feeds("2999") == []

    assert store.remove_feed(feed["id"]) is True
    assert store.remove_feed(feed["id"]) is False
    assert store.list_feeds() == [] and len(store.list_feeds(include_removed=True)) == 1
    _, created = store.add_feed("https://example.org/rss", interval_s=60, reenable=False)
    assert not created and store.list_feeds() == []  # seeding does not bring it back
    back, created = store.add_feed("https://example.org/rss", interval_s=60)
    assert created and back["id"] == feed["id"] and back["enabled"] is True

    with pytest.raises(NotFound):
        store.update_feed(999, failures=1)
    with pytest.raises(ValueError):
        store.update_feed(feed["id"], colour="red")


def test_bakes_and_probe_results(store):
    bake = store.create_bake([1, 2, 3], {"rank": 8, "lr": 1e-4})
    assert (bake["status"], bake["item_ids"], bake["config"]) == ("queued", [1, 2, 3], {"rank": 8, "lr": 1e-4})
    assert bake["started_at"] and bake["probe_results"] == []

    done = store.update_bake(bake["id"], status="done", version=4, verdict="accepted",
                             metrics={"loss": [2.5, 1.0]}, adapter_path="/state/adapters/live/v4")
    assert (done["version"], done["metrics"], done["verdict"]) == (4, {"loss": [2.5, 1.0]}, "accepted")

    store.add_probe_results(bake["id"], [
        {"probe_set": "durov", "model": "memory", "question": "Who was arrested?", "answer": "Durov",
         "correct": True, "score": 1.0},
        {"probe_set": "durov", "model": "base", "question": "Who was arrested?", "answer": "?",
         "correct": False, "score": 0.0},
    ])
    results = store.get_bake(bake["id"])["probe_results"]
    assert [(r["model"], r["correct"]) for r in results] == [("memory", 1), ("base", 0)]

    second = store.create_bake([4])
    assert [b["id"] for b in store.list_bakes()] == [second["id"], bake["id"]]
    assert store.get_bake(999) is None
    with pytest.raises(NotFound):
        store.update_bake(999, status="failed")
    with pytest.raises(ValueError):
        store.update_bake(bake["id"], colour="red")
