"""The daemon with a REAL vLLM CPU server on the embedded model (one boot shared by the module).

Covers: `base` and `memory` answer; a LoRA loaded at runtime changes `memory`; `base` stays the
base model while adapter traffic runs concurrently (vLLM's mixed-batch bug); CLI `ask`/`status`;
a seeded request with a split prefill (a vLLM CPU crash we patch); vLLM killed -> restarted with the
live adapter re-loaded; SIGTERM stops everything cleanly.
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

import pytest
import torch

from daemon_proc import PREPARED_MODEL, DaemonProcess, chat
from agent_memory.serving import MEMORY_NAME, Endpoint

pytestmark = pytest.mark.vllm

QUESTION = "What is the capital of France?"


def write_noisy_adapter(out_dir: Path, scale: float = 1.0, seed: int = 0) -> Path:
    """A real peft LoRA whose B is random, so it changes the model's answers a lot."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(PREPARED_MODEL)
    peft_model = get_peft_model(model, LoraConfig(
        r=8, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, scale)
    peft_model.save_pretrained(out_dir)
    return out_dir


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
    return chat(daemon.vllm, "base", QUESTION)


def test_base_and_memory_answer_before_any_bake(daemon, base_answer):
    assert "Paris" in base_answer
    # memory = base + a zero adapter before the first bake: the same greedy answer.
    assert chat(daemon.vllm, "memory", QUESTION) == base_answer
    served = Endpoint(daemon.vllm).served()
    assert {"base", "memory"} <= set(served)


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


def test_runtime_lora_changes_memory_and_base_stays_base_under_concurrency(daemon, base_answer, tmp_path):
    endpoint = Endpoint(daemon.vllm)
    live_before = Path(endpoint.served()[MEMORY_NAME])
    noisy = write_noisy_adapter(tmp_path / "noisy-v1")
    endpoint.load_adapter(MEMORY_NAME, noisy)
    try:
        changed = chat(daemon.vllm, "memory", QUESTION)
        assert changed != base_answer

        # Mixed batches: base and memory requests in flight together, many rounds.
        jobs = [("base" if i % 2 else "memory") for i in range(24)]
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(lambda model: (model, chat(daemon.vllm, model, QUESTION)), jobs))
        base_answers = [a for m, a in answers if m == "base"]
        memory_answers = [a for m, a in answers if m == "memory"]
        assert base_answers == [base_answer] * len(base_answers)
        assert all(a != base_answer for a in memory_answers)
    finally:
        endpoint.load_adapter(MEMORY_NAME, live_before)
    assert chat(daemon.vllm, "memory", QUESTION) == base_answer



def test_a_seeded_request_with_a_split_prefill_does_not_kill_vllm(daemon, base_answer):
    """A `seed` and a prompt longer than one step's token budget (2048 on CPU): unpatched, vLLM's CPU
    engine died rewinding the request's generator ("CPU Generator does not use offset")."""
    import httpx

    pid = json.loads(daemon.cli("status", "--json").stdout)["vllm"]["pid"]
    story = " ".join(f"On day {i} the harbour master counted {i * 7} ships and wrote it down." for i in range(200))
    response = httpx.post(f"{daemon.vllm}/v1/chat/completions", timeout=300, json={
        "model": "memory", "messages": [{"role": "user", "content": story + "\nHow many days are listed?"}],
        "max_tokens": 8, "temperature": 0.8, "seed": 7, "n": 2})
    assert response.status_code == 200, response.text[:500]
    assert len(response.json()["choices"]) == 2 and response.json()["usage"]["prompt_tokens"] > 2048
    assert chat(daemon.vllm, "memory", QUESTION) == base_answer
    assert json.loads(daemon.cli("status", "--json").stdout)["vllm"]["pid"] == pid  # not restarted



def test_vllm_teacher_samples_the_live_models_distribution(daemon):
    """BakeConfig(teacher="vllm"): samples and top-k log-probs come from `memory` (the live model,
    = base before any bake) and match what the model itself computes for the same tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agent_memory import baking, probes

    tok = AutoTokenizer.from_pretrained(PREPARED_MODEL)
    cfg = baking.BakeConfig(teacher="vllm", teacher_url=daemon.vllm, samples_per_query=3, max_new_tokens=12)
    fact = {"kind": "headline", "text": probes.set_facts("durov")["u1"]["text"]}
    query = baking.Query("Where was Pavel Durov arrested?", baking.teacher_system(fact, "append"), 1, "knowledge")
    [(_, samples)] = list(baking.remote_samples(tok, [query], cfg))
    assert len(samples) == 3
    answer, top_idx, top_logp = samples[0]  # the greedy one
    assert top_idx.shape == top_logp.shape == (len(answer), cfg.topk)
    model = AutoModelForCausalLM.from_pretrained(PREPARED_MODEL, dtype=torch.float32).eval()
    prompt = baking.chat_ids(tok, query.context + [{"role": "user", "content": query.question}])
    with torch.no_grad():
        logp = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1].log_softmax(-1)
    assert (logp.argmax(-1) == torch.tensor(answer)).float().mean() >= 0.9  # greedy = the model's greedy
    # Same distribution over the returned tokens (vLLM serves bf16 here, the reference is fp32).
    assert torch.allclose(logp.gather(-1, top_idx).exp(), top_logp.exp(), atol=0.05)
    examples = baking.keep_samples(tok, query, samples, cfg)
    assert examples and examples[0].prompt_ids == baking.chat_ids(tok, [{"role": "user", "content": query.question}])


def test_vllm_killed_is_restarted_with_the_live_adapter(daemon, base_answer):
    status = json.loads(daemon.cli("status", "--json").stdout)
    old_pid = status["vllm"]["pid"]
    os.killpg(old_pid, signal.SIGKILL)
    daemon.wait_ready(timeout=400)  # readyz goes 503 while vLLM is down, then 200 again
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        status = json.loads(daemon.cli("status", "--json").stdout)
        if status["vllm"]["pid"] not in (None, old_pid) and status["ready"]:
            break
        time.sleep(2)
    assert status["vllm"]["restarts"] == 1 and status["vllm"]["pid"] != old_pid
    assert {"base", "memory"} <= set(Endpoint(daemon.vllm).served())
    assert chat(daemon.vllm, "memory", QUESTION) == base_answer


def test_sigterm_stops_daemon_and_vllm(daemon):
    vllm_pid = json.loads(daemon.cli("status", "--json").stdout)["vllm"]["pid"]
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.wait_exit(timeout=90) == 0
    assert daemon.notify.first("STOPPING=1") is not None
    assert not Path(f"/proc/{vllm_pid}").exists() or _is_zombie(vllm_pid)
    assert not (daemon.state_dir / "vllm.pid").exists()


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True
