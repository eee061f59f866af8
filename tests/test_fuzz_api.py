"""The fuzz run (issue 15): hypothesis sends every route of the daemon's HTTP API, enumerated from
the app itself (a new route is fuzzed without touching this file), requests it did not expect:
any method, odd path parameters and query strings, JSON of the wrong shape, bodies that are not
JSON, wrong content types, huge strings, NUL and control characters, foreign Host and Origin
headers, with the token, without it and with a wrong one. Whatever comes, the answer is a clear
error or a success: never a 5xx, never a dropped connection.

Two variants: the app in-process (every collaborator real: the daemon's own objects, no model) and
the real daemon over real HTTP. `FUZZ_EXAMPLES=N` runs N examples in each instead of
the bounded default (e.g. 5000 for a long run).
"""

from __future__ import annotations

import os
import re
import socket
import typing
from urllib.parse import quote

import httpx
import pytest
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from starlette.routing import Route

from agent_memory import api
from agent_memory.api import create_app
from agent_memory.auth import auth_header, ensure_token
from conftest import API_BASE
from daemon_proc import DaemonProcess

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "0"))
BODY_METHODS = ("POST", "PUT", "PATCH", "DELETE")
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
PARAM = re.compile(r"{([^}:]+)(?::[^}]+)?}")


def fuzz_settings(default_examples: int):
    return settings(max_examples=EXAMPLES or default_examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


# --- what the app has -----------------------------------------------------------------------


def routes_of(app) -> list[dict]:
    """Every HTTP route: path template, methods, its query parameters and JSON body keys."""
    found = []
    for route in app.routes:
        if not isinstance(route, Route):  # (a Mount or WebSocketRoute: none today)
            continue
        query, models = [], []
        if isinstance(route, APIRoute):
            query = [p.alias for p in route.dependant.query_params]
            for param in route.dependant.body_params:
                models += _models(param.field_info.annotation)
        found.append({"path": route.path, "methods": sorted(route.methods or {"GET"}), "query": query,
                      "models": models, "body_keys": [k for m in models for k in m.model_fields]})
    return found


def _models(annotation) -> list[type[BaseModel]]:
    candidates = [annotation, *typing.get_args(annotation)]
    return [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]


# --- what hypothesis sends --------------------------------------------------------------------

ODD_STRINGS = [
    "", " ", "\x00", "a\x00b", "\x00" * 1000, "\x1b[31m", "\r\n", "\u202e", "\ud7ff", "\U0001f600" * 500,
    "nan", "inf", "-inf", "1e400", "1e400s", "-1", "0", "9" * 40, "-9" * 20, "null", "true", "[]", "{}",
    "%00", "%", "../../etc/passwd", "file:///etc/passwd", "http://[", "http://[::1", "http://a:99999/",
    "http://127.0.0.1:1/", "http://user:pw@localhost/", "javascript:alert(1)", "data:,x", "//x", "v0000",
    "v9999", "v-1", "pending,baked", "pending,,", "fact", "<script>alert(1)</script>",
    "A" * 5000, "2024-13-45", "2024-02-30T25:61:61Z", "0001-01-01", "9999-12-31T23:59:59+14:00", "30m", "0s", "400d",
]
odd_text = st.one_of(st.sampled_from(ODD_STRINGS), st.text(max_size=60),
                     st.text(st.characters(max_codepoint=0x9f), max_size=30))
huge_text = st.sampled_from(["A" * 100_000, "\x00" * 50_000, "\U0001f600" * 30_000])  # bodies only: URLs stay short
odd_int = st.one_of(st.integers(-3, 6), st.integers(), st.sampled_from([2**63 - 1, 2**63, -(2**63) - 1, 10**400]))
odd_float = st.floats(allow_nan=True, allow_infinity=True)
scalar = st.one_of(st.none(), st.booleans(), odd_int, odd_float, odd_text, huge_text)
json_value = st.recursive(scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(odd_text, st.sampled_from(["text", "role", "content"])),
                                                 inner, max_size=4)), max_leaves=12)
CONTENT_TYPES = [None, "application/json", "application/json; charset=utf-8", "application/json; charset=latin-1",
                 "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                 "application/merge-patch+json", "application/xml", "", "json", "application/JSON"]
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=40).map(str.strip)


