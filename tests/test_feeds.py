"""Feed polling against a real HTTP server on 127.0.0.1 and real SQLite files."""

from __future__ import annotations

import gzip
import os
import threading
import time
import tracemalloc
import zlib
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from agent_memory import feeds
from agent_memory.errors import UserError
from agent_memory.store import NotFound
from conftest import DATA, REPO, Reply, slow_header_server

RSS = {"content_type": "application/rss+xml; charset=utf-8"}


def add(store, url, interval_s=600.0):
    return store.add_feed(url, interval_s=interval_s)[0]["id"]


def headlines(store):
    return store.list_items(kind="headline", oldest_first=True, limit=1000)


def test_new_entries_land_once(store, cfg, http_server):
    url = http_server.serve("/news.xml", (DATA / "news_v1.xml").read_bytes(), **RSS)
    feed_id = add(store, url)

    first = feeds.poll_feed(store, feed_id, cfg)
    second = feeds.poll_feed(store, feed_id, cfg)

    assert (first["new"], first["error"]) == (3, None)
    assert (second["new"], second["unchanged"]) == (0, 3)
    items = headlines(store)
    assert len(items) == 3
    durov = items[0]
    assert durov["title"].startswith("Telegram founder Pavel Durov arrested")
    assert durov["source"] == "Test Wire"  # the feed's own title, learnt on the first poll
    assert durov["source_ref"] == "test-wire-durov-1"
    assert durov["published_at"] == durov["valid_at"] == "2024-08-24T22:00:00+00:00"
    assert {i["dedup_key"].split(":")[2] for i in items} == {"id", "link", "hash"}
    sent = http_server.hits("/news.xml")[0]
    assert sent["user-agent"] == feeds.USER_AGENT
    feed = store.get_feed(feed_id)
    assert feed["title"] == "Test Wire" and feed["failures"] == 0 and feed["last_ok_at"]


def test_html_stripped_and_whitespace_normalised(store, cfg, http_server):
    url = http_server.serve("/news.xml", (DATA / "news_v1.xml").read_bytes(), **RSS)
    feeds.poll_feed(store, add(store, url), cfg)
    text = headlines(store)[0]["text"]
    assert text == (
        "Telegram founder Pavel Durov arrested at Le Bourget airport near Paris\n"
        "Pavel Durov was arrested on Saturday evening. Police & prosecutors declined to comment."
    )


def test_not_modified_304(store, cfg, http_server):
    body = (DATA / "news_v1.xml").read_bytes()
    stamp = "Sat, 24 Aug 2024 22:00:00 GMT"

    def conditional(headers):
        if headers.get("if-none-match") == '"v1"' or headers.get("if-modified-since") == stamp:
            return Reply(304)
        return Reply(200, {"ETag": '"v1"', "Last-Modified": stamp, **{"Content-Type": RSS["content_type"]}}, body)

    http_server.routes["/news.xml"] = conditional
    feed_id = add(store, http_server.url("/news.xml"))

    assert feeds.poll_feed(store, feed_id, cfg)["new"] == 3
    again = feeds.poll_feed(store, feed_id, cfg)

    assert again["status"] == "not_modified" and again["new"] == again["unchanged"] == 0
    second_request = http_server.hits("/news.xml")[1]
    assert second_request["if-none-match"] == '"v1"'
    assert second_request["if-modified-since"] == stamp
    feed = store.get_feed(feed_id)
    assert (feed["etag"], feed["last_modified"], feed["failures"]) == ('"v1"', stamp, 0)
    assert len(headlines(store)) == 3


def test_429_retry_after_is_honoured(store, cfg, http_server):
    url = http_server.serve("/busy.xml", "slow down", status=429, retry_after="120")
    feed_id = add(store, url, interval_s=60)
    now = datetime.now(timezone.utc)

    result = feeds.poll_due(store, cfg, now=now)

    assert result["errors"][0]["error"] == "HTTP 429 (Retry-After 120s)"
    feed = store.get_feed(feed_id)
    assert feed["failures"] == 1 and feed["backoff_s"] == 120
    assert feed["next_poll_at"] == (now + timedelta(seconds=120)).isoformat(timespec="seconds")
    # Not polled again before the server said so, polled once it has passed.
    assert feeds.poll_due(store, cfg, now=now + timedelta(seconds=90))["feeds"] == 0
    assert feeds.poll_due(store, cfg, now=now + timedelta(seconds=121))["feeds"] == 1
    assert len(http_server.hits("/busy.xml")) == 2


