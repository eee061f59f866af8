"""The daemon's HTTP API (FastAPI): JSON in and out, a bearer token on writes and on reads of
memory contents, size limits, and no requests a web page could forge.

Routes get what they need from `app.state`, set once by `create_app`: `cfg`, `store`, `versions`,
`bakery` (bakes), `history` (rollback, forget, retry), `metrics`, and the daemon's `status` and
`readiness` as functions; none of them is the daemon. Three routers: `public_router` (health,
status, the status page, metrics: open to any local process; none shows memory contents) and
`memory_router` / `history_router` (everything else), which check the token in a router
dependency, so a route added to them is guarded by default. Before any route, `_install_guard` refuses what a browser could be made to
send: a foreign Host when serving on loopback (DNS rebinding, 421), a foreign Origin (403), a body
that is not JSON (415), a body over `api.max_request_bytes` (413).

Errors are JSON `{"error": "..."}`. Every exception becomes a response in one place
(`error_response`); its status comes from the exception's class (errors.py).
"""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING, Annotated, Any, Callable, Literal

import anyio
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from . import feeds as feeds_mod
from .auth import token_matches
from .config import Config
from .errors import (Forbidden, MisdirectedRequest, NotFound, TooLarge, Unauthorized, UnsupportedMediaType,
                     UserError)
from .ingest import IngestError, ingest_conversation, remember
from .loopback import LOOPBACK_NAMES, host_name, is_loopback
from .prompts import memory_prompt
from .serving import ServingError
from .records import RETRYABLE, ItemKind, ItemStatus
from .store import MAX_SQLITE_INT, Store
from .versions import Version, Versions

if TYPE_CHECKING:
    from .bakery import Bakery
    from .history import History
    from .metrics import Metrics

log = logging.getLogger(__name__)


def create_app(cfg: Config, store: Store, versions: Versions, *, bakery: "Bakery | None",
               history: "History | None", metrics: "Metrics | None", status: Callable[[], dict],
               readiness: Callable[[], tuple[bool, str]]) -> FastAPI:
    """The API over these collaborators (`status`: the /v1/status document; `readiness`: (ready,
    why not)); bakery, history and metrics may be None where a test needs none of their routes."""
    app = FastAPI(title="agent-memory", version="0.1.0")
    app.state.cfg, app.state.store, app.state.versions = cfg, store, versions
    app.state.bakery, app.state.history, app.state.metrics = bakery, history, metrics
    app.state.status, app.state.readiness = status, readiness
    app.state.feed_slots = anyio.CapacityLimiter(feeds_mod.MAX_PARALLEL_FETCHES)
    for exc_class in (UserError, IngestError, LookupError, ServingError, HTTPException, RequestValidationError):
        app.add_exception_handler(exc_class, _handle_exception)  # any other exception: see _install_guard
    _install_guard(app, cfg)
    app.include_router(public_router)
    app.include_router(memory_router)
    app.include_router(history_router)
    return app


# --- the one exception-to-response mapping ---------------------------------------------------


def error_response(exc: Exception) -> JSONResponse:
    """`{"error": message}` with the status the exception's class carries."""
    if isinstance(exc, (UserError, IngestError)):
        status, message = exc.status, str(exc)
    elif isinstance(exc, HTTPException):  # the framework's own: unknown path 404, wrong method 405
        status, message = exc.status_code, exc.detail
    elif isinstance(exc, RequestValidationError):
        status, message = 422, _validation_message(exc)
    elif isinstance(exc, LookupError) and not isinstance(exc, (KeyError, IndexError)):  # store.NotFound,
        # the bakery's "no item N"; Python's own KeyError and IndexError are bugs (500)
        status, message = NotFound.status, str(exc)
    elif isinstance(exc, ServingError):
        status, message = 502, f"model server: {exc}"
    elif isinstance(exc, ClientDisconnect):  # (nobody reads this answer; it is no server error)
        status, message = 400, "the client closed the connection while sending its body"
    else:
        status, message = 500, f"internal error ({exc.__class__.__name__}): see the daemon's log"
    return JSONResponse({"error": message}, status_code=status, headers=getattr(exc, "headers", None))


