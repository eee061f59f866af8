"""Run the real `agent-memory daemon` as a subprocess for tests: free ports, own state dir, logs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from agent_memory.serving import free_port

REPO = Path(__file__).resolve().parent.parent
PREPARED_MODEL = REPO / "state" / "models" / "smollm2-135m-instruct"


class DaemonProcess:
    """`agent-memory daemon` in its own process group, configured only through env vars."""

    def __init__(self, state_dir: Path, **settings: str):
        self.state_dir = state_dir
        self.api_port = int(settings.pop("api_port", free_port("127.0.0.1")))
        self.vllm_port = int(settings.pop("vllm_port", free_port("127.0.0.1")))
        self.env = {
            **os.environ,
            "AGENT_MEMORY_STATE_DIR": str(state_dir),
            "AGENT_MEMORY_API_PORT": str(self.api_port),
            "AGENT_MEMORY_VLLM_PORT": str(self.vllm_port),
            "AGENT_MEMORY_MODEL_PATH": str(PREPARED_MODEL),
            "AGENT_MEMORY_FEEDS_FILE": str(state_dir / "no-feeds.toml"),
            "AGENT_MEMORY_VLLM_KVCACHE_GIB": "1",
            "PYTHONUNBUFFERED": "1",
        }
        self.env.pop("AGENT_MEMORY_CONFIG", None)
        for key, value in settings.items():
            self.env[f"AGENT_MEMORY_{key.upper()}"] = value
        self.log_path = state_dir / "daemon-stdout.log"
        self.process: subprocess.Popen | None = None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def vllm(self) -> str:
        """The model port (the daemon's proxy in front of its vLLM engines)."""
        return f"http://127.0.0.1:{self.vllm_port}"

    @property
    def model_key(self) -> str:
        """The model API key the daemon created in its state dir (clients' OPENAI_API_KEY)."""
        return (self.state_dir / "model-api-key").read_text().strip()

    def model(self):
        """A client of the model port, as a user of this daemon would make it."""
        from agent_memory.client import ModelClient

        return ModelClient(self.vllm, self.model_key)

    def chat(self, model: str, question: str, max_tokens: int = 24) -> str:
        choice = self.model().chat(model, [{"role": "user", "content": question}], max_tokens=max_tokens,
                                   temperature=0)
        return choice["message"]["content"]

    def vllm_pids(self) -> dict[str, int]:
        """The managed vLLM engines' process group ids by role (memory, base)."""
        return {p.stem.removeprefix("vllm-"): int(p.read_text()) for p in self.state_dir.glob("vllm-*.pid")}

    @property
    def headers(self) -> dict[str, str]:
        """The API token as the CLI finds it (api.token, else the daemon's token file)."""
        from agent_memory import config
        from agent_memory.auth import auth_header, read_token

        token = read_token(config.load(env=self.env))
        assert token, f"no API token yet in {self.state_dir}: start the daemon first"
        return auth_header(token)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "agent_memory.cli", *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def start(self) -> "DaemonProcess":
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent_memory.cli", "daemon"], env=self.env,
            stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        return self

    def wait_ready(self, timeout: float = 400) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited with {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.api}/readyz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise AssertionError(f"daemon not ready within {timeout}s:\n{self.output()}")

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"daemon still running after {timeout}s:\n{self.output()}") from None

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """Leave nothing behind: the daemon's group and vLLM's (its own session)."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)
        for pid in self.vllm_pids().values():
            try:
                os.killpg(pid, signal.SIGCONT)
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


def write_noisy_version(state_dir: Path, number: int, seed: int = 0, scale: float = 0.2) -> str:
    """A live version `vNNNN` in a daemon's state dir whose one delta (bake 900+number, on the MLPs'
    gate/up, random A and B) changes the model's answers a lot; `rollback vNNNN` puts it live
    through the same swap a bake uses. Returns the version name."""
    import json

    import torch

    from agent_memory import adapters

    g = torch.Generator().manual_seed(seed)
    modules = {m: (torch.randn(8, fin, generator=g) * scale, torch.randn(fout, 8, generator=g) * scale)
               for m, (fin, fout) in adapters.module_shapes(PREPARED_MODEL, ["gate_proj", "up_proj"]).items()}
    bake_id, version = 900 + number, f"v{number:04d}"
    root = state_dir / "adapters"
    adapters.write_adapter(root / "deltas" / f"bake-{bake_id:04d}", modules, rank=8, alpha=8)
    adapters.compose([root / "deltas" / f"bake-{bake_id:04d}"], root / "live" / version, 64)  # the served adapter in lora mode
    (root / "live" / version / "manifest.json").write_text(json.dumps({"version": version, "deltas": [bake_id]}))
    return version
