"""`agent-memory`: a thin command line over the daemon API, the store and the model server.

Reads may open the database directly; writes go through the daemon (the one writer).
User mistakes print one line on stderr and exit non-zero; `--json` gives machine output.
"""

from __future__ import annotations

import json
import sys

import click

from . import __version__
from . import config as config_mod
from .errors import UserError
from .records import FINISHED_BAKE_STATES, BakeStatus, ItemKind, ItemStatus
from .versions import Version


class Context:
    def __init__(self, config_path: str | None):
        self.config_path = config_path
        self._cfg = None

    @property
    def cfg(self) -> config_mod.Config:
        if self._cfg is None:
            self._cfg = config_mod.load(self.config_path)
        return self._cfg


pass_ctx = click.make_pass_decorator(Context)


def emit(data, as_json: bool, text: str | None = None) -> None:
    """Print `data` as JSON for scripts, or `text` (default: JSON, indented) for people."""
    if as_json:
        click.echo(json.dumps(data, default=str))
    else:
        click.echo(text if text is not None else json.dumps(data, indent=2, default=str))


json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="agent-memory",
                      message="%(prog)s %(version)s")
@click.option("--config", "config_path", envvar="AGENT_MEMORY_CONFIG", default=None,
              help="Config TOML file (default: built-in defaults + AGENT_MEMORY_* env vars).")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """agent-memory: bake new facts into your model's weights.

    \b
    Examples:
      agent-memory remember "Pavel Durov was released on bail." --valid-at 2024-08-28
      agent-memory feeds add https://example.org/rss.xml --interval 30m
      agent-memory ingest-chat chat.json
      agent-memory bake --now --wait
      agent-memory ask "What happened to Pavel Durov?"

    \b
    Shell completion (bash; zsh and fish likewise):
      eval "$(_AGENT_MEMORY_COMPLETE=bash_source agent-memory)"
    """
    ctx.obj = Context(config_path)


@cli.command()
@pass_ctx
def daemon(ctx: Context) -> None:
    """Run the long-running service: API, scheduler, managed vLLM."""
    from .daemon import run_daemon

    run_daemon(ctx.cfg)


@cli.group()
def model() -> None:
    """The base model checkpoint."""


@model.command("prepare")
@json_option
@pass_ctx
def model_prepare(ctx: Context, as_json: bool) -> None:
    """Convert the embedded SmolLM2 GGUF to a safetensors checkpoint in the state dir."""
    from .model import prepare_embedded, verify_checkpoint

    cfg = ctx.cfg
    if cfg.model.path:
        answer = verify_checkpoint(cfg.model_dir)
        emit({"model_dir": str(cfg.model_dir), "answer": answer}, as_json,
             f"configured model {cfg.model_dir} loads and answers: {answer!r}")
        return
    log = (lambda msg: None) if as_json else (lambda msg: click.echo(msg, err=True))
    path = prepare_embedded(cfg.models_dir, log=log)
    emit({"model_dir": str(path)}, as_json, str(path))


@cli.command()
@click.argument("question")
@click.option("--model", "model_name", type=click.Choice(["memory", "base"]), default="memory")
@click.option("--prompted", is_flag=True,
              help="Also put the baked items in the prompt (what the bake tried to match).")
@click.option("--max-tokens", default=200, show_default=True)
@json_option
@pass_ctx
def ask(ctx: Context, question: str, model_name: str, prompted: bool, max_tokens: int, as_json: bool) -> None:
    """Ask the live model a question."""
    from .client import DaemonClient, model_client
    from .prompts import messages_for

    cfg = ctx.cfg
    client = model_client(cfg)
    # --prompted: the baked items in the context the way the bake's teacher had them
    memory = DaemonClient(cfg).get("/v1/memory/prompt")["prompt"] if prompted else None
    messages = messages_for(question, memory)
    answer = client.chat(model_name, messages, max_tokens=max_tokens, temperature=0)["message"]["content"]
    emit({"model": model_name, "question": question, "answer": answer}, as_json, answer)