def test_503_with_http_date_retry_after(store, cfg, http_server):
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    url = http_server.serve("/down.xml", "", status=503,
                            retry_after=later.strftime("%a, %d %b %Y %H:%M:%S GMT"))
    feed_id = add(store, url, interval_s=60)
    feeds.poll_feed(store, feed_id, cfg)
    assert 3500 < store.get_feed(feed_id)["backoff_s"] <= 3600


def test_repeated_failures_back_off_exponentially(store, cfg, http_server):
    url = http_server.serve("/broken.xml", "oops", status=500)
    feed_id = add(store, url, interval_s=60)
    backoffs = []
    for _ in range(4):
        result = feeds.poll_feed(store, feed_id, cfg)
        backoffs.append(store.get_feed(feed_id)["backoff_s"])
    assert result["error"] == "HTTP 500 Internal Server Error"
    assert backoffs == [60, 120, 240, 480]
    assert store.get_feed(feed_id)["failures"] == 4
    # One good poll resets it.
    http_server.serve("/broken.xml", (DATA / "news_v1.xml").read_bytes(), **RSS)
    assert feeds.poll_feed(store, feed_id, cfg)["error"] is None
    feed = store.get_feed(feed_id)
    assert (feed["failures"], feed["backoff_s"], feed["last_error"]) == (0, 0, None)


def test_truncated_feed_with_entries_is_accepted(store, cfg, http_server):
    url = http_server.serve("/cut.xml", (DATA / "truncated.xml").read_bytes(), **RSS)
    result = feeds.poll_feed(store, add(store, url), cfg)
    assert (result["error"], result["new"], result["skipped"]) == (None, 2, 1)
    assert [i["title"][:5] for i in headlines(store)] == ["Teleg", "Paris"]


def test_truncated_feed_without_entries_is_refused(store, cfg, http_server):
    url = http_server.serve("/cut.xml", (DATA / "truncated_header.xml").read_bytes(), **RSS)
    feed_id = add(store, url)
    result = feeds.poll_feed(store, feed_id, cfg)
    assert result["status"] == "error"
    assert result["error"].startswith("malformed rss20 feed with no readable entries")
    assert store.get_feed(feed_id)["last_error"] == result["error"]
    assert headlines(store) == []


def test_html_page_is_refused(store, cfg, http_server):
    url = http_server.serve("/index.html", (DATA / "page.html").read_bytes(),
                            content_type="text/html; charset=utf-8")
    feed_id = add(store, url)
    result = feeds.poll_feed(store, feed_id, cfg)
    assert result["error"] == "not an RSS/Atom feed: got an HTML page"
    assert store.get_feed(feed_id)["failures"] == 1
    assert headlines(store) == []


def test_iso_8859_1_declared(store, cfg, http_server):
    url = http_server.serve("/latin1.xml", (DATA / "latin1.xml").read_bytes(), content_type="application/rss+xml")
    assert feeds.poll_feed(store, add(store, url), cfg)["new"] == 1
    assert headlines(store)[0]["text"] == (
        "Cafés de Paris fermés pendant les Jeux\nÀ Paris, les cafés près de la Seine ferment à 18 h.")


def test_windows_1252_undeclared_is_read(store, cfg, http_server):
    body = ('<?xml version="1.0"?><rss version="2.0"><channel><title>Wire</title><item>'
            '<title>\u201cQuoted\u201d caf\u00e9 news</title><guid>w1</guid></item></channel></rss>')
    # The server claims UTF-8; the bytes are windows-1252 (smart quotes 0x93/0x94).
    url = http_server.serve("/cp1252.xml", body.encode("cp1252"), **RSS)
    result = feeds.poll_feed(store, add(store, url), cfg)
    assert (result["error"], result["new"]) == (None, 1)
    assert headlines(store)[0]["text"] == "\u201cQuoted\u201d caf\u00e9 news"


def test_atom_feed(store, cfg, http_server):
    url = http_server.serve("/atom.xml", (DATA / "atom.xml").read_bytes(), content_type="application/atom+xml")
    assert feeds.poll_feed(store, add(store, url), cfg)["new"] == 1
    item = headlines(store)[0]
    assert item["text"].endswith("Rebel forces took Damascus on December 8, 2024.")
    assert item["valid_at"] == "2024-12-08T10:00:00+00:00"


