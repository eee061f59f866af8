"""One bake from queue to live: lease, claim items, train and probe, gate, compose, swap, check.

    pending items --claim--> baking --train + probe (subprocess)--> delta + the gate's answers
        --gate.decide--> pass: compose version, swap `memory`, check the served model, CURRENT;
                               the items it learnt baked, the others back in the queue
                         fail: items rejected with the reason, live untouched

Training runs in a subprocess (`python -m agent_memory.engine JOB.json`): the daemon stays
responsive, a stop can end it, and a kill -9 anywhere leaves at most a `.partial` directory, never
a delta under its final name. The same subprocess answers the gate's probes with the candidate and
the live model it already holds (bf16, batched), so no probe waits on the model server.

Only the gate's judgement rejects items. Everything else that can go wrong is infrastructure (the
trainer killed by the OOM killer, vLLM restarting or stopped, a full disk) and is retried with
backoff, resuming from the last finished stage: a trained delta is kept and re-used (not
re-trained) while the live version it was trained on is still live. A bake that still cannot finish
puts its items back in the queue with the reason (`failed` after `bake.max_attempts`, from where
`agent-memory retry` takes them). At start `recover` settles what a stop or kill cut off: a bake
whose delta is in the live version is recorded live, any other unfinished bake abandoned and its
items requeued.

One change of the served model at a time: a bake holds the `bake` lease row in SQLite while it
runs (so it holds across processes too); a rollback or a forget (history.py) takes the same lease
through `model_change()`, refused while a bake runs.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, fields, replace
from typing import Callable, Protocol

from . import gate as gate_mod
from . import probes
from .client import ModelError
from .config import Config, GateConfig, parse_duration, validate_gate
from .engine import PROBES_FILE
from .errors import ConflictError, UserError
from .orphan import child_env
from .serving import BASE_NAME, MEMORY_NAME, Serving, ServingError
from .records import BakeStatus, ItemStatus
from .store import Store, utcnow
from .versions import EMPTY_VERSION, Version, Versions

log = logging.getLogger(__name__)

MODEL_LEASE = "bake"  # the lease row held while the served model changes (a bake, a rollback, a forget)
# Bakes that ended without going live and may have left a finished delta a retry of the same items re-uses.
DELTA_REUSABLE = (BakeStatus.FAILED, BakeStatus.ABANDONED)
# Why an unteachable item (gate.judge_items) is rejected at once: a bake teaches what the prompted model says.
UNTEACHABLE = ("not learnt by bake {bake}: its teacher, the live model with this item in its prompt, answered none "
               "of its questions, so no bake can teach it; reword it (who did what, where) and add it again, "
               "or `agent-memory retry` it")
REPLAY_POOL = 64  # earlier items a bake job carries for the engine to replay a few of
SMOKE_PROBES = 8  # item probes asked of the served `memory` after a swap


class BakeCancelled(Exception):
    """The daemon is stopping; the bake's items go back to pending."""


class InfraError(Exception):
    """A stage failed for a reason that is not the items' fault; worth retrying."""


class Events(Protocol):
    """What the bakery tells the daemon (systemd status, logs, metrics)."""

    def bake_status(self, text: str) -> None: ...
    def bake_finished(self, seconds: float) -> None: ...
    def swapped(self, seconds: float) -> None: ...


