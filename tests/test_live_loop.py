"""The live loop end to end, through the real daemon, vLLM, feed server and baking engine.

feed on 127.0.0.1 -> polled into the queue -> `bake --now --wait` -> gate -> hot-swap ->
`memory` answers what it could not before; then a forced rejection, rollback, forget,
swaps under concurrent chat traffic, and kill -9 of the daemon in the middle of a bake.
One daemon (one vLLM boot) serves the module; tests run in file order and build on each other.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from agent_memory import probes
from agent_memory.gate import ITEM_MAX_TOKENS
from conftest import HttpServer
from daemon_proc import DaemonProcess

pytestmark = pytest.mark.vllm

HEADLINE = "Vesna Kordic elected president of the chess federation"
SUMMARY = "Vesna Kordic was elected president of the chess federation on March 3, 2025."
FEED = f"""<?xml version="1.0" encoding="UTF-8"?>
<rss version="2.0"><channel><title>Test wire</title><link>http://127.0.0.1/</link>
<description>test</description>
<item><title>{HEADLINE}</title><description>{SUMMARY}</description>
<pubDate>Mon, 03 Mar 2025 09:00:00 GMT</pubDate><guid>test-wire-kordic</guid></item>
</channel></rss>"""
SECOND_FACT = "The Harbin ice festival of 2025 used 300,000 cubic meters of ice from the Songhua River."
KILLED_FACT = "Tomasz Reller won the 2025 Warsaw marathon in 2 hours 9 minutes."


@pytest.fixture(scope="module")
def feed_server():
    server = HttpServer()
    server.thread.start()
    server.serve("/wire.xml", FEED, content_type="application/rss+xml")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, feed_server):
    state = tmp_path_factory.mktemp("live-loop")
    feeds_file = state / "feeds.toml"
    feeds_file.write_text(f'[[feed]]\nurl = "{feed_server.url("/wire.xml")}"\ninterval = "30s"\n')
    # Whether a 135M model learns ONE fact depends on the fact, the seed and the float rounding of
    # the trainer (its dtype, picked by the CPU, and its thread count). This test checks the loop, so
    # it pins a seed, a longer bake and the threads, and bakes a fact with margin: its prompted
    # teacher states it plainly, and its one entity gives it two item questions (direct,
    # paraphrase), so the gate's floor of 0.5 is one of the two. (A headline naming three entities
    # was learnt in bfloat16 but not in float32: 1 of its 3 questions.) The locality floor has a
    # margin too: one of the ~30 general questions the live model answers right is 0.03 of that
    # share (the gate's rules: test_gate.py).
    (state / "config.toml").write_text("[bake.engine]\nseed = 3\nmin_steps = 60\nthreads = 2\n\n"
                                       "[gate]\nmin_locality_kept = 0.8\n")
    proc = DaemonProcess(state, feeds_file=str(feeds_file), bake_min_pending="1000", bake_every="30d",
                         feeds_allow_loopback="true", bake_retry_wait="2s", bake_retries="6",
                         vllm_unresponsive_restart_s="30")
    proc.env["AGENT_MEMORY_CONFIG"] = str(state / "config.toml")
    proc.start()
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.kill()


def queue(daemon, status="all") -> list[dict]:
    result = daemon.cli("queue", "--status", status, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["items"]


def bake(daemon, *args) -> tuple[int, dict]:
    result = daemon.cli("bake", "--now", "--wait", "--json", *args, timeout=1800)
    assert result.returncode in (0, 2), result.stderr
    return result.returncode, json.loads(result.stdout)


def item_accuracy(daemon, model: str, items: list[dict]) -> float:
    return probes.accuracy(probes.run_remote(daemon.model(), model, probes.item_probes(items),
                                             max_tokens=ITEM_MAX_TOKENS))  # as the gate asks


def test_feed_headline_is_baked_and_memory_answers_it(daemon):
    deadline = time.monotonic() + 180
    while not (items := queue(daemon)) and time.monotonic() < deadline:
        time.sleep(2)
    assert len(items) == 1 and items[0]["status"] == "pending"
    assert items[0]["source_ref"] and "Kordic" in items[0]["text"]
    before = item_accuracy(daemon, "memory", items)

    code, record = bake(daemon)
    assert code == 0, record
    assert record["status"] == "live" and record["version"] == 1
    assert record["metrics"]["probes"]["items"] >= 0.5

    after = item_accuracy(daemon, "memory", items)
    assert after > before
    # The gate's kinds of question, as the operator asks them of the served model.
    asked = json.loads(daemon.cli("probes", "run", "items", "--json").stdout)
    assert asked["accuracy"] > before and sum(asked["grades"].values()) == len(asked["results"])
    assert {r["kind"] for r in asked["results"]} >= {"direct", "paraphrase"}
    leaks = json.loads(daemon.cli("probes", "run", "neighbours", "--json").stdout)
    assert len(leaks["results"]) == len(probes.NEIGHBOURS) and all("Kordic" in r["expected"] for r in leaks["results"])
    assert item_accuracy(daemon, "base", items) == before  # base is untouched
    status = json.loads(daemon.cli("status", "--json").stdout)
    assert status["live_version"] == "v0001" and status["queue"].get("baked") == 1

    history = json.loads(daemon.cli("history", "--json").stdout)
    assert history["live_version"] == "v0001"
    assert history["bakes"][0]["verdict"] == "passed"
    metrics = httpx.get(f"{daemon.api}/metrics").text
    assert 'agent_memory_bakes_total{result="passed"} 1.0' in metrics
    assert "agent_memory_live_version 1.0" in metrics
    page = httpx.get(f"{daemon.api}/").text
    assert "v0001" in page and "passed" in page
    assert httpx.get(f"{daemon.api}/plot.png").content[:8] == b"\x89PNG\r\n\x1a\n"


def test_rejected_bake_leaves_live_untouched(daemon):
    reference = daemon.chat("memory", "What is the latest news about Vesna Kordic?")
    result = daemon.cli("remember", SECOND_FACT, "--json")
    assert result.returncode == 0, result.stderr
    # max_regression = -1: every probe set must improve by 1.0, which nothing can.
    code, record = bake(daemon, "--gate", "max_regression=-1")
    assert code == 2 and record["status"] == "rejected"
    assert "fell from" in record["reason"]
    assert json.loads(daemon.cli("status", "--json").stdout)["live_version"] == "v0001"
    assert daemon.chat("memory", "What is the latest news about Vesna Kordic?") == reference
    rejected = [i for i in queue(daemon) if i["text"] == SECOND_FACT]
    assert rejected[0]["status"] == "rejected" and rejected[0]["status_reason"]
    probed = httpx.get(f"{daemon.api}/v1/bakes/{record['id']}", headers=daemon.headers).json()["probe_results"]
    assert {(r["probe_set"], r["model"]) for r in probed} >= {("items", "candidate"), ("items", "teacher"), ("durov", "live")}
    assert {r["item"] for r in probed if r["probe_set"] == "items"} == {rejected[0]["id"]}  # judged per item


def test_swaps_under_concurrent_traffic_fail_no_request(daemon):
    base_reference = daemon.chat("base", "What is the capital of Italy?")
    failures, base_answers, stop = [], [], threading.Event()

    def traffic(model):
        while not stop.is_set():
            try:
                answer = daemon.chat(model, "What is the capital of Italy?")
                if model == "base":
                    base_answers.append(answer)
            except Exception as e:  # noqa: BLE001 - any failure counts
                failures.append(repr(e))

    threads = [threading.Thread(target=traffic, args=(m,)) for m in ("memory", "memory", "base")]
    for t in threads:
        t.start()
    try:
        for version in ["v0000", "v0001"] * 5:  # 10 swaps
            result = daemon.cli("rollback", version, "--json")
            assert result.returncode == 0, result.stderr
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert failures == []
    assert base_answers and set(base_answers) == {base_reference}
    assert json.loads(daemon.cli("status", "--json").stdout)["live_version"] == "v0001"
    kordic = next(i for i in queue(daemon) if "Kordic" in i["text"])
    assert kordic["status"] == "baked"  # rolled back out, then forward in again


def test_forget_removes_the_items_knowledge(daemon):
    item = next(i for i in queue(daemon) if "Kordic" in i["text"])
    base_level = item_accuracy(daemon, "base", [item])
    result = daemon.cli("forget", str(item["id"]), "--json")
    assert result.returncode == 0, result.stderr
    forgotten = json.loads(result.stdout)
    assert forgotten["version"] == "v0000"  # its bake's delta was the only one
    assert item_accuracy(daemon, "memory", [item]) == base_level
    assert next(i for i in queue(daemon) if i["id"] == item["id"])["status"] == "forgotten"
    assert daemon.cli("forget", "999999").returncode != 0  # unknown id: a clear error


def test_kill_9_mid_bake_loses_nothing_and_resumes(daemon):
    live_before = json.loads(daemon.cli("status", "--json").stdout)["live_version"]
    result = daemon.cli("remember", KILLED_FACT, "--json")
    assert result.returncode == 0, result.stderr
    item_id = json.loads(result.stdout)["id"]
    bake_id = json.loads(daemon.cli("bake", "--now", "--json").stdout)["bake_id"]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if httpx.get(f"{daemon.api}/v1/bakes/{bake_id}", headers=daemon.headers).json()["status"] == "training":
            break
        time.sleep(0.5)
    time.sleep(3)  # well inside training
    os.kill(daemon.process.pid, signal.SIGKILL)
    daemon.process.wait(30)

    daemon.start()  # same state dir and ports
    daemon.wait_ready()
    status = json.loads(daemon.cli("status", "--json").stdout)
    assert status["live_version"] == live_before
    assert httpx.get(f"{daemon.api}/v1/bakes/{bake_id}", headers=daemon.headers).json()["status"] == "abandoned"
    item = httpx.get(f"{daemon.api}/v1/memory/items/{item_id}", headers=daemon.headers).json()
    assert item["status"] == "pending"
    assert not list((daemon.state_dir / "adapters" / "deltas").glob(f"bake-{bake_id:04d}"))

    # Bake it again, and meanwhile kill the trainer (as the OOM killer would) and stop the engine
    # that serves `memory` (SIGSTOP: it neither answers nor dies). Neither is a verdict: the training
    # is retried, the daemon restarts the engine that stopped answering, the bake goes live.
    bake_id = json.loads(daemon.cli("bake", "--now", "--gate", "min_item_accuracy=0", "--json").stdout)["bake_id"]
    wait_for(lambda: bake_status(daemon, bake_id) == "training" and trainer_pids(daemon), 300)
    time.sleep(3)
    for pid in trainer_pids(daemon):
        os.kill(pid, signal.SIGKILL)
    stopped = daemon.vllm_pids()["memory"]
    os.killpg(stopped, signal.SIGSTOP)
    try:
        wait_for(lambda: bake_status(daemon, bake_id) not in UNFINISHED, 1500)
    finally:
        try:
            os.killpg(stopped, signal.SIGCONT)
        except ProcessLookupError:
            pass
    record = httpx.get(f"{daemon.api}/v1/bakes/{bake_id}", headers=daemon.headers).json()
    assert record["status"] == "live", record["reason"]
    assert item_id in record["item_ids"]
    assert "retry 1/6" in daemon.log_path.read_text(), "the killed training was retried"
    assert daemon.vllm_pids()["memory"] != stopped and not Path(f"/proc/{stopped}").exists()
    assert daemon.chat("memory", "What is the capital of Japan?")  # the restarted engine serves


UNFINISHED = ("queued", "claiming", "training", "composing", "swapping", "checking")


def bake_status(daemon, bake_id: int) -> str:
    return httpx.get(f"{daemon.api}/v1/bakes/{bake_id}", headers=daemon.headers).json()["status"]


def trainer_pids(daemon) -> list[int]:
    """This daemon's trainers only: a benchmark's or another daemon's on the same machine are not ours to kill."""
    jobs = {f"{d}/jobs/".encode() for d in (daemon.state_dir, daemon.state_dir.resolve())}
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _is_trainer(p, jobs)]


def _is_trainer(proc: Path, jobs: set[bytes]) -> bool:
    try:
        cmdline = (proc / "cmdline").read_bytes()
    except OSError:
        return False
    return b"agent_memory.engine" in cmdline and any(j in cmdline for j in jobs)


def wait_for(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"not within {timeout}s")
