"""Model serving: the vLLM engines behind the names `memory` and `base`, and how a version goes live.

Two ways to serve `memory` (config `vllm.serve_memory`; "auto" picks by device):

- **merged** (CPU): `memory` is a dense checkpoint, the base weights with the live deltas added in
  (`Versions.merged`), in its own vLLM engine; a new version is swapped in with vLLM's in-place
  `reload_weights` (vllm_entry.py's reload route), which also drops the prefix cache. vLLM's CPU LoRA
  path decodes at a fraction of the plain model's speed (bench/results/serving.md), so this is
  the fast way on CPU. `base` is a second engine on the untouched checkpoint: it never changes.
- **lora** (CUDA, or external servers): one engine serves both names as LoRA adapters, `base` as an
  all-zero adapter (vLLM on CPU can give a plain base request the output of an adapter request
  batched with it, ../shared/vllm-cpu-notes.md "mixed batches"); a version goes live by loading its
  adapter in place from a new directory (no missing name, no stale prefix cache keyed on the path).

Managed engines listen on loopback ports of their own, behind an internal API key that only the
daemon knows. Clients reach the models through the proxy (proxy.py) on `vllm.port`, which needs the
client key (`vllm.api_key` or the model-api-key file: auth.py), forwards only the OpenAI routes, and
routes each request by its model name. So no client can load, unload or reload what `memory` and `base` serve.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import httpx

from .auth import MODEL_API_KEY, ensure_secret
from .config import Config
from .errors import UserError
from .orphan import child_env
from .versions import Versions
from .vllm_entry import RELOAD_ROUTE

log = logging.getLogger(__name__)

BASE_NAME = "base"
MEMORY_NAME = "memory"
PUBLIC_NAMES = (MEMORY_NAME, BASE_NAME)
TEACHER_MAX_LOGPROBS = 64  # top log-probs per token a vLLM teacher may ask for (EngineConfig.topk)
HEALTH_TIMEOUT_S = 10.0  # a health check that takes longer counts as failed


class ServingError(Exception):
    """vLLM refused or failed an operation (an infrastructure failure, never a verdict)."""


def serve_mode(cfg: Config) -> str:
    """"merged" or "lora": how `memory` is served (see the module docstring)."""
    wanted = cfg.vllm.serve_memory
    if cfg.vllm.mode == "external":
        return "lora"  # we cannot reload the weights of servers we do not run
    if wanted != "auto":
        return wanted
    import torch  # only the daemon that runs vLLM itself gets here

    return "lora" if torch.cuda.is_available() else "merged"


class Endpoint:
    """One OpenAI-compatible vLLM server."""

    def __init__(self, url: str, api_key: str = "", timeout: float = 60.0):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers)

    def healthy(self) -> bool:
        try:
            return self.http.get("/health", timeout=HEALTH_TIMEOUT_S).status_code == 200
        except httpx.HTTPError:
            return False

    def served(self) -> dict[str, str]:
        """Served model names -> their adapter path (or the checkpoint path)."""
        data = self._call("GET", "/v1/models", timeout=HEALTH_TIMEOUT_S)
        return {card["id"]: card.get("root", "") for card in data["data"]}

    def load_adapter(self, name: str, path: Path, *, inplace: bool = True) -> None:
        body = {"lora_name": name, "lora_path": str(path), "load_inplace": inplace}
        self._call("POST", "/v1/load_lora_adapter", json=body)

    def unload_adapter(self, name: str) -> None:
        self._call("POST", "/v1/unload_lora_adapter", json={"lora_name": name})

    def reload_weights(self, checkpoint: Path) -> None:
        # Reading the weights scales with their size: 60 s plus 60 s per GB (a 135M model takes ~0.5 s).
        size_gb = sum(f.stat().st_size for f in Path(checkpoint).glob("*.safetensors")) / 1e9
        self._call("POST", RELOAD_ROUTE, json={"path": str(checkpoint)}, timeout=60 + 60 * size_gb)

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
    """One vLLM API server as our child process: started, watched, restarted, stopped."""

    def __init__(self, cfg: Config, role: str, model_dir: Path, served_name: str, lora: bool, api_key: str):
        self.cfg = cfg
        self.role = role  # "memory", "base" or "lora" (one engine for both names)
        self.model_dir = model_dir  # what a (re)start loads; a reload moves it
        self.served_name = served_name
        self.lora = lora
        self.api_key = api_key
        self.port = free_port(cfg.vllm.host)
        self.endpoint = Endpoint(f"http://{cfg.vllm.host}:{self.port}", api_key)
        self.log_path = cfg.logs_dir / f"vllm-{role}.log"
        self.pid_path = cfg.state_path / f"vllm-{role}.pid"
        self.process: subprocess.Popen | None = None
        self.restarts: deque[float] = deque()
        self.unhealthy_since: float | None = None

    def command(self) -> list[str]:
        v = self.cfg.vllm
        lora = ["--enable-lora", "--max-lora-rank", str(v.max_lora_rank), "--max-loras", str(v.max_loras),
                "--max-cpu-loras", str(v.max_loras + 2)] if self.lora else []
        return [
            sys.executable, "-m", "agent_memory.vllm_entry",
            "--model", str(self.model_dir), "--tokenizer", str(self.cfg.model_dir),
            "--served-model-name", self.served_name,
            "--host", v.host, "--port", str(self.port),
            *lora,
            *([] if v.compile else ["--enforce-eager"]),
            "--max-model-len", str(v.max_model_len),
            "--max-logprobs", str(TEACHER_MAX_LOGPROBS),
            "--dtype", serving_dtype(self.cfg),
            *v.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        env = child_env()  # vllm_entry stops vLLM if the daemon dies, even by kill -9
        bind = self.cfg.vllm.omp_threads_bind
        if bind == "all":
            bind = f"0-{(os.cpu_count() or 1) - 1}"
        env.update({
            "VLLM_API_KEY": self.api_key,  # in the environment, not on the command line `ps` shows
            "VLLM_CPU_KVCACHE_SPACE": str(self.cfg.vllm.kvcache_gib),
            "VLLM_CPU_OMP_THREADS_BIND": bind,
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",  # never reach for a hub: the checkpoint is local
        })
        if self.lora:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        if bind != "auto":
            env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        return env

    def launch(self) -> None:
        """Start the process; wait_ready() waits for it (engines boot side by side)."""
        if not (self.model_dir / "config.json").exists():
            raise UserError(f"no model checkpoint in {self.model_dir}: run `agent-memory model prepare` first")
        stop_stale(self.pid_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        rotate_log(self.log_path)
        with open(self.log_path, "ab") as logfile:
            log.info("starting vLLM (%s) on port %s (log: %s)", self.role, self.port, self.log_path)
            self.process = subprocess.Popen(
                self.command(), env=self.environment(), stdout=logfile, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        self.pid_path.write_text(str(self.process.pid))
        self.unhealthy_since = None

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.cfg.vllm.boot_timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise ServingError(f"vLLM ({self.role}) exited with code {code} while starting: "
                                   f"{self.last_log_line()} (full log: {self.log_path})")
            if self.endpoint.healthy():
                return
            time.sleep(1.0)
        self.stop()
        raise ServingError(f"vLLM ({self.role}) was not healthy within {self.cfg.vllm.boot_timeout_s:.0f}s "
                           f"(vllm.boot_timeout_s); log: {self.log_path}")

    def alive(self) -> bool:
        """Running and answering: an engine that has failed every health check for
        `vllm.unresponsive_restart_s` (stopped by SIGSTOP, hung) counts as dead. A slow machine
        answers within that time; it is not a reason to restart."""
        if self.process is None or self.process.poll() is not None:
            return False
        if self.endpoint.healthy():
            self.unhealthy_since = None
            return True
        now = time.monotonic()
        self.unhealthy_since = self.unhealthy_since or now
        return now - self.unhealthy_since < self.cfg.vllm.unresponsive_restart_s

    def may_restart(self) -> bool:
        """At most `restart_limit` restarts per window: a crash loop stops the daemon instead."""
        now = time.monotonic()
        while self.restarts and now - self.restarts[0] > self.cfg.vllm.restart_window_s:
            self.restarts.popleft()
        return len(self.restarts) < self.cfg.vllm.restart_limit

    def restart(self) -> None:
        self.restarts.append(time.monotonic())
        self.stop()
        self.launch()
        self.wait_ready()

    def stop(self, timeout: float = 30.0) -> None:
        process, self.process = self.process, None
        if process is not None:
            _signal_group(process.pid, signal.SIGCONT)  # a stopped engine cannot act on SIGTERM
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(process.pid, signal.SIGKILL)  # and whatever of its group is left
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                log.warning("vLLM (%s) pid %s did not exit after SIGKILL", self.role, process.pid)
        self.pid_path.unlink(missing_ok=True)

    def last_log_line(self) -> str:
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except FileNotFoundError:
            return "(no log)"
        errors = [ln for ln in lines[-60:] if "Error" in ln or "error" in ln]
        return (errors or lines or ["(empty log)"])[-1].strip()[:400]


class Serving:
    """What the daemon needs from the model servers: start them, keep `base` and `memory` up, and
    put a version live everywhere or nowhere."""

    def __init__(self, cfg: Config, versions: Versions):
        self.cfg = cfg
        self.versions = versions
        self.mode = serve_mode(cfg)
        self.live_version: str | None = None
        self.lock = threading.Lock()  # one swap/restart at a time
        self.proxy = None
        self.engines: list[ManagedVllm] = []
        if cfg.vllm.mode == "managed":
            self.client_key = ensure_secret(cfg.vllm.api_key, cfg.model_api_key_path, MODEL_API_KEY)
            internal_key = secrets.token_urlsafe(32)  # known to this daemon process only: new at each start
            if self.mode == "merged":
                self.engines = [ManagedVllm(cfg, "memory", versions.merged(versions.current()), MEMORY_NAME,
                                            False, internal_key),
                                ManagedVllm(cfg, "base", cfg.model_dir, BASE_NAME, False, internal_key)]
            else:
                self.engines = [ManagedVllm(cfg, "lora", cfg.model_dir, RAW_LORA_BASE_NAME, True, internal_key)]
            self.routes = {MEMORY_NAME: [self.engines[0].endpoint], BASE_NAME: [self.engines[-1].endpoint]}
        else:  # external: servers the user runs, both names as adapters, no proxy
            self.client_key = ""
            endpoints = [Endpoint(url) for url in cfg.vllm_urls]
            self.routes = {MEMORY_NAME: endpoints, BASE_NAME: endpoints}

    # -- what callers use ------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Where clients (and the daemon's own checks) send OpenAI requests."""
        return self.cfg.vllm_urls[0]

    def client(self):
        """A client of the model port, as users have it (key included)."""
        from .client import ModelClient

        return ModelClient(self.url, self.client_key)

    @property
    def restarts(self) -> int:
        return sum(len(e.restarts) for e in self.engines)

    def start(self, version: str) -> None:
        with self.lock:
            self.live_version = version
            if self.engines:
                ensure_port_free(self.cfg.vllm.host, self.cfg.vllm.port, "vllm.port")
            for engine in self.engines:
                engine.launch()
            for engine in self.engines:
                engine.wait_ready()
            if self.engines:
                from .proxy import start_proxy

                self.proxy = start_proxy(self.cfg, self.routes, self.client_key)
            self._load_names()

    def _load_names(self, endpoints: list[Endpoint] | None = None) -> None:
        """LoRA mode: (re)load both names' adapters (a restarted engine has none)."""
        if self.mode != "lora":
            return
        for endpoint in endpoints or self.routes[MEMORY_NAME]:
            endpoint.load_adapter(BASE_NAME, self.versions.zero())
            endpoint.load_adapter(MEMORY_NAME, self.versions.ensure(self.live_version))

    def swap(self, version: str) -> dict[str, str]:
        """Make `version` what `memory` serves on every endpoint, the first one (the canary) first.

        All or nothing: at the first endpoint that fails, the rollout stops and the endpoints that
        already took the new version are put back on the previous one, so replicas never serve two
        versions. Returns {url: error} for the endpoints that failed ({} = swapped everywhere).
        """
        failures: dict[str, str] = {}
        with self.lock:
            previous = self.live_version
            swapped = []
            for endpoint in self.routes[MEMORY_NAME]:
                try:
                    self._apply(endpoint, version)
                    swapped.append(endpoint)
                except ServingError as e:
                    failures[endpoint.url] = str(e)
                    break
            if failures and previous is not None:
                for endpoint in swapped:
                    try:
                        self._apply(endpoint, previous)
                    except ServingError as e:
                        failures[endpoint.url] = f"swapped, then could not be put back: {e}"
            if not failures:
                self.live_version = version
                if self.mode == "merged":
                    self.engines[0].model_dir = self.versions.merged(version)  # what a restart loads
        return failures

    def _apply(self, endpoint: Endpoint, version: str) -> None:
        if self.mode == "merged":
            endpoint.reload_weights(self.versions.merged(version))
        else:
            endpoint.load_adapter(MEMORY_NAME, self.versions.ensure(version))

    def check(self) -> None:
        """Called periodically: restart a dead, stopped or hung managed engine, with the live version."""
        for engine in self.engines:
            if engine.alive():
                continue
            with self.lock:
                if not engine.may_restart():
                    raise ServingError(
                        f"vLLM ({engine.role}) died {self.cfg.vllm.restart_limit} times within "
                        f"{self.cfg.vllm.restart_window_s:.0f}s; last: {engine.last_log_line()}")
                code = engine.process.poll() if engine.process else None
                log.warning("vLLM (%s) is gone or not answering (exit code %s); restarting it", engine.role, code)
                engine.restart()
                self._load_names([engine.endpoint])

    def healthy(self) -> bool:
        """Every endpoint answers and serves its names: a vLLM that has just been restarted is up a
        moment before its names are loaded again, and is not ready then."""
        for name, endpoints in self.routes.items():
            for endpoint in endpoints:
                try:
                    if name not in endpoint.served():
                        return False
                except ServingError:
                    return False
        return bool(self.routes[MEMORY_NAME])

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        for engine in self.engines:
            engine.stop()


