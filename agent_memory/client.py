"""Thin HTTP clients the CLI uses: the daemon API and an OpenAI-compatible chat endpoint (vLLM)."""

from __future__ import annotations

from typing import Any

import httpx

from .auth import auth_header, read_token
from .config import Config
from .errors import UserError


class DaemonClient:
    """Talks to a running daemon. Writes go through it: it is the database's only writer.

    It sends the API token from `api.token` or the daemon's token file in the state dir (auth.py),
    so commands work without the user passing anything. Errors are one line without HTTP details.
    """

    def __init__(self, cfg: Config, timeout: float = 30.0):
        self.base = cfg.api_url
        source = "api.token" if cfg.api.token else str(cfg.api_token_path)
        try:
            token = read_token(cfg)
        except UserError as e:  # unreadable: open routes (status) still work; the rest says why not
            token, self.refused = None, str(e)
        else:
            self.refused = (f"the daemon at {self.base} refused the API token from {source}" if token else
                            f"the daemon at {self.base} wants an API token and {source} does not exist"
                            ) + ": use the daemon's config and state dir (or set api.token)"
        headers = auth_header(token) if token else {}
        self.http = httpx.Client(base_url=self.base, headers=headers, timeout=timeout)

    def request(self, method: str, path: str, **kwargs) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.ConnectError:
            raise UserError(
                f"the daemon is not reachable at {self.base}: is `agent-memory daemon` running?"
            ) from None
        except httpx.TimeoutException:
            raise UserError(f"the daemon at {self.base} did not answer in time") from None
        if response.status_code == 401:
            raise UserError(self.refused)
        if response.status_code >= 400:
            try:
                message = response.json().get("error") or response.text
            except (ValueError, AttributeError):
                message = response.text
            message = message or f"status {response.status_code}"
            raise UserError(message if response.status_code < 500 else f"the daemon failed: {message}")
        return response.json()

    def get(self, path: str, **kwargs) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, json: Any = None, **kwargs) -> Any:
        return self.request("POST", path, json=json, **kwargs)

    def delete(self, path: str, **kwargs) -> Any:
        return self.request("DELETE", path, **kwargs)


def chat(base_url: str, model: str, messages: list[dict], *, timeout: float = 120.0, **params) -> str:
    """One chat completion from an OpenAI-compatible server; returns the answer text."""
    body = {"model": model, "messages": messages, **params}
    try:
        response = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=timeout)
    except httpx.HTTPError as e:
        raise UserError(f"the model server at {base_url} is not reachable: {e}") from None
    if response.status_code != 200:
        raise UserError(f"the model server at {base_url} answered {response.status_code}: {response.text[:300]}")
    return response.json()["choices"][0]["message"]["content"]