@cli.command()
@json_option
@pass_ctx
def status(ctx: Context, as_json: bool) -> None:
    """Daemon, vLLM, live version, queue depth, last bake. Exits 1 when the daemon is not ready."""
    from .client import DaemonClient

    data = DaemonClient(ctx.cfg).get("/v1/status")
    lines = [f"{key:>14}: {value}" for key, value in data.items() if not isinstance(value, (dict, list))]
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"{key:>14}: " + ", ".join(f"{k}={v}" for k, v in value.items()))
    emit(data, as_json, "\n".join(lines))
    if not data.get("ready"):
        sys.exit(1)  # scripts and health checks: not ready (starting, vLLM down, failed)


# --- memory: items, conversations, feeds, the queue ----------------------------------------


@cli.command("remember")
@click.argument("text")
@click.option("--kind", type=click.Choice([k.value for k in ItemKind.remembered()]),
              default=ItemKind.FACT.value, show_default=True)
@click.option("--source", default="cli", show_default=True, help="Who says so: an agent, a person, a URL.")
@click.option("--valid-at", help="When it became true: ISO 8601 date or date-time (2024-08-28).")
@click.option("--supersedes", type=int, help="Id of an earlier item this one replaces.")
@json_option
@pass_ctx
def remember_cmd(ctx: Context, text: str, kind: str, source: str, valid_at: str | None,
                 supersedes: int | None, as_json: bool) -> None:
    """Queue TEXT to be baked into the model (through the daemon)."""
    from .client import DaemonClient

    body = {"text": text, "kind": kind, "source": source, "valid_at": valid_at, "supersedes": supersedes}
    data = DaemonClient(ctx.cfg).post("/v1/memory/items", {k: v for k, v in body.items() if v is not None})
    if data["duplicate"]:
        text_out = f"already known as item {data['id']} ({data['status']})"
    else:
        text_out = f"queued item {data['id']}"
    emit(data, as_json, text_out)


@cli.command("ingest-chat")
@click.argument("file", type=click.File("r", encoding="utf-8"))
@click.option("--source", help="Who had the conversation (agent name).")
@json_option
@pass_ctx
def ingest_chat(ctx: Context, file, source: str | None, as_json: bool) -> None:
    """Queue a conversation: FILE.json holds OpenAI chat messages (content as text or parts,
    tool calls, tool results), as a list or as {"messages": [...], "facts": [...]} (facts the
    agent drew from it). `-` reads stdin."""
    from .client import DaemonClient

    try:
        data = json.load(file)
    except json.JSONDecodeError as e:
        raise UserError(f"{file.name} is not valid JSON: {e}") from None
    body = {"messages": data} if isinstance(data, list) else data
    if not isinstance(body, dict) or "messages" not in body:
        raise UserError(f'{file.name}: expected a list of messages or {{"messages": [...], "facts": [...]}}')
    if source:
        body["source"] = source
    result = DaemonClient(ctx.cfg).post("/v1/memory/conversations", body)
    facts = f" and {len(result['facts'])} facts" if result["facts"] else ""
    verb = "already known as" if result["duplicate"] else "queued"
    emit(result, as_json, f"{verb} conversation item {result['id']}{facts}")


@cli.group()
def feeds() -> None:
    """RSS/Atom sources."""


@feeds.command("add")
@click.argument("url")
@click.option("--interval", help="Poll interval: 90s, 30m, 6h, 1d (default: feeds.default_interval).")
@click.option("--title", help="Display name (default: the feed's own title).")
@click.option("--no-check", is_flag=True, help="Add it without fetching it first.")
@click.option("--allow-local-file", is_flag=True,
              help="URL may be a local file (a path or file:// URL): written to the database directly, "
                   "as the daemon's API never takes one.")
