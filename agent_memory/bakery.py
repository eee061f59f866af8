"""One bake from queue to live: lease, claim items, train a delta, compose, probe, gate, swap.

    pending items --claim--> baking --train (subprocess)--> delta
        --compose(live deltas + delta)--> candidate version --load as `memory-candidate`-->
        probes (items, registered sets, locality) --gate--> pass: swap `memory`, CURRENT, items baked
                                                          fail: unload, items rejected, live untouched

Training runs in a subprocess (`python -m agent_memory.baking JOB.json`): the daemon stays
responsive, a stop can end it, and a kill -9 anywhere leaves at most a `.partial` directory, never
a delta under its final name. At the next start `recover` settles what was cut off: a bake whose delta
is in the live version is recorded live, any other unfinished bake abandoned and its items requeued.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING

from . import probes
from .config import GateConfig, parse_duration, validate_gate
from .errors import UserError
from .orphan import child_env
from .serving import MEMORY_NAME, ServingError
from .versions import EMPTY_VERSION

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger(__name__)

CANDIDATE_NAME = "memory-candidate"
# Probe answers are checked for keywords. General-knowledge and probe-set answers state them early;
# a news answer takes a sentence to get to the point. (vLLM with LoRA decodes slowly on CPU.)
GATE_MAX_TOKENS = 24
ITEM_MAX_TOKENS = 48
REPLAY_POOL = 64  # earlier items a bake job carries for the engine to replay a few of


class BakeCancelled(Exception):
    """The daemon is stopping; the bake's items go back to pending."""


@dataclass
class Verdict:
    passed: bool
    reason: str
    probes: dict  # probe set -> accuracy of the candidate
    live_probes: dict  # probe set -> accuracy of the live version it would replace
    locality: dict  # unchanged (word for word) and kept (still right), see probes.locality_scores


