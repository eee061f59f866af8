"""The status page at `/`: state and uptime, the running bake, bake history with verdicts,
versions and durations, feeds with their errors, rollback/forget events, and a plot of probe
scores per bake.

The page renders from plain data (`PageData`: what `collect` reads from the status, the store and
the live version), never from the daemon. It is open to any local process, so it shows no item
texts and no feed URL's query string or credentials; everything it shows is HTML-escaped (feed
titles and error texts come from outside). The plot is the same PNG that `GET /plot.png` serves
and `agent-memory history --plot FILE` saves.
"""

from __future__ import annotations

import html
import io
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from .feeds import display_url
from .store import UNFINISHED_BAKE_STATES

if TYPE_CHECKING:
    from .store import Store
    from .versions import Versions

NOTHING_DONE = ("empty", "skipped")  # bakes that found nothing to bake: not shown, only counted
FAILED = ("failed", "cancelled", "abandoned")  # bakes that ended without a verdict on their items
MAX_ROWS = 50


@dataclass
class PageData:
    status: dict  # what GET /v1/status answers
    bakes: list[dict]  # newest first, as Store.list_bakes gives them
    live_bakes: list[int] = field(default_factory=list)  # bakes whose deltas the live version holds
    feeds: list[dict] = field(default_factory=list)  # enabled feeds, as Store.list_feeds
    events: list[dict] = field(default_factory=list)  # newest first, as Store.list_events
    now: datetime = field(default_factory=lambda: datetime.now(timezone.utc))


def collect(status: dict, store: "Store", versions: "Versions") -> PageData:
    return PageData(
        status=status,
        bakes=store.list_bakes(limit=500),
        live_bakes=list(versions.manifest(versions.current())["deltas"]),
        feeds=store.list_feeds(),
        events=store.list_events(limit=20),
    )


def version_name(number: int | None) -> str:
    return "" if number is None else f"v{number:04d}"


# --- the plot ------------------------------------------------------------------------------


@dataclass
class Plot:
    """What the plot shows, worked out before any drawing."""

    series: dict[str, list[tuple[int, float]]]  # probe set -> [(bake id, candidate accuracy)]
    rejected: list[int]
    failed: list[int]
    xlim: tuple[float, float] | None  # bake ids, with half a bake either side
    message: str | None  # instead of lines, when no bake has scores


def plot_data(bakes: list[dict]) -> Plot:
    shown = sorted((b for b in bakes if b.get("status") not in NOTHING_DONE), key=lambda b: b["id"])
    series: dict[str, list[tuple[int, float]]] = {}
    for bake in shown:
        for probe_set, score in ((bake.get("metrics") or {}).get("probes") or {}).items():
            series.setdefault(probe_set, []).append((bake["id"], score))
    ids = [b["id"] for b in shown]
    message = None
    if not series:
        running = [b for b in shown if b.get("status") in UNFINISHED_BAKE_STATES]
        if running:
            message = f"bake {running[-1]['id']} is {running[-1]['status']}: scores when it is judged"
        elif shown:
            message = "no bake judged yet"
        else:
            message = "no bakes yet"
    return Plot(
        series=series,
        rejected=[b["id"] for b in shown if b.get("verdict") == "rejected"],
        failed=[b["id"] for b in shown if b.get("verdict") in FAILED],
        xlim=(min(ids) - 0.5, max(ids) + 0.5) if ids else None,
        message=message,
    )


def plot_png(bakes: list[dict]) -> bytes:
    import matplotlib.pyplot as plt

    fig = plot_figure(bakes)
    out = io.BytesIO()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out.getvalue()