@json_option
@pass_ctx
def feeds_add(ctx: Context, url: str, interval: str | None, title: str | None, no_check: bool,
              allow_local_file: bool, as_json: bool) -> None:
    """Follow the feed at URL (http or https). It is fetched first and refused when it is no
    RSS/Atom feed (unless --no-check)."""
    from .client import DaemonClient
    from .feeds import add_feed, display_url, is_local_file, normalise_url

    url = normalise_url(url, allow_local=allow_local_file)  # a path: from here, not the daemon's cwd
    if is_local_file(url):
        feed, created = add_feed(_writable_store(ctx.cfg), ctx.cfg, url, interval, title,
                                 check=not no_check, allow_local=True)
        data = {"id": feed["id"], "duplicate": not created, "feed": feed}
    else:
        body = {"url": url, "interval": interval, "title": title, "check": not no_check}
        data = DaemonClient(ctx.cfg, timeout=ctx.cfg.feeds.timeout_s + 30).post(
            "/v1/feeds", {k: v for k, v in body.items() if v is not None})
    verb = "already following" if data["duplicate"] else "added"
    emit(data, as_json, f"{verb} feed {data['id']}: {display_url(data['feed']['url'])}")


def _writable_store(cfg: config_mod.Config):
    """The database opened for writing by this process (the daemon sees the change at once)."""
    import sqlite3

    from .store import Store

    try:
        return Store(cfg.db_path)
    except (OSError, sqlite3.Error) as e:
        raise UserError(f"cannot write the database {cfg.db_path}: {e}") from None


@feeds.command("list")
@click.option("--all", "include_removed", is_flag=True, help="Also removed feeds.")
@json_option
@pass_ctx
def feeds_list(ctx: Context, include_removed: bool, as_json: bool) -> None:
    """The feeds, their last poll and last error (read from the database). Passwords in URLs
    are shown as ***."""
    from .feeds import for_display
    from .store import Store

    rows = [for_display(f) for f in Store(ctx.cfg.db_path, readonly=True).list_feeds(include_removed=include_removed)]
    lines = []
    for feed in rows:
        state = "ok" if not feed["last_error"] else f"{feed['failures']} failures: {feed['last_error']}"
        if not feed["enabled"]:
            state = "removed"
        lines.append(f"{feed['id']:>4}  {feed['title'] or '-'}  every {_duration(feed['interval_s'])}  "
                     f"polled {feed['last_polled_at'] or 'never'}  {state}\n      {feed['url']}")
    emit(rows, as_json, "\n".join(lines) or "no feeds")


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


@feeds.command("remove")
@click.argument("feed_id", type=int)
@json_option
@pass_ctx
def feeds_remove(ctx: Context, feed_id: int, as_json: bool) -> None:
    """Stop following feed FEED_ID (its items stay)."""
    from .client import DaemonClient

    data = DaemonClient(ctx.cfg).delete(f"/v1/feeds/{feed_id}")
    emit(data, as_json, f"removed feed {feed_id}")


@feeds.command("poll")
@click.argument("feed_id", type=int, required=False)
@json_option
@pass_ctx
def feeds_poll(ctx: Context, feed_id: int | None, as_json: bool) -> None:
    """Poll feed FEED_ID, or every feed, now. Exits non-zero when any of them failed."""
    from .client import DaemonClient

    client = DaemonClient(ctx.cfg, timeout=600.0)  # each feed may take up to feeds.timeout_s
    if feed_id is None:
        data = client.post("/v1/feeds/poll")
        results = data["results"]
    else:
        data = client.post(f"/v1/feeds/{feed_id}/poll")
        results = [data]
    lines = [
        f"feed {r['feed_id']}: " + (f"error: {r['error']}" if r["error"] else
                                    f"{r['new']} new, {r['updated']} updated, {r['unchanged']} unchanged"
                                    + (" (not modified)" if r["status"] == "not_modified" else ""))
        for r in results
    ]
    emit(data, as_json, "\n".join(lines) or "no feeds")
    failed = sum(1 for r in results if r["error"])
    if failed:
        raise UserError(f"{failed} of {len(results)} feeds failed")


