"""The status page (issue 14 #8): it renders from plain data and says where each bake stands now.

The pure page and plot are checked on data made here; the last test opens the real daemon's page in
headless Chromium (Debian's `chromium` package) and checks what the browser shows, the plot included.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from agent_memory import config
from agent_memory.store import Store
from agent_memory.versions import Versions
from agent_memory.web import PageData, plot_data, plot_figure, plot_png, status_page
from daemon_proc import DaemonProcess

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)


def at(minutes_ago: float) -> str:
    return (NOW - timedelta(minutes=minutes_ago)).isoformat(timespec="seconds")


def bake(id, status, verdict=None, version=None, probes=None, items=(1,), minutes=10.0, **fields):
    metrics = {"probes": probes} if probes else {}
    return {"id": id, "status": status, "verdict": verdict, "version": version, "item_ids": list(items),
            "started_at": at(minutes + 5), "finished_at": at(5) if verdict else None, "metrics": metrics,
            "reason": fields.pop("reason", None), **fields}


STATUS = {"version": "0.1.0", "ready": True, "state": "ready", "uptime_s": 7300.0, "model": "m",
          "live_version": "v0002", "vllm": {"mode": "managed", "urls": "http://127.0.0.1:8000", "healthy": True,
                                            "restarts": 0},
          "queue": {"pending": 2, "baked": 3}, "bake": {"running": None, "stage": None, "waiting": None}}


def page(bakes, **fields) -> str:
    return status_page(PageData(status=fields.pop("status", STATUS), bakes=bakes, now=NOW, **fields))


def row(text: str, element_id: str) -> str:
    """The visible text of the element with this id (tags dropped, entities decoded)."""
    match = re.search(rf'<(\w+)[^>]*\bid="{element_id}"[^>]*>(.*?)</\1>', text, re.S)
    assert match, f"no #{element_id} in the page"
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", match.group(2))).split())


# --- the plot --------------------------------------------------------------------------------


@pytest.mark.parametrize("bakes", [[bake(1, "live", "passed", 1, {"items": 1.0})], [bake(1, "training")]],
                         ids=["judged", "running"])
def test_one_bake_gets_an_axis_around_it_with_whole_bake_numbers(bakes):
    import matplotlib.pyplot as plt

    assert plot_data(bakes).xlim == (0.5, 1.5)
    fig = plot_figure(bakes)
    fig.canvas.draw()
    ticks = [t for t in fig.axes[0].get_xticks() if 0.5 <= t <= 1.5]
    plt.close(fig)
    assert ticks == [1.0]
    assert plot_png(bakes)[:8] == b"\x89PNG\r\n\x1a\n"


def test_rejected_and_failed_bakes_are_marked_and_empty_ones_left_out():
    plot = plot_data([bake(4, "empty", "empty", items=()), bake(3, "failed", "failed"),
                      bake(2, "rejected", "rejected", probes={"items": 0.2}),
                      bake(1, "live", "passed", 1, {"items": 0.9})])
    assert plot.rejected == [2] and plot.failed == [3]
    assert plot.series == {"items": [(1, 0.9), (2, 0.2)]}
    assert plot.xlim == (0.5, 3.5)  # the empty bake 4 adds nothing to the axis


def test_while_the_first_bake_runs_the_plot_says_so_not_no_bakes_yet():
    plot = plot_data([bake(1, "training")])
    assert plot.message == "bake 1 is training: scores when it is judged"
    assert plot_data([]).message == "no bakes yet"
    assert plot_data([bake(1, "failed", "failed")]).message == "no bake judged yet"


# --- the page --------------------------------------------------------------------------------


def test_versions_verdicts_and_durations_say_where_each_bake_stands_now():
    bakes = [
        bake(5, "empty", "empty", items=()), bake(4, "skipped", "skipped", items=()),
        bake(3, "failed", "failed", items=(7, 8), reason="InfraError: probe request timed out"),
        bake(2, "rejected", "rejected", probes={"items": 0.2}, reason="items 0.20 < 0.50"),
        bake(1, "live", "passed", 1, {"items": 0.9, "durov": 0.8}, minutes=15,
             metrics={"probes": {"items": 0.9}, "total_s": 905.0,
                      "stages": {"training_s": 772.0, "composing_s": 3.1}}),
        bake(0, "live", "passed", 2),
    ]
    text = page(bakes, live_bakes=[0])
    assert "v0001" in row(text, "bake-1") and "v0002" in row(text, "bake-0")
    assert "15 min 5 s (training 12 min 52 s, composing 3 s)" in row(text, "bake-1")
    assert "passed, no longer live" in row(text, "bake-1")
    assert "passed, live" in row(text, "bake-0")
    assert "failed" in row(text, "bake-3") and "timed out" in row(text, "bake-3")
    assert "rejected" in row(text, "bake-2")
    assert 'id="bake-5"' not in text and 'id="bake-4"' not in text
    assert "2 bake(s) that found nothing to bake not shown" in text
    assert "up 2 h 1 min" in row(text, "state")


def test_a_forgotten_or_rolled_back_bake_does_not_show_passed_live():
    bakes = [bake(2, "live", "passed", 2), bake(1, "live", "passed", 1)]
    events = [
        {"kind": "forget", "at": at(1), "data": {"item": 7, "dropped_bakes": [2], "version": "v0003", "requeued": [8]}},
        {"kind": "rollback", "at": at(2), "data": {"from": "v0002", "to": "v0001", "dropped_bakes": [2],
                                                     "restored_bakes": []}},
        {"kind": "rollback", "at": at(3), "data": {"from": "v0001", "to": "v0000", "dropped_bakes": [1],
                                                     "restored_bakes": []}},
    ]
    text = page(bakes, live_bakes=[], events=events)
    assert "passed, dropped to forget item 7 (v0003)" in row(text, "bake-2")
    assert "passed, rolled back (v0001 to v0000)" in row(text, "bake-1")
    events_text = row(text, "events")
    assert "item 7: dropped bake(s) 2, live v0003; item(s) 8 back in the queue" in events_text
    assert "v0002 to v0001; dropped bake(s) 2" in events_text


def test_the_running_bake_shows_its_stage_and_the_empty_page_says_no_bakes():
    status = {**STATUS, "bake": {"running": 3, "stage": "train 12/30", "waiting": 4}}
    text = page([bake(4, "queued"), bake(3, "training", minutes=2)], status=status)
    assert "Bake 3 running: train 12/30 for 7 min" in row(text, "current-bake")
    assert "bake 4 waiting" in row(text, "current-bake")
    assert "train 12/30" in row(text, "bake-3")
    assert "no bakes yet" in page([])


def test_feeds_show_their_errors_without_the_url_secrets_and_outside_text_is_escaped():
    feeds = [
        {"id": 1, "url": "https://user:pw@news.example/rss?key=SECRET", "title": "<b>News</b>", "interval_s": 1800,
         "failures": 3, "last_error": "HTTP 403 from https://user:***@news.example/rss?key=SECRET",
         "last_ok_at": at(90)},
        {"id": 2, "url": "https://ok.example/feed.xml", "title": "Fine", "interval_s": 3600, "failures": 0,
         "last_error": None, "last_ok_at": at(3)},
    ]
    bakes = [bake(1, "rejected", "rejected", reason="<script>alert(1)</script>")]
    text = page(bakes, feeds=feeds)
    assert "SECRET" not in text and "pw@" not in text
    assert "3 failed: HTTP 403 from https://news.example/rss" in row(text, "feed-1")
    assert "ok" in row(text, "feed-2") and "30 min" in row(text, "feed-1")
    assert "<b>News</b>" not in text and "&lt;b&gt;News&lt;/b&gt;" in text
    assert "<script>" not in text


# --- the real page in a real browser ---------------------------------------------------------

CHROMIUM_NAMES = ("chromium", "chromium-browser", "chromium-headless-shell", "google-chrome")


def chromium() -> str:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no headless Chromium found (Debian: `apt-get install chromium`; see README, Tests)")


def browse(url: str, out: Path) -> tuple[str, Path]:
    """The page's DOM once loaded, and a screenshot of it, as headless Chromium shows them."""
    binary = chromium()
    common = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              f"--user-data-dir={out / 'chromium-profile'}", "--window-size=1200,1800"]
    shot = out / "status-page.png"
    done = subprocess.run([*common, f"--screenshot={shot}", url], capture_output=True, text=True, timeout=120)
    assert shot.exists(), done.stderr[-2000:]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0 and "<html" in dom.stdout, dom.stderr[-2000:]
    return dom.stdout, shot