def test_edited_entry_updates_pending_and_leaves_baked_alone(store, cfg, http_server):
    http_server.serve("/news.xml", (DATA / "news_v1.xml").read_bytes(), **RSS)
    feed_id = add(store, http_server.url("/news.xml"))
    feeds.poll_feed(store, feed_id, cfg)
    durov = headlines(store)[0]

    http_server.serve("/news.xml", (DATA / "news_v2.xml").read_bytes(), **RSS)
    result = feeds.poll_feed(store, feed_id, cfg)

    # Durov edited in place; Olympics (listed twice) and eclipse known; Starship new.
    assert (result["new"], result["updated"], result["unchanged"]) == (1, 1, 3)
    items = headlines(store)
    assert len(items) == 4
    edited = store.get_item(durov["id"])
    assert edited["text"].startswith("Pavel Durov charged in France")
    assert edited["title"] == "Pavel Durov charged in France, released on 5 million euro bail"
    assert edited["valid_at"] == "2024-08-28T21:00:00+00:00"
    assert edited["status"] == "pending" and edited["status_reason"] == "edited at the source"

    # Once baked, a later edit is not written over what the model was taught.
    store.mark_items([durov["id"]], "baked", bake_id=1)
    http_server.serve("/news.xml", (DATA / "news_v1.xml").read_bytes(), **RSS)
    result = feeds.poll_feed(store, feed_id, cfg)
    assert result["updated"] == 0 and result["new"] == 0
    assert store.get_item(durov["id"])["text"] == edited["text"]


def test_ten_megabyte_entry_is_capped(store, cfg, http_server):
    cfg.feeds.max_item_chars = 500
    huge = "<p>Breaking: " + "very long story " * 650_000 + "</p>"  # 10.4 MB of HTML
    body = ('<?xml version="1.0"?><rss version="2.0"><channel><title>Big</title>'
            f'<item><title>Huge entry</title><guid>big</guid><description><![CDATA[{huge}]]></description></item>'
            '<item><title>Small entry</title><guid>small</guid></item></channel></rss>')
    assert len(body) > 10_000_000
    url = http_server.serve("/big.xml", body, **RSS)

    started = time.monotonic()
    result = feeds.poll_feed(store, add(store, url), cfg)

    assert time.monotonic() - started < 20
    assert (result["error"], result["new"]) == (None, 2)
    big, small = headlines(store)
    assert big["truncated"] is True and len(big["text"]) <= 500
    assert big["text"].startswith("Huge entry\nBreaking: very long story very long story")
    assert big["text"].endswith("…")
    assert "10,400," in big["truncated_reason"] and "max_item_chars = 500" in big["truncated_reason"]
    assert small["truncated"] is False and small["truncated_reason"] is None


def test_hanging_feed_times_out_and_the_next_feed_is_polled(store, cfg, http_server):
    cfg.feeds.timeout_s = 0.5
    hanging = add(store, http_server.hang("/hang.xml"))
    good = add(store, http_server.serve("/news.xml", (DATA / "news_v1.xml").read_bytes(), **RSS))

    started = time.monotonic()
    result = feeds.poll_due(store, cfg)

    assert time.monotonic() - started < 5
    assert result["feeds"] == 2 and result["new"] == 3
    assert result["errors"] == [{"feed_id": hanging, "url": http_server.url("/hang.xml"),
                                 "error": "timed out after 0.5s"}]
    assert store.get_feed(hanging)["failures"] == 1
    assert store.get_feed(good)["failures"] == 0


def test_trickling_feed_hits_the_total_deadline(store, cfg, http_server):
    """A server that sends a byte every 50 ms never trips a per-read timeout; the whole fetch
    still has to finish within feeds.timeout_s."""
    cfg.feeds.timeout_s = 0.5
    http_server.routes["/slow.xml"] = Reply(200, {"Content-Type": "application/rss+xml"},
                                            (DATA / "news_v1.xml").read_bytes(), trickle_s=0.05)
    started = time.monotonic()
    result = feeds.poll_feed(store, add(store, http_server.url("/slow.xml")), cfg)
    assert time.monotonic() - started < 3
    assert result["error"] == "timed out after 0.5s"


