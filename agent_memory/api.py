"""The daemon's HTTP API (FastAPI): JSON in and out, bearer-token auth on writes, size limits.

Routes read and write through the daemon object (`app.state.daemon`): its `cfg`, `store`, and
the methods it offers. Errors are JSON `{"error": "..."}` with a 4xx status a client can act on.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from . import feeds as feeds_mod
from .errors import UserError
from .ingest import IngestError, ingest_conversation, memory_prompt, remember
from .store import MAX_SQLITE_INT, STATUSES, NotFound, Store

if TYPE_CHECKING:
    from .daemon import Daemon


def create_app(daemon: "Daemon") -> FastAPI:
    app = FastAPI(title="agent-memory", version="0.1.0")
    app.state.daemon = daemon
    _install_error_handlers(app)
    _install_size_limit(app, daemon.cfg.api.max_request_bytes)

    @app.get("/livez")
    def livez():
        return {"ok": True}

    @app.get("/readyz")
    def readyz():
        ready, reason = daemon.readiness()
        if not ready:
            return JSONResponse({"ready": False, "reason": reason}, status_code=503)
        return {"ready": True}

    @app.get("/v1/status")
    def status():
        return daemon.status()

    app.include_router(memory_router)
    app.include_router(history_router)
    return app


def require_token(request: Request) -> None:
    """Dependency for write routes: checks `Authorization: Bearer <token>` when a token is set."""
    expected = request.app.state.daemon.cfg.api.token
    if not expected:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    # compare_digest: constant time, so the token cannot be guessed byte by byte from timings.
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise HTTPException(status_code=401, detail="missing or wrong bearer token")


writer = Depends(require_token)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        problems = []
        for err in exc.errors():
            if err.get("type") == "json_invalid":
                problems.append(f"the request body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})")
                continue
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{where or 'body'}: {err.get('msg')}")
        return JSONResponse({"error": "; ".join(problems)}, status_code=422)


def _install_size_limit(app: FastAPI, max_bytes: int) -> None:
    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            return JSONResponse(
                {"error": f"request body over {max_bytes} bytes"}, status_code=413
            )
        if request.method in ("POST", "PUT", "PATCH") and length is None:
            # Chunked upload: read it (bounded) so the limit holds without Content-Length too.
            body = b""
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_bytes:
                    return JSONResponse(
                        {"error": f"request body over {max_bytes} bytes"}, status_code=413
                    )
            request._body = body
        return await call_next(request)


# --- memory items, conversations and feeds ------------------------------------------------
# Routes are plain `def`s: FastAPI runs them in worker threads, so SQLite and feed fetches never
# block the event loop. Every write returns only after its transaction has committed.

memory_router = APIRouter()
ItemId = Annotated[int, PathParam(ge=1, le=MAX_SQLITE_INT)]


class ItemIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    kind: Literal["fact", "headline", "prompt"] = "fact"
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
    kind: Literal["fact", "headline", "prompt"] = "fact"
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
    return request.app.state.daemon.store


def _ingest_errors(call, *args, **kwargs) -> Any:
    try:
        return call(*args, **kwargs)
    except IngestError as e:
        raise HTTPException(status_code=e.status, detail=str(e)) from None


@memory_router.post("/v1/memory/items", dependencies=[writer], status_code=201)
def post_item(body: ItemIn, request: Request, response: Response):
    """Queue a fact / headline / prompt. 201 new, 200 with "duplicate": true when known."""
    item, duplicate = _ingest_errors(remember, _store(request), **body.model_dump())
    if duplicate:
        response.status_code = 200
    return {"id": item["id"], "duplicate": duplicate, "status": item["status"], "item": item}


@memory_router.post("/v1/memory/conversations", dependencies=[writer], status_code=201)
def post_conversation(body: ConversationIn, request: Request, response: Response):
    """Queue a conversation whole, plus the facts the agent extracted from it (linked to it)."""
    result = _ingest_errors(
        ingest_conversation, _store(request),
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
    unknown = [s for s in statuses if s not in STATUSES]
    if unknown:
        raise HTTPException(422, f"unknown status {unknown[0]!r}: use {', '.join(STATUSES)}")
    return statuses


@memory_router.get("/v1/memory/items")
def get_items(
    request: Request,
    status: str | None = Query(None, description="one status or a comma-separated list"),
    kind: Literal["headline", "fact", "conversation", "prompt"] | None = None,
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
        raise HTTPException(404, f"no item {item_id}")
    if item["kind"] == "conversation":
        item["facts"] = store.list_items(parent_id=item_id, limit=10_000, oldest_first=True)
    return item


@memory_router.get("/v1/memory/prompt")
def get_memory_prompt(
    request: Request,
    status: str = Query("baked", description="which items: one status or a comma-separated list"),
    limit: int = Query(50, ge=1, le=1000, description="the most recent this many items"),
):
    """The memory prompt u for these items (default: the baked ones, what the live model knows)."""
    statuses = [s for s in _statuses(status) or STATUSES if s != "forgotten"]
    items = _store(request).list_items(status=statuses, limit=limit)
    return {"prompt": memory_prompt(items), "item_ids": sorted(i["id"] for i in items)}


@memory_router.get("/v1/feeds")
def get_feeds(request: Request):
    return {"feeds": [feeds_mod.for_display(f) for f in _store(request).list_feeds()]}


@memory_router.post("/v1/feeds", dependencies=[writer], status_code=201)
def post_feed(body: FeedIn, request: Request, response: Response):
    daemon = request.app.state.daemon
    try:
        feed, created = feeds_mod.add_feed(daemon.store, daemon.cfg, body.url, body.interval, body.title,
                                           check=body.check)
    except UserError as e:
        raise HTTPException(422, str(e)) from None
    if not created:
        response.status_code = 200
    return {"id": feed["id"], "duplicate": not created, "feed": feed}


@memory_router.delete("/v1/feeds/{feed_id}", dependencies=[writer])
def delete_feed(feed_id: ItemId, request: Request):
    if not _store(request).remove_feed(feed_id):
        raise HTTPException(404, f"no feed {feed_id}")
    return {"id": feed_id, "removed": True}


@memory_router.post("/v1/feeds/poll", dependencies=[writer])
def poll_all_feeds(request: Request):
    """Poll every enabled feed now (not only the due ones)."""
    daemon = request.app.state.daemon
    return feeds_mod.poll_due(daemon.store, daemon.cfg, force=True)


@memory_router.post("/v1/feeds/{feed_id}/poll", dependencies=[writer])
def poll_one_feed(feed_id: ItemId, request: Request):
    daemon = request.app.state.daemon
    feed = daemon.store.get_feed(feed_id)
    if feed is None or not feed["enabled"]:
        raise HTTPException(404, f"no feed {feed_id}")
    try:
        return feeds_mod.poll_feed(daemon.store, feed_id, daemon.cfg)
    except NotFound as e:
        raise HTTPException(404, str(e)) from None


# --- bakes, history, rollback, forget, status page, metrics -------------------------------

history_router = APIRouter()


def _daemon(request: Request) -> "Daemon":
    return request.app.state.daemon


def _history_errors(call, *args):
    """Map the bakery's errors to HTTP: bad state 409, unknown id 404, model server down 502."""
    from .serving import ServingError

    try:
        return call(*args)
    except UserError as e:
        raise HTTPException(status_code=409, detail=str(e)) from None
    except LookupError as e:
        raise HTTPException(status_code=404, detail=str(e).strip("'\"")) from None
    except ServingError as e:
        raise HTTPException(status_code=502, detail=f"model server: {e}") from None


class RollbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str | None = Field(default=None, pattern=r"^v\d{4}$", description="e.g. v0002; default: the previous one")


class BakeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gate: dict[str, float] | None = Field(default=None, description="[gate] overrides for this bake")


@history_router.post("/v1/bakes", dependencies=[writer], status_code=202)
def post_bake(request: Request, body: BakeIn | None = None):
    bake_id = _history_errors(_daemon(request).bakery.request, "api", body.gate if body else None)
    return {"bake_id": bake_id, "status": _daemon(request).store.get_bake(bake_id)["status"]}


@history_router.get("/v1/bakes")
def get_bakes(request: Request, limit: Annotated[int, Query(ge=1, le=1000)] = 50):
    return {"bakes": _daemon(request).store.list_bakes(limit=limit),
            "live_version": _daemon(request).versions.current()}


@history_router.get("/v1/bakes/{bake_id}")
def get_bake(bake_id: ItemId, request: Request):
    store = _daemon(request).store
    bake = store.get_bake(bake_id)
    if bake is None:
        raise HTTPException(status_code=404, detail=f"no bake {bake_id}")
    items = [store.get_item(i) for i in bake.get("item_ids") or []]
    return {**bake, "items": [i for i in items if i], "probe_results": store.probe_results(bake_id)}


@history_router.get("/v1/events")
def get_events(request: Request, limit: Annotated[int, Query(ge=1, le=1000)] = 50):
    return {"events": _daemon(request).store.list_events(limit=limit)}


@history_router.post("/v1/rollback", dependencies=[writer])
def post_rollback(body: RollbackIn, request: Request):
    return _history_errors(_daemon(request).bakery.rollback, body.version)


class RetryIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ids: list[ItemId] | None = Field(default=None, description="failed or rejected items; default: all of `statuses`")
    statuses: list[Literal["failed", "rejected"]] = Field(default=["failed"])


@history_router.post("/v1/memory/items/retry", dependencies=[writer])
def post_retry(body: RetryIn, request: Request):
    return _history_errors(_daemon(request).bakery.retry, body.ids, tuple(body.statuses))


@history_router.delete("/v1/memory/items/{item_id}", dependencies=[writer])
def forget_item(item_id: ItemId, request: Request):
    return _history_errors(_daemon(request).bakery.forget, item_id)


@history_router.get("/", include_in_schema=False)
def status_page(request: Request):
    from fastapi.responses import HTMLResponse

    from .web import status_page as render

    return HTMLResponse(render(_daemon(request)))


@history_router.get("/plot.png", include_in_schema=False)
def plot(request: Request):
    from .web import plot_png

    return Response(plot_png(_daemon(request).store.list_bakes(limit=500)), media_type="image/png")


@history_router.get("/metrics", include_in_schema=False)
def metrics(request: Request):
    from .metrics import CONTENT_TYPE

    return Response(_daemon(request).metrics.render(), media_type=CONTENT_TYPE)