async def _handle_exception(request: Request, exc: Exception) -> JSONResponse:
    response = error_response(exc)
    if response.status_code == 500:
        raise exc  # a bug (a KeyError is no missing row): the guard logs it and answers 500
    return response


def _validation_message(exc: RequestValidationError) -> str:
    problems = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            problems.append(f"the request body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})")
            continue
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        problems.append(f"{where or 'body'}: {err.get('msg')}")
    return "; ".join(problems)


# --- the credential and the browser guard --------------------------------------------------


def require_token(request: Request) -> None:
    """Router dependency: `Authorization: Bearer <token>` (auth.py) or 401."""
    if not token_matches(request.headers.get("authorization"), request.app.state.cfg.api.token):
        raise Unauthorized("missing or wrong bearer token")


BODY_METHODS = ("POST", "PUT", "PATCH", "DELETE")


def _is_json(content_type: str | None) -> bool:
    mime = (content_type or "").split(";")[0].strip().lower()
    return mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))


def _check_request(method: str, scheme: str, headers, loopback: bool, max_bytes: int) -> None:
    """Refuse, before any route runs, what a web page could make a browser send to this daemon."""
    host = headers.get("host")
    if loopback and host_name(host) not in LOOPBACK_NAMES:
        raise MisdirectedRequest(f"this daemon answers only to {', '.join(LOOPBACK_NAMES)} (Host: {host!r})")
    origin = headers.get("origin")
    if origin is not None and origin.lower() != f"{scheme}://{host}".lower():
        raise Forbidden(f"cross-origin requests are refused (Origin: {origin!r})")
    length = headers.get("content-length")
    has_body = (length not in (None, "0")) or "transfer-encoding" in headers
    if method in BODY_METHODS and (has_body or "content-type" in headers) and not _is_json(headers.get("content-type")):
        raise UnsupportedMediaType("send the body as JSON (Content-Type: application/json)")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise TooLarge(f"request body over {max_bytes} bytes")


def _install_guard(app: FastAPI, cfg: Config) -> None:
    loopback = is_loopback(cfg.api.host)
    max_bytes = cfg.api.max_request_bytes

    @app.middleware("http")
    async def guard(request: Request, call_next):
        try:
            _check_request(request.method, request.url.scheme, request.headers, loopback, max_bytes)
            if request.method in BODY_METHODS and request.headers.get("content-length") is None:
                # Chunked upload: read it (bounded) so the limit holds without Content-Length too.
                body = b""
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > max_bytes:
                        raise TooLarge(f"request body over {max_bytes} bytes")
                request._body = body
        except (UserError, ClientDisconnect) as e:
            return error_response(e)
        try:
            return await call_next(request)
        except Exception as e:  # a bug: logged with its traceback, answered as JSON like every error
            log.exception("%s %s failed", request.method, request.url.path)
            return error_response(e)


# --- memory items, conversations and feeds ------------------------------------------------
# Routes are plain `def`s: FastAPI runs them in worker threads, so SQLite never blocks the event
# loop; those that fetch feeds run in a few threads of their own (_in_feed_slot). Every write
# returns only after its transaction has committed.

memory_router = APIRouter(dependencies=[Depends(require_token)])
ItemId = Annotated[int, PathParam(ge=1, le=MAX_SQLITE_INT)]
RememberKind = Literal[tuple(k.value for k in ItemKind.remembered())]  # fact, headline, prompt


class ItemIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    kind: RememberKind = ItemKind.FACT.value
    source: str | None = None
    valid_at: str | None = Field(None, description="ISO 8601 date or date-time")
    supersedes: int | None = Field(None, description="id of an earlier item this one replaces")


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, tool_call_id, ... are kept
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Any = None  # a string, content parts or null: ingest.check_messages says which are fine


class FactIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    kind: RememberKind = ItemKind.FACT.value
    valid_at: str | None = None
    supersedes: int | None = None


class ConversationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages: list[MessageIn] = Field(min_length=1)
    facts: list[str | FactIn] = Field(default_factory=list)
    source: str | None = None
    valid_at: str | None = None


class FeedIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str
    interval: str | None = Field(None, description="e.g. 30m; default feeds.default_interval")
    title: str | None = None
    check: bool = Field(True, description="fetch and parse the feed first; refuse it when that fails")