class Bakery:
    def __init__(self, daemon: "Daemon"):
        self.daemon = daemon
        self.cfg = daemon.cfg
        self.store = daemon.store
        self.versions = daemon.versions
        # One worker thread runs bakes one at a time; the lease row guards against other processes.
        self.requests: queue.Queue[int | None] = queue.Queue()
        self.worker = threading.Thread(target=self._work, name="bakery", daemon=True)
        self.lock = threading.Lock()
        self.waiting: int | None = None  # bake id queued but not started
        self.running: int | None = None
        self.process: subprocess.Popen | None = None  # the training subprocess
        self.stopping = threading.Event()
        self.live_answers: dict[tuple, list[dict]] = {}  # (live version, probe set, size) -> answers

    # -- entry points ----------------------------------------------------------------------

    def recover(self) -> None:
        """At start, before anything else: settle what a stopped or killed daemon left half done."""
        current = self.versions.current()
        live_deltas = set(self.versions.manifest(current)["deltas"])
        for bake in self.store.unfinished_bakes():
            if bake["id"] in live_deltas:  # killed after the swap, before recording it: it is live
                self.store.mark_items(bake["item_ids"] or [], "baked", None, bake["id"])
                self.store.update_bake(bake["id"], status="live", verdict="passed", finished_at=_now(),
                                       version=int(current[1:]),
                                       reason="live; the daemon stopped before recording the verdict")
        self.store.requeue_stale_baking()  # items of bakes that did not reach live go back to pending
        self.store.abandon_unfinished_bakes()
        self.store.release_dead_leases()  # held by a daemon that was killed -9

    def start(self) -> None:
        self.worker.start()

    def request(self, trigger: str, gate: dict | None = None) -> int:
        """Queue a bake (coalesced: one waiting bake at most); returns its bake id.

        `gate` overrides `[gate]` settings for this bake only (e.g. a stricter min_item_accuracy).
        """
        if self.daemon.serving is None:
            raise UserError("no model is served (vllm.mode = 'off'): nothing can be baked")
        gate_settings = asdict(self._gate_policy(gate or {}))  # validates the overrides now
        with self.lock:
            if self.waiting is None or gate:
                config = {"trigger": trigger, "gate": gate_settings}
                self.waiting = self.store.create_bake(status="queued", config=config)["id"]
                self.requests.put(self.waiting)
            return self.waiting

    def _gate_policy(self, overrides: dict) -> GateConfig:
        known = {f.name for f in fields(GateConfig)} - {"probe_sets"}
        unknown = set(overrides) - known
        if unknown:
            raise UserError(f"unknown gate setting(s): {', '.join(sorted(unknown))}")
        policy = replace(self.cfg.gate, **{k: float(v) for k, v in overrides.items()})
        validate_gate(policy)
        return policy

    def due(self) -> bool:
        """Enough pending items, or some pending and `bake.every` since the last bake."""
        pending = self.store.counts_by_status().get("pending", 0)
        if pending == 0:
            return False
        if pending >= self.cfg.bake.min_pending:
            return True
        last = self.store.last_bake_started()
        return last is None or time.time() - last >= parse_duration(self.cfg.bake.every)

    def maybe_request(self) -> None:
        """Scheduled job: queue a bake when one is due and none is waiting."""
        if self.waiting is None and self.running is None and self.due():
            self.request("scheduled")

    def stop(self) -> None:
        """Daemon shutdown: end a running training subprocess (its items are requeued)."""
        self.stopping.set()
        self.requests.put(None)
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
        self.worker.join(timeout=30)

    def _work(self) -> None:
        while not self.stopping.is_set():
            bake_id = self.requests.get()
            if bake_id is None:
                return
            with self.lock:
                self.waiting = None
                self.running = bake_id
            try:
                self._run(bake_id)
            except BakeCancelled:
                return
            except Exception:  # never let one bake kill the worker
                log.exception("bake %s crashed", bake_id)
            finally:
                self.running = None

    def _run(self, bake_id: int) -> None:
        if not self.store.acquire_lease("bake", owner=f"{os.getpid()}:bake {bake_id}"):
            self.store.update_bake(bake_id, status="skipped", verdict="skipped", finished_at=_now(),
                                   reason="another process holds the bake lease")
            return
        try:
            self._bake(bake_id)
        finally:
            self.store.release_lease("bake")

    # -- one bake --------------------------------------------------------------------------

    def _bake(self, bake_id: int) -> None:
        started = time.monotonic()
        self.store.update_bake(bake_id, status="claiming", started_at=_now())
        items = self.store.claim_pending(self.cfg.bake.max_items, bake_id=bake_id)
        if not items:
            self.store.update_bake(bake_id, status="empty", finished_at=_now(), verdict="empty",
                                   reason="no pending items")
            return
        item_ids = [i["id"] for i in items]
        gate = GateConfig(**(self.store.get_bake(bake_id)["config"] or {}).get("gate") or asdict(self.cfg.gate))
        self.store.update_bake(bake_id, item_ids=item_ids)
        self.daemon.notify(f"STATUS=baking {len(items)} items (bake {bake_id})")
        stages: dict[str, float] = {}
        try:
            with self._stage(bake_id, "training", stages):
                train_report = self._train(bake_id, items)
            with self._stage(bake_id, "composing", stages):
                live = self.versions.manifest(self.versions.current())
                version = self.versions.build(live["deltas"] + [bake_id], note=f"bake {bake_id}")
            with self._stage(bake_id, "probing", stages):
                verdict = self._gate(bake_id, version, items, gate)
            if verdict.passed:
                with self._stage(bake_id, "swapping", stages):
                    failures = self._promote(version)
                if failures:
                    verdict.passed = False
                    verdict.reason = "swap failed on " + ", ".join(f"{u}: {e}" for u, e in failures.items())
        except Exception as e:
            if self.stopping.is_set():  # the daemon is stopping: not the items' fault
                self.store.mark_items(item_ids, "pending", "bake cancelled: daemon stopping")
                self.store.update_bake(bake_id, status="cancelled", finished_at=_now(),
                                       verdict="cancelled", reason="daemon stopping")
                raise BakeCancelled() from e
            log.exception("bake %s failed", bake_id)
            reason = f"{e.__class__.__name__}: {e}"
            self.store.mark_items(item_ids, "failed", reason[:500], bake_id)
            self.store.update_bake(bake_id, status="failed", finished_at=_now(), verdict="failed",
                                   reason=reason[:2000], metrics={"stages": stages})
            self.daemon.notify("STATUS=ready; last bake failed")
            return

        outcome = "baked" if verdict.passed else "rejected"
        self.store.mark_items(item_ids, outcome, None if verdict.passed else verdict.reason[:500], bake_id)
        self.store.update_bake(
            bake_id, status="live" if verdict.passed else "rejected", finished_at=_now(),
            verdict="passed" if verdict.passed else "rejected", version=int(version[1:]),
            reason=verdict.reason, delta_path=str(self.versions.delta_dir(bake_id)),
            adapter_path=str(self.versions.path(version)),
            metrics={"stages": stages, "total_s": round(time.monotonic() - started, 3),
                     "train": train_report, **asdict(verdict)},
        )
        self.daemon.metrics.bake_duration.observe(time.monotonic() - started)
        self.daemon.notify(f"STATUS=ready; live adapter {self.versions.current()}")

    @contextmanager
    def _stage(self, bake_id: int, name: str, stages: dict[str, float]):
        """Show the stage in the bake's status and record how long it took (stages[name_s])."""
        self.store.update_bake(bake_id, status=name)
        started = time.monotonic()
        try:
            yield
        finally:
            stages[f"{name}_s"] = round(time.monotonic() - started, 3)

    def _train(self, bake_id: int, items: list[dict]) -> dict:
        """Train this bake's delta in a subprocess; return its report (bake.json)."""
        out_dir = self.versions.delta_dir(bake_id)
        job_path = self.cfg.state_path / "jobs" / f"bake-{bake_id:04d}.json"
        job_path.parent.mkdir(parents=True, exist_ok=True)
        job = {
            "model_dir": str(self.cfg.model_dir),
            "live_adapter": str(self.versions.current_path()),
            "out_dir": str(out_dir),
            "items": [_bake_item(i) for i in items],
            "earlier": [_bake_item(i) for i in self._earlier_items(bake_id)],
            "config": self._engine_config(),
        }
        job_path.write_text(json.dumps(job, indent=2))
        log_path = self.cfg.logs_dir / f"bake-{bake_id:04d}.log"
        with open(log_path, "ab") as logfile:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "agent_memory.baking", str(job_path)],
                stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=child_env(),  # the bake ends itself if the daemon is killed
            )
        code = self.process.wait()
        self.process = None
        if code != 0:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise RuntimeError(f"training exited with code {code}: {tail[0][:300]} (log: {log_path})")
        return json.loads((out_dir / "bake.json").read_text())

    def _earlier_items(self, bake_id: int) -> list[dict]:
        """Items the live version was baked with and still current (not superseded): the engine
        replays a few of them. At most REPLAY_POOL, drawn at random so old ones get their turn."""
        live_bakes = set(self.versions.manifest(self.versions.current())["deltas"])
        current = [i for i in self.store.list_items(status="baked", limit=-1)
                   if i["bake_id"] in live_bakes and not i.get("superseded_by")]
        return random.Random(bake_id).sample(current, min(REPLAY_POOL, len(current)))

    def _engine_config(self) -> dict:
        """[bake.engine], plus where the live model is served when vLLM is the teacher."""
        engine = dict(self.cfg.bake.engine or {})
        if engine.get("teacher") == "vllm" and not engine.get("teacher_url"):
            engine["teacher_url"] = self.daemon.serving.endpoints[0].url  # serves `memory` = the live model
        return engine

    # -- probes and the gate -----------------------------------------------------------------

    def _gate(self, bake_id: int, version: str, items: list[dict], gate: GateConfig) -> Verdict:
        """Load the candidate beside `memory`, probe both, and decide."""
        serving = self.daemon.serving
        endpoint = serving.endpoints[0]
        endpoint.load_adapter(CANDIDATE_NAME, self.versions.path(version))
        try:
            return self._judge(bake_id, endpoint.url, items, gate)
        finally:
            try:
                endpoint.unload_adapter(CANDIDATE_NAME)
            except ServingError as e:
                log.warning("could not unload the candidate: %s", e)

    def _judge(self, bake_id: int, url: str, items: list[dict], gate: GateConfig) -> Verdict:
        sets = {"items": probes.item_probes(items), **probes.registered_sets(self.cfg),
                "locality": probes.locality_probes()}
        scores, live_scores, locality = {}, {}, {}
        for name, probe_list in sets.items():
            if not probe_list:
                continue
            tokens = ITEM_MAX_TOKENS if name == "items" else GATE_MAX_TOKENS
            candidate = probes.run_remote(url, CANDIDATE_NAME, probe_list, max_tokens=tokens)
            self.store.add_probe_results(bake_id, [{**r, "probe_set": name, "model": "candidate"} for r in candidate])
            if name == "items":
                scores[name] = probes.accuracy(candidate)
                continue
            live = self._live_results(url, name, probe_list)
            if name == "locality":
                locality = probes.locality_scores(probe_list, live, candidate)
            else:
                scores[name], live_scores[name] = probes.accuracy(candidate), probes.accuracy(live)
        problems = []
        if scores.get("items", 1.0) < gate.min_item_accuracy:
            problems.append(f"items learned {scores['items']:.2f} < {gate.min_item_accuracy:.2f}")
        for name, live in live_scores.items():
            if scores[name] < live - gate.max_regression:
                problems.append(f"probe set '{name}' fell from {live:.2f} to {scores[name]:.2f}")
        if locality["kept"] < gate.min_locality_kept:
            problems.append(f"general knowledge kept {locality['kept']:.2f} < {gate.min_locality_kept:.2f}")
        reason = "; ".join(problems) or (
            f"items {scores.get('items', 0):.2f}, general knowledge kept {locality['kept']:.2f}, no regression")
        return Verdict(not problems, reason, scores, live_scores, locality)

    def _live_results(self, url: str, name: str, probe_list: list[dict]) -> list[dict]:
        """The live version's answers to a probe set: asked once per version, then remembered
        (they only change with a swap; this halves the probing of every later bake)."""
        key = (self.versions.current(), name, len(probe_list))
        if key not in self.live_answers:
            self.live_answers = {k: v for k, v in self.live_answers.items() if k[0] == key[0]}
            self.live_answers[key] = probes.run_remote(url, MEMORY_NAME, probe_list, max_tokens=GATE_MAX_TOKENS)
        return self.live_answers[key]

    def _promote(self, version: str) -> dict[str, str]:
        started = time.monotonic()
        failures = self.daemon.serving.swap(MEMORY_NAME, self.versions.path(version))
        if not failures:
            self.versions.set_current(version)
        self.daemon.metrics.swap_duration.observe(time.monotonic() - started)
        return failures


    # -- history operations: rollback and forget --------------------------------------------

    def rollback(self, version: str | None = None) -> dict:
        """Make an earlier version live again (default: the one before the current)."""
        with self._exclusive("rollback"):
            current = self.versions.current()
            target = version or self.store.previous_live_version(current)
            if target is None:
                raise UserError(f"no earlier version than {current} to roll back to")
            if target != EMPTY_VERSION and not (self.versions.path(target) / "manifest.json").exists():
                raise UserError(f"unknown adapter version {target!r}: see `agent-memory history`")
            self._swap_to(target)
            before = self.versions.manifest(current)["deltas"]
            after = self.versions.manifest(target)["deltas"]
            dropped = [b for b in before if b not in after]
            restored = [b for b in after if b not in before]  # rolling forward again
            for bake_id in dropped:
                ids = self.store.get_bake(bake_id)["item_ids"] or []
                self.store.mark_items(ids, "rejected", f"rolled back from {current} to {target}", bake_id)
            for bake_id in restored:  # items a rollback had taken out (not forgotten ones) are baked again
                ids = [i["id"] for i in self.store.list_items("rejected", bake_id=bake_id, limit=-1)]
                self.store.mark_items(ids, "baked", None, bake_id)
            self.store.record_event("rollback", {"from": current, "to": target, "dropped_bakes": dropped,
                                                 "restored_bakes": restored})
            return {"from": current, "to": target, "dropped_bakes": dropped, "restored_bakes": restored}

    def forget(self, item_id: int) -> dict:
        """Remove an item's knowledge: recompose without its bake's delta; re-queue its bake-mates."""
        with self._exclusive("forget"):
            item = self.store.get_item(item_id)
            if item is None:
                raise LookupError(f"no item {item_id}")
            current = self.versions.current()
            live_deltas = self.versions.manifest(current)["deltas"]
            bake_id = item.get("bake_id")
            if item["status"] != "baked" or bake_id not in live_deltas:
                self.store.mark_items([item_id], "forgotten", "forgotten before it was live", bake_id)
                return {"item": item_id, "version": current, "requeued": []}
            remaining = [b for b in live_deltas if b != bake_id]
            version = self.versions.build(remaining, note=f"forget item {item_id} (drop bake {bake_id})")
            self._swap_to(version)
            mates = [i for i in (self.store.get_bake(bake_id)["item_ids"] or []) if i != item_id]
            self.store.mark_items([item_id], "forgotten", f"dropped with bake {bake_id} in {version}", bake_id)
            self.store.mark_items(mates, "pending", f"re-queued: bake {bake_id} dropped to forget item {item_id}", None)
            self.store.record_event("forget", {"item": item_id, "bake": bake_id, "version": version,
                                               "requeued": mates})
            return {"item": item_id, "version": version, "requeued": mates}

    def _swap_to(self, version: str) -> None:
        path = self.versions.ensure(version)
        failures = self.daemon.serving.swap(MEMORY_NAME, path) if self.daemon.serving else {}
        if failures:
            raise ServingError("swap failed on " + ", ".join(f"{u}: {e}" for u, e in failures.items()))
        self.versions.set_current(version)

    @contextmanager
    def _exclusive(self, what: str):
        if self.running is not None or not self.store.acquire_lease("bake", owner=f"{os.getpid()}:{what}"):
            raise UserError(f"a bake is running; {what} again when it has finished")
        try:
            yield
        finally:
            self.store.release_lease("bake")


def _bake_item(item: dict) -> dict:
    keys = ("id", "kind", "text", "title", "source", "valid_at", "published_at", "messages")
    return {k: item.get(k) for k in keys}


def _now() -> str:
    from .store import utcnow

    return utcnow()
