"""The daemon's HTTP API (FastAPI): JSON in and out, bearer-token auth on writes, size limits.

Routes read and write through the daemon object (`app.state.daemon`): its `cfg`, `store`, and
the methods it offers. Errors are JSON `{"error": "..."}` with a 4xx status a client can act on.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

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
