"""The model port (`vllm.port`): vLLM's OpenAI routes for `memory` and `base`, and nothing else.

Clients send OpenAI requests here with the model API key (`vllm.api_key` or the model-api-key
file: auth.py). Each request is forwarded, streamed, to the engine that serves its model name
(serving.py: in merged mode `memory` and `base` are two engines). What vLLM offers beyond generation (runtime LoRA loading, our weight
reload route, tokenizer and dev routes) is never forwarded, and `/v1/models` lists the two public
names only, without local paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .loopback import LOOPBACK_NAMES, host_name, is_loopback

log = logging.getLogger(__name__)

FORWARDED = ("/v1/chat/completions", "/v1/completions")
MAX_BODY_BYTES = 8_000_000  # a long chat history fits; a runaway upload does not


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def create_proxy_app(routes: dict, client_key: str, loopback: bool = True) -> Starlette:
    """`routes`: public model name -> its endpoints (serving.Endpoint, with the internal key).
    `loopback`: the port is bound to loopback, so only loopback Host headers are answered."""
    # One async client per upstream engine, with its internal key; created in the server's loop.
    clients: dict[str, httpx.AsyncClient] = {}

    def upstream(name: str) -> httpx.AsyncClient:
        endpoint = routes[name][0]
        if endpoint.url not in clients:
            clients[endpoint.url] = httpx.AsyncClient(
                base_url=endpoint.url, headers=dict(endpoint.http.headers),
                timeout=httpx.Timeout(None, connect=10.0))  # generation may take long; connecting may not
        return clients[endpoint.url]

    def misdirected(request: Request) -> bool:
        return loopback and host_name(request.headers.get("host")) not in LOOPBACK_NAMES

    def authorised(request: Request) -> bool:
        given = request.headers.get("authorization", "")
        return bool(client_key) and hmac.compare_digest(given.encode(), f"Bearer {client_key}".encode())

    async def health(request: Request) -> Response:
        return Response(status_code=200)

    async def models(request: Request) -> Response:
        if misdirected(request):
            return _error(421, f"this port answers only to {', '.join(LOOPBACK_NAMES)}")
        if not authorised(request):
            return _error(401, "a valid API key is needed (see README: model API key)", "authentication_error")
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "owned_by": "agent-memory"} for name in routes]})

    async def forward(request: Request) -> Response:
        if misdirected(request):
            return _error(421, f"this port answers only to {', '.join(LOOPBACK_NAMES)}")
        if not authorised(request):
            return _error(401, "a valid API key is needed (see README: model API key)", "authentication_error")
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return _error(413, f"request body over {MAX_BODY_BYTES} bytes")
        try:
            payload = json.loads(body)
            name = payload.get("model")
        except (ValueError, AttributeError):
            return _error(400, "the body must be a JSON object")
        if name not in routes:
            return _error(404, f"the model {name!r} does not exist; served: {', '.join(routes)}")
        client = upstream(name)
        try:
            upstream_request = client.build_request("POST", request.url.path, content=body,
                                                    headers={"content-type": "application/json"})
            response = await client.send(upstream_request, stream=True)
        except httpx.HTTPError as e:
            return _error(503, f"the model server for {name!r} is not reachable right now ({e.__class__.__name__}); "
                               "retry shortly", "server_error")

        async def relay():
            try:
                async for chunk in response.aiter_raw():
                    yield chunk
            finally:
                await response.aclose()

        headers = {k: v for k, v in response.headers.items() if k.lower() in ("content-type", "x-request-id")}
        return StreamingResponse(relay(), status_code=response.status_code, headers=headers)

    async def not_found(request: Request) -> Response:
        return _error(404, f"no route {request.url.path}: this port serves {', '.join(FORWARDED)} and /v1/models")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.gather(*(c.aclose() for c in clients.values()))

    app = Starlette(routes=[
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        *(Route(path, forward, methods=["POST"]) for path in FORWARDED),
        Route("/{path:path}", not_found, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
    ], lifespan=lifespan)
    return app


class ProxyServer:
    """The proxy's uvicorn server, in a thread of the daemon (its own event loop)."""

    def __init__(self, cfg, routes: dict, client_key: str):
        app = create_proxy_app(routes, client_key, loopback=is_loopback(cfg.vllm.host))
        config = uvicorn.Config(app, host=cfg.vllm.host, port=cfg.vllm.port,
                                log_level="warning", access_log=False, log_config=None,  # our format
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="model-proxy", daemon=True)

    def start(self, timeout: float = 30.0) -> "ProxyServer":
        self.thread.start()
        for _ in range(int(timeout * 20)):
            if self.server.started:
                return self
            if not self.thread.is_alive():
                break
            threading.Event().wait(0.05)
        from .serving import ServingError

        raise ServingError(f"the model proxy did not start on {self.server.config.host}:{self.server.config.port}")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def start_proxy(cfg, routes: dict, client_key: str) -> ProxyServer:
    return ProxyServer(cfg, routes, client_key).start()