def test_unreachable_and_missing(store, cfg, http_server, tmp_path):
    """The errors tell what to fix, not which ports are open or which files exist."""
    gone = add(store, "http://127.0.0.1:9/feed.xml")  # discard port: connection refused
    not_http = add(store, http_server.url("/x").replace("http://", "https://"))  # open port, no TLS
    missing = add(store, (tmp_path / "nope.xml").as_uri())
    secret = tmp_path / "secret"
    secret.write_text("")
    secret.chmod(0)
    unreadable = add(store, secret.as_uri())
    result = feeds.poll_due(store, cfg)
    errors = {e["feed_id"]: e["error"] for e in result["errors"]}
    assert errors[gone] == errors[not_http] == "fetch failed: no HTTP answer from the server"
    assert errors[missing] == feeds.UNREADABLE_FILE
    if os.geteuid() != 0:  # root reads a mode-0 file
        assert errors[unreadable] == feeds.UNREADABLE_FILE
    assert str(tmp_path) not in " ".join(errors.values())
    with pytest.raises(NotFound):
        feeds.poll_feed(store, 999, cfg)


def test_sample_feed_from_feeds_toml(store, cfg):
    cfg.feeds.file = str(REPO / "feeds" / "feeds.toml")
    assert feeds.seed_feeds(store, cfg) == 1
    assert feeds.seed_feeds(store, cfg) == 0  # idempotent
    [feed] = store.list_feeds()
    assert feed["url"] == (REPO / "feeds" / "sample-news.xml").as_uri()
    assert feed["interval_s"] == 1800 and feed["origin"] == "file"

    result = feeds.poll_due(store, cfg)
    assert result["new"] >= 20 and result["errors"] == []
    texts = [i["text"] for i in headlines(store)]
    assert any("Durov" in t and "Le Bourget" in t for t in texts)
    assert any("5 million euros" in t and "twice a week" in t and "may not leave France" in t for t in texts)
    # The file has not changed: nothing is read again.
    assert feeds.poll_feed(store, feed["id"], cfg)["status"] == "not_modified"

    # A removed default stays removed at the next start.
    store.remove_feed(feed["id"])
    assert feeds.seed_feeds(store, cfg) == 0
    assert store.list_feeds() == []


def test_feed_urls_and_intervals_are_checked(store, cfg, tmp_path):
    assert feeds.normalise_url("https://example.org/rss") == "https://example.org/rss"
    assert feeds.normalise_url("x.xml", base_dir=tmp_path, allow_local=True) == (tmp_path / "x.xml").as_uri()
    for bad in ("ftp://example.org/rss", "https:///rss", "javascript:alert(1)", "http://a:99999/",
                "http://exa\nmple.org/"):
        with pytest.raises(UserError):
            feeds.normalise_url(bad, allow_local=True)
    with pytest.raises(UserError, match="interval"):
        feeds.add_feed(store, cfg, "https://example.org/rss", interval="soon", check=False)
    feed, created = feeds.add_feed(store, cfg, "https://example.org/rss", interval="2h", check=False)
    assert created and feed["interval_s"] == 7200


def test_bad_feeds_toml(tmp_path):
    path = tmp_path / "feeds.toml"
    path.write_text('[[feed]]\ntitle = "no url"\n')
    with pytest.raises(UserError, match="needs a url"):
        feeds.load_feeds_file(path)
    path.write_text('[[feed]]\nurl = "a.xml"\ninterval = "often"\n')
    with pytest.raises(UserError, match="not a duration"):
        feeds.load_feeds_file(path)


# --- where a feed may point (issue 15 #3) ---------------------------------------------------


@pytest.mark.parametrize("url", [
    "file:///etc/passwd", "/etc/passwd", "etc/passwd", "file://evil.example/etc/passwd",
    "FILE:///etc/shadow", "data:text/xml,<rss/>", "javascript:alert(1)", "gopher://example.org/",
])
def test_api_never_takes_a_local_file(api, store, url):
    response = api.post("/v1/feeds", json={"url": url, "check": False})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert "must be http:// or https://" in error and "\n" not in error
    assert store.list_feeds(include_removed=True) == []