def _store(request: Request) -> Store:
    return request.app.state.store


@memory_router.post("/v1/memory/items", status_code=201)
def post_item(body: ItemIn, request: Request, response: Response):
    """Queue a fact / headline / prompt. 201 new, 200 with "duplicate": true when known."""
    item, duplicate = remember(_store(request), **body.model_dump())
    if duplicate:
        response.status_code = 200
    return {"id": item["id"], "duplicate": duplicate, "status": item["status"], "item": item}


@memory_router.post("/v1/memory/conversations", status_code=201)
def post_conversation(body: ConversationIn, request: Request, response: Response):
    """Queue a conversation whole, plus the facts the agent extracted from it (linked to it)."""
    result = ingest_conversation(
        _store(request),
        messages=[m.model_dump(exclude_unset=True) for m in body.messages],
        facts=[f if isinstance(f, str) else f.model_dump() for f in body.facts],
        source=body.source, valid_at=body.valid_at,
    )
    if result["duplicate"]:
        response.status_code = 200
    conversation = result["conversation"]
    return {
        "id": conversation["id"], "duplicate": result["duplicate"], "status": conversation["status"],
        "facts": [{"id": f["item"]["id"], "duplicate": f["duplicate"]} for f in result["facts"]],
        "item": conversation,
    }


def _statuses(status: str | None) -> list[str] | None:
    """"pending" or "pending,baked" -> a checked list; None = any status."""
    if not status:
        return None
    statuses = [s.strip() for s in status.split(",") if s.strip()]
    unknown = [s for s in statuses if s not in tuple(ItemStatus)]
    if unknown:
        raise UserError(f"unknown status {unknown[0]!r}: use {', '.join(ItemStatus)}")
    return statuses


@memory_router.get("/v1/memory/items")
def get_items(
    request: Request,
    status: str | None = Query(None, description="one status or a comma-separated list"),
    kind: ItemKind | None = None,
    limit: int = Query(100, ge=1, le=10_000),
):
    store = _store(request)
    items = store.list_items(status=_statuses(status), kind=kind, limit=limit)
    return {"items": items, "counts": store.counts_by_status()}


@memory_router.get("/v1/memory/items/{item_id}")
def get_item(item_id: ItemId, request: Request):
    store = _store(request)
    item = store.get_item(item_id)
    if item is None:
        raise NotFound(f"no item {item_id}")
    if item["kind"] == ItemKind.CONVERSATION:
        item["facts"] = store.list_items(parent_id=item_id, limit=10_000, oldest_first=True)
    return item


@memory_router.get("/v1/memory/prompt")
def get_memory_prompt(
    request: Request,
    status: str = Query("baked", description="which items: one status or a comma-separated list"),
    limit: int = Query(50, ge=1, le=1000, description="the most recent this many items"),
):
    """The memory prompt u for these items (default: the baked ones, what the live model knows)."""
    statuses = [s for s in _statuses(status) or ItemStatus if s != ItemStatus.FORGOTTEN]
    items = _store(request).list_items(status=statuses, limit=limit)
    return {"prompt": memory_prompt(items), "item_ids": sorted(i["id"] for i in items)}


@memory_router.get("/v1/feeds")
def get_feeds(request: Request):
    return {"feeds": [feeds_mod.for_display(f) for f in _store(request).list_feeds()]}


async def _in_feed_slot(request: Request, work: Callable, *args, **kwargs):
    """Run `work` (it fetches feeds) in a worker thread, at most feeds.MAX_PARALLEL_FETCHES at once:
    polls that wait for a slot hold no thread, so hanging feeds never starve the other routes."""
    return await anyio.to_thread.run_sync(partial(work, *args, **kwargs), limiter=request.app.state.feed_slots)


@memory_router.post("/v1/feeds", status_code=201)
async def post_feed(body: FeedIn, request: Request, response: Response):
    state = request.app.state
    feed, created = await _in_feed_slot(request, feeds_mod.add_feed, state.store, state.cfg, body.url,
                                        body.interval, body.title, check=body.check)
    if not created:
        response.status_code = 200
    return {"id": feed["id"], "duplicate": not created, "feed": feed}