def plot_figure(bakes: list[dict]):
    """The plot as a matplotlib figure (close it with plt.close)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a server
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    plot = plot_data(bakes)
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
    for probe_set, points in sorted(plot.series.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=probe_set)
    for bake_id in plot.rejected:
        ax.axvline(bake_id, color="red", alpha=0.25, linewidth=6)
    for bake_id in plot.failed:
        ax.axvline(bake_id, color="grey", alpha=0.35, linewidth=6, linestyle=":")
    if plot.xlim:
        ax.set_xlim(*plot.xlim)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # bake ids: 1, not 0.96-1.04
    ax.set_xlabel("bake")
    ax.set_ylabel("probe accuracy (candidate)")
    ax.set_ylim(-0.02, 1.02)
    marks = [text for text, ids in (("red: rejected", plot.rejected), ("grey: failed", plot.failed)) if ids]
    ax.set_title("Probe scores per bake" + (f" ({', '.join(marks)})" if marks else ""))
    if plot.series:
        ax.legend(loc="lower left", fontsize=8)
    if plot.message:
        ax.text(0.5, 0.5, plot.message, ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


# --- the page ------------------------------------------------------------------------------

esc = html.escape

STYLE = """body{font-family:sans-serif;margin:2em;max-width:1100px}
table{border-collapse:collapse;width:100%;margin-bottom:1.5em}
td,th{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
.passed{color:#080}.rejected,.failed,.error{color:#b00}.forgotten,.rolled-back,.not-live{color:#a60}
.running{color:#06c;font-weight:bold}.stopped{color:#777}.note{color:#777}"""


def status_page(data: PageData) -> str:
    status = data.status
    bakes = [b for b in data.bakes if b.get("status") not in NOTHING_DONE]
    hidden = len(data.bakes) - len(bakes)
    rows = "\n".join(_bake_row(b, data) for b in bakes[:MAX_ROWS])
    if not rows:
        rows = '<tr><td colspan="8">no bakes yet</td></tr>'
    notes = []
    if hidden:
        notes.append(f"{hidden} bake(s) that found nothing to bake not shown")
    if len(bakes) > MAX_ROWS:
        notes.append(f"the newest {MAX_ROWS} of {len(bakes)} shown; `agent-memory history` lists all")
    vllm = status.get("vllm") or {}
    queue = ", ".join(f"{k}: {v}" for k, v in (status.get("queue") or {}).items() if v) or "empty"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>agent-memory</title>
<meta http-equiv="refresh" content="30">
<style>{STYLE}</style></head>
<body><h1>agent-memory</h1>
<p id="state">State: <b>{esc(str(status.get("state", "")))}</b> &middot; live version
<b id="live-version">{esc(str(status.get("live_version", "")))}</b>
&middot; up {esc(_duration(status.get("uptime_s")))} &middot; agent-memory {esc(str(status.get("version", "")))}</p>
<p>Model {esc(str(status.get("model", "")))} &middot; {_serving(vllm)}</p>
<p>Queue: {esc(queue)}</p>
{_current_bake(status, data)}
<img id="plot" src="/plot.png" alt="probe scores per bake" width="700" height="320">
<h2>Bakes</h2>
<table id="bakes"><tr><th>bake</th><th>started</th><th>items</th><th>verdict</th><th>version</th>
<th>duration</th><th>probes</th><th>reason</th></tr>
{rows}</table>
{"".join(f'<p class="note">{esc(n)}</p>' for n in notes)}
<h2>Feeds</h2>
{_feeds(data.feeds)}
<h2>Events</h2>
{_events(data.events)}
</body></html>"""


def _serving(vllm: dict) -> str:
    if vllm.get("mode") == "off":
        return "no model served (vllm.mode = off)"
    n = vllm.get("restarts") or 0
    restarts = f", {n} restart{'s' if n != 1 else ''}" if n else ""
    return (f'vLLM {esc(vllm.get("mode") or "")} at {esc(vllm.get("urls") or "")} '
            f'({"healthy" if vllm.get("healthy") else "not healthy"}{restarts})')


def _current_bake(status: dict, data: PageData) -> str:
    bake = status.get("bake") or {}
    parts = []
    if bake.get("running") is not None:
        started = next((b.get("started_at") for b in data.bakes if b["id"] == bake["running"]), None)
        elapsed = _seconds_between(started, data.now)
        parts.append(f'Bake {bake["running"]} running: <span class="running">{esc(str(bake.get("stage") or ""))}</span>'
                     + (f" for {esc(_duration(elapsed))}" if elapsed is not None else ""))
    if bake.get("waiting") is not None:
        parts.append(f'bake {bake["waiting"]} waiting')
    last_live = next((b for b in data.bakes if b.get("verdict") == "passed"), None)
    if last_live:
        parts.append(f'last bake that went live: {last_live["id"]} at {esc(_when(last_live.get("finished_at")))}')
    return f'<p id="current-bake">{" &middot; ".join(parts)}</p>' if parts else ""


def bake_state(bake: dict, data: PageData) -> tuple[str, str]:
    """(css class, words) for where the bake stands now, not only what its verdict was."""
    status, verdict = bake.get("status") or "", bake.get("verdict") or ""
    if status in UNFINISHED_BAKE_STATES:
        running = data.status.get("bake") or {}
        if running.get("running") == bake["id"] and running.get("stage"):
            status = running["stage"]  # with its progress: "train 12/30"
        return "running", status
    if verdict == "passed":
        if bake["id"] in data.live_bakes:
            return "passed", "passed, live"
        for event in data.events:  # newest first: what last took it out
            d = event.get("data") or {}
            if event["kind"] == "forget" and bake["id"] in (d.get("dropped_bakes") or [d.get("bake")]):
                return "forgotten", f"passed, dropped to forget item {d.get('item')} ({d.get('version')})"
            if event["kind"] == "rollback" and bake["id"] in (d.get("dropped_bakes") or []):
                return "rolled-back", f"passed, rolled back ({d.get('from')} to {d.get('to')})"
        return "not-live", "passed, no longer live"
    if verdict == "failed":
        return "failed", "failed"
    if verdict == "rejected":
        return "rejected", "rejected"
    return "stopped", verdict or status


def _bake_row(bake: dict, data: PageData) -> str:
    metrics = bake.get("metrics") or {}
    scores = ", ".join(f"{k} {v:.2f}" for k, v in (metrics.get("probes") or {}).items())
    css, words = bake_state(bake, data)
    return (f'<tr id="bake-{bake["id"]}"><td>{bake["id"]}</td><td>{esc(_when(bake.get("started_at")))}</td>'
            f'<td>{len(bake.get("item_ids") or [])}</td><td class="verdict {css}">{esc(words)}</td>'
            f'<td>{esc(version_name(bake.get("version")))}</td><td>{esc(_bake_duration(bake, data.now))}</td>'
            f'<td>{esc(scores)}</td><td>{esc(str(bake.get("reason") or ""))}</td></tr>')


def _bake_duration(bake: dict, now: datetime) -> str:
    metrics = bake.get("metrics") or {}
    total = metrics.get("total_s")
    if total is None:
        total = _seconds_between(bake.get("started_at"), bake.get("finished_at") or now)
    stages = [f"{name.removesuffix('_s')} {_duration(s)}" for name, s in (metrics.get("stages") or {}).items()]
    return _duration(total) + (f" ({', '.join(stages)})" if stages else "")


def _feeds(feeds: list[dict]) -> str:
    if not feeds:
        return '<p id="feeds">no feeds</p>'
    rows = []
    for f in feeds:
        url = _public_url(f["url"])
        error = (f.get("last_error") or "").replace(f["url"], url).replace(display_url(f["url"]), url)
        health = (f'<td class="error">{f.get("failures") or 0} failed: {esc(error)}</td>' if f.get("last_error")
                  else '<td class="passed">ok</td>')
        rows.append(f'<tr id="feed-{f["id"]}"><td>{f["id"]}</td><td>{esc(f.get("title") or "")}</td><td>{esc(url)}</td>'
                    f'<td>{esc(_duration(f.get("interval_s")))}</td><td>{esc(_when(f.get("last_ok_at")) or "never")}</td>'
                    f'{health}</tr>')
    return ('<table id="feeds"><tr><th>feed</th><th>title</th><th>url</th><th>every</th><th>last fetched</th>'
            '<th>health</th></tr>\n' + "\n".join(rows) + "</table>")


def _events(events: list[dict]) -> str:
    if not events:
        return '<p id="events">no rollbacks, forgets or retries yet</p>'
    rows = [f'<tr><td>{esc(_when(ev.get("at")))}</td><td>{esc(ev["kind"])}</td><td>{esc(_event_text(ev))}</td></tr>'
            for ev in events]
    return '<table id="events"><tr><th>at</th><th>event</th><th>what</th></tr>\n' + "\n".join(rows) + "</table>"


def _event_text(event: dict) -> str:
    d = event.get("data") or {}
    if event["kind"] == "rollback":
        text = f"{d.get('from')} to {d.get('to')}"
        if d.get("dropped_bakes"):
            text += f"; dropped bake(s) {_ids(d['dropped_bakes'])}"
        if d.get("restored_bakes"):
            text += f"; restored bake(s) {_ids(d['restored_bakes'])}"
        return text
    if event["kind"] == "forget":
        text = f"item {d.get('item')}"
        dropped = d.get("dropped_bakes") or ([d["bake"]] if d.get("bake") is not None else [])  # older events: "bake"
        if dropped:
            text += f": dropped bake(s) {_ids(dropped)}, live {d.get('version')}"
        if d.get("requeued"):
            text += f"; item(s) {_ids(d['requeued'])} back in the queue"
        return text
    if event["kind"] == "retry":
        return f"item(s) {_ids(d.get('items') or [])} back in the queue"
    return ", ".join(f"{k}: {v}" for k, v in d.items())


# --- formatting ----------------------------------------------------------------------------


def _ids(ids: list) -> str:
    return ", ".join(str(i) for i in ids)


def _public_url(url: str) -> str:
    """The URL without credentials, query or fragment (a private feed's key is often there): this
    page is open to any local process, where `feeds.display_url` serves token holders."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(unparsable URL)"
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _when(iso: str | None) -> str:
    if not iso:
        return ""
    try:
        return _parse(iso).strftime("%Y-%m-%d %H:%M:%S UTC")
    except ValueError:
        return iso


def _parse(value: str | datetime) -> datetime:
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _seconds_between(start: str | None, end: str | datetime | None) -> float | None:
    if not start or not end:
        return None
    try:
        return (_parse(end) - _parse(start)).total_seconds()
    except ValueError:
        return None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {s} s" if s else f"{minutes} min"
    hours, m = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {m} min"
    return f"{hours // 24} d {hours % 24} h"