def test_local_files_only_with_allow_local(store, cfg, tmp_path):
    sample = tmp_path / "news.xml"
    sample.write_bytes((DATA / "news_v1.xml").read_bytes())
    with pytest.raises(UserError, match="--allow-local-file"):
        feeds.add_feed(store, cfg, str(sample))
    with pytest.raises(UserError, match="not on 'evil.example'"):
        feeds.add_feed(store, cfg, "file://evil.example/etc/passwd", allow_local=True)
    for special in ("/dev/zero", str(tmp_path)):
        with pytest.raises(UserError, match="not a regular file"):
            feeds.add_feed(store, cfg, special, allow_local=True, check=False)
    feed, created = feeds.add_feed(store, cfg, str(sample), allow_local=True)
    assert created and feed["url"] == sample.as_uri()
    assert feeds.poll_feed(store, feed["id"], cfg)["new"] == 3


def test_special_files_are_refused_at_poll_time_without_hanging(store, cfg, tmp_path):
    """/dev/zero would be read until memory runs out, a FIFO would block: neither is read."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    ids = [add(store, Path(p).as_uri()) for p in ("/dev/zero", str(fifo), str(tmp_path))]
    started = time.monotonic()
    result = feeds.poll_due(store, cfg)
    assert time.monotonic() - started < 5
    assert {e["feed_id"]: e["error"] for e in result["errors"]} == dict.fromkeys(ids, feeds.UNREADABLE_FILE)


def test_loopback_is_refused_unless_configured(api, store, cfg, http_server):
    url = http_server.serve("/news.xml", (DATA / "news_v1.xml").read_bytes(), **RSS)
    cfg.feeds.allow_loopback = False
    port = http_server.server.server_address[1]
    for target in (url, f"http://localhost:{port}/news.xml", f"http://[::1]:{port}/news.xml",
                   f"http://0.0.0.0:{port}/news.xml"):
        response = api.post("/v1/feeds", json={"url": target})
        assert response.status_code == 422, target
        assert "points at this machine (loopback)" in response.json()["error"]
    # A name that only resolves to loopback is caught at fetch time (also for a feed added unchecked).
    sneaky = add(store, f"http://127.1:{port}/news.xml")
    assert "points at this machine" in feeds.poll_feed(store, sneaky, cfg)["error"]
    assert http_server.requests == []
    assert api.get("/v1/feeds").json()["feeds"] == [{**store.get_feed(sneaky)}]

    cfg.feeds.allow_loopback = True
    assert api.post("/v1/feeds", json={"url": url}).status_code == 201


def test_the_daemons_own_ports_are_refused_even_with_loopback_allowed(store, cfg, http_server):
    cfg.api.port = http_server.server.server_address[1]  # pretend the test server is the daemon
    with pytest.raises(UserError, match="daemon's own port"):
        feeds.add_feed(store, cfg, http_server.url("/v1/bakes"), check=False)
    # A feed that redirects to the daemon (here vLLM's port) is refused at that hop.
    cfg.api.port, cfg.vllm.port = 1, 2
    target = add(store, http_server.url("/start"))
    http_server.routes["/start"] = Reply(302, {"Location": "http://127.0.0.1:2/v1/load_lora_adapter"})
    assert feeds.poll_feed(store, target, cfg)["error"] == "feed URL points at the daemon's own port"
    http_server.routes["/start"] = Reply(302, {"Location": "file:///etc/passwd"})
    assert feeds.poll_feed(store, target, cfg)["error"] == "only http:// and https:// URLs are fetched"


def test_redirects_are_followed_and_bounded(store, cfg, http_server):
    http_server.serve("/news.xml", (DATA / "news_v1.xml").read_bytes(), **RSS)
    http_server.routes["/old"] = Reply(301, {"Location": "/news.xml"})
    assert feeds.poll_feed(store, add(store, http_server.url("/old")), cfg)["new"] == 3
    http_server.routes["/loop"] = Reply(302, {"Location": "/loop"})
    assert feeds.poll_feed(store, add(store, http_server.url("/loop")), cfg)["error"] == "more than 5 redirects"


# --- checked when added (issue 14 #6) -------------------------------------------------------


def test_feeds_are_checked_when_added(api, store, http_server):
    http_server.serve("/index.html", (DATA / "page.html").read_bytes(), content_type="text/html")
    http_server.serve("/notes.txt", "just some text, no feed", content_type="text/plain")
    http_server.serve("/empty.xml", "", **RSS)
    cases = {
        "http://127.0.0.1:9/feed.xml": "fetch failed: no HTTP answer from the server",  # closed port
        http_server.url("/index.html"): "not an RSS/Atom feed: got an HTML page",
        http_server.url("/notes.txt"): "not an RSS/Atom feed",
        http_server.url("/missing.xml"): "HTTP 404 Not Found",
        http_server.url("/empty.xml"): "not an RSS/Atom feed: the response is empty",
        "no such feed": "must be http:// or https://",
    }
    for url, reason in cases.items():
        response = api.post("/v1/feeds", json={"url": url})
        assert response.status_code == 422, url
        assert reason in response.json()["error"], (url, response.json())
        assert "\n" not in response.json()["error"]
    assert store.list_feeds(include_removed=True) == []

    unchecked = api.post("/v1/feeds", json={"url": http_server.url("/missing.xml"), "check": False})
    assert unchecked.status_code == 201
    good = api.post("/v1/feeds", json={"url": http_server.serve("/news.xml", (DATA / "news_v1.xml").read_bytes(), **RSS)})
    assert good.status_code == 201 and len(store.list_feeds()) == 2


# --- bad values and one feed's fault (issue 15 #4) -----------------------------------------


@pytest.mark.parametrize("interval", ["inf", "nan", "1e400s", "-1s", "0", "400d", "soon"])
def test_bad_intervals_get_a_clear_422(api, store, http_server, interval):
    url = http_server.serve("/news.xml", (DATA / "news_v1.xml").read_bytes(), **RSS)
    response = api.post("/v1/feeds", json={"url": url, "interval": interval})
    assert response.status_code == 422
    assert response.json()["error"].startswith("interval: ")
    assert store.list_feeds() == []


def test_one_broken_feed_does_not_stop_the_others(api, store, cfg, http_server):
    """A row the poller cannot handle (here an infinite interval, as an older version stored)
    is reported as that feed's error; every other feed is still polled."""
    broken = add(store, http_server.serve("/a.xml", (DATA / "news_v1.xml").read_bytes(), **RSS),
                 interval_s=float("inf"))
    good = add(store, http_server.serve("/b.xml", (DATA / "atom.xml").read_bytes(), content_type="application/atom+xml"))
    response = api.post("/v1/feeds/poll")
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["feeds"] == 2 and result["new"] >= 1
    assert [e["feed_id"] for e in result["errors"]] == [broken]
    assert result["errors"][0]["error"] == "unexpected error: OverflowError"
    assert store.get_feed(good)["last_ok_at"]
    assert [i["feed_id"] for i in headlines(store)].count(good) == 1