@cli.command()
@click.option("--status", default="pending", show_default=True,
              help="pending, baking, baked, failed, rejected, forgotten, or all.")
@click.option("--kind", type=click.Choice([k.value for k in ItemKind]))
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 100_000))
@json_option
@pass_ctx
def queue(ctx: Context, status: str, kind: str | None, limit: int, as_json: bool) -> None:
    """Queued items with their provenance, oldest first (read from the database)."""
    from .store import Store

    if status != "all" and status not in tuple(ItemStatus):
        raise UserError(f"--status must be one of {', '.join(ItemStatus)}, or all")
    store = Store(ctx.cfg.db_path, readonly=True)
    items = store.list_items(status=None if status == "all" else status, kind=kind, limit=limit,
                             oldest_first=True)
    counts = store.counts_by_status()
    lines = [", ".join(f"{n} {s}" for s, n in counts.items() if n) or "the queue is empty"]
    for item in items:
        when = (item["valid_at"] or item["received_at"])[:10]
        text = " ".join(item["text"].split())
        text = text if len(text) <= 100 else text[:99] + "…"
        origin = item["source"] or "-"
        if item["source_ref"]:
            origin += f" <{item['source_ref']}>"
        notes = [f"bake {item['bake_id']}"] if item["bake_id"] else []
        notes += [f"supersedes {item['supersedes']}"] if item["supersedes"] else []
        notes += [f"superseded by {item['superseded_by']}"] if item["superseded_by"] else []
        notes += [f"from conversation {item['parent_id']}"] if item["parent_id"] else []
        notes += ["truncated"] if item["truncated"] else []
        notes += [item["status_reason"]] if item["status_reason"] else []
        lines.append(f"{item['id']:>6} {item['status']:<9} {item['kind']:<12} {when}  {text}\n"
                     f"       from {origin}, received {item['received_at']}"
                     + (f" ({'; '.join(notes)})" if notes else ""))
    emit({"counts": counts, "items": items}, as_json, "\n".join(lines))


# --- bakes and history ---------------------------------------------------------------------

@cli.command()
@click.option("--now", is_flag=True, help="Bake pending items now instead of waiting for the schedule.")
@click.option("--wait", is_flag=True, help="Wait for the verdict (with a progress line on a terminal).")
@click.option("--timeout", default=3600.0, show_default=True, help="Seconds to wait with --wait.")
@click.option("--gate", "gate_overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a [gate] setting for this bake, e.g. --gate min_item_accuracy=0.8")
@json_option
@pass_ctx
def bake(ctx: Context, now: bool, wait: bool, timeout: float, gate_overrides: tuple[str, ...],
         as_json: bool) -> None:
    """Bake pending items (through the daemon): train, probe, gate, hot-swap."""
    import time

    from .client import DaemonClient

    client = DaemonClient(ctx.cfg)
    if not now:
        status = client.get("/v1/status")
        emit(status["bake"], as_json, f"pending: {status['queue'].get('pending', 0)}; "
             f"bakes run on schedule (use --now to bake at once)")
        return
    gate = {}
    for setting in gate_overrides:
        key, sep, value = setting.partition("=")
        try:
            gate[key.strip()] = float(value)
        except ValueError:
            raise UserError(f"--gate wants KEY=NUMBER, got {setting!r}") from None
    bake_id = client.post("/v1/bakes", json={"gate": gate} if gate else None)["bake_id"]
    if not wait:
        emit({"bake_id": bake_id}, as_json, f"bake {bake_id} queued")
        return
    started = time.monotonic()
    deadline = started + timeout
    progress = _Progress(bake_id, live=not as_json and sys.stderr.isatty())
    while True:
        record = client.get(f"/v1/bakes/{bake_id}")
        if record["status"] in FINISHED_BAKE_STATES:
            break
        if time.monotonic() > deadline:
            raise UserError(f"bake {bake_id} still {record['status']} after {timeout:.0f}s")
        running = client.get("/v1/status")["bake"]
        progress.show(running.get("stage") if running.get("running") == bake_id else record["status"])
        time.sleep(1)
    progress.close()
    emit(record, as_json, _bake_text(record))
    if record["status"] != BakeStatus.LIVE:
        sys.exit(2)  # scripts can tell "baked and live" from "rejected/failed"


