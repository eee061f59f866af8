"""The model port (proxy.py) with a stand-in engine: a real HTTP server on 127.0.0.1 that answers
like vLLM. What a client may reach and what it may not; the real engines: test_daemon_vllm.py."""

from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient

from agent_memory.proxy import create_proxy_app
from agent_memory.serving import Endpoint

KEY = "client-key"
ANSWER = {"choices": [{"message": {"role": "assistant", "content": "Tokyo."}}], "usage": {"completion_tokens": 2}}


@pytest.fixture
def engine(http_server):
    http_server.serve("/v1/chat/completions", json.dumps(ANSWER), content_type="application/json")
    return http_server


@pytest.fixture
def proxy(engine):
    upstream = Endpoint(engine.url(""), api_key="internal-key")
    app = create_proxy_app({"memory": [upstream], "base": [upstream]}, KEY)
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        yield client


def ask(proxy, model="memory", key=KEY, host=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if host:
        headers["Host"] = host
    return proxy.post("/v1/chat/completions", headers=headers,
                      json={"model": model, "messages": [{"role": "user", "content": "Capital of Japan?"}]})


def test_a_request_with_the_key_reaches_the_engine_of_its_model(proxy, engine):
    response = ask(proxy)
    assert response.status_code == 200 and response.json() == ANSWER
    path, headers = engine.requests[-1]
    assert path == "/v1/chat/completions" and headers["authorization"] == "Bearer internal-key"


def test_without_the_key_or_for_another_name_nothing_is_forwarded(proxy, engine):
    assert ask(proxy, key=None).status_code == 401
    assert ask(proxy, key="wrong").status_code == 401
    unknown = ask(proxy, model="agent-memory-raw-base")
    assert unknown.status_code == 404 and "served: memory, base" in unknown.json()["error"]["message"]
    assert proxy.post("/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      content=b"not json").status_code == 400
    assert engine.requests == []


def test_only_generation_is_forwarded(proxy, engine):
    auth = {"Authorization": f"Bearer {KEY}"}
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/agent_memory/reload_weights",
                 "/collective_rpc", "/reset_prefix_cache", "/tokenize"):
        assert proxy.post(path, json={}, headers=auth).status_code == 404
    models = proxy.get("/v1/models", headers=auth).json()["data"]
    assert [m["id"] for m in models] == ["memory", "base"] and "/" not in json.dumps(models)
    assert engine.requests == []


def test_a_foreign_host_is_refused_on_loopback(proxy, engine):
    assert ask(proxy, host="attacker.example").status_code == 421
    assert ask(proxy, host="localhost:8000").status_code == 200


def test_an_engine_that_is_down_gives_a_clear_503(http_server):
    upstream = Endpoint("http://127.0.0.1:9", api_key="internal-key")  # nothing listens on port 9
    with TestClient(create_proxy_app({"memory": [upstream]}, KEY), base_url="http://127.0.0.1:8000") as client:
        response = ask(client)
    assert response.status_code == 503 and "not reachable" in response.json()["error"]["message"]
