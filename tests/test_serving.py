"""Swapping `memory` across several vLLM replicas (external mode): canary first, all or nothing.

The replicas are real HTTP servers on 127.0.0.1 that answer vLLM's runtime-LoRA endpoints the way
vLLM does (200, or an error status); the real vLLM path is covered in test_daemon_vllm.py.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agent_memory.config import Config
from agent_memory.serving import MEMORY_NAME, Serving
from agent_memory.versions import Versions


class Replica:
    """A stand-in vLLM: records which adapter path each name points at; `failing` answers 500."""

    def __init__(self):
        self.adapters: dict[str, str] = {}
        self.loads: list[str] = []
        self.failing = False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if outer.failing:
                    self.send_response(500)
                    self.end_headers()
                    self.wfile.write(b"engine dead")
                    return
                outer.adapters[body["lora_name"]] = body["lora_path"]
                outer.loads.append(body["lora_path"])
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'"ok"')

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def replicas():
    servers = [Replica() for _ in range(3)]
    yield servers
    for s in servers:
        s.server.shutdown()
        s.server.server_close()


def serving_for(replicas, tmp_path) -> Serving:
    cfg = Config(state_dir=str(tmp_path))
    cfg.vllm.mode = "external"
    cfg.vllm.urls = [r.url for r in replicas]
    serving = Serving(cfg, Versions(cfg.adapters_dir, cfg.model_dir, cfg.vllm.max_lora_rank))
    assert serving.mode == "lora"  # external servers are never reloaded: adapters only
    serving.live_version = "v0001"
    for r in replicas:
        r.adapters[MEMORY_NAME] = path(tmp_path, "v0001")
    return serving


def path(tmp_path, version: str) -> str:
    return str(tmp_path / "adapters" / "live" / version)


def test_swap_reaches_every_replica_canary_first(replicas, tmp_path):
    serving = serving_for(replicas, tmp_path)
    assert serving.swap("v0002") == {}
    assert all(r.adapters[MEMORY_NAME] == path(tmp_path, "v0002") for r in replicas)
    assert serving.live_version == "v0002"


def test_failing_canary_stops_the_rollout(replicas, tmp_path):
    serving = serving_for(replicas, tmp_path)
    replicas[0].failing = True
    failures = serving.swap("v0002")
    assert list(failures) == [replicas[0].url] and "500" in failures[replicas[0].url]
    assert replicas[1].loads == [] and replicas[2].loads == []  # never asked
    assert serving.live_version == "v0001"


def test_a_failing_replica_puts_the_others_back(replicas, tmp_path):
    serving = serving_for(replicas, tmp_path)
    replicas[1].failing = True
    failures = serving.swap("v0002")
    assert list(failures) == [replicas[1].url]
    # The canary took v0002, then went back: no two versions served side by side.
    assert replicas[0].loads == [path(tmp_path, "v0002"), path(tmp_path, "v0001")]
    assert replicas[0].adapters[MEMORY_NAME] == path(tmp_path, "v0001")
    assert replicas[2].loads == []
    assert serving.live_version == "v0001"


def test_an_engine_log_past_its_size_is_rotated_at_start(tmp_path):
    from agent_memory.serving import rotate_log

    log = tmp_path / "vllm-memory.log"
    log.write_bytes(b"x" * 30)
    rotate_log(log, max_bytes=100)
    assert log.exists() and not (tmp_path / "vllm-memory.log.1").exists()  # small: left alone
    for generation in (b"a", b"b", b"c"):
        log.write_bytes(generation * 200)
        rotate_log(log, max_bytes=100, keep=2)
    assert not log.exists()
    assert (tmp_path / "vllm-memory.log.1").read_bytes() == b"c" * 200
    assert (tmp_path / "vllm-memory.log.2").read_bytes() == b"b" * 200
    assert not (tmp_path / "vllm-memory.log.3").exists()