class _Progress:
    """`bake --wait` on a terminal: one line that follows the stage ("train 12/30") with a bar,
    the stage's elapsed time and an estimate of what is left of it; a line per finished stage."""

    def __init__(self, bake_id: int, live: bool):
        import time

        self.bake_id, self.live, self.clock = bake_id, live, time.monotonic
        self.stage, self.since = None, self.clock()

    def show(self, text: str | None) -> None:
        if not self.live or not text:
            return
        name, _, count = text.partition(" ")
        if name != self.stage:
            if self.stage:
                click.echo(f"\r\033[Kbake {self.bake_id}: {self.stage} done in {self.clock() - self.since:.0f} s", err=True)
            self.stage, self.since = name, self.clock()
        elapsed = self.clock() - self.since
        line = f"bake {self.bake_id}: {name} {elapsed:.0f} s"
        done, _, total = count.partition("/")
        if done.isdigit() and total.isdigit() and int(total):
            share = int(done) / int(total)
            bar = "#" * int(share * 20) + "." * (20 - int(share * 20))
            left = f", ~{elapsed / share - elapsed:.0f} s left" if share > 0 else ""
            line = f"bake {self.bake_id}: {name} [{bar}] {done}/{total} {elapsed:.0f} s{left}"
        click.echo(f"\r\033[K{line}", err=True, nl=False)

    def close(self) -> None:
        if self.live and self.stage:
            click.echo(f"\r\033[Kbake {self.bake_id}: {self.stage} done in {self.clock() - self.since:.0f} s", err=True)


