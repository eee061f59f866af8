"""RSS/Atom sources: the default list in feeds.toml, polling, and entries -> headline items.

The daemon's scheduler calls `poll_due(store, cfg)` every so often; `poll_feed` polls one feed
now. A poll never raises for a bad feed: the error is recorded on the feed (`last_error`,
`failures`, a backoff) and reported in the summary, and the poller goes on with the next feed.

Where a feed may point: http(s) URLs, not at this machine (loopback) unless `feeds.allow_loopback`,
and never at the daemon's own ports. Local files (a path or `file://` URL, regular files only) come
from the operator: feeds.toml, or `feeds add --allow-local-file`, which writes to the database
itself; the HTTP API refuses them always. The rule is checked when a feed is added and again at
every fetch and redirect.

Fetching is HTTP(S) through httpx (timeouts, a total deadline, a size cap on the raw bytes and on
each unpacked Content-Encoding layer, conditional GET with ETag / Last-Modified, Retry-After on
429/503) or a local file (the file's mtime plays Last-Modified). Parsing is feedparser's; every
entry becomes plain text through our own HTML-to-text conversion, which drops all tags, scripts
and styles (also markup escaped twice). feedparser's sanitizer is off: once everything is text it
adds nothing, and it costs ~4 s per 10 MB of tag-dense HTML (0.1 s without).

Errors say what to fix without telling what the daemon can see: a connection failure or an
unreadable file gets one generic wording, whatever the cause.
"""

from __future__ import annotations

import hashlib
import html
import ipaddress
import logging
import os
import re
import socket
import stat
import threading
import time
import tomllib
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime, parsedate_to_datetime
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse, urlsplit, urlunsplit

import feedparser
import httpx

from .config import Config, parse_duration
from .errors import UserError
from .ingest import strip_control_chars
from .store import NotFound, Store

log = logging.getLogger(__name__)

USER_AGENT = "agent-memory/0.1 (+https://github.com/agent-memory)"
ACCEPT = "application/rss+xml, application/atom+xml, application/xml;q=0.9, text/xml;q=0.9, */*;q=0.5"
MAX_FEED_BYTES = 50 * 1024 * 1024  # a bigger body (raw, or any unpacked layer) is refused, not parsed
MAX_REDIRECTS = 5
MAX_ENTRIES_PER_POLL = 1000  # a feed's first (newest) entries; the rest wait for a later poll
ENTRIES_PER_COMMIT = 100  # API writes get the database between batches
MAX_PARALLEL_FETCHES = 4  # feed fetches the API runs at once; more requests wait for a slot
MAX_REF_CHARS = 2000
MAX_WAIT_S = 24 * 3600  # ceiling on Retry-After and on the failure backoff
RAW_CHARS_PER_CHAR = 20  # HTML looked at per kept character: bounds the work on huge entries