def seed_history(state_dir: Path, cfg) -> None:
    """What a day of bakes leaves: one live, one rejected, one failed, empties, a forgotten one."""
    store = Store(cfg.db_path)
    live = store.create_bake([1, 2], status="live", verdict="passed", version=1,
                             metrics={"probes": {"items": 0.9, "durov": 0.75}, "total_s": 905.0,
                                      "stages": {"training_s": 772.0}})
    store.create_bake([3], status="rejected", verdict="rejected", reason="items 0.33 < 0.50",
                      metrics={"probes": {"items": 0.33, "durov": 0.7}})
    store.create_bake([4], status="failed", verdict="failed", reason="InfraError: probe request timed out")
    for _ in range(3):
        store.create_bake([], status="empty", verdict="empty", reason="no pending items")
    forgotten = store.create_bake([5], status="live", verdict="passed", version=2,
                                  metrics={"probes": {"items": 1.0, "durov": 0.8}})
    for b in store.list_bakes():
        store.update_bake(b["id"], finished_at=b["started_at"])
    store.record_event("forget", {"item": 5, "bake": forgotten["id"], "version": "v0003", "requeued": []})
    store.close()
    versions = Versions(cfg.adapters_dir, cfg.model_dir, cfg.vllm.max_lora_rank)
    (versions.path("v0003")).mkdir(parents=True)
    (versions.path("v0003") / "manifest.json").write_text(json.dumps({"version": "v0003", "deltas": [live["id"]]}))
    versions.set_current("v0003")