class Bakery:
    def __init__(self, cfg: Config, store: Store, versions: Versions, events: Events,
                 serving: Serving | None = None):
        self.cfg = cfg
        self.store = store
        self.versions = versions
        self.events = events
        self.serving = serving  # set by the daemon once vLLM is up
        # One worker thread runs bakes one at a time; the lease row guards against other processes.
        self.requests: queue.Queue[int | None] = queue.Queue()
        self.worker = threading.Thread(target=self._work, name="bakery", daemon=True)
        self.lock = threading.Lock()
        self.waiting: int | None = None  # bake id queued but not started
        self.running: int | None = None
        self.stage: str | None = None  # of the running bake, with its progress ("train 12/30")
        self.process: subprocess.Popen | None = None  # the training subprocess
        self.stopping = threading.Event()

    # -- entry points ----------------------------------------------------------------------

    def recover(self) -> None:
        """At start, before anything else: settle what a stopped or killed daemon left half done."""
        current = self.versions.current()
        live_deltas = set(self.versions.manifest(current)["deltas"])
        for bake in self.store.unfinished_bakes():
            if bake["id"] in live_deltas:  # killed after the swap, before recording it: it is live
                answers = {model: [r for r in self.store.probe_results(bake["id"])
                                   if r["probe_set"] == gate_mod.ITEMS and r["model"] == model]
                           for model in ("candidate", "teacher")}
                _, missed, unteachable = gate_mod.judge_items(answers["candidate"], self._policy(bake).min_item_accuracy,
                                                              answers["teacher"])
                requeued = self._settle_items(bake["id"], bake["item_ids"] or [], missed, unteachable)
                self.store.update_bake(bake["id"], status=BakeStatus.LIVE, verdict=BakeStatus.LIVE.verdict,
                                       finished_at=utcnow(), version=current.number,
                                       metrics={**(bake["metrics"] or {}), "requeued": requeued},
                                       reason="live; the daemon stopped before recording the verdict")
        self.store.requeue_stale_baking()  # items of bakes that did not reach live go back to pending
        self.store.abandon_unfinished_bakes()  # their deltas stay on disk: a re-bake of the same items re-uses them
        self.store.release_dead_leases()  # held by a daemon that was killed -9
        for partial in self.versions.deltas_dir.glob("*.partial"):
            shutil.rmtree(partial, ignore_errors=True)  # a trainer killed mid-write
        self._prune_deltas()

    def start(self) -> None:
        self.worker.start()

    def request(self, trigger: str, gate: dict | None = None) -> int:
        """Queue a bake (coalesced: one waiting bake at most); returns its bake id.

        `gate` overrides `[gate]` settings for this bake only (e.g. a stricter min_item_accuracy).
        """
        if self.serving is None:
            if self.cfg.vllm.mode == "off":
                raise UserError("no model is served (vllm.mode = 'off'): nothing can be baked")
            raise ConflictError("the model server is still starting: ask for the bake again in a minute")
        gate_settings = asdict(self._gate_policy(gate or {}))  # validates the overrides now
        if trigger != "scheduled" and not self.store.counts_by_status().get(ItemStatus.PENDING):
            raise ConflictError("nothing to bake: no item is pending (`agent-memory queue` lists them)")
        with self.lock:
            if self.waiting is None or gate:
                config = {"trigger": trigger, "gate": gate_settings}
                self.waiting = self.store.create_bake(status=BakeStatus.QUEUED, config=config)["id"]
                self.requests.put(self.waiting)
            return self.waiting

    def _gate_policy(self, overrides: dict) -> GateConfig:
        known = {f.name for f in fields(GateConfig)} - {"probe_sets"}
        unknown = set(overrides) - known
        if unknown:
            raise UserError(f"unknown gate setting(s): {', '.join(sorted(unknown))}")
        try:
            policy = replace(self.cfg.gate, **{k: float(v) for k, v in overrides.items()})
        except (TypeError, ValueError):
            raise UserError("gate settings are numbers, e.g. min_item_accuracy=0.8") from None
        validate_gate(policy)
        return policy

    def due(self) -> bool:
        """Enough pending items, some pending and `bake.every` since the last bake, or (`bake.follow_up`)
        items the last bake left still pending: unlearnt by it (live), or not taken (`bake.max_items`)."""
        pending = self.store.counts_by_status().get(ItemStatus.PENDING, 0)
        if pending == 0:
            return False
        if pending >= self.cfg.bake.min_pending or (self.cfg.bake.follow_up and self._left_by_last_bake()):
            return True
        last = self.store.last_bake_started()
        return last is None or time.time() - last >= parse_duration(self.cfg.bake.every)

    def _left_by_last_bake(self) -> bool:
        # The last bake that trained (an empty, skipped or abandoned one after it changes nothing).
        last = self.store.last_bake((BakeStatus.LIVE, BakeStatus.REJECTED, BakeStatus.FAILED))
        if not last or last["status"] == BakeStatus.FAILED:
            return False
        metrics = last["metrics"] or {}
        left = (metrics.get("requeued") or {}).get(ItemStatus.PENDING) or []
        return bool(metrics.get("not_taken")) or \
            any((self.store.get_item(i) or {}).get("status") == ItemStatus.PENDING for i in left)

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
                self.stage = None

    def _run(self, bake_id: int) -> None:
        if not self.store.acquire_lease(MODEL_LEASE, owner=f"{os.getpid()}:bake {bake_id}"):
            self._finish(bake_id, BakeStatus.SKIPPED, reason="another process holds the bake lease")
            return
        try:
            self._bake(bake_id)
        finally:
            self.store.release_lease(MODEL_LEASE)

    def _finish(self, bake_id: int, status: BakeStatus, **fields) -> None:
        self.store.update_bake(bake_id, status=status, verdict=status.verdict, finished_at=utcnow(), **fields)

    # -- one bake --------------------------------------------------------------------------

    def _bake(self, bake_id: int) -> None:
        started = time.monotonic()
        self.store.update_bake(bake_id, status=BakeStatus.CLAIMING, started_at=utcnow())
        pending = self.store.counts_by_status().get(ItemStatus.PENDING, 0)
        items = self.store.claim_pending(self._share(pending), bake_id=bake_id)
        not_taken = pending - len(items)
        if not items:
            self._finish(bake_id, BakeStatus.EMPTY, reason="no pending items")
            return
        item_ids = [i["id"] for i in items]
        policy = self._policy(self.store.get_bake(bake_id))
        self.store.update_bake(bake_id, item_ids=item_ids)
        log.info("bake %s: %d items %s", bake_id, len(items), item_ids)
        stages: dict[str, float] = {}
        version, before = None, self.versions.current()
        try:
            with self._stage(bake_id, BakeStatus.TRAINING, stages):
                train_report, answers = self._retrying(BakeStatus.TRAINING, lambda: self._train(bake_id, items))
            self.store.add_probe_results(bake_id, [
                {**r, "probe_set": name, "model": model} for model in ("candidate", "live", "teacher")
                for name, results in (answers.get(model) or {}).items() for r in results])
            verdict = gate_mod.decide(answers["candidate"], answers["live"], policy, answers.get("teacher"))
            log.info("bake %s: gate %s: %s", bake_id, "passed" if verdict.passed else "rejected", verdict.reason)
            served = None
            if verdict.passed:
                with self._stage(bake_id, BakeStatus.COMPOSING, stages):
                    version = self._retrying(BakeStatus.COMPOSING, lambda: self._compose(bake_id))
                with self._stage(bake_id, BakeStatus.SWAPPING, stages):
                    self._retrying(BakeStatus.SWAPPING, lambda: self._promote(version))
                with self._stage(bake_id, BakeStatus.CHECKING, stages):
                    served = self._retrying(BakeStatus.CHECKING, lambda: self._check_served(answers))
        except Exception as e:
            self._failed(bake_id, item_ids, e, stages, version, before)
            return

        outcome = BakeStatus.LIVE if verdict.passed else BakeStatus.REJECTED
        if verdict.passed:
            requeued = self._settle_items(bake_id, item_ids, verdict.missed, verdict.unteachable)
        else:
            self.store.mark_items(item_ids, ItemStatus.REJECTED, verdict.reason[:500], bake_id)
            requeued = {}
        total = time.monotonic() - started
        self._finish(
            bake_id, outcome, version=version.number if version else None, reason=verdict.reason, delta_path=str(self.versions.delta_dir(bake_id)),
            adapter_path=str(self.versions.path(version)) if version else None,
            metrics={"stages": stages, "total_s": round(total, 3), "train": train_report,
                     "served": served, "live_version": before, "requeued": requeued, "not_taken": not_taken,
                     **asdict(verdict)},
        )
        self._prune_deltas()
        self.events.bake_finished(total)
        log.info("bake %s: %s in %.0f s; live %s", bake_id, outcome, total, self.versions.current())
        self.events.bake_status(f"ready; live {self.versions.current()}; last bake {bake_id} {outcome}")

    def _share(self, pending: int) -> int:
        """How many of the `pending` items this bake takes: all of them up to `bake.max_items`, else an
        equal share of them (the bakes after it take the rest at once), so no bake is left with a few."""
        bakes = -(-pending // self.cfg.bake.max_items)
        return -(-pending // bakes) if bakes else self.cfg.bake.max_items

    def _settle_items(self, bake_id: int, item_ids: list[int], missed: list, unteachable: list = ()) -> dict[str, list[int]]:
        """The bake is live: its items are baked, except those the gate found it did not learn
        (`missed`), which go back to the queue for the next bake (stacked on this one), until
        `bake.max_attempts` bakes have left them unlearnt: then `rejected`. An unteachable one (its
        teacher answered none of its questions: gate.judge_items) is `rejected` at once, with why."""
        missed = [i for i in item_ids if i in missed]
        unteachable = [i for i in missed if i in unteachable]
        self.store.mark_items([i for i in item_ids if i not in missed], ItemStatus.BAKED, None, bake_id)
        requeued = self.store.requeue([i for i in missed if i not in unteachable],
                                      f"not learnt by bake {bake_id} (live with the items it learnt)",
                                      self.cfg.bake.max_attempts, final=ItemStatus.REJECTED)
        if unteachable:
            self.store.mark_items(unteachable, ItemStatus.REJECTED, UNTEACHABLE.format(bake=bake_id), bake_id)
            requeued[ItemStatus.REJECTED] = sorted({*requeued.get(ItemStatus.REJECTED, []), *unteachable})
        if missed:
            log.info("bake %s: items %s not learnt: %s", bake_id, missed, requeued)
        return requeued

    def _policy(self, bake: dict) -> GateConfig:
        """The gate settings a bake was requested with (`bake --gate`), else `[gate]`."""
        return GateConfig(**(bake["config"] or {}).get("gate") or asdict(self.cfg.gate))

    def _failed(self, bake_id: int, item_ids: list[int], error: Exception, stages: dict, version: str | None,
                before: str) -> None:
        """The bake could not finish: nothing judged the items, so they go back to the queue."""
        if version and self.versions.current() == version:  # swapped, then the check failed for good
            try:
                self.swap_to(before)
            except Exception:  # noqa: BLE001 - recorded below; the next start serves CURRENT
                log.exception("bake %s: could not put %s back", bake_id, before)
        if self.stopping.is_set():  # the daemon is stopping: not the items' fault, no attempt counted
            self.store.mark_items(item_ids, ItemStatus.PENDING, "bake cancelled: daemon stopping")
            self._finish(bake_id, BakeStatus.CANCELLED, reason="daemon stopping", metrics={"stages": stages})
            raise BakeCancelled() from error
        log.error("bake %s failed: %s: %s", bake_id, error.__class__.__name__, error)
        reason = f"{error.__class__.__name__}: {error}"
        moved = self.store.requeue(item_ids, f"bake {bake_id} failed: {reason[:300]}", self.cfg.bake.max_attempts)
        self._finish(bake_id, BakeStatus.FAILED, reason=reason[:2000], metrics={"stages": stages, "items": moved})
        self.events.bake_status(f"ready; live {self.versions.current()}; last bake {bake_id} failed")

    def _retrying(self, stage: str, step: Callable):
        """Run one stage; on an infrastructure failure wait and run it again (the stage resumes:
        a finished training is re-used). `bake.retries` retries, waits doubling from
        `bake.retry_wait`; serving.check restarts a dead or stopped vLLM meanwhile."""
        wait = parse_duration(self.cfg.bake.retry_wait)
        for attempt in range(self.cfg.bake.retries + 1):
            if self.stopping.is_set():
                raise InfraError("daemon stopping")
            try:
                return step()
            except (InfraError, ServingError, OSError) as e:
                if attempt == self.cfg.bake.retries or self.stopping.is_set():
                    raise
                log.warning("bake stage %s failed (%s); retry %d/%d in %.0f s", stage, e, attempt + 1,
                            self.cfg.bake.retries, wait)
                self.stopping.wait(wait)
                wait *= 2

    @contextmanager
    def _stage(self, bake_id: int, name: BakeStatus, stages: dict[str, float]):
        """Show the stage in the bake's status, the journal and systemd's STATUS=; record its time."""
        self.store.update_bake(bake_id, status=name)
        self._progress(bake_id, name)
        log.info("bake %s: %s", bake_id, name)
        started = time.monotonic()
        try:
            yield
        finally:
            stages[f"{name}_s"] = round(time.monotonic() - started, 3)

    def _progress(self, bake_id: int, stage: str) -> None:
        self.stage = stage
        self.events.bake_status(f"baking (bake {bake_id}): {stage}")

    # -- stages ----------------------------------------------------------------------------

    def _train(self, bake_id: int, items: list[dict]) -> tuple[dict, dict]:
        """Train this bake's delta and answer the gate's probes in a subprocess; return its report
        (bake.json) and the answers (probes.json). A delta already trained for these items on the
        live version (an earlier try of this bake, or of the same items before a restart) is re-used."""
        out_dir = self.versions.delta_dir(bake_id)
        live = self.versions.current()
        self._reuse_delta(bake_id, [i["id"] for i in items], live)
        if not _finished_delta(out_dir, live):
            self._run_trainer(bake_id, items, live)
        report = json.loads((out_dir / "bake.json").read_text())
        answers = json.loads((out_dir / PROBES_FILE).read_text())
        for results in (*answers["candidate"].values(), *answers["live"].values(), *(answers.get("teacher") or {}).values()):
            for r in results:  # scored here: the keyword rule is the daemon's, whatever the trainer ran
                probes.rescore(r)
        return report, answers

    def _reuse_delta(self, bake_id: int, item_ids: list[int], live: str) -> None:
        """An unfinished earlier bake of exactly these items, trained on this live version, left a
        delta: take it over instead of training again."""
        out_dir = self.versions.delta_dir(bake_id)
        if out_dir.exists():
            return
        for bake in self.store.list_bakes(limit=20):
            if bake["id"] != bake_id and bake["status"] in DELTA_REUSABLE \
                    and sorted(bake["item_ids"] or []) == sorted(item_ids) \
                    and _finished_delta(self.versions.delta_dir(bake["id"]), live):
                os.rename(self.versions.delta_dir(bake["id"]), out_dir)
                log.info("bake %s: re-using the delta trained by bake %s", bake_id, bake["id"])
                return

    def _prune_deltas(self) -> None:
        """Delete the deltas no version holds and no retry can re-use: those of bakes that ended
        without going live, trained on a version that is no longer live."""
        live = self.versions.current()
        for bake in self.store.list_bakes(limit=1000):
            path = self.versions.delta_dir(bake["id"])
            if bake["status"] in (*DELTA_REUSABLE, BakeStatus.CANCELLED, BakeStatus.REJECTED) and path.exists() \
                    and not _finished_delta(path, live):
                shutil.rmtree(path, ignore_errors=True)

    def _run_trainer(self, bake_id: int, items: list[dict], live: str) -> None:
        out_dir = self.versions.delta_dir(bake_id)
        job_path = self.cfg.state_path / "jobs" / f"bake-{bake_id:04d}.json"
        job_path.parent.mkdir(parents=True, exist_ok=True)
        merged = self.serving is not None and self.serving.mode == "merged"
        items = self._with_updates(items)
        job = {
            # The live model as served: the merged checkpoint, or the base with the live adapter.
            "model_dir": str(self.versions.merged(live) if merged else self.cfg.model_dir),
            "live_adapter": None if merged else str(self.versions.ensure(live)),
            "live_version": live,
            "out_dir": str(out_dir),
            "items": items,
            "earlier": [_bake_item(i) for i in self._earlier_items(bake_id)],
            "config": self._engine_config(),
            "probe_plan": gate_mod.probe_plan(items, self.cfg),
            "live_cache": str(self.cfg.state_path / "probe-cache" / f"{live}.json"),
        }
        job_path.write_text(json.dumps(job, indent=2))
        log_path = self.cfg.logs_dir / f"bake-{bake_id:04d}.log"
        with open(log_path, "ab") as logfile:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "agent_memory.engine", str(job_path)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=child_env(),  # the bake ends itself if the daemon is killed
            )
            for line in self.process.stdout:  # progress lines ("train 12/30") to the log and the status
                logfile.write(line)
                logfile.flush()
                text = line.decode(errors="replace").strip()
                if text.split(" ")[0] in ("teacher", "train", "probe") and "/" in text:
                    self._progress(bake_id, text)
        code = self.process.wait()
        self.process = None
        if code != 0:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            message = f"training exited with code {code}: {tail[0][:300]} (log: {log_path})"
            # Killed by a signal (the OOM killer, an operator) is infrastructure; an exception
            # inside the engine is not worth the same retry in a minute.
            raise (InfraError if code < 0 else RuntimeError)(message)
        if not _finished_delta(out_dir, live):
            raise RuntimeError(f"training finished but {out_dir} has no delta with the gate's answers")

    def _compose(self, bake_id: int) -> str:
        live = self.versions.manifest(self.versions.current())
        return self.version_with(live["deltas"] + [bake_id], f"bake {bake_id}")

    def version_with(self, deltas: list[int], note: str) -> Version:
        """A version holding these deltas (the empty version for none), its served form ready."""
        version = self.versions.build(deltas, note=note) if deltas else EMPTY_VERSION
        if self.serving is not None and self.serving.mode == "merged":
            self.versions.merged(version)  # built now, so the swap itself only reloads weights
        return version

    def _promote(self, version: str) -> None:
        if self.versions.current() == version:
            return  # an earlier try got this far
        self.swap_to(version)

    def _check_served(self, answers: dict) -> dict:
        """Ask the served `memory` (through the model port, as users do) a few of the item probes:
        what users get must be what was tested (gate.served_problem says when it is not)."""
        candidate = answers["candidate"].get(gate_mod.ITEMS, [])[:SMOKE_PROBES]
        if not candidate or self.serving is None:
            return {}
        live = answers["live"][gate_mod.ITEMS][:SMOKE_PROBES]
        asked = [{"question": r["question"], "answers": r["expected"].split("|")} for r in candidate]
        try:
            served = probes.run_remote(self.serving.client(), MEMORY_NAME, asked, max_tokens=gate_mod.ITEM_MAX_TOKENS)
        except ModelError as e:
            raise InfraError(str(e)) from None
        problem = gate_mod.served_problem(served, candidate, live)
        if problem:
            raise RuntimeError(problem)
        return {k: probes.accuracy(v) for k, v in (("served", served), ("candidate", candidate), ("live", live))}

    def _with_updates(self, items: list[dict]) -> list[dict]:
        """The items as the engine takes them, each with the earlier items it updates (what it
        supersedes, or live items about the same subject) under "updates": the teacher sees both,
        the gate asks whether the stale state is still answered."""
        baked = self._live_items()
        return [{**_bake_item(i), "updates": [_bake_item(e) for e in probes.updated_by(i, baked)]} for i in items]

    def _live_items(self) -> list[dict]:
        """The items the live version was baked with."""
        live_bakes = set(self.versions.manifest(self.versions.current())["deltas"])
        return [i for i in self.store.list_items(status=ItemStatus.BAKED, limit=-1) if i["bake_id"] in live_bakes]

    def _earlier_items(self, bake_id: int) -> list[dict]:
        """Items the live version was baked with and still current (not superseded): the engine
        replays a few of them. At most REPLAY_POOL, drawn at random so old ones get their turn."""
        current = [i for i in self._live_items() if not i.get("superseded_by")]
        return random.Random(bake_id).sample(current, min(REPLAY_POOL, len(current)))

    def _engine_config(self) -> dict:
        """[bake.engine], plus where the live model is served when vLLM is the teacher."""
        engine = dict(self.cfg.bake.engine or {})
        if engine.get("teacher") == "vllm" and not engine.get("teacher_url"):
            engine["teacher_url"] = self.serving.url  # serves `memory` = the live model, and `base`
            engine["teacher_api_key"] = self.serving.client_key
            engine.update(teacher_model=MEMORY_NAME, teacher_base_model=BASE_NAME)
        return engine

    # -- what a bake shares with history.py (rollback, forget) -----------------------------------

    def swap_to(self, version: str) -> None:
        """`memory` serves `version` everywhere, then CURRENT says so (a kill -9 between the two
        leaves CURRENT on the old version, which the next start serves)."""
        started = time.monotonic()
        failures = self.serving.swap(version) if self.serving else {}
        if failures:
            raise ServingError("swap failed on " + ", ".join(f"{u}: {e}" for u, e in failures.items()))
        self.versions.set_current(version)
        seconds = time.monotonic() - started
        self.events.swapped(seconds)
        log.info("swapped memory to %s in %.2f s", version, seconds)
        self.versions.prune_merged()

    @contextmanager
    def model_change(self, what: str):
        """Hold the model lease for a change that is not a bake (a rollback, a forget), or raise
        ConflictError while a bake (or another change, here or in another process) holds it."""
        if self.running is not None or not self.store.acquire_lease(MODEL_LEASE, owner=f"{os.getpid()}:{what}"):
            raise ConflictError(f"a bake is running; {what} again when it has finished")
        try:
            yield
        finally:
            self.store.release_lease(MODEL_LEASE)


def _finished_delta(out_dir, live_version: str) -> bool:
    """A delta with its report and the gate's answers, trained on `live_version`."""
    try:
        report = json.loads((out_dir / "bake.json").read_text())
    except (FileNotFoundError, ValueError):
        return False
    return (out_dir / PROBES_FILE).exists() and report.get("live_version") == live_version


def _bake_item(item: dict) -> dict:
    keys = ("id", "kind", "text", "title", "source", "valid_at", "published_at", "messages")
    return {k: item.get(k) for k in keys}
