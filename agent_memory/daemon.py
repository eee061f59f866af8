"""The long-running service: HTTP API (main thread), model serving, scheduled jobs.

Start order: check what can be checked at once (config, API port, model files), bring the API up
(so /livez answers during the minute vLLM boots), then boot vLLM and the scheduler in a thread.
systemd hears READY only when all three are up. A failure while booting stops the daemon with
one line and a non-zero exit; it never hangs.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from datetime import datetime, timezone
from contextlib import asynccontextmanager

import sdnotify
import uvicorn
from apscheduler.schedulers.background import BackgroundScheduler

from . import __version__
from .api import create_app
from .auth import ensure_token
from .bakery import Bakery
from .config import Config
from .errors import UserError
from .feeds import poll_due, seed_feeds
from .history import History
from .metrics import Metrics
from .serving import Serving, ServingError, ensure_port_free, serving_dtype
from .store import Store
from .versions import Versions

log = logging.getLogger("agent_memory")

WATCHDOG_INTERVAL_S = 10.0
SERVING_CHECK_INTERVAL_S = 5.0
FEED_CHECK_INTERVAL_S = 30.0
BAKE_CHECK_INTERVAL_S = 30.0


class Daemon:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        for path in (cfg.state_path, cfg.adapters_dir, cfg.logs_dir):
            path.mkdir(parents=True, exist_ok=True)
        self.store = Store(cfg.db_path)
        self.versions = Versions(cfg.adapters_dir, cfg.model_dir, cfg.vllm.max_lora_rank)
        self.serving: Serving | None = None
        self.bakery = Bakery(cfg, self.store, self.versions, events=self)
        self.history = History(self.store, self.versions, self.bakery)
        self.metrics = Metrics(self.store, self.versions, self.bakery, serving=lambda: self.serving)
        self.scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1})
        self.notifier = sdnotify.SystemdNotifier()
        self.started_at = time.time()
        self.booted = threading.Event()
        self.fatal: str | None = None  # set when booting or serving fails for good
        self.on_fatal = lambda: None  # how to stop the main loop (set by run_daemon)

    # -- lifecycle -------------------------------------------------------------------------

    def boot(self) -> None:
        """Bring up serving and the scheduler (runs in a thread while the API already answers)."""
        try:
            self.bakery.recover()  # a bake cut off by a crash or stop: recorded live, or items requeued
            seed_feeds(self.store, self.cfg)
            if self.cfg.vllm.mode != "off":
                self.notify(f"STATUS=starting vLLM ({self.cfg.vllm.mode})")
                if self.cfg.vllm.mode == "managed":
                    self.versions.dtype = serving_dtype(self.cfg)  # merged checkpoints are stored as served
                self.serving = Serving(self.cfg, self.versions)
                self.serving.start(self.versions.current())
                self.bakery.serving = self.serving
            self.schedule_jobs()
            self.scheduler.start()
            if self.serving is not None:
                self.bakery.start()
            self.booted.set()
            self.notify("READY=1", f"STATUS=ready; live adapter {self.versions.current()}")
            log.info("ready: API %s, model %s", self.cfg.api_url, ", ".join(self.cfg.vllm_urls) or "off")
        except (UserError, ServingError) as e:
            self.fail(str(e))
        except Exception as e:  # an unexpected bug: still stop cleanly with a readable line
            log.exception("boot failed")
            self.fail(f"boot failed: {e.__class__.__name__}: {e}")

    def schedule_jobs(self) -> None:
        # Every feed has its own interval; one frequent job polls those that are due.
        self.scheduler.add_job(self.poll_feeds, "interval", seconds=FEED_CHECK_INTERVAL_S,
                               id="feeds", next_run_time=datetime.now(timezone.utc))
        if self.serving is not None:
            self.scheduler.add_job(self.check_serving, "interval", seconds=SERVING_CHECK_INTERVAL_S,
                                   id="serving-check")
            self.scheduler.add_job(self.bakery.maybe_request, "interval", seconds=BAKE_CHECK_INTERVAL_S,
                                   id="bake-check")

    def poll_feeds(self) -> None:
        summary = poll_due(self.store, self.cfg)
        if any(summary.get(k) for k in ("new", "updated", "errors")):
            log.info("feeds: %s", summary)

    def check_serving(self) -> None:
        try:
            self.serving.check()
        except (ServingError, UserError) as e:
            self.fail(str(e))

    def fail(self, message: str) -> None:
        log.error("%s", message)
        self.fatal = message
        self.notify(f"STATUS=failed: {message}")
        self.on_fatal()

    def stop(self) -> None:
        self.notify("STOPPING=1")
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        if self.bakery.worker.is_alive():
            self.bakery.stop()
        if self.serving is not None:
            self.serving.stop()

    def notify(self, *lines: str) -> None:
        self.notifier.notify("\n".join(lines))  # a no-op outside systemd (no NOTIFY_SOCKET)

    # -- what the bakery reports (bakery.Events) ----------------------------------------------

    def bake_status(self, text: str) -> None:
        self.notify(f"STATUS={text}")

    def bake_finished(self, seconds: float) -> None:
        self.metrics.bake_duration.observe(seconds)

    def swapped(self, seconds: float) -> None:
        self.metrics.swap_duration.observe(seconds)

    # -- what the API reports ----------------------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        if self.fatal:
            return False, self.fatal
        if not self.booted.is_set():
            return False, "starting"
        if self.serving is not None and not self.serving.healthy():
            return False, "vLLM is not healthy"
        return True, "ready"

    def status(self) -> dict:
        ready, reason = self.readiness()
        serving = self.serving
        return {
            "version": __version__,
            "ready": ready,
            "state": reason,
            "uptime_s": round(time.time() - self.started_at, 1),
            "state_dir": str(self.cfg.state_path),
            "model": str(self.cfg.model_dir),
            "live_version": self.versions.current(),
            "vllm": {
                "mode": self.cfg.vllm.mode,
                "serve_memory": serving.mode if serving else None,
                "urls": ",".join(self.cfg.vllm_urls),
                "healthy": bool(serving and serving.healthy()),
                "pids": {e.role: e.process.pid for e in serving.engines if e.process} if serving else {},
                "engines": {e.role: e.endpoint.url for e in serving.engines} if serving else {},
                "restarts": serving.restarts if serving else 0,
            },
            "queue": self.store.counts_by_status(),
            "bake": {"running": self.bakery.running, "stage": self.bakery.stage, "waiting": self.bakery.waiting},
            "last_bake": _summary(self.store.list_bakes(limit=1)),
        }


def _summary(bakes: list[dict]) -> dict | None:
    if not bakes:
        return None
    b = bakes[0]
    return {k: b.get(k) for k in ("id", "status", "verdict", "version", "started_at", "finished_at", "reason")}


def run_daemon(cfg: Config) -> None:
    """Run until SIGTERM/SIGINT; raise UserError (one line, exit 1) if it cannot run."""
    _setup_logging(cfg)
    ensure_port_free(cfg.api.host, cfg.api.port, "api.port")
    if cfg.vllm.mode == "managed" and not (cfg.model_dir / "config.json").exists():
        raise UserError(f"no model checkpoint in {cfg.model_dir}: run `agent-memory model prepare` first")
    daemon = Daemon(cfg)
    ensure_token(cfg)  # api.token, or the 0600 token file made at the first start
    app = create_app(cfg, daemon.store, daemon.versions, bakery=daemon.bakery, history=daemon.history,
                     metrics=daemon.metrics, status=daemon.status, readiness=daemon.readiness)
    app.router.lifespan_context = _lifespan(daemon)
    server = uvicorn.Server(uvicorn.Config(
        app, host=cfg.api.host, port=cfg.api.port, log_level=cfg.log_level, access_log=False,
        log_config=None,  # uvicorn's lines go through our handlers, in our format (_setup_logging)
        timeout_graceful_shutdown=10,
    ))
    daemon.on_fatal = lambda: setattr(server, "should_exit", True)
    # uvicorn (>= 0.29) re-raises the signal it caught once it has shut down, with the handler that
    # was there before it: make that a no-op, so our own cleanup below runs and we exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        server.run()  # uvicorn handles SIGTERM/SIGINT by finishing in-flight requests, then returns
    finally:
        daemon.stop()
    if daemon.fatal:
        raise UserError(daemon.fatal)


def _lifespan(daemon: Daemon):
    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=daemon.boot, name="boot", daemon=True).start()
        watchdog = asyncio.create_task(_watchdog(daemon))
        yield
        watchdog.cancel()

    return lifespan


async def _watchdog(daemon: Daemon) -> None:
    """WATCHDOG=1 from the event loop itself: if the loop hangs, systemd restarts us."""
    while True:
        if daemon.fatal is None:
            daemon.notify("WATCHDOG=1")
        await asyncio.sleep(WATCHDOG_INTERVAL_S)


def _setup_logging(cfg: Config) -> None:
    cfg.logs_dir.mkdir(parents=True, exist_ok=True)
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handlers = [logging.StreamHandler(), logging.FileHandler(cfg.logs_dir / "daemon.log")]
    for h in handlers:
        h.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(cfg.log_level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # "skipped: maximum number of running instances" every 5 s while vLLM restarts is noise.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