# The checkpoint's own name on a LoRA-mode engine; the proxy never routes to it.
RAW_LORA_BASE_NAME = "agent-memory-raw-base"


def serving_dtype(cfg: Config) -> str:
    """The dtype vLLM serves in (and merged checkpoints are stored in): `vllm.dtype`, or measured."""
    if cfg.vllm.dtype != "auto":
        return cfg.vllm.dtype
    from .hardware import pick_dtype  # imports torch: only when we start vLLM ourselves

    return str(pick_dtype("auto")).removeprefix("torch.")


def rotate_log(path: Path, max_bytes: int = 20_000_000, keep: int = 2) -> None:
    """At each (re)start: a log past `max_bytes` becomes path.1 (path.1 -> path.2, ...)."""
    if not path.exists() or path.stat().st_size < max_bytes:
        return
    for n in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{n}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{n + 1}"))
    os.replace(path, path.with_name(f"{path.name}.1"))


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ensure_port_free(host: str, port: int, key: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As servers do: connections in TIME_WAIT from a previous run do not make the port busy.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            raise UserError(f"port {port} on {host} is already in use (config key '{key}')") from None


def stop_stale(pid_path: Path) -> None:
    """A vLLM left behind by a daemon that was killed -9 still runs: end its whole group."""
    try:
        pid = int(pid_path.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ValueError, ProcessLookupError):
        pid_path.unlink(missing_ok=True)
        return
    if b"agent_memory.vllm_entry" in cmdline:
        log.warning("stopping a vLLM (pid %s) left by an earlier daemon", pid)
        _signal_group(pid, signal.SIGCONT)
        _signal_group(pid, signal.SIGTERM)
        for _ in range(300):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.1)
        _signal_group(pid, signal.SIGKILL)
    pid_path.unlink(missing_ok=True)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # vLLM runs its engine in child processes: signal them all
    except (ProcessLookupError, PermissionError):
        pass
