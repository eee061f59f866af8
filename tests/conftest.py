"""Shared fixtures: a config and store in a temp state dir, the API over the store alone, and a
real HTTP server on 127.0.0.1 whose answers each test controls."""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import pytest

from agent_memory.config import Config
from agent_memory.store import Store
from daemon_proc import DaemonProcess

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def cfg(tmp_path) -> Config:
    """Defaults, state in a temp dir, no model (`vllm.mode = "off"`), short feed timeouts, and
    feeds on 127.0.0.1 allowed (the test servers' address)."""
    cfg = Config(state_dir=str(tmp_path / "state"))
    cfg.vllm.mode = "off"
    cfg.feeds.timeout_s = 2.0
    cfg.feeds.allow_loopback = True
    cfg.feeds.file = str(tmp_path / "no-feeds.toml")
    return cfg


@pytest.fixture
def store(cfg) -> Store:
    store = Store(cfg.db_path)
    yield store
    store.close()


def stub_app(cfg: Config, store: Store):
    """The real app over the real store, without a bakery, serving or a scheduler: ready, with a
    status document like the daemon's."""

    from agent_memory.api import create_app
    from agent_memory.versions import Versions

    def status() -> dict:
        return {"ready": True, "state": "ready", "live_version": "v0000", "model": "stub",
                "vllm": {"urls": "", "healthy": False}, "queue": store.counts_by_status()}

    app = create_app(cfg, store, Versions(cfg.adapters_dir, cfg.model_dir, cfg.vllm.max_lora_rank),
                     bakery=None, history=None, metrics=None, status=status, readiness=lambda: (True, "ready"))
    return app


# The daemon serves on loopback, where it answers only to a loopback Host header.
API_BASE = "http://127.0.0.1:8700"


@pytest.fixture
def api(cfg, store):
    """A TestClient on the real app that sends the API token, made as the daemon makes it at start
    (`cfg.api.token` then holds it; change it to test a wrong one). `anon` has no token."""
    from fastapi.testclient import TestClient

    from agent_memory.auth import auth_header, ensure_token

    with TestClient(stub_app(cfg, store), base_url=API_BASE,
                    headers=auth_header(ensure_token(cfg))) as client:
        yield client


@pytest.fixture
def daemon(tmp_path):
    """`agent-memory daemon` with no model (vllm.mode = off), on free ports (it makes its own token); feeds on
    127.0.0.1 allowed (the test servers' address)."""
    proc = DaemonProcess(tmp_path / "state", vllm_mode="off", model_path="",
                         feeds_allow_loopback="true")
    proc.start()
    try:
        proc.wait_ready(timeout=60)
        yield proc
    finally:
        proc.kill()


@pytest.fixture
def anon(api):
    """A client of the same app without the token."""
    from fastapi.testclient import TestClient

    return TestClient(api.app, base_url=API_BASE)


# --- a real HTTP server -------------------------------------------------------------------


@dataclass
class Reply:
    status: int = 200
    headers: dict = field(default_factory=dict)
    body: bytes = b""
    trickle_s: float = 0.0  # > 0: send the body one byte at a time, this long apart


# A route answers with a Reply, or a function of the request headers that returns one.
Route = Reply | Callable[[dict], Reply]


class HttpServer:
    """http.server on 127.0.0.1 in a thread. `routes[path]` says what each path answers; every
    request is recorded in `requests` as (path, headers). `hang(path)` never answers (until the
    server stops)."""

    def __init__(self):
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, dict]] = []
        self.stopping = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                headers = {k.lower(): v for k, v in self.headers.items()}
                outer.requests.append((self.path, headers))
                route = outer.routes.get(self.path, Reply(404, body=b"not found"))
                reply = route(headers) if callable(route) else route
                if reply is None:  # hang: hold the connection open without a byte
                    outer.stopping.wait(60)
                    return
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                if not reply.trickle_s:
                    self.wfile.write(reply.body)
                    return
                for byte in reply.body:
                    if outer.stopping.wait(reply.trickle_s):
                        return
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()

            do_POST = do_DELETE = do_GET  # the body is not read: routes answer by path

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def serve(self, path: str, body: bytes | str, status: int = 200, **headers: str) -> str:
        """Answer `path` with this body (headers given as content_type="..." etc.); returns its URL."""
        body = body.encode() if isinstance(body, str) else body
        self.routes[path] = Reply(status, {k.replace("_", "-"): v for k, v in headers.items()}, body)
        return self.url(path)

    def hang(self, path: str) -> str:
        self.routes[path] = lambda headers: None
        return self.url(path)

    def hits(self, path: str) -> list[dict]:
        return [headers for p, headers in self.requests if p == path]

    def stop(self):
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def http_server():
    server = HttpServer()
    server.thread.start()
    yield server
    server.stop()


def slow_header_server(stop: threading.Event) -> socket.socket:
    """Answers every connection with a status line and then one header byte every 50 ms."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve(conn):
        with conn:
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100_000:
                if stop.wait(0.05):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    def accept():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener
