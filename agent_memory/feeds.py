"""RSS/Atom sources: the default list in feeds.toml, polling, and entries -> headline items.

The daemon's scheduler calls `poll_due(store, cfg)` every so often; `poll_feed` polls one feed
now. A poll never raises for a bad feed: the error is recorded on the feed (`last_error`,
`failures`, a backoff) and reported in the summary, and the poller goes on with the next feed.

Fetching is HTTP(S) through httpx (timeouts, a total deadline, a size cap, conditional GET with
ETag / Last-Modified, Retry-After on 429/503) or a local file (`file://` URL; the file's mtime
plays Last-Modified). Parsing is feedparser's; we strip all HTML ourselves, so its sanitizer
(slow on multi-megabyte entries) is off.
"""

from __future__ import annotations

import hashlib
import html
import logging
import time
import tomllib
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime, parsedate_to_datetime
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import feedparser
import httpx

from .config import Config, parse_duration
from .errors import UserError
from .store import NotFound, Store

log = logging.getLogger(__name__)

USER_AGENT = "agent-memory/0.1 (+https://github.com/agent-memory)"
ACCEPT = "application/rss+xml, application/atom+xml, application/xml;q=0.9, text/xml;q=0.9, */*;q=0.5"
MAX_FEED_BYTES = 50 * 1024 * 1024  # a bigger body is refused, not parsed
MAX_WAIT_S = 24 * 3600  # ceiling on Retry-After and on the failure backoff
RAW_CHARS_PER_CHAR = 20  # HTML looked at per kept character: bounds the work on huge entries


class FeedError(Exception):
    """A feed could not be fetched or read; the message is what `feeds list` shows."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


# --- the list of sources ------------------------------------------------------------------


def normalise_url(url: str, base_dir: Path | None = None) -> str:
    """http(s) URLs as they are; file:// URLs and plain paths (relative to `base_dir`, else
    the current directory) as absolute file:// URLs. Anything else is a UserError."""
    url = url.strip()
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        if not urlparse(url).netloc:
            raise UserError(f"feed URL has no host: {url!r}")
        return url
    if scheme == "file":
        return Path(unquote(urlparse(url).path)).resolve().as_uri()
    if scheme and len(scheme) > 1:  # (a one-letter "scheme" is a Windows drive)
        raise UserError(f"feed URL must be http://, https:// or file://, got {url!r}")
    path = Path(url).expanduser()
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    return path.resolve().as_uri()


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
            "url": normalise_url(entry["url"], base_dir=path.parent.resolve()),
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
             title: str | None = None) -> tuple[dict, bool]:
    """Validate and add a user's feed (due at once); returns (feed, created)."""
    interval_s = _interval_s(interval or cfg.feeds.default_interval, where="interval")
    return store.add_feed(normalise_url(url), interval_s=interval_s, title=title, origin="user")


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
    results = [poll_feed(store, feed["id"], cfg, now=now) for feed in feeds]
    return {
        "feeds": len(results),
        **{key: sum(r[key] for r in results) for key in ("new", "updated", "unchanged")},
        "errors": [{"feed_id": r["feed_id"], "url": r["url"], "error": r["error"]}
                   for r in results if r["error"]],
        "results": results,
    }


def poll_feed(store: Store, feed_id: int, cfg: Config, *, now: datetime | None = None) -> dict:
    """Poll one feed now and store its new entries. Raises NotFound for an unknown id; a feed
    that fails is recorded (and reported under "error"), never raised."""
    feed = store.get_feed(feed_id)
    if feed is None:
        raise NotFound(f"no feed {feed_id}")
    now = now or datetime.now(timezone.utc)
    summary = {"feed_id": feed_id, "url": feed["url"], "status": "ok",
               "new": 0, "updated": 0, "unchanged": 0, "skipped": 0, "error": None}
    try:
        fetched = fetch(feed["url"], feed["etag"], feed["last_modified"], cfg.feeds.timeout_s)
        if fetched.not_modified:
            summary["status"] = "not_modified"
        else:
            parsed = parse_feed(fetched.content, fetched.headers, feed["url"])
            if not feed["title"] and parsed.feed.get("title"):
                feed["title"] = clean_text(parsed.feed.title)[:200]  # also the items' source
            summary.update(store_entries(store, feed, parsed.entries, cfg.feeds.max_item_chars))
    except FeedError as e:
        return _record_failure(store, feed, summary, str(e), e.retry_after_s, now)
    except httpx.TimeoutException:
        return _record_failure(store, feed, summary, f"timed out after {cfg.feeds.timeout_s:g}s", None, now)
    except (httpx.HTTPError, OSError) as e:
        return _record_failure(store, feed, summary, f"fetch failed: {e or type(e).__name__}", None, now)
    except Exception as e:  # a bug or a parser surprise: record it, and let the next feed run
        log.exception("feed %s (%s): unexpected error", feed_id, feed["url"])
        return _record_failure(store, feed, summary, f"unexpected error: {e!r}", None, now)
    store.update_feed(
        feed_id, title=feed["title"], etag=fetched.etag or feed["etag"],
        last_modified=fetched.last_modified or feed["last_modified"],
        failures=0, backoff_s=0, last_error=None, last_polled_at=_iso(now), last_ok_at=_iso(now),
        next_poll_at=_iso(now + timedelta(seconds=feed["interval_s"])),
    )
    return summary


def _record_failure(store: Store, feed: dict, summary: dict, error: str,
                    retry_after_s: float | None, now: datetime) -> dict:
    """Count the failure and push the next poll back: by Retry-After when the server said,
    else exponentially (interval, 2x, 4x, ... up to a day)."""
    failures = feed["failures"] + 1
    if retry_after_s is not None:
        wait = min(retry_after_s, MAX_WAIT_S)
    else:
        wait = min(feed["interval_s"] * 2 ** (failures - 1), MAX_WAIT_S)
    log.warning("feed %s (%s): %s; next try in %ds", feed["id"], feed["url"], error, wait)
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


def fetch(url: str, etag: str | None, last_modified: str | None, timeout_s: float) -> Fetched:
    """GET a feed, conditionally. Raises FeedError (with retry_after_s on 429/503) or httpx errors."""
    if urlparse(url).scheme == "file":
        return _fetch_file(url, last_modified)
    headers = {"User-Agent": USER_AGENT, "Accept": ACCEPT}
    if etag:
        headers["If-None-Match"] = etag
    if last_modified:
        headers["If-Modified-Since"] = last_modified
    deadline = time.monotonic() + timeout_s  # httpx's timeouts are per read; this is the whole
    with httpx.Client(timeout=timeout_s, follow_redirects=True, max_redirects=5) as client:
        with client.stream("GET", url, headers=headers) as response:
            if response.status_code == 304:
                return Fetched(not_modified=True, etag=response.headers.get("etag"),
                               last_modified=response.headers.get("last-modified"))
            if response.status_code in (429, 503):
                wait = _retry_after_s(response.headers.get("retry-after"))
                said = f" (Retry-After {wait:g}s)" if wait is not None else ""
                raise FeedError(f"HTTP {response.status_code}{said}", retry_after_s=wait)
            if response.status_code >= 400:
                raise FeedError(f"HTTP {response.status_code} {response.reason_phrase}".strip())
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > MAX_FEED_BYTES:
                    raise FeedError(f"feed larger than {MAX_FEED_BYTES // 2**20} MiB")
                if time.monotonic() > deadline:
                    raise httpx.ReadTimeout("total deadline passed")
            return Fetched(bytes(body), dict(response.headers), response.headers.get("etag"),
                           response.headers.get("last-modified"))


def _fetch_file(url: str, last_modified: str | None) -> Fetched:
    path = Path(unquote(urlparse(url).path))
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise FeedError(f"no such file: {path}") from None
    if stat.st_size > MAX_FEED_BYTES:
        raise FeedError(f"feed larger than {MAX_FEED_BYTES // 2**20} MiB")
    mtime = format_datetime(datetime.fromtimestamp(stat.st_mtime, timezone.utc), usegmt=True)
    if mtime == last_modified:
        return Fetched(not_modified=True)
    return Fetched(path.read_bytes(), {"content-location": url}, None, mtime)


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
    """Entries -> headline items, in one transaction. Counts new / updated / unchanged / skipped."""
    counts = {"new": 0, "updated": 0, "unchanged": 0, "skipped": 0}
    with store.transaction():
        for entry in entries:
            item = entry_to_item(entry, feed, max_chars)
            if item is None:
                counts["skipped"] += 1
                continue
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
    link = entry.get("link")
    return {
        "text": text,
        "title": title or None,
        "source": feed["title"] or feed["url"],
        "source_ref": link or entry.get("id"),
        "feed_id": feed["id"],
        "dedup_key": entry_key(entry, feed["id"], title, published),
        "published_at": published,
        "valid_at": published,
        "truncated": bool(cut),
        "truncated_reason": cut or None,
    }


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


def clean_text(fragment: str) -> str:
    """HTML fragment -> plain text on one line: tags dropped, entities decoded, whitespace collapsed."""
    if "<" in fragment:
        parser = _TextOnly()
        parser.feed(fragment)
        parser.close()
        fragment = "".join(parser.parts)
    else:
        fragment = html.unescape(fragment)
    return " ".join(fragment.split())


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