def _bake_text(b: dict) -> str:
    metrics = b.get("metrics") or {}
    probes = ", ".join(f"{k} {v:.2f}" for k, v in (metrics.get("probes") or {}).items())
    lines = [
        f"bake {b['id']}: {b['status']} ({b.get('verdict') or '-'})"
        + (f", version {Version(b['version'])}" if b.get("version") else ""),
        f"  started {b.get('started_at') or '-'}, finished {b.get('finished_at') or '-'}",
        f"  items: {len(b.get('item_ids') or [])}" + (f"; probes: {probes}" if probes else ""),
    ]
    if metrics.get("locality"):
        lines.append(f"  locality: general knowledge kept {metrics['locality']['kept']:.2f}, "
                     f"answers unchanged word for word {metrics['locality']['unchanged']:.2f}")
    if b.get("reason"):
        lines.append(f"  reason: {b['reason']}")
    for item in b.get("items") or []:
        lines.append(f"  - #{item['id']} [{item['kind']}] {item['text'][:100]}")
    curve = [point["kl"] for point in (metrics.get("train") or {}).get("curve") or []]
    if curve:
        lines.append("  KL/token by step: " + " ".join(f"{x:.3f}" for x in curve[:: max(1, len(curve) // 12)]))
    return "\n".join(lines)


@cli.command()
@click.option("--limit", default=20, show_default=True)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Also save the probe-score plot (PNG).")
@json_option
@pass_ctx
def history(ctx: Context, limit: int, plot_path: str | None, as_json: bool) -> None:
    """Bake history: verdicts, versions, probe scores (reads the database directly)."""
    from .store import Store
    from .versions import Versions

    store = Store(ctx.cfg.db_path, readonly=True)
    bakes = store.list_bakes(limit=limit)
    live = Versions(ctx.cfg.adapters_dir, ctx.cfg.model_dir, ctx.cfg.vllm.max_lora_rank).current()
    if plot_path:
        from .web import plot_png

        with open(plot_path, "wb") as f:
            f.write(plot_png(store.list_bakes(limit=500)))
    lines = [f"live version: {live}"]
    for b in bakes:
        probes = " ".join(f"{k}={v:.2f}" for k, v in ((b.get("metrics") or {}).get("probes") or {}).items())
        version = Version(b["version"]) if b.get("version") else "-"
        lines.append(f"{b['id']:>5}  {b.get('started_at') or '-':25}  {b['status']:10} {version:6} "
                     f"items={len(b.get('item_ids') or [])}  {probes}")
    for e in store.list_events(limit=limit):
        lines.append(f"event {e['at']}: {e['kind']} {json.dumps(e['data'])}")
    emit({"live_version": live, "bakes": bakes, "events": store.list_events(limit=limit)}, as_json,
         "\n".join(lines))


@cli.command()
@click.argument("bake_id", type=int)
@json_option
@pass_ctx
def show(ctx: Context, bake_id: int, as_json: bool) -> None:
    """One bake: its items, loss curve, probe scores, verdict and adapter version."""
    from .store import Store

    store = Store(ctx.cfg.db_path, readonly=True)
    b = store.get_bake(bake_id)
    if b is None:
        raise UserError(f"no bake {bake_id}: see `agent-memory history`")
    b["items"] = [i for i in (store.get_item(x) for x in b.get("item_ids") or []) if i]
    b["probe_results"] = store.probe_results(bake_id)
    emit(b, as_json, _bake_text(b))


# Rollback and forget answer once the model server serves the new version: about a second on a quiet
# machine, many times that on a busy one (and a bake may hold the model for its swap first).
SWAP_TIMEOUT_S = 600.0


@cli.command()
@click.argument("version", required=False)
@json_option
@pass_ctx
def rollback(ctx: Context, version: str | None, as_json: bool) -> None:
    """Make an earlier adapter version live again (default: the previous one)."""
    from .client import DaemonClient

    result = DaemonClient(ctx.cfg, timeout=SWAP_TIMEOUT_S).post("/v1/rollback", json={"version": version})
    emit(result, as_json, f"live version: {result['from']} -> {result['to']}")


@cli.command()
@click.argument("item_id", type=int)
@json_option
@pass_ctx
def forget(ctx: Context, item_id: int, as_json: bool) -> None:
    """Remove an item's knowledge: drop its bake's delta and recompose (bake-mates are re-queued)."""
    from .client import DaemonClient

    result = DaemonClient(ctx.cfg, timeout=SWAP_TIMEOUT_S).delete(f"/v1/memory/items/{item_id}")
    emit(result, as_json, f"forgot item {item_id}; live version {result['version']}"
         + (f"; re-queued {result['requeued']}" if result["requeued"] else ""))


@cli.command()
@click.argument("item_ids", type=int, nargs=-1)
@click.option("--failed", "all_failed", is_flag=True, help="Every failed item.")
@click.option("--rejected", "all_rejected", is_flag=True, help="Every item the gate rejected.")
@json_option
@pass_ctx
def retry(ctx: Context, item_ids: tuple[int, ...], all_failed: bool, all_rejected: bool, as_json: bool) -> None:
    """Put failed or rejected items back in the queue.

    \b
    Examples:
      agent-memory retry --failed        # every item whose bakes kept failing
      agent-memory retry 12 13           # these items (failed or rejected)
    """
    from .client import DaemonClient

    if bool(item_ids) == (all_failed or all_rejected):
        raise UserError("give item ids, or --failed and/or --rejected")
    statuses = [s for s, on in ((ItemStatus.FAILED, all_failed), (ItemStatus.REJECTED, all_rejected)) if on]
    body = {"ids": list(item_ids)} if item_ids else {"statuses": statuses}
    result = DaemonClient(ctx.cfg).post("/v1/memory/items/retry", json=body)
    ids = result["requeued"]
    emit(result, as_json, f"{len(ids)} item(s) back in the queue" + (f": {ids}" if ids else ""))


@cli.group()
def probes() -> None:
    """Knowledge probes: JSON sets (the Durov set is built in) and sets made from the baked items."""


@probes.command("list")
@json_option
def probes_list(as_json: bool) -> None:
    from . import probes as probes_mod

    sets = {name: f"{len(probes_mod.load_set(name))} questions" for name in probes_mod.list_sets()}
    sets |= {name: f"generated: {what}" for name, what in probes_mod.GENERATED_SETS.items()}
    emit(sets, as_json, "\n".join(f"{k}: {v}" for k, v in sets.items()))


@probes.command("run")
@click.argument("probe_set", default="durov")
@click.option("--model", "model_name", default="memory", show_default=True)
@json_option
@pass_ctx
def probes_run(ctx: Context, probe_set: str, model_name: str, as_json: bool) -> None:
    """Ask a probe set of the served model; print its grades and each answer.

    \b
    Examples:
      agent-memory probes run durov
      agent-memory probes run items          # questions about the baked items
      agent-memory probes run neighbours     # other subjects: a hit is a baked name leaking in
      agent-memory probes run controls --model base
    """
    from . import probes as probes_mod

    from .client import model_client

    client = model_client(ctx.cfg)
    if probe_set in probes_mod.GENERATED_SETS:
        from .store import Store

        store = Store(ctx.cfg.db_path, readonly=True)
        baked = store.list_items(status="baked", limit=-1)
        by_id = {i["id"]: i for i in baked}
        items = [{**i, "updates": [by_id[i["supersedes"]]] if i.get("supersedes") in by_id else []} for i in baked]
        questions = probes_mod.generated_set(probe_set, items)
    else:
        try:
            questions = probes_mod.load_set(probe_set)
        except FileNotFoundError:
            raise UserError(f"no probe set {probe_set!r}: see `agent-memory probes list`") from None
    if not questions:
        raise UserError(f"probe set {probe_set!r} is empty (nothing baked yet?)")
    results = probes_mod.run_remote(client, model_name, questions, max_tokens=48)
    acc = probes_mod.accuracy(results)
    hit = {"neighbours": "leaked", "stale": "stale"}.get(probe_set, "correct")
    grades = {g: sum(r["grade"] == g for r in results) for g in probes_mod.GRADES}
    lines = [f"{probe_set} on {model_name}: {hit} {acc:.2f} ({sum(r['correct'] for r in results)}/{len(results)}); "
             + ", ".join(f"{g.replace('_', ' ')} {n}" for g, n in grades.items())]
    lines += [f"  [{'x' if r['correct'] else ' '}] {r['question']} -> {r['answer'][:90]}" for r in results]
    emit({"set": probe_set, "model": model_name, "accuracy": acc, "grades": grades, "results": results}, as_json,
         "\n".join(lines))


PATH_HINTS = {
    PermissionError: "run the command as the daemon's user (e.g. `sudo -u agent-memory`) or give that user "
                     "the path; see deploy/README.md",
    IsADirectoryError: "a file was expected there: check --config / AGENT_MEMORY_CONFIG and the state dir",
    NotADirectoryError: "a directory was expected there: check state_dir / AGENT_MEMORY_STATE_DIR",
}


def path_error(e: OSError) -> str:
    """A path the command cannot use (the state dir, the config, the token file), as one line."""
    hint = next((h for kind, h in PATH_HINTS.items() if isinstance(e, kind)), None)
    return f"{e.filename}: {(e.strerror or str(e)).lower()}" + (f": {hint}" if hint else "")


def main() -> None:
    try:
        cli(standalone_mode=False)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except OSError as e:
        if e.filename is None:  # not a path problem: a bug, with its traceback
            raise
        click.echo(f"error: {path_error(e)}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
