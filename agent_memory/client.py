"""Thin HTTP clients the CLI uses: the daemon API and an OpenAI-compatible chat endpoint (vLLM)."""

from __future__ import annotations

from typing import Any

import httpx

from .auth import MODEL_API_KEY, auth_header, read_secret, read_token
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


class ModelError(UserError):
    """The model server did not answer, or refused the request."""


class ModelClient:
    """The OpenAI-compatible model port (the daemon's proxy, or an external vLLM) over one shared
    httpx.Client: the CLI's `ask`, probes, the vLLM teacher and the bakery's served check use it."""

    def __init__(self, base_url: str, api_key: str = "", timeout: float = 300.0):
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout,
                                 limits=httpx.Limits(max_connections=32))

    def complete(self, body: dict) -> dict:
        """POST /v1/chat/completions; returns the response JSON."""
        try:
            response = self.http.post("/v1/chat/completions", json=body)
        except httpx.HTTPError as e:
            raise ModelError(f"the model server at {self.base_url} is not reachable: {e.__class__.__name__}: {e}") from None
        if response.status_code != 200:
            raise ModelError(f"the model server at {self.base_url} answered {response.status_code}: "
                             f"{response.text[:300]}")
        return response.json()

    def chat(self, model: str, messages: list[dict], **params) -> dict:
        """One chat completion; returns its first choice (message, logprobs)."""
        return self.complete({"model": model, "messages": messages, **params})["choices"][0]

    def close(self) -> None:
        self.http.close()


def model_client(cfg: Config) -> ModelClient:
    """The model port of the configured daemon, with the model API key it created."""
    if not cfg.vllm_urls:
        raise UserError("no model is served (vllm.mode = 'off')")
    return ModelClient(cfg.vllm_urls[0], read_secret(cfg.vllm.api_key, cfg.model_api_key_path, MODEL_API_KEY) or "")