sentence = st.from_regex(r"[A-Z][a-z]{2,9}( [a-z]{1,9}){2,8}\.", fullmatch=True)
# Values for body fields with these names that often pass validation, so that the fuzz gets past it
# (any other field: what its type allows, e.g. any text for a str).
FIELD_VALUES = {
    "text": st.one_of(sentence, sentence.map(lambda s: s + "\x00\x1b[31m<b>x</b>"), odd_text, huge_text),
    "content": st.one_of(sentence, json_value),
    "valid_at": st.one_of(st.dates().map(str), st.datetimes().map(lambda d: d.isoformat() + "Z"), odd_text),
    "url": st.one_of(st.sampled_from(["http://127.0.0.1:1/rss", "https://example.invalid/feed.xml",
                                      "http://0.0.0.0/", "http://[::1]:8700/", "ftp://example.invalid/",
                                      "/etc/passwd", "file://evil.example/x", "http://a b/"]), odd_text),
    "interval": st.one_of(st.sampled_from(["30m", "1h", "90s", "1e400s", "inf", "nan", "-5m", "0"]), odd_text),
    "version": st.one_of(st.sampled_from(["v0000", "v0001", "v9999"]), odd_text),
    "supersedes": st.one_of(st.integers(1, 5), odd_int),
    "ids": st.lists(st.one_of(st.integers(1, 6), odd_int), max_size=4),
    "check": st.just(False),  # (a fetch of a fuzzed URL is slow to fail; the check's own tests are in test_feeds)
}


def model_bodies(model: type[BaseModel]):
    """JSON objects for a body model: its required keys and some of the others, each with a value
    from FIELD_VALUES, any JSON where the type is Any (a chat message's content), else of its type."""
    def values(name, f):
        return FIELD_VALUES.get(name, json_value if f.annotation is typing.Any else st.from_type(f.annotation))

    fields = model.model_fields
    return st.fixed_dictionaries({n: values(n, f) for n, f in fields.items() if f.is_required()},
                                 optional={n: values(n, f) for n, f in fields.items() if not f.is_required()})


for _model in vars(api).values():  # the API's models, also where one nests another
    if isinstance(_model, type) and issubclass(_model, BaseModel) and _model.__module__ == api.__name__:
        st.register_type_strategy(_model, model_bodies(_model))


@st.composite
def requests(draw, routes: list[dict], token: str, port: int):
    """(method, url, headers, content) for one request to one of `routes`. Half of them are
    well-formed (the route's method, loopback Host, the token, a JSON body of the route's shape
    with odd values in it), so that the routes themselves are reached; the others are hostile
    in every part."""
    route = draw(st.sampled_from(routes))
    well_formed = draw(st.booleans())
    method = draw(st.sampled_from(route["methods"] if well_formed else METHODS))

    def segment(match):
        value = draw(st.one_of(st.integers(1, 6), odd_int, odd_text) if well_formed else st.one_of(odd_int, odd_text))
        return quote(str(value), safe="")

    path = PARAM.sub(segment, route["path"])
    query = {}
    for name in route["query"] + draw(st.lists(odd_text, max_size=0 if well_formed else 2)):
        if draw(st.booleans()):
            query[name] = str(draw(st.one_of(odd_int, odd_text)))
    url = path + ("?" + "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in query.items())
                  if query else "")

    headers = {"host": f"127.0.0.1:{port}"}
    if well_formed:
        headers.update(auth_header(token))
    else:
        headers["host"] = draw(st.sampled_from([f"127.0.0.1:{port}", f"localhost:{port}", "attacker.example"]))
        credential = draw(st.sampled_from(["token", "none", "wrong", "odd"]))
        if credential == "token":
            headers.update(auth_header(token))
        elif credential == "wrong":
            headers["authorization"] = "Bearer " + "x" * len(token)
        elif credential == "odd":
            headers["authorization"] = draw(header_text)
        if draw(st.booleans()):
            headers["origin"] = draw(st.one_of(st.just(f"http://127.0.0.1:{port}"), header_text))

    content = None
    if well_formed:
        if route["models"] and draw(st.integers(0, 4)):  # the route's model, one value of any JSON or not
            body = draw(model_bodies(draw(st.sampled_from(route["models"]))))
            if body and draw(st.booleans()):
                body[draw(st.sampled_from(sorted(body)))] = draw(json_value)
            content = httpx_json(body)
        elif method in BODY_METHODS and draw(st.booleans()):
            content = httpx_json(draw(json_value))
        if content is not None:
            headers["content-type"] = "application/json"
        return method, url, headers, content

    body_kind = draw(st.sampled_from(["none", "shaped", "json", "bytes"]))
    if body_kind == "shaped" and route["body_keys"]:  # the route's own keys, values of any type
        keys = draw(st.lists(st.sampled_from(route["body_keys"]), unique=True, min_size=1))
        content = httpx_json({k: draw(json_value) for k in keys})
    elif body_kind in ("json", "shaped"):
        content = httpx_json(draw(json_value))
    elif body_kind == "bytes":
        content = draw(st.one_of(st.binary(max_size=200), st.sampled_from([b"{", b"\x00", b"\xff\xfe", b"{}" * 10,
                                                                          b"[" * 5000, b'{"text": "\xff"}'])))
    content_type = draw(st.sampled_from(CONTENT_TYPES))
    if content_type is not None and (content is not None or draw(st.booleans())):
        headers["content-type"] = content_type
    return method, url, headers, content