def test_the_real_daemons_page_in_headless_chromium(tmp_path):
    chromium()  # skip before starting a daemon for nothing
    proc = DaemonProcess(tmp_path / "state", vllm_mode="off", model_path="", feeds_allow_loopback="true")
    proc.state_dir.mkdir(parents=True)
    seed_history(proc.state_dir, config.load(env=proc.env))
    proc.start()
    try:
        proc.wait_ready(timeout=60)
        # A feed on a closed port: added without the check, then polled (and failing) by the real CLI.
        closed = f"http://127.0.0.1:{_closed_port()}/rss.xml?token=SECRET"
        assert proc.cli("feeds", "add", closed, "--no-check").returncode == 0
        assert proc.cli("feeds", "poll").returncode != 0
        dom, shot = browse(f"{proc.api}/", tmp_path)
    finally:
        proc.kill()
    print(f"status page screenshot: {shot}")

    assert "v0003" in row(dom, "live-version")
    assert "passed, live" in row(dom, "bake-1") and "v0001" in row(dom, "bake-1")
    assert "rejected" in row(dom, "bake-2") and "failed" in row(dom, "bake-3")
    assert "passed, dropped to forget item 5 (v0003)" in row(dom, "bake-7")
    assert all(f'id="bake-{i}"' not in dom for i in (4, 5, 6))  # the empty bakes
    assert "3 bake(s) that found nothing to bake not shown" in dom
    assert "failed:" in row(dom, "feeds") and "SECRET" not in dom
    assert "forget" in row(dom, "events")

    # The browser loaded and drew the plot: matplotlib's first line colour (tab:blue) and the
    # rejected bake's red band are on the screenshot.
    from PIL import Image

    colours = {c for _, c in Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)}
    assert (31, 119, 180) in colours, f"no plot line on {shot}"
    assert any(r > 240 and 170 < g < 215 and 170 < b < 215 for r, g, b in colours), f"no red band on {shot}"


def _closed_port() -> int:
    from agent_memory.serving import free_port

    return free_port("127.0.0.1")  # nothing listens there once the probe socket is closed