class FeedError(Exception):
    """A feed could not be fetched or read; the message is what `feeds list` shows."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


# --- the list of sources ------------------------------------------------------------------


def normalise_url(url: str, base_dir: Path | None = None, *, allow_local: bool = False) -> str:
    """http(s) URLs as they are. With `allow_local` (the operator's own sources), also file://
    URLs of this host and plain paths (relative to `base_dir`, else the current directory), as
    absolute file:// URLs. Anything else is a UserError."""
    url = url.strip()
    if any(ord(c) < 32 or ord(c) == 127 for c in url):
        raise UserError("feed URL contains control characters")
    parts = urlparse(url)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        try:
            parts.port  # noqa: B018 (raises ValueError for a bad port)
        except ValueError:
            raise UserError(f"feed URL has a bad port: {display_url(url)!r}") from None
        if not parts.hostname:
            raise UserError(f"feed URL has no host: {display_url(url)!r}")
        return url
    is_path = not scheme or len(scheme) == 1  # (a one-letter "scheme" is a Windows drive)
    if not is_path and scheme != "file":
        raise UserError(f"feed URL must be http:// or https://, got {display_url(url)!r}")
    if not allow_local:
        raise UserError("feed URL must be http:// or https:// (a local file can be added only from "
                        f"the command line: feeds add --allow-local-file), got {url!r}")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise UserError(f"a file:// URL must name a file on this machine, not on {parts.netloc!r}")
        return Path(unquote(parts.path)).resolve().as_uri()
    path = Path(url).expanduser()
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    return path.resolve().as_uri()


def is_local_file(url: str) -> bool:
    return urlparse(url).scheme == "file"


def check_destination(url: str, cfg: Config, *, resolve: bool = True) -> None:
    """Refuse an http(s) URL that reaches this machine: the daemon's own ports always, any other
    loopback port unless feeds.allow_loopback. `resolve`: look the host name up (at fetch time);
    without it only addresses written in the URL (and localhost) are checked. Raises FeedError."""
    parts = urlparse(url)
    if parts.scheme not in ("http", "https"):
        raise FeedError("only http:// and https:// URLs are fetched")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addresses = _addresses(parts.hostname or "", port, resolve)
    if not any(_is_this_machine(a) for a in addresses):
        return
    if port in (cfg.api.port, cfg.vllm.port):
        raise FeedError("feed URL points at the daemon's own port")
    if not cfg.feeds.allow_loopback:
        raise FeedError("feed URL points at this machine (loopback); "
                        "set feeds.allow_loopback = true to allow that")


def _addresses(host: str, port: int, resolve: bool) -> list:
    try:
        return [ipaddress.ip_address(host.split("%")[0])]
    except ValueError:
        pass
    if host.lower().rstrip(".") == "localhost" or host.lower().rstrip(".").endswith(".localhost"):
        return [ipaddress.ip_address("127.0.0.1")]
    if not resolve:
        return []
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise FeedError("fetch failed: the host name does not resolve") from None
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


def _is_this_machine(address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    address = mapped or address
    return address.is_loopback or address.is_unspecified


def display_url(url: str) -> str:
    """The URL with its password (if any) masked, for lists, logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def for_display(feed: dict) -> dict:
    """A feed row as `feeds list` and GET /v1/feeds show it (password masked)."""
    return {**feed, "url": display_url(feed["url"])}


def load_feeds_file(path: str | Path) -> list[dict]:
    """The [[feed]] tables of a feeds.toml: url, title, interval. Relative paths are read
    relative to the file's own directory."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"feeds file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"feeds file {path} is not valid TOML: {e}") from None
    feeds = []
    for number, entry in enumerate(data.get("feed", []), start=1):
        if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
            raise UserError(f"{path}: [[feed]] number {number} needs a url = \"...\"")
        interval = entry.get("interval")
        feeds.append({
            "url": normalise_url(entry["url"], base_dir=path.parent.resolve(), allow_local=True),
            "title": entry.get("title"),
            "interval_s": _interval_s(interval, where=f"{path}: [[feed]] number {number}")
            if interval is not None else None,
        })
    return feeds


def seed_feeds(store: Store, cfg: Config) -> int:
    """Load the default sources (cfg.feeds.file) into the database; returns how many were new.
    Idempotent: known URLs are left as they are, and a feed the user removed stays removed."""
    path = Path(cfg.feeds.file)
    if not path.exists():
        log.warning("feeds file %s not found: no default feeds", path)
        return 0
    default_interval = parse_duration(cfg.feeds.default_interval)
    added = 0
    for feed in load_feeds_file(path):
        _, created = store.add_feed(
            feed["url"], interval_s=feed["interval_s"] or default_interval, title=feed["title"],
            origin="file", reenable=False,
        )
        added += created
    return added


def add_feed(store: Store, cfg: Config, url: str, interval: str | None = None,
             title: str | None = None, *, check: bool = True, allow_local: bool = False) -> tuple[dict, bool]:
    """Validate and add a user's feed (due at once); returns (feed, created).
    `check`: fetch and parse it first, and refuse it (UserError) when that fails.
    `allow_local`: a local file may be the feed (the CLI's --allow-local-file; never the API)."""
    interval_s = _interval_s(interval or cfg.feeds.default_interval, where="interval")
    url = normalise_url(url, allow_local=allow_local)
    if is_local_file(url):
        path = Path(unquote(urlparse(url).path))
        if path.exists() and not path.is_file():
            raise UserError(f"not added: {path} is not a regular file (a directory, device or FIFO)")
    else:
        try:
            check_destination(url, cfg, resolve=False)
        except FeedError as e:
            raise UserError(f"not added: {e}") from None
    if check:
        try:
            fetched = fetch(url, cfg)
            parse_feed(fetched.content, fetched.headers, url)
        except Exception as e:
            raise UserError(f"not added: {display_url(url)}: {failure_message(e, cfg)}") from None
    title = " ".join(strip_control_chars(title).split())[:200] if title else None
    return store.add_feed(url, interval_s=interval_s, title=title or None, origin="user")


def _interval_s(text, where: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None


# --- polling ------------------------------------------------------------------------------


def poll_due(store: Store, cfg: Config, *, force: bool = False, now: datetime | None = None) -> dict:
    """Poll every enabled feed whose next_poll_at has come (every enabled feed when `force`),
    one after the other. Returns {"feeds", "new", "updated", "unchanged", "errors": [...],
    "results": [per-feed summaries]}."""
    now = now or datetime.now(timezone.utc)
    feeds = store.list_feeds() if force else store.due_feeds(_iso(now))
    results = [_poll_guarded(store, feed, cfg, now) for feed in feeds]
    return {
        "feeds": len(results),
        **{key: sum(r[key] for r in results) for key in ("new", "updated", "unchanged")},
        "errors": [{"feed_id": r["feed_id"], "url": r["url"], "error": r["error"]}
                   for r in results if r["error"]],
        "results": results,
    }


def _poll_guarded(store: Store, feed: dict, cfg: Config, now: datetime) -> dict:
    """poll_feed for one of many: whatever goes wrong with this feed (even a bug, or a row
    the database cannot take) is reported in its summary, and the next feed is polled."""
    try:
        return poll_feed(store, feed["id"], cfg, now=now)
    except Exception as e:
        log.exception("feed %s: poll failed", feed["id"])
        return {"feed_id": feed["id"], "url": display_url(feed["url"]), "status": "error", "new": 0, "updated": 0,
                "unchanged": 0, "skipped": 0, "error": f"unexpected error: {type(e).__name__}"}


def poll_enabled_feed(store: Store, feed_id: int, cfg: Config) -> dict:
    """poll_feed for a feed the user names (the API's POST /v1/feeds/{id}/poll): NotFound for a
    removed one too."""
    feed = store.get_feed(feed_id)
    if feed is None or not feed["enabled"]:
        raise NotFound(f"no feed {feed_id}")
    return poll_feed(store, feed_id, cfg)


def poll_feed(store: Store, feed_id: int, cfg: Config, *, now: datetime | None = None) -> dict:
    """Poll one feed now and store its new entries. Raises NotFound for an unknown id; a feed
    that fails is recorded (and reported under "error"), never raised."""
    feed = store.get_feed(feed_id)
    if feed is None:
        raise NotFound(f"no feed {feed_id}")
    now = now or datetime.now(timezone.utc)
    summary = {"feed_id": feed_id, "url": display_url(feed["url"]), "status": "ok",
               "new": 0, "updated": 0, "unchanged": 0, "skipped": 0, "error": None}
    try:
        fetched = fetch(feed["url"], cfg, feed["etag"], feed["last_modified"])
        if fetched.not_modified:
            summary["status"] = "not_modified"
        else:
            parsed = parse_feed(fetched.content, fetched.headers, feed["url"])
            if not feed["title"] and parsed.feed.get("title"):
                feed["title"] = clean_text(parsed.feed.title)[:200]  # also the items' source
            summary.update(store_entries(store, feed, parsed.entries, cfg.feeds.max_item_chars))
    except Exception as e:  # recorded on the feed; the next feed runs
        if not isinstance(e, (FeedError, httpx.HTTPError, OSError)):  # a bug or a parser surprise
            log.exception("feed %s (%s): unexpected error", feed_id, display_url(feed["url"]))
        return _record_failure(store, feed, summary, failure_message(e, cfg),
                               getattr(e, "retry_after_s", None), now)
    store.update_feed(
        feed_id, title=feed["title"], etag=fetched.etag or feed["etag"],
        last_modified=fetched.last_modified or feed["last_modified"],
        failures=0, backoff_s=0, last_error=None, last_polled_at=_iso(now), last_ok_at=_iso(now),
        next_poll_at=_iso(now + timedelta(seconds=feed["interval_s"])),
    )
    return summary


def failure_message(e: Exception, cfg: Config) -> str:
    """What `feeds list` shows for a failed fetch or parse: the reason when it is the feed's
    (HTTP status, not a feed, too big), one generic wording when it is the network's."""
    if isinstance(e, (FeedError, UserError)):
        return str(e)
    if isinstance(e, httpx.TimeoutException):
        return f"timed out after {cfg.feeds.timeout_s:g}s"
    if isinstance(e, (httpx.HTTPError, OSError)):
        return "fetch failed: no HTTP answer from the server"
    return f"unexpected error: {type(e).__name__}"


def _record_failure(store: Store, feed: dict, summary: dict, error: str,
                    retry_after_s: float | None, now: datetime) -> dict:
    """Count the failure and push the next poll back: by Retry-After when the server said,
    else exponentially (interval, 2x, 4x, ... up to a day)."""
    failures = feed["failures"] + 1
    if retry_after_s is not None:
        wait = min(retry_after_s, MAX_WAIT_S)
    else:
        wait = min(feed["interval_s"] * 2 ** (failures - 1), MAX_WAIT_S)
    log.warning("feed %s (%s): %s; next try in %ds", feed["id"], display_url(feed["url"]), error, wait)
    store.update_feed(
        feed["id"], failures=failures, backoff_s=wait, last_error=error, last_polled_at=_iso(now),
        next_poll_at=_iso(now + timedelta(seconds=wait)),
    )
    summary.update(status="error", error=error)
    return summary


# --- fetching -----------------------------------------------------------------------------


@dataclass
class Fetched:
    content: bytes = b""
    headers: dict = field(default_factory=dict)
    etag: str | None = None
    last_modified: str | None = None
    not_modified: bool = False


def fetch(url: str, cfg: Config, etag: str | None = None, last_modified: str | None = None) -> Fetched:
    """GET a feed, conditionally, within cfg.feeds.timeout_s in all. Raises FeedError (with
    retry_after_s on 429/503) or httpx errors."""
    if is_local_file(url):
        return _fetch_file(url, last_modified)
    headers = {"User-Agent": USER_AGENT, "Accept": ACCEPT, "Accept-Encoding": "gzip, deflate"}
    if etag:
        headers["If-None-Match"] = etag
    if last_modified:
        headers["If-Modified-Since"] = last_modified
    timeout_s = cfg.feeds.timeout_s
    deadline = time.monotonic() + timeout_s  # httpx's timeouts are per read; this is the whole
    with httpx.Client(timeout=timeout_s, follow_redirects=False) as client:
        # A server that sends its headers a byte at a time never trips a per-read timeout:
        # closing the client at the deadline ends the request wherever it is.
        watchdog = threading.Timer(timeout_s, client.close)
        watchdog.start()
        try:
            for _ in range(MAX_REDIRECTS + 1):
                check_destination(url, cfg)  # every hop: a redirect may point anywhere
                with client.stream("GET", url, headers=headers) as response:
                    if response.has_redirect_location:
                        url = str(response.url.join(response.headers["location"]))
                        continue
                    return _read_response(response, deadline)
            raise FeedError(f"more than {MAX_REDIRECTS} redirects")
        except (httpx.HTTPError, OSError, RuntimeError):
            if time.monotonic() >= deadline:
                raise httpx.ReadTimeout("total deadline passed") from None
            raise
        finally:
            watchdog.cancel()


def _read_response(response: httpx.Response, deadline: float) -> Fetched:
    if response.status_code == 304:
        return Fetched(not_modified=True, etag=response.headers.get("etag"),
                       last_modified=response.headers.get("last-modified"))
    if response.status_code in (429, 503):
        wait = _retry_after_s(response.headers.get("retry-after"))
        said = f" (Retry-After {wait:g}s)" if wait is not None else ""
        raise FeedError(f"HTTP {response.status_code}{said}", retry_after_s=wait)
    if response.status_code >= 400:
        raise FeedError(f"HTTP {response.status_code} {response.reason_phrase}".strip())
    raw = bytearray()
    for chunk in response.iter_raw():  # as sent: we unpack it ourselves, bounded
        raw += chunk
        if len(raw) > MAX_FEED_BYTES:
            raise FeedError(f"feed larger than {MAX_FEED_BYTES // 2**20} MiB")
        if time.monotonic() > deadline:
            raise httpx.ReadTimeout("total deadline passed")
    body = _decode(bytes(raw), response.headers.get("content-encoding", ""))
    return Fetched(body, dict(response.headers), response.headers.get("etag"),
                   response.headers.get("last-modified"))


def _decode(body: bytes, content_encoding: str) -> bytes:
    """Undo each Content-Encoding layer (the last applied first), none unpacking past MAX_FEED_BYTES:
    a few KB of gzip-in-gzip cannot become gigabytes in memory."""
    for coding in reversed([c.strip().lower() for c in content_encoding.split(",") if c.strip()]):
        if coding == "identity":
            continue
        if coding in ("gzip", "x-gzip"):
            body = _inflate(body, 16 + zlib.MAX_WBITS)
        elif coding == "deflate":  # zlib-wrapped as the RFC says, or raw as some servers send
            try:
                body = _inflate(body, zlib.MAX_WBITS)
            except FeedError:
                body = _inflate(body, -zlib.MAX_WBITS)
        else:
            raise FeedError(f"unsupported Content-Encoding {coding!r}")
    return body


def _inflate(data: bytes, wbits: int) -> bytes:
    out = bytearray()
    while data:  # gzip allows several members one after the other
        unpacker = zlib.decompressobj(wbits)
        try:
            out += unpacker.decompress(data, MAX_FEED_BYTES + 1 - len(out))
        except zlib.error:
            raise FeedError("the compressed body is corrupt") from None
        if len(out) > MAX_FEED_BYTES:
            raise FeedError(f"feed larger than {MAX_FEED_BYTES // 2**20} MiB once unpacked")
        if not unpacker.eof:
            raise FeedError("the compressed body is cut short")
        data = unpacker.unused_data
    return bytes(out)


UNREADABLE_FILE = "cannot read the feed file (it must be an existing, readable regular file)"


def _fetch_file(url: str, last_modified: str | None) -> Fetched:
    """A local feed file: regular files only (not /dev/zero, a FIFO, a directory), at most
    MAX_FEED_BYTES. Any failure reads the same, so an error tells nothing about other files."""
    path = Path(unquote(urlparse(url).path))
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        raise FeedError(UNREADABLE_FILE) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise FeedError(UNREADABLE_FILE)
    with os.fdopen(fd, "rb") as file:
        if info.st_size > MAX_FEED_BYTES:
            raise FeedError(f"feed larger than {MAX_FEED_BYTES // 2**20} MiB")
        mtime = format_datetime(datetime.fromtimestamp(info.st_mtime, timezone.utc), usegmt=True)
        if mtime == last_modified:
            return Fetched(not_modified=True)
        try:
            content = file.read(MAX_FEED_BYTES + 1)
        except OSError:
            raise FeedError(UNREADABLE_FILE) from None
    if len(content) > MAX_FEED_BYTES:  # it grew while we read
        raise FeedError(f"feed larger than {MAX_FEED_BYTES // 2**20} MiB")
    return Fetched(content, {"content-location": url}, None, mtime)


def _retry_after_s(value: str | None) -> float | None:
    """Retry-After is either seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


# --- parsing ------------------------------------------------------------------------------


def parse_feed(content: bytes, headers: dict, url: str):
    """feedparser's result. A feed with parse problems ("bozo") is accepted while it still has
    entries; one without entries is refused with the reason."""
    if not content.strip():
        raise FeedError("not an RSS/Atom feed: the response is empty")
    headers = {k.lower(): v for k, v in headers.items()}
    headers.setdefault("content-location", url)
    parsed = feedparser.parse(
        content, response_headers=headers, sanitize_html=False, resolve_relative_uris=False,
    )
    if parsed.entries:
        return parsed
    problem = parsed.get("bozo_exception")
    if not parsed.version:
        content_type = headers.get("content-type", "").split(";")[0].strip()
        if content_type == "text/html" or content.lstrip()[:200].lower().startswith((b"<!doctype html", b"<html")):
            raise FeedError("not an RSS/Atom feed: got an HTML page")
        raise FeedError(f"not an RSS/Atom feed{f' ({problem})' if problem else ''}")
    if parsed.bozo:
        raise FeedError(f"malformed {parsed.version} feed with no readable entries: {problem}")
    return parsed  # a well-formed feed that is empty right now


def store_entries(store: Store, feed: dict, entries: list, max_chars: int) -> dict:
    """Entries -> headline items: the first MAX_ENTRIES_PER_POLL of them (the rest count as
    skipped), committed ENTRIES_PER_COMMIT at a time so that API writes are never held up long.
    Counts new / updated / unchanged / skipped."""
    counts = {"new": 0, "updated": 0, "unchanged": 0, "skipped": max(0, len(entries) - MAX_ENTRIES_PER_POLL)}
    entries = entries[:MAX_ENTRIES_PER_POLL]
    for start in range(0, len(entries), ENTRIES_PER_COMMIT):
        # Text conversion outside the transaction: the database is free while the next batch is made.
        items = [entry_to_item(entry, feed, max_chars) for entry in entries[start:start + ENTRIES_PER_COMMIT]]
        counts["skipped"] += items.count(None)
        with store.transaction():
            for item in filter(None, items):
                _, outcome = store.add_item("headline", update_pending=True, **item)
                counts["unchanged" if outcome == "duplicate" else outcome] += 1
    return counts


def entry_to_item(entry, feed: dict, max_chars: int) -> dict | None:
    """One feed entry as add_item keyword arguments (None for an entry with no text)."""
    title, title_cut = clean_capped(entry.get("title", ""), max_chars)
    summary_html = entry.get("summary") or (entry.get("content") or [{}])[0].get("value", "")
    summary, summary_cut = clean_capped(summary_html, max_chars)
    parts = [title] + ([summary] if summary and summary != title else [])
    text = "\n".join(p for p in parts if p)
    if not text:
        return None
    text, text_cut = cap(text, max_chars)
    cut = title_cut or summary_cut or text_cut
    published = _entry_time(entry)
    return {
        "text": text,
        "title": title or None,
        "source": feed["title"] or feed["url"],
        "source_ref": _safe_ref(entry.get("link")) or _safe_ref(entry.get("id")),
        "feed_id": feed["id"],
        "dedup_key": entry_key(entry, feed["id"], title, published),
        "published_at": published,
        "valid_at": published,
        "truncated": bool(cut),
        "truncated_reason": cut or None,
    }


def _safe_ref(value) -> str | None:
    """A link or id fit to show and follow: http(s) links, and ids that are not links at all
    ("tag:...", "urn:...", "wire-123"); never javascript:, data: and the like."""
    if not isinstance(value, str):
        return None
    value = strip_control_chars(value).strip()
    scheme = urlparse(value).scheme.lower()
    if not value or len(value) > MAX_REF_CHARS or scheme not in ("http", "https", "tag", "urn", ""):
        return None
    return value


def entry_key(entry, feed_id: int, title: str, published: str | None) -> str:
    """Identity of an entry within its feed: its id, else its link, else title + date."""
    if entry.get("id"):
        return f"feed:{feed_id}:id:{entry.id}"
    if entry.get("link"):
        return f"feed:{feed_id}:link:{entry.link}"
    digest = hashlib.sha256(f"{title}\n{published or ''}".encode()).hexdigest()[:32]
    return f"feed:{feed_id}:hash:{digest}"


def _entry_time(entry) -> str | None:
    parsed = entry.get("published_parsed") or entry.get("updated_parsed")
    if not parsed:
        return None
    return datetime(*parsed[:6], tzinfo=timezone.utc).isoformat(timespec="seconds")


# --- text ---------------------------------------------------------------------------------


class _TextOnly(HTMLParser):
    """Collects the text of an HTML fragment, without scripts and styles."""

    SKIP = {"script", "style"}
    BREAKS = {"p", "br", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BREAKS:
            self.parts.append(" ")

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.skipping:
            self.skipping -= 1

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)


TAG = re.compile(r"</?[a-zA-Z!?/][^<>]*>")
UNESCAPE_ROUNDS = 3  # markup escaped this many times over is still found and dropped


def clean_text(fragment: str) -> str:
    """HTML fragment -> plain text on one line: tags, scripts and styles dropped, entities
    decoded, control characters removed, whitespace collapsed. Markup escaped once more than
    it should be ("&lt;script&gt;", as some feeds send) is text that still holds tags: it is
    converted again (until nothing changes, UNESCAPE_ROUNDS at most), and whatever tag survives
    that is removed."""
    for _ in range(UNESCAPE_ROUNDS):
        text = _html_to_text(fragment)
        if text == fragment:
            break
        fragment = text
    text = TAG.sub(" ", text)
    return " ".join(strip_control_chars(text).split())


def _html_to_text(fragment: str) -> str:
    if "<" not in fragment:
        return html.unescape(fragment)
    parser = _TextOnly()
    parser.feed(fragment)
    parser.close()
    return "".join(parser.parts)


def clean_capped(fragment: str, max_chars: int) -> tuple[str, str]:
    """clean_text, looking at no more of a huge fragment than it needs; returns (text, why cut)."""
    limit = max(max_chars * RAW_CHARS_PER_CHAR, 100_000)
    text = clean_text(fragment[:limit])
    text, why = cap(text, max_chars)
    if len(fragment) > limit:
        why = f"entry was {len(fragment):,} characters; kept the first {len(text):,} (feeds.max_item_chars = {max_chars})"
    return text, why


def cap(text: str, max_chars: int) -> tuple[str, str]:
    """Cut text to max_chars at a word boundary, with an ellipsis; returns (text, why cut or "")."""
    if len(text) <= max_chars:
        return text, ""
    cut = text[: max_chars - 1]
    if " " in cut[-200:]:
        cut = cut[: cut.rindex(" ")]
    cut = cut.rstrip() + "…"
    return cut, f"entry was {len(text):,} characters; kept the first {len(cut):,} (feeds.max_item_chars = {max_chars})"


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds")