# --- smaller ones (issue 15 #8) and markup (issue 15 #9) ----------------------------------


def test_passwords_in_urls_are_masked(api, store):
    feed_id = add(store, "https://reader:hunter2@example.org/private.xml")
    assert feeds.display_url("https://reader:hunter2@example.org/x") == "https://reader:***@example.org/x"
    assert feeds.display_url("https://example.org/x") == "https://example.org/x"
    shown = api.get("/v1/feeds").json()["feeds"]
    assert [f["url"] for f in shown] == ["https://reader:***@example.org/private.xml"]
    assert store.get_feed(feed_id)["url"].endswith("hunter2@example.org/private.xml")  # still polled with it


HOSTILE = b"""<?xml version="1.0"?><rss version="2.0"><channel><title>Evil \x1b[31mWire</title>
<item><title>CDATA script</title><guid isPermaLink="false">1</guid><link>javascript:alert(1)</link>
  <description><![CDATA[<p>Hello <b>world</b></p><script>alert("cdata")</script><style>p{}</style><!-- hidden -->]]></description></item>
<item><title>Escaped twice</title><guid>data:text/html,hi</guid>
  <description>&amp;lt;script&amp;gt;alert("twice")&amp;lt;/script&amp;gt;Kept &amp;lt;i&amp;gt;text&amp;lt;/i&amp;gt;</description></item>
<item><title>Escaped three times &amp;amp;lt;img src=x onerror=alert(3)&amp;amp;gt;</title><guid>https://example.org/3</guid>
  <description>a &amp;lt; b and c &gt; d</description></item>
<item><title>Control\x07 chars\x00 here</title><link>https://example.org/4</link></item>
</channel></rss>"""


