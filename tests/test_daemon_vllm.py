"""The daemon with a REAL vLLM CPU server on the embedded model (one boot shared by the module).

Covers: `base` and `memory` answer through the model port (the daemon's proxy, with the model API
key); no client can load, unload or reload what they serve; a version swapped in by reloading the
dense weights changes `memory` while `base` stays the base model under concurrent traffic; CLI
`ask`/`status`; a seeded request with a split prefill (a vLLM CPU crash we patch); the vLLM
teacher; an engine killed -9 is restarted with the live version; SIGTERM stops everything.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from daemon_proc import PREPARED_MODEL, DaemonProcess, write_noisy_version

pytestmark = pytest.mark.vllm

QUESTION = "What is the capital of Japan?"


class NotifySocket:
    """What systemd does for Type=notify: a unix datagram socket named in $NOTIFY_SOCKET."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.path = path
        self.messages: list[tuple[float, str]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        while True:
            data = self.sock.recv(4096).decode()
            self.messages.append((time.monotonic(), data))

    def first(self, line: str) -> float | None:
        return next((t for t, m in self.messages if line in m.splitlines()), None)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    state = tmp_path_factory.mktemp("vllm-daemon")
    notify = NotifySocket(state / "notify.sock")
    proc = DaemonProcess(state)
    proc.env["NOTIFY_SOCKET"] = str(notify.path)
    proc.notify = notify
    proc.start()
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.kill()


@pytest.fixture(scope="module")
def base_answer(daemon):
    return daemon.chat("base", QUESTION)


def test_base_and_memory_answer_before_any_bake(daemon, base_answer):
    assert "Tokyo" in base_answer
    # memory = the base weights before the first bake: the same greedy answer.
    assert daemon.chat("memory", QUESTION) == base_answer
    models = httpx.get(f"{daemon.vllm}/v1/models", headers=auth(daemon)).json()["data"]
    assert [m["id"] for m in models] == ["memory", "base"]
    assert "/" not in json.dumps(models)  # no local paths
    assert os.stat(daemon.state_dir / "model-api-key").st_mode & 0o777 == 0o600


def auth(daemon) -> dict:
    return {"Authorization": f"Bearer {daemon.model_key}"}


def test_no_client_can_change_what_is_served(daemon, base_answer):
    """The model port needs the key and forwards only generation; the engines behind it need a
    key only the daemon has (issue: any local process could replace `memory`)."""
    body = {"model": "memory", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4}
    assert httpx.post(f"{daemon.vllm}/v1/chat/completions", json=body).status_code == 401
    bad = {"Authorization": "Bearer wrong"}
    assert httpx.post(f"{daemon.vllm}/v1/chat/completions", json=body, headers=bad).status_code == 401
    for path, payload in (("/v1/load_lora_adapter", {"lora_name": "memory", "lora_path": "/tmp/x"}),
                          ("/v1/unload_lora_adapter", {"lora_name": "memory"}),
                          ("/v1/agent_memory/reload_weights", {"path": "/tmp/x"}),
                          ("/collective_rpc", {"method": "reload_weights"})):
        assert httpx.post(f"{daemon.vllm}{path}", json=payload, headers=auth(daemon)).status_code == 404
    wrong = httpx.post(f"{daemon.vllm}/v1/chat/completions", headers=auth(daemon),
                       json={**body, "model": "agent-memory-raw-base"})
    assert wrong.status_code == 404 and "memory, base" in wrong.text
    # The engines themselves: loopback ports of their own, every route under /v1 behind the internal key.
    status = json.loads(daemon.cli("status", "--json").stdout)
    for url in status["vllm"]["engines"].values():
        assert httpx.post(f"{url}/v1/agent_memory/reload_weights", json={"path": "/tmp/x"},
                          headers=auth(daemon)).status_code == 401
    assert daemon.chat("memory", QUESTION) == base_answer


def test_systemd_ready_only_after_vllm_serves(daemon):
    notify = daemon.notify
    ready_at = notify.first("READY=1")
    assert ready_at is not None
    # READY came after the "starting vLLM" status, and vLLM answered by then (fixture waited).
    starting = [t for t, m in notify.messages if "STATUS=starting vLLM" in m]
    assert starting and starting[0] < ready_at
    assert notify.first("WATCHDOG=1") is not None


def test_status_and_ask_through_the_cli(daemon, base_answer):
    result = daemon.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["ready"] is True and status["live_version"] == "v0000"
    assert status["vllm"]["healthy"] is True
    result = daemon.cli("ask", QUESTION, "--model", "base", "--max-tokens", "24", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["answer"] == base_answer


def test_a_swapped_version_changes_memory_and_base_stays_base_under_concurrency(daemon, base_answer):
    """A version whose delta changes the answers, put live with `rollback` (the swap every bake
    and rollback uses: merged weights reloaded in place), then taken out again."""
    version = write_noisy_version(daemon.state_dir, 1)
    result = daemon.cli("rollback", version, "--json")
    assert result.returncode == 0, result.stderr
    try:
        changed = daemon.chat("memory", QUESTION)
        assert changed != base_answer
        assert (daemon.state_dir / "models" / "merged" / "v0001" / "model.safetensors").exists()

        # base and memory requests in flight together, many rounds: two engines, never mixed.
        jobs = [("base" if i % 2 else "memory") for i in range(24)]
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(lambda model: (model, daemon.chat(model, QUESTION)), jobs))
        assert [a for m, a in answers if m == "base"] == [base_answer] * 12
        # (batched, the changed model's greedy answers may differ among themselves: near-ties in bf16)
        assert all(a != base_answer for m, a in answers if m == "memory")
    finally:
        result = daemon.cli("rollback", "v0000", "--json")
        assert result.returncode == 0, result.stderr
    assert daemon.chat("memory", QUESTION) == base_answer



def test_a_seeded_request_with_a_split_prefill_does_not_kill_vllm(daemon, base_answer):
    """A `seed` and a prompt longer than one step's token budget (2048 on CPU): unpatched, vLLM's CPU
    engine died rewinding the request's generator ("CPU Generator does not use offset")."""
    import httpx

    pid = json.loads(daemon.cli("status", "--json").stdout)["vllm"]["pids"]["memory"]
    story = " ".join(f"On day {i} the harbour master counted {i * 7} ships and wrote it down." for i in range(200))
    response = httpx.post(f"{daemon.vllm}/v1/chat/completions", timeout=300, headers=auth(daemon), json={
        "model": "memory", "messages": [{"role": "user", "content": story + "\nHow many days are listed?"}],
        "max_tokens": 8, "temperature": 0.8, "seed": 7, "n": 2})
    assert response.status_code == 200, response.text[:500]
    assert len(response.json()["choices"]) == 2 and response.json()["usage"]["prompt_tokens"] > 2048
    assert daemon.chat("memory", QUESTION) == base_answer
    assert json.loads(daemon.cli("status", "--json").stdout)["vllm"]["pids"]["memory"] == pid  # not restarted



def test_vllm_teacher_samples_the_live_models_distribution(daemon):
    """EngineConfig(teacher="vllm"): samples and top-k log-probs come from `memory` (the live model,
    = base before any bake) and match what the model itself computes for the same tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agent_memory import probes, prompts
    from agent_memory.engine import queries, teacher
    from agent_memory.engine.config import EngineConfig

    tok = AutoTokenizer.from_pretrained(PREPARED_MODEL)
    cfg = EngineConfig(teacher="vllm", teacher_url=daemon.vllm, teacher_api_key=daemon.model_key,
                       samples_per_query=3, max_new_tokens=12)
    fact = {"kind": "headline", "text": probes.set_facts("durov")["u1"]["text"]}
    query = queries.Query("Where was Pavel Durov arrested?", prompts.teacher_system(fact, "append"), 1, "knowledge")
    [(_, samples)] = list(teacher.remote_samples(tok, [query], cfg))
    assert len(samples) == 3
    answer, top_idx, top_logp, _ = samples[0]  # the greedy one
    assert top_idx.shape == top_logp.shape == (len(answer), cfg.topk)
    model = AutoModelForCausalLM.from_pretrained(PREPARED_MODEL, dtype=torch.float32).eval()
    prompt = teacher.chat_ids(tok, query.context + [{"role": "user", "content": query.question}])
    with torch.no_grad():
        logp = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1].log_softmax(-1)
    assert (logp.argmax(-1) == torch.tensor(answer)).float().mean() >= 0.9  # greedy = the model's greedy
    # Same distribution over the returned tokens (vLLM serves bf16 here, the reference is fp32).
    assert torch.allclose(logp.gather(-1, top_idx).exp(), top_logp.exp(), atol=0.05)
    examples = teacher.keep_samples(tok, query, samples, cfg)
    assert examples and examples[0].prompt_ids == teacher.chat_ids(tok, [{"role": "user", "content": query.question}])


def test_an_engine_killed_is_restarted_with_the_live_version(daemon, base_answer):
    old_pid = daemon.vllm_pids()["memory"]
    os.killpg(old_pid, signal.SIGKILL)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        status = json.loads(daemon.cli("status", "--json").stdout)
        if status["vllm"]["pids"].get("memory") not in (None, old_pid) and status["ready"]:
            break
        time.sleep(2)
    assert status["vllm"]["restarts"] == 1 and status["vllm"]["pids"]["memory"] != old_pid
    assert not Path(f"/proc/{old_pid}").exists() or _is_zombie(old_pid)
    assert daemon.chat("memory", QUESTION) == base_answer


def test_sigterm_stops_daemon_and_vllm(daemon):
    pids = daemon.vllm_pids()
    assert set(pids) == {"memory", "base"}
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.wait_exit(timeout=90) == 0
    assert daemon.notify.first("STOPPING=1") is not None
    assert all(not Path(f"/proc/{pid}").exists() or _is_zombie(pid) for pid in pids.values())
    assert not daemon.vllm_pids()


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True
