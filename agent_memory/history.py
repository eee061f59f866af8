"""What is live, changed after the fact: rollback, forget, retry.

    rollback [vNNNN]   `memory` serves an earlier version again (default: the one before the live one);
                       the items of bakes it drops become `rejected`, those it brings back `baked`
    forget ITEM        the live deltas minus every bake trained on the item (its own, and any that went
                       live without learning it), composed as a new version and swapped in; the item
                       becomes `forgotten`, the items those bakes had baked go back to the queue
    retry              failed (or rejected) items back to the queue

Rollback and forget change the served model, so they run under `Bakery.model_change()`, the lock a
bake holds (the `bake` lease): one model change at a time, and none while a bake runs. They compose
and swap with the bakery's own `version_with` and `swap_to`, so a rollback or a forget is served,
timed and pruned exactly as a bake's new version is. Each is recorded as an event (`history`).
"""

from __future__ import annotations

import logging

from .bakery import Bakery
from .errors import ConflictError, NotFound, UserError
from .records import ItemStatus
from .store import Store
from .versions import EMPTY_VERSION, Versions

log = logging.getLogger(__name__)

ROLLED_BACK = "rolled back"  # how the reason of an item a rollback took out begins (rolling forward restores it)


class History:
    def __init__(self, store: Store, versions: Versions, bakery: Bakery):
        self.store = store
        self.versions = versions
        self.bakery = bakery  # the model-change lock, composing and swapping

    def rollback(self, version: str | None = None) -> dict:
        """Make an earlier version live again (default: the one before the current)."""
        with self.bakery.model_change("rollback"):
            current = self.versions.current()
            target = version or self.store.previous_live_version(current)
            if target is None:
                raise ConflictError(f"no earlier version than {current} to roll back to")
            if target != EMPTY_VERSION and not (self.versions.path(target) / "manifest.json").exists():
                raise UserError(f"unknown adapter version {target!r}: see `agent-memory history`")
            self.bakery.swap_to(target)
            before = self.versions.manifest(current)["deltas"]
            after = self.versions.manifest(target)["deltas"]
            dropped = [b for b in before if b not in after]
            restored = [b for b in after if b not in before]  # rolling forward again
            for bake_id in dropped:  # the items these bakes baked (the ones they missed are queued or baked later)
                ids = [i["id"] for i in self.store.list_items(ItemStatus.BAKED, bake_id=bake_id, limit=-1)]
                self.store.mark_items(ids, ItemStatus.REJECTED, f"{ROLLED_BACK} from {current} to {target}", bake_id)
            for bake_id in restored:  # items a rollback had taken out (not forgotten or unlearnt ones) are baked again
                ids = [i["id"] for i in self.store.list_items(ItemStatus.REJECTED, bake_id=bake_id, limit=-1)
                       if (i["status_reason"] or "").startswith(ROLLED_BACK)]
                self.store.mark_items(ids, ItemStatus.BAKED, None, bake_id)
            event = {"from": current, "to": target, "dropped_bakes": dropped, "restored_bakes": restored}
            self.store.record_event("rollback", event)
            log.info("rollback: %s", event)
            return event

    def forget(self, item_id: int) -> dict:
        """Remove an item's knowledge: recompose without every live delta trained on it (its own
        bake's, and those of bakes that went live without learning it); re-queue what they baked."""
        with self.bakery.model_change("forget"):
            item = self.store.get_item(item_id)
            if item is None:
                raise NotFound(f"no item {item_id}")
            current = self.versions.current()
            live_deltas = self.versions.manifest(current)["deltas"]
            dropped = [b for b in live_deltas if item_id in ((self.store.get_bake(b) or {}).get("item_ids") or [])]
            if not dropped:
                self.store.mark_items([item_id], ItemStatus.FORGOTTEN, "forgotten before it was live")
                return {"item": item_id, "version": current, "requeued": []}
            remaining = [b for b in live_deltas if b not in dropped]
            version = self.bakery.version_with(remaining, f"forget item {item_id} (drop bake(s) {dropped})")
            self.bakery.swap_to(version)
            mates = [i["id"] for b in dropped for i in self.store.list_items(ItemStatus.BAKED, bake_id=b, limit=-1)
                     if i["id"] != item_id]
            self.store.mark_items([item_id], ItemStatus.FORGOTTEN, f"dropped with bake(s) {dropped} in {version}")
            self.store.mark_items(mates, ItemStatus.PENDING,
                                  f"re-queued: bake(s) {dropped} dropped to forget item {item_id}", None)
            event = {"item": item_id, "dropped_bakes": dropped, "version": version, "requeued": mates}
            self.store.record_event("forget", event)
            log.info("forget: %s", event)
            return event

    def retry(self, item_ids: list[int] | None = None,
              statuses: tuple[ItemStatus, ...] = (ItemStatus.FAILED,)) -> dict:
        """Put failed (or rejected) items back in the queue: these ids, or all in `statuses`.
        No model change, so no lock: the items simply wait for the next bake."""
        requeued = self.store.retry(item_ids, statuses)
        if requeued:
            self.store.record_event("retry", {"items": requeued})
            log.info("retry: items %s back in the queue", requeued)
        return {"requeued": requeued}
