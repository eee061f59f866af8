"""Hostile feeds against the real daemon with real feed servers (issue 15 #5): reads stay bounded
in memory and time (a stacked gzip bomb, headers a byte at a time, /dev/zero, a FIFO), and polling
never starves the API: while 45 polls hang on feeds that never answer and one feed of 100,000
entries is parsed and stored, /livez, /readyz and an authenticated item write keep answering.
(Each must answer within 10 s: a liveness bound, not a speed target; a starved API did not answer
for ~50 s.)"""

from __future__ import annotations

import gzip
import os
import threading
import time
import zlib

import httpx

from agent_memory import feeds
from conftest import Reply, slow_header_server
from daemon_proc import DaemonProcess

HANGING_FEEDS = 45
BIG_FEED_ENTRIES = 100_000
LIVENESS_TIMEOUT_S = 10.0


def big_feed() -> bytes:
    items = "".join(f"<item><title>Story {n}</title><guid>s{n}</guid></item>" for n in range(BIG_FEED_ENTRIES))
    return f'<?xml version="1.0"?><rss version="2.0"><channel><title>Big</title>{items}</channel></rss>'.encode()


def test_hanging_and_huge_feeds_being_polled_never_starve_the_api(tmp_path, http_server):
    http_server.routes["/big.xml"] = Reply(200, {"content-type": "application/rss+xml"}, big_feed())
    urls = [http_server.url("/big.xml")] + [http_server.hang(f"/hang-{n}.xml") for n in range(HANGING_FEEDS)]
    # The fetch deadline (20 s) is longer than the liveness bound: a poll holding a worker the API
    # needs would show.
    proc = DaemonProcess(tmp_path / "state", vllm_mode="off", model_path="", feeds_allow_loopback="true",
                         feeds_timeout_s="20").start()
    try:
        proc.wait_ready(timeout=60)
        api = httpx.Client(base_url=proc.api, headers=proc.headers, timeout=LIVENESS_TIMEOUT_S)
        ids = [api.post("/v1/feeds", json={"url": url, "check": False}).json()["id"] for url in urls]

        polls: dict[int, httpx.Response | Exception] = {}

        def poll(feed_id):
            try:
                polls[feed_id] = httpx.post(f"{proc.api}/v1/feeds/{feed_id}/poll", headers=proc.headers, timeout=300)
            except httpx.HTTPError as e:
                polls[feed_id] = e

        threads = [threading.Thread(target=poll, args=(i,)) for i in ids]
        for thread in threads:
            thread.start()
            time.sleep(0.01)  # the big feed first
        deadline = time.monotonic() + 25  # past the fetch deadline of the first hanging polls
        answered = 0
        while time.monotonic() < deadline:
            assert api.get("/livez").status_code == 200
            assert api.get("/readyz").status_code == 200
            write = api.post("/v1/memory/items", json={"text": f"Liveness fact number {answered}."})
            assert write.status_code == 201, write.text
            answered += 1
            time.sleep(1)

        http_server.stopping.set()  # the hanging feeds now close without an answer: the rest fail fast
        for thread in threads:
            thread.join(timeout=300)
        assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in polls.values()), polls
        big = polls[ids[0]].json()
        assert (big["new"], big["skipped"]) == (feeds.MAX_ENTRIES_PER_POLL, BIG_FEED_ENTRIES - feeds.MAX_ENTRIES_PER_POLL)
        assert all(polls[i].json()["status"] == "error" for i in ids[1:])
        counts = api.get("/v1/memory/items", params={"kind": "fact", "limit": 1}).json()["counts"]
        assert counts["pending"] == feeds.MAX_ENTRIES_PER_POLL + answered
    finally:
        proc.kill()


def vm_peak_mib(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), MiB."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def gzip_of_zeros(mebibytes: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return b"".join(packer.compress(bytes(2**20)) for _ in range(mebibytes)) + packer.flush()


def test_bombs_trickles_and_special_files_stay_within_a_memory_and_time_bound(tmp_path, http_server):
    """A 1 GiB bomb in two gzip layers (about 1 KB on the wire) costs the daemon about the 50 MiB
    cap, not the gigabyte; the other feeds end at the 3 s fetch deadline or at once."""
    bomb = gzip.compress(gzip_of_zeros(1024), 9)
    assert len(bomb) < 50_000
    http_server.routes["/bomb.xml"] = Reply(200, {"content-type": "application/rss+xml",
                                                  "content-encoding": "gzip, gzip"}, bomb)
    fifo = tmp_path / "feed.fifo"
    os.mkfifo(fifo)
    feeds_file = tmp_path / "feeds.toml"  # local files come only from the operator's feeds file
    feeds_file.write_text(f'[[feed]]\nurl = "/dev/zero"\n[[feed]]\nurl = "{fifo}"\n')
    stop = threading.Event()
    slow = slow_header_server(stop)
    proc = DaemonProcess(tmp_path / "state", vllm_mode="off", model_path="", feeds_allow_loopback="true",
                         feeds_timeout_s="3", feeds_file=str(feeds_file)).start()
    try:
        proc.wait_ready(timeout=60)
        api = httpx.Client(base_url=proc.api, headers=proc.headers, timeout=LIVENESS_TIMEOUT_S)
        for url in (http_server.url("/bomb.xml"), f"http://127.0.0.1:{slow.getsockname()[1]}/feed.xml"):
            assert api.post("/v1/feeds", json={"url": url, "check": False}).status_code == 201
        before = vm_peak_mib(proc.process.pid)
        started = time.monotonic()
        summary = api.post("/v1/feeds/poll", timeout=120).json()
        took = time.monotonic() - started
        errors = {e["url"]: e["error"] for e in summary["errors"]}
        assert errors == {
            fifo.resolve().as_uri(): feeds.UNREADABLE_FILE,
            "file:///dev/zero": feeds.UNREADABLE_FILE,
            http_server.url("/bomb.xml"): "feed larger than 50 MiB once unpacked",
            f"http://127.0.0.1:{slow.getsockname()[1]}/feed.xml": "timed out after 3s",
        }, summary
        assert took < 60, f"the poll took {took:.0f}s"  # (a liveness bound: unbounded, it was minutes)
        grown = vm_peak_mib(proc.process.pid) - before
        assert grown < 400, f"peak memory grew {grown:.0f} MiB"  # (unbounded: the whole gigabyte)
        assert api.get("/livez").status_code == 200
    finally:
        stop.set()
        slow.close()
        proc.kill()