def test_markup_and_control_characters_are_stripped(store, cfg, http_server):
    url = http_server.serve("/evil.xml", HOSTILE, **RSS)
    result = feeds.poll_feed(store, add(store, url), cfg)
    assert result["error"] is None and result["new"] == 4
    items = headlines(store)
    assert [i["text"] for i in items] == [
        "CDATA script\nHello world",
        "Escaped twice\nKept text",
        "Escaped three times\na < b and c > d",
        "Control chars here",
    ]
    for item in items:
        assert "<" not in item["text"].replace("a < b", "") and "alert" not in item["text"]
        assert not any(ord(c) < 32 and c != "\n" for c in item["text"] + item["source"])
    assert items[0]["source"] == "Evil [31mWire"
    # Only links fit to follow are kept as the source reference.
    assert [i["source_ref"] for i in items] == ["1", None, "https://example.org/3", "https://example.org/4"]


# --- bounded reads (issue 15 #5) ----------------------------------------------------------


def _gzip_of_zeros(megabytes: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = bytes(2**20)
    return b"".join(packer.compress(chunk) for _ in range(megabytes)) + packer.flush()


def test_stacked_gzip_bomb_is_refused_within_a_memory_bound(store, cfg, http_server, monkeypatch):
    """"Content-Encoding: gzip, gzip": a few KB on the wire, 200 MB unpacked. Every layer is
    unpacked with the size cap, so memory stays near the cap (here 1 MiB), not the bomb's size."""
    monkeypatch.setattr(feeds, "MAX_FEED_BYTES", 2**20)
    bomb = gzip.compress(_gzip_of_zeros(200), 9)
    assert len(bomb) < 10_000
    url = http_server.serve("/bomb.xml", bomb, content_encoding="gzip, gzip", **RSS)
    tracemalloc.start()
    try:
        result = feeds.poll_feed(store, add(store, url), cfg)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result["error"] == "feed larger than 1 MiB once unpacked"
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.0f} MiB"


def test_gzip_and_deflate_layers_are_unpacked(store, cfg, http_server):
    body = (DATA / "news_v1.xml").read_bytes()
    http_server.serve("/gz.xml", gzip.compress(gzip.compress(body)), content_encoding="gzip, gzip", **RSS)
    http_server.serve("/deflate.xml", zlib.compress(body), content_encoding="deflate", **RSS)
    http_server.serve("/br.xml", body, content_encoding="br", **RSS)
    assert feeds.poll_feed(store, add(store, http_server.url("/gz.xml")), cfg)["new"] == 3
    assert feeds.poll_feed(store, add(store, http_server.url("/deflate.xml")), cfg)["unchanged"] == 3
    assert feeds.poll_feed(store, add(store, http_server.url("/br.xml")), cfg)["error"] == (
        "unsupported Content-Encoding 'br'")
    assert http_server.hits("/gz.xml")[0]["accept-encoding"] == "gzip, deflate"


def test_headers_sent_a_byte_at_a_time_hit_the_total_deadline(store, cfg):
    """Each byte comes well within the per-read timeout; the whole fetch still ends on time."""
    cfg.feeds.timeout_s = 0.5
    stop = threading.Event()
    listener = slow_header_server(stop)
    try:
        started = time.monotonic()
        result = feeds.poll_feed(store, add(store, f"http://127.0.0.1:{listener.getsockname()[1]}/"), cfg)
        assert time.monotonic() - started < 2
        assert result["error"] == "timed out after 0.5s"
    finally:
        stop.set()
        listener.close()


def test_entries_per_poll_are_capped_and_committed_in_batches(store, cfg, http_server, monkeypatch):
    monkeypatch.setattr(feeds, "MAX_ENTRIES_PER_POLL", 50)
    monkeypatch.setattr(feeds, "ENTRIES_PER_COMMIT", 20)
    items = "".join(f"<item><title>Story {n}</title><guid>s{n}</guid></item>" for n in range(120))
    url = http_server.serve("/many.xml", f'<?xml version="1.0"?><rss version="2.0"><channel><title>Many</title>'
                                         f'{items}</channel></rss>', **RSS)
    feed_id = add(store, url)
    commits, depth = [], [0]
    real = store.transaction

    @contextmanager
    def outermost_counted():
        commits.append(1) if depth[0] == 0 else None
        depth[0] += 1
        try:
            with real() as db:
                yield db
        finally:
            depth[0] -= 1

    monkeypatch.setattr(store, "transaction", outermost_counted)
    result = feeds.poll_feed(store, feed_id, cfg)
    assert (result["new"], result["skipped"]) == (50, 70)
    assert [i["title"] for i in headlines(store)] == [f"Story {n}" for n in range(50)]
    assert len(commits) == 4  # entries 20 + 20 + 10, then the feed's own row
