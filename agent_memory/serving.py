"""Model serving: vLLM as a managed child process (or external servers) and the names served on it.

Two names are served, both as LoRA adapters on the same base weights:
- `memory`: base + the live stacked adapter (a zero adapter before the first bake);
- `base`: a zero adapter, i.e. the untouched base model.
`base` is an adapter too because vLLM on CPU can give a plain base-model request the output of an
adapter request batched with it (see ../shared/vllm-cpu-notes.md, "mixed batches"): when every
request names an adapter, every request has its own adapter slot. The checkpoint's own name is
served as RAW_NAME, which clients should not use.

New adapter versions are swapped in with `load_inplace` from a new directory each time: no moment
without the name (no failed request), no stale prefix cache (keyed on the path). vllm_entry.py
fixes the per-step reload that `load_inplace` otherwise causes.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import httpx

from .config import Config
from .errors import UserError
from .orphan import child_env

log = logging.getLogger(__name__)

BASE_NAME = "base"
MEMORY_NAME = "memory"
RAW_NAME = "agent-memory-raw-base"
TEACHER_MAX_LOGPROBS = 64  # top log-probs per token a vLLM teacher may ask for (BakeConfig.topk)


class ServingError(Exception):
    """vLLM refused or failed an operation."""


class Endpoint:
    """One OpenAI-compatible vLLM server with runtime LoRA updating enabled."""

    def __init__(self, url: str, timeout: float = 60.0):
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, timeout=timeout)

    def healthy(self) -> bool:
        try:
            return self.http.get("/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def served(self) -> dict[str, str]:
        """Served model names -> their adapter path (or the checkpoint path for the base)."""
        data = self._call("GET", "/v1/models")
        return {card["id"]: card.get("root", "") for card in data["data"]}

    def load_adapter(self, name: str, path: Path, *, inplace: bool = True) -> None:
        body = {"lora_name": name, "lora_path": str(path), "load_inplace": inplace}
        self._call("POST", "/v1/load_lora_adapter", json=body)

    def unload_adapter(self, name: str) -> None:
        self._call("POST", "/v1/unload_lora_adapter", json={"lora_name": name})

    def _call(self, method: str, path: str, **kwargs):
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise ServingError(f"{self.url}{path}: {e.__class__.__name__}: {e}") from None
        if response.status_code != 200:
            raise ServingError(f"{self.url}{path}: {response.status_code} {response.text[:300]}")
        try:
            return response.json()
        except ValueError:
            return response.text


class ManagedVllm:
    """vLLM's API server as our child process: started, watched, restarted, stopped."""

    def __init__(self, cfg: Config, model_dir: Path):
        self.cfg = cfg
        self.model_dir = model_dir
        self.log_path = cfg.logs_dir / "vllm.log"
        self.pid_path = cfg.state_path / "vllm.pid"
        self.process: subprocess.Popen | None = None
        self.restarts: deque[float] = deque()

    def command(self) -> list[str]:
        v = self.cfg.vllm
        return [
            sys.executable, "-m", "agent_memory.vllm_entry",
            "--model", str(self.model_dir),
            "--served-model-name", RAW_NAME,
            "--host", v.host, "--port", str(v.port),
            "--enable-lora", "--max-lora-rank", str(v.max_lora_rank),
            "--max-loras", str(v.max_loras), "--max-cpu-loras", str(v.max_loras + 2),
            "--max-model-len", str(v.max_model_len),
            "--max-logprobs", str(TEACHER_MAX_LOGPROBS),
            "--dtype", self.dtype(),
            *v.extra_args,
        ]

    def dtype(self) -> str:
        if self.cfg.vllm.dtype != "auto":
            return self.cfg.vllm.dtype
        from .hardware import pick_dtype  # imports torch: only when we start vLLM ourselves

        return str(pick_dtype("auto")).removeprefix("torch.")

    def environment(self) -> dict[str, str]:
        env = child_env()  # vllm_entry stops vLLM if the daemon dies, even by kill -9
        bind = self.cfg.vllm.omp_threads_bind
        if bind == "all":
            bind = f"0-{(os.cpu_count() or 1) - 1}"
        env.update({
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_CPU_KVCACHE_SPACE": str(self.cfg.vllm.kvcache_gib),
            "VLLM_CPU_OMP_THREADS_BIND": bind,
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",  # never reach for a hub: the checkpoint is local
        })
        if bind != "auto":
            env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        return env

    def start(self) -> None:
        if not (self.model_dir / "config.json").exists():
            raise UserError(
                f"no model checkpoint in {self.model_dir}: run `agent-memory model prepare` first"
            )
        self._stop_stale()
        ensure_port_free(self.cfg.vllm.host, self.cfg.vllm.port, "vllm.port")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logfile = open(self.log_path, "ab")
        log.info("starting vLLM on port %s (log: %s)", self.cfg.vllm.port, self.log_path)
        self.process = subprocess.Popen(
            self.command(), env=self.environment(), stdout=logfile, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        logfile.close()
        self.pid_path.write_text(str(self.process.pid))
        self.wait_ready()

    def wait_ready(self) -> None:
        endpoint = Endpoint(f"http://{self.cfg.vllm.host}:{self.cfg.vllm.port}")
        deadline = time.monotonic() + self.cfg.vllm.boot_timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise ServingError(
                    f"vLLM exited with code {code} while starting: {self.last_log_line()} "
                    f"(full log: {self.log_path})"
                )
            if endpoint.healthy():
                return
            time.sleep(1.0)
        self.stop()
        raise ServingError(
            f"vLLM was not healthy within {self.cfg.vllm.boot_timeout_s:.0f}s "
            f"(vllm.boot_timeout_s); log: {self.log_path}"
        )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def may_restart(self) -> bool:
        """At most `restart_limit` restarts per window: a crash loop stops the daemon instead."""
        now = time.monotonic()
        while self.restarts and now - self.restarts[0] > self.cfg.vllm.restart_window_s:
            self.restarts.popleft()
        return len(self.restarts) < self.cfg.vllm.restart_limit

    def restart(self) -> None:
        self.restarts.append(time.monotonic())
        self.stop()
        self.start()

    def stop(self, timeout: float = 30.0) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
                process.wait(10)
        self.pid_path.unlink(missing_ok=True)

    def last_log_line(self) -> str:
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except FileNotFoundError:
            return "(no log)"
        errors = [ln for ln in lines[-60:] if "Error" in ln or "error" in ln]
        return (errors or lines or ["(empty log)"])[-1].strip()[:400]

    def _stop_stale(self) -> None:
        """A vLLM left behind by a daemon that was killed -9 still holds the port: end it."""
        try:
            pid = int(self.pid_path.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return
        if b"agent_memory.vllm_entry" in cmdline:
            log.warning("stopping a vLLM (pid %s) left by an earlier daemon", pid)
            _signal_group(pid, signal.SIGTERM)
            for _ in range(300):
                if not Path(f"/proc/{pid}").exists():
                    break
                time.sleep(0.1)
            else:
                _signal_group(pid, signal.SIGKILL)
        self.pid_path.unlink(missing_ok=True)


class Serving:
    """What the daemon needs from the model servers: start them, keep `base` and `memory` up."""

    def __init__(self, cfg: Config, zero_adapter: Path):
        self.cfg = cfg
        self.zero_adapter = zero_adapter
        self.endpoints = [Endpoint(url) for url in cfg.vllm_urls]
        self.managed = ManagedVllm(cfg, cfg.model_dir) if cfg.vllm.mode == "managed" else None
        self.live_adapter: Path | None = None
        self.lock = threading.Lock()  # one load/swap/restart at a time

    def start(self, live_adapter: Path) -> None:
        with self.lock:
            self.live_adapter = live_adapter
            if self.managed:
                self.managed.start()
            for endpoint in self.endpoints:
                self._load_names(endpoint)

    def _load_names(self, endpoint: Endpoint) -> None:
        if not endpoint.healthy():
            raise ServingError(f"vLLM at {endpoint.url} is not healthy")
        endpoint.load_adapter(BASE_NAME, self.zero_adapter)
        endpoint.load_adapter(MEMORY_NAME, self.live_adapter)

    def swap(self, name: str, adapter_dir: Path) -> dict[str, str]:
        """Point `name` at `adapter_dir` on every endpoint, the first one (the canary) first.

        All or nothing: at the first endpoint that fails, the rollout stops and the endpoints that
        already took the new adapter are put back on the previous one, so replicas never serve two
        versions. Returns {url: error} for the endpoints that failed ({} = swapped everywhere).
        """
        previous = self.live_adapter if name == MEMORY_NAME else None
        failures: dict[str, str] = {}
        with self.lock:
            swapped = []
            for endpoint in self.endpoints:
                try:
                    endpoint.load_adapter(name, adapter_dir)
                    swapped.append(endpoint)
                except ServingError as e:
                    failures[endpoint.url] = str(e)
                    break
            if failures and previous is not None:
                for endpoint in swapped:
                    try:
                        endpoint.load_adapter(name, previous)
                    except ServingError as e:
                        failures[endpoint.url] = f"swapped, then could not be put back: {e}"
            if name == MEMORY_NAME and not failures:
                self.live_adapter = adapter_dir
        return failures

    def check(self) -> None:
        """Called periodically: restart a dead managed vLLM and re-load the live names."""
        if not self.managed or self.managed.alive():
            return
        with self.lock:
            if self.managed.alive():
                return
            if not self.managed.may_restart():
                raise ServingError(
                    f"vLLM died {self.cfg.vllm.restart_limit} times within "
                    f"{self.cfg.vllm.restart_window_s:.0f}s; last: {self.managed.last_log_line()}"
                )
            code = self.managed.process.poll() if self.managed.process else None
            log.warning("vLLM exited (code %s); restarting it", code)
            self.managed.restart()
            for endpoint in self.endpoints:
                self._load_names(endpoint)

    def healthy(self) -> bool:
        """Every endpoint answers and serves `base` and `memory`: a vLLM that has just been
        restarted is up a moment before its names are loaded again, and is not ready then."""
        return bool(self.endpoints) and all(e.healthy() and _serves_our_names(e) for e in self.endpoints)

    def stop(self) -> None:
        if self.managed:
            self.managed.stop()


def _serves_our_names(endpoint: Endpoint) -> bool:
    try:
        return {BASE_NAME, MEMORY_NAME} <= set(endpoint.served())
    except ServingError:  # it died between the two calls
        return False


def ensure_port_free(host: str, port: int, key: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As servers do: connections in TIME_WAIT from a previous run do not make the port busy.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            raise UserError(f"port {port} on {host} is already in use (config key '{key}')") from None


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # vLLM runs its engine in child processes: signal them all
    except (ProcessLookupError, PermissionError):
        pass
