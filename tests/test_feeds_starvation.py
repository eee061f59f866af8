"""Polling never starves the API (issue 15 #5), on the real daemon with a real feed server: while
45 polls hang on feeds that never answer and one feed of 100,000 entries is parsed and stored,
/livez, /readyz and an authenticated item write keep answering. (Each must answer within 10 s:
a liveness bound, not a speed target; a starved API did not answer for ~50 s.)"""

from __future__ import annotations

import threading
import time

import httpx

from agent_memory import feeds
from conftest import Reply
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