def httpx_json(value) -> bytes:
    import json

    return json.dumps(value, allow_nan=True).encode()


def assert_answered(response: httpx.Response, request: tuple) -> None:
    assert response.status_code < 500, (request[:3], response.status_code, response.text[:500])
    if response.status_code >= 400 and request[0] != "HEAD":
        assert set(response.json()) == {"error"}, response.text[:500]


# --- the app in-process -----------------------------------------------------------------------


@pytest.fixture
def app_and_token(cfg):
    """The daemon's own objects (store, versions, bakery, history, metrics) under its API, as
    `agent-memory daemon` makes them with no model: only the HTTP server is not there."""
    from agent_memory.daemon import Daemon

    cfg.feeds.allow_loopback = False  # the default: a fuzzed URL never fetches from this machine
    cfg.feeds.timeout_s = 1.0
    daemon = Daemon(cfg)
    daemon.booted.set()
    token = ensure_token(cfg)
    app = create_app(cfg, daemon.store, daemon.versions, bakery=daemon.bakery, history=daemon.history,
                     metrics=daemon.metrics, status=daemon.status, readiness=daemon.readiness)
    from fastapi.testclient import TestClient

    with TestClient(app, base_url=API_BASE, headers=auth_header(token)) as client:
        for n in range(3):  # something to find: items, a feed, a conversation
            assert client.post("/v1/memory/items", json={"text": f"Seed fact {n}."}).status_code == 201
        client.post("/v1/feeds", json={"url": "https://example.invalid/rss", "check": False})
        client.post("/v1/memory/conversations", json={"messages": [{"role": "user", "content": "hi"}]})
        yield app, token
    daemon.store.close()


def test_the_routes_are_enumerated_from_the_app(app_and_token):
    app, _ = app_and_token
    paths = {r["path"] for r in routes_of(app)}
    assert {"/livez", "/v1/memory/items", "/v1/memory/items/{item_id}", "/v1/feeds/{feed_id}/poll",
            "/v1/bakes", "/v1/rollback", "/openapi.json", "/"} <= paths
    items = next(r for r in routes_of(app) if r["path"] == "/v1/memory/items" and "POST" in r["methods"])
    assert set(items["body_keys"]) == {"text", "kind", "source", "valid_at", "supersedes"}


def test_no_request_gets_a_server_error_in_process(app_and_token):
    from fastapi.testclient import TestClient

    app, token = app_and_token
    routes = routes_of(app)
    # raise_server_exceptions: an exception that escaped every handler fails the test here.
    client = TestClient(app, base_url=API_BASE)

    @fuzz_settings(1000)
    @given(request=requests(routes, token, 8700))
    def one(request):
        method, url, headers, content = request
        assert_answered(client.request(method, url, headers=headers, content=content), request)

    one()


# --- the real daemon over HTTP ----------------------------------------------------------------


