"""What the bakery settles at start after a crash (the real store; versions as manifests on disk)."""

from __future__ import annotations

import json
from types import SimpleNamespace

from agent_memory.bakery import Bakery
from agent_memory.versions import Versions


def test_recover_after_kill_9_mid_swap_and_mid_training(cfg, store, tmp_path):
    versions = Versions(cfg.adapters_dir, cfg.model_dir, cfg.vllm.max_lora_rank)
    swapped, training = (store.create_bake(status="queued")["id"] for _ in range(2))
    a, b = (store.add_item("fact", text)[0]["id"] for text in ("fact a", "fact b"))
    store.claim_pending(1, bake_id=swapped)
    store.claim_pending(1, bake_id=training)
    store.update_bake(swapped, status="swapping", item_ids=[a])
    store.update_bake(training, status="training", item_ids=[b])
    # The daemon died right after CURRENT moved to the version holding `swapped`'s delta.
    (versions.path("v0001")).mkdir(parents=True)
    (versions.path("v0001") / "manifest.json").write_text(json.dumps({"version": "v0001", "deltas": [swapped]}))
    versions.set_current("v0001")
    store.acquire_lease("bake", owner="4242:dead")

    Bakery(SimpleNamespace(cfg=cfg, store=store, versions=versions)).recover()

    recorded = store.get_bake(swapped)
    assert (recorded["status"], recorded["verdict"], recorded["version"]) == ("live", "passed", 1)
    assert (store.get_item(a)["status"], store.get_item(a)["bake_id"]) == ("baked", swapped)
    assert store.get_bake(training)["status"] == "abandoned"
    assert (store.get_item(b)["status"], store.get_item(b)["bake_id"]) == ("pending", None)
    assert store.acquire_lease("bake", owner="new")  # the dead daemon's lease was released


def test_rollback_and_forward_again_restores_the_items(cfg, store):
    versions = Versions(cfg.adapters_dir, cfg.model_dir, cfg.vllm.max_lora_rank)
    first, second = (store.create_bake(status="live")["id"] for _ in range(2))
    a, b = (store.add_item("fact", text)[0]["id"] for text in ("fact a", "fact b"))
    store.update_bake(first, item_ids=[a])
    store.update_bake(second, item_ids=[b])
    store.mark_items([a], "baked", None, first)
    store.mark_items([b], "baked", None, second)
    for version, deltas in (("v0001", [first]), ("v0002", [first, second])):
        versions.path(version).mkdir(parents=True)
        (versions.path(version) / "manifest.json").write_text(json.dumps({"version": version, "deltas": deltas}))
    versions.set_current("v0002")
    bakery = Bakery(SimpleNamespace(cfg=cfg, store=store, versions=versions, serving=None))

    assert bakery.rollback("v0001")["dropped_bakes"] == [second]
    assert store.get_item(b)["status"] == "rejected" and store.get_item(a)["status"] == "baked"
    assert bakery.rollback("v0002")["restored_bakes"] == [second]
    assert (store.get_item(b)["status"], store.get_item(b)["bake_id"]) == ("baked", second)
    assert versions.current() == "v0002"


def test_a_bake_job_carries_the_live_items_that_are_still_current(cfg, store):
    versions = Versions(cfg.adapters_dir, cfg.model_dir, cfg.vllm.max_lora_rank)
    live_bake, dropped_bake = (store.create_bake(status="live")["id"] for _ in range(2))
    arrest, release, other, rolled_back = (store.add_item("fact", text)[0]["id"] for text in (
        "Durov arrested", "Durov released", "Library opens at 9", "A fact whose bake was rolled back"))
    store.mark_items([arrest, release, other], "baked", None, live_bake)
    store.mark_items([rolled_back], "baked", None, dropped_bake)
    store.supersede(arrest, release)
    versions.path("v0001").mkdir(parents=True)
    (versions.path("v0001") / "manifest.json").write_text(json.dumps({"version": "v0001", "deltas": [live_bake]}))
    versions.set_current("v0001")
    bakery = Bakery(SimpleNamespace(cfg=cfg, store=store, versions=versions, serving=None))

    # Not the superseded arrest, not an item outside the live version.
    assert sorted(i["id"] for i in bakery._earlier_items(bake_id=3)) == [release, other]
