"""The feeds commands and ingest-chat through the real CLI and the real daemon (vllm.mode = off)."""

from __future__ import annotations

import json
import os

import httpx

from conftest import DATA
from daemon_proc import DaemonProcess
from test_cli_errors import assert_one_line_error
from test_ingest_api import OPENAI_CHAT, OPENAI_TRANSCRIPT

RSS = {"content_type": "application/rss+xml"}


def ok(result) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_feeds_are_checked_on_add_and_a_failed_poll_exits_non_zero(daemon, http_server):
    http_server.serve("/index.html", (DATA / "page.html").read_bytes(), content_type="text/html")
    for url, reason in (("no such feed", "must be http:// or https://"),
                        (http_server.url("/index.html"), "not an RSS/Atom feed: got an HTML page"),
                        (http_server.url("/gone.xml"), "HTTP 404 Not Found"),
                        ("http://127.0.0.1:9/feed.xml", "fetch failed: no HTTP answer from the server")):
        result = daemon.cli("feeds", "add", url)
        assert_one_line_error(result, reason)
        assert "POST" not in result.stderr and "/v1/" not in result.stderr  # no HTTP verbs and routes
    assert ok(daemon.cli("feeds", "list")) == "no feeds\n"

    broken = json.loads(ok(daemon.cli("feeds", "add", http_server.url("/gone.xml"), "--no-check", "--json")))
    good_url = http_server.serve("/news.xml", (DATA / "news_v1.xml").read_bytes(), **RSS)
    good = json.loads(ok(daemon.cli("feeds", "add", good_url, "--json")))

    result = daemon.cli("feeds", "poll")
    assert_one_line_error(result, "1 of 2 feeds failed")
    assert f"feed {broken['id']}: error: HTTP 404 Not Found" in result.stdout
    assert f"feed {good['id']}: " in result.stdout  # every feed polled and printed
    assert ok(daemon.cli("feeds", "poll", str(good["id"]))).startswith(f"feed {good['id']}: ")
    assert daemon.cli("feeds", "poll", str(broken["id"])).returncode == 1


def test_local_files_only_from_the_cli_with_the_flag(daemon, tmp_path):
    sample = tmp_path / "local news.xml"
    sample.write_bytes((DATA / "news_v1.xml").read_bytes())
    assert_one_line_error(daemon.cli("feeds", "add", str(sample)), "--allow-local-file")
    # Never over the API, whatever the credential.
    refused = httpx.post(f"{daemon.api}/v1/feeds", json={"url": sample.as_uri(), "check": False},
                         headers=daemon.headers)
    assert refused.status_code == 422 and "must be http:// or https://" in refused.json()["error"]

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for special in ("/dev/zero", str(fifo), str(tmp_path)):
        assert_one_line_error(daemon.cli("feeds", "add", special, "--allow-local-file", timeout=30),
                              "is not a regular file")
    assert_one_line_error(daemon.cli("feeds", "add", "file://evil.example/etc/passwd", "--allow-local-file"),
                          "must name a file on this machine")

    added = json.loads(ok(daemon.cli("feeds", "add", str(sample), "--allow-local-file", "--json")))
    assert added["feed"]["url"] == sample.as_uri()
    polled = ok(daemon.cli("feeds", "poll", str(added["id"])))  # the daemon reads it
    assert polled in (f"feed {added['id']}: 3 new, 0 updated, 0 unchanged\n",
                      f"feed {added['id']}: 0 new, 0 updated, 3 unchanged\n")


def test_feeds_list_masks_passwords(daemon, http_server):
    url = http_server.url("/private.xml").replace("http://", "http://reader:hunter2@")
    ok(daemon.cli("feeds", "add", url, "--no-check"))
    text = ok(daemon.cli("feeds", "list"))
    listed = ok(daemon.cli("feeds", "list", "--json"))
    assert "hunter2" not in text + listed
    assert url.replace("hunter2", "***") in text
    assert [f["url"] for f in json.loads(listed)] == [url.replace("hunter2", "***")]


def test_bad_intervals_are_one_line(daemon, http_server):
    url = http_server.serve("/news.xml", (DATA / "news_v1.xml").read_bytes(), **RSS)
    for interval in ("inf", "nan", "1e400s"):
        assert_one_line_error(daemon.cli("feeds", "add", url, "--interval", interval),
                              f"interval: duration must be between 1s and 365d: '{interval}'")
    assert ok(daemon.cli("feeds", "list")) == "no feeds\n"
    assert httpx.get(f"{daemon.api}/livez").status_code == 200


def test_ingest_chat_takes_openai_messages(daemon, tmp_path):
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps(OPENAI_CHAT))
    result = json.loads(ok(daemon.cli("ingest-chat", str(chat), "--json")))
    stored = httpx.get(f"{daemon.api}/v1/memory/items/{result['id']}",
                       headers=daemon.headers).json()
    assert stored["text"] == OPENAI_TRANSCRIPT and stored["messages"] == OPENAI_CHAT


def test_version_and_short_help(tmp_path):
    proc = DaemonProcess(tmp_path)
    assert ok(proc.cli("--version")) == "agent-memory 0.1.0\n"
    help_text = ok(proc.cli("-h"))
    assert help_text.startswith("Usage: ") and "agent-memory feeds add https://" in help_text
    assert "--allow-local-file" in ok(proc.cli("feeds", "add", "-h"))