@memory_router.delete("/v1/feeds/{feed_id}")
def delete_feed(feed_id: ItemId, request: Request):
    if not _store(request).remove_feed(feed_id):
        raise NotFound(f"no feed {feed_id}")
    return {"id": feed_id, "removed": True}


@memory_router.post("/v1/feeds/poll")
async def poll_all_feeds(request: Request):
    """Poll every enabled feed now (not only the due ones)."""
    state = request.app.state
    return await _in_feed_slot(request, feeds_mod.poll_due, state.store, state.cfg, force=True)


@memory_router.post("/v1/feeds/{feed_id}/poll")
async def poll_one_feed(feed_id: ItemId, request: Request):
    state = request.app.state
    return await _in_feed_slot(request, feeds_mod.poll_enabled_feed, state.store, feed_id, state.cfg)


# --- bakes, history, rollback, forget ------------------------------------------------------

history_router = APIRouter(dependencies=[Depends(require_token)])


def _bakery(request: Request) -> "Bakery":
    return request.app.state.bakery


def _history(request: Request) -> "History":
    return request.app.state.history


class RollbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str | None = Field(default=None, pattern=Version.PATTERN, description="e.g. v0002; default: the previous one")


class BakeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gate: dict[str, float] | None = Field(default=None, description="[gate] overrides for this bake")


@history_router.post("/v1/bakes", status_code=202)
def post_bake(request: Request, body: BakeIn | None = None):
    bake_id = _bakery(request).request("api", body.gate if body else None)
    return {"bake_id": bake_id, "status": _store(request).get_bake(bake_id)["status"]}


@history_router.get("/v1/bakes")
def get_bakes(request: Request, limit: Annotated[int, Query(ge=1, le=1000)] = 50):
    return {"bakes": _store(request).list_bakes(limit=limit),
            "live_version": request.app.state.versions.current()}


@history_router.get("/v1/bakes/{bake_id}")
def get_bake(bake_id: ItemId, request: Request):
    store = _store(request)
    bake = store.get_bake(bake_id)
    if bake is None:
        raise NotFound(f"no bake {bake_id}")
    items = [store.get_item(i) for i in bake.get("item_ids") or []]
    return {**bake, "items": [i for i in items if i], "probe_results": store.probe_results(bake_id)}


@history_router.get("/v1/events")
def get_events(request: Request, limit: Annotated[int, Query(ge=1, le=1000)] = 50):
    return {"events": _store(request).list_events(limit=limit)}


@history_router.post("/v1/rollback")
def post_rollback(body: RollbackIn, request: Request):
    return _history(request).rollback(body.version)


class RetryIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ids: list[ItemId] | None = Field(default=None, description="failed or rejected items; default: all of `statuses`")
    statuses: list[Literal[tuple(s.value for s in RETRYABLE)]] = Field(default=[ItemStatus.FAILED.value])


@history_router.post("/v1/memory/items/retry")
def post_retry(body: RetryIn, request: Request):
    return _history(request).retry(body.ids, tuple(body.statuses))


@history_router.delete("/v1/memory/items/{item_id}")
def forget_item(item_id: ItemId, request: Request):
    return _history(request).forget(item_id)


# --- open to any local process: health, status, the status page (no item texts), metrics ----

public_router = APIRouter()


@public_router.get("/livez")
async def livez():  # (async: answered by the event loop itself, even while every worker thread is busy)
    return {"ok": True}


@public_router.get("/readyz")
def readyz(request: Request):
    ready, reason = request.app.state.readiness()
    if not ready:
        return JSONResponse({"ready": False, "reason": reason}, status_code=503)
    return {"ready": True}


@public_router.get("/v1/status")
def status(request: Request):
    return request.app.state.status()


@public_router.get("/", include_in_schema=False)
def status_page(request: Request):
    from fastapi.responses import HTMLResponse

    from .web import collect, status_page as render

    state = request.app.state
    return HTMLResponse(render(collect(state.status(), state.store, state.versions)))


@public_router.get("/plot.png", include_in_schema=False)
def plot(request: Request):
    from .web import plot_png

    return Response(plot_png(_store(request).list_bakes(limit=500)), media_type="image/png")


@public_router.get("/metrics", include_in_schema=False)
def metrics(request: Request):
    from .metrics import CONTENT_TYPE

    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)
