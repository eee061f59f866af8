"""Thin HTTP clients the CLI uses: the daemon API and an OpenAI-compatible chat endpoint (vLLM)."""

from __future__ import annotations

from typing import Any

import httpx

from .config import Config
from .errors import UserError


class DaemonClient:
    """Talks to a running daemon. Writes go through it: it is the database's only writer."""

    def __init__(self, cfg: Config, timeout: float = 30.0):
        self.base = cfg.api_url
        headers = {"Authorization": f"Bearer {cfg.api.token}"} if cfg.api.token else {}
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
        if response.status_code >= 400:
            try:
                message = response.json().get("error") or response.text
            except ValueError:
                message = response.text
            raise UserError(message)
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