@pytest.fixture(scope="module")
def real_daemon(tmp_path_factory):
    proc = DaemonProcess(tmp_path_factory.mktemp("fuzz") / "state", vllm_mode="off", model_path="",
                         feeds_timeout_s="1").start()
    try:
        proc.wait_ready(timeout=60)
        yield proc
    finally:
        proc.kill()


def test_no_request_gets_a_server_error_or_a_dropped_connection_from_the_real_daemon(real_daemon):
    proc = real_daemon
    token = proc.headers["Authorization"].removeprefix("Bearer ")
    with httpx.Client(base_url=proc.api, timeout=30) as client:
        routes = routes_of(served_app())

        @fuzz_settings(300)
        @given(request=requests(routes, token, proc.api_port))
        def one(request):
            method, url, headers, content = request
            try:
                response = client.request(method, url, headers=headers, content=content)
            except httpx.TransportError as e:  # a dropped connection or no answer
                pytest.fail(f"{request[:3]}: {type(e).__name__}: {e}")
            assert_answered(response, request)

        one()
        assert client.get("/livez").status_code == 200
    assert "Traceback" not in proc.output(), proc.output()


raw_token = st.binary(min_size=1, max_size=12).filter(lambda b: not any(c in b for c in b" \r\n"))
raw_text = st.binary(max_size=80).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send bytes as they are, read until the server closes; what came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(data)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def test_malformed_http_gets_an_answer_from_the_real_daemon(real_daemon):
    """What no HTTP client library would send (bytes of any kind in the method, the target and the
    headers) is answered, by uvicorn's parser (400) or by the app, and never drops the connection."""
    proc = real_daemon
    host = f"127.0.0.1:{proc.api_port}".encode()

    @fuzz_settings(100)
    @given(method=st.one_of(st.sampled_from([b"GET", b"POST", b"DELETE"]), raw_token),
           target=st.one_of(st.sampled_from([b"/livez", b"/v1/memory/items", b"/v1/feeds/1/poll"]),
                            raw_text.map(lambda b: b"/" + b.replace(b" ", b""))),
           headers=st.lists(st.tuples(raw_token, raw_text), max_size=3))
    def one(method, target, headers):
        lines = [method + b" " + target + b" HTTP/1.1", b"Host: " + host, b"Connection: close"]
        lines += [b"X-" + name + b": " + value for name, value in headers]
        answer = raw_exchange(proc.api_port, b"\r\n".join(lines) + b"\r\n\r\n")
        assert re.match(rb"HTTP/1.1 [1-4]\d\d ", answer), answer[:200]

    one()
    # A client that goes away in the middle of a chunked body: no error in the log, and the daemon answers.
    with socket.create_connection(("127.0.0.1", proc.api_port), timeout=10) as conn:
        conn.sendall(b"POST /v1/memory/items HTTP/1.1\r\nHost: " + host + b"\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n" + b"\r\n".join(proc_auth(proc)) + b"\r\n\r\n5\r\n{\"te")
    assert httpx.get(f"{proc.api}/livez", timeout=10).status_code == 200
    assert "Traceback" not in proc.output(), proc.output()


def proc_auth(proc) -> list[bytes]:
    return [f"{k}: {v}".encode() for k, v in proc.headers.items()]


def served_app():
    """The app as create_app builds it for the daemon: its routes are the daemon's."""
    from agent_memory.config import Config

    return create_app(Config(), None, None, bakery=None, history=None, metrics=None, status=dict,
                      readiness=lambda: (True, ""))


# --- what the fuzz found, pinned ----------------------------------------------------------------


def test_the_memory_prompt_of_a_conversation_with_a_tool_call(api):
    messages = [{"role": "user", "content": "Book a table."},
                {"role": "assistant", "tool_calls": [{"id": "1", "type": "function",
                                                      "function": {"name": "book", "arguments": "{}"}}]},
                {"role": "user", "content": [{"type": "text", "text": "Thanks."}]}]
    assert api.post("/v1/memory/conversations", json={"messages": messages}).status_code == 201
    response = api.get("/v1/memory/prompt", params={"status": "pending"})
    assert response.status_code == 200, response.text
    assert "[tool call: book({})]" in response.json()["prompt"] and "user: Thanks." in response.json()["prompt"]
