"""Facts, conversations and feeds through the HTTP API: FastAPI's TestClient on the real app and
real SQLite files, hypothesis fuzzing, and the real daemon killed with SIGKILL mid-stream."""

from __future__ import annotations

import hmac
import json
import os
import signal
import threading

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from agent_memory import auth
from agent_memory.ingest import MAX_CONVERSATION_CHARS, MAX_FACT_CHARS, strip_control_chars
from agent_memory.prompts import memory_prompt
from agent_memory.store import Store
from conftest import DATA

ITEMS = "/v1/memory/items"
CONVERSATIONS = "/v1/memory/conversations"


def test_remember_is_acknowledged_after_commit(api, cfg):
    response = api.post(ITEMS, json={"text": "  Durov was arrested at Le Bourget. ", "source": "agent-7",
                                     "valid_at": "2024-08-24"})
    assert response.status_code == 201
    body = response.json()
    assert body["duplicate"] is False and body["status"] == "pending"
    # Another connection (as after a crash) sees the row: the ack came after the commit.
    item = Store(cfg.db_path, readonly=True).get_item(body["id"])
    assert (item["text"], item["kind"], item["source"], item["valid_at"]) == (
        "Durov was arrested at Le Bourget.", "fact", "agent-7", "2024-08-24")


def test_duplicate_returns_the_existing_id(api):
    first = api.post(ITEMS, json={"text": "Durov was arrested."}).json()
    again = api.post(ITEMS, json={"text": "durov  was arrested."})
    assert again.status_code == 200
    assert again.json()["id"] == first["id"] and again.json()["duplicate"] is True


@pytest.mark.parametrize("body, status, error", [
    ({"text": ""}, 422, "text is empty"),
    ({"text": " \n\t "}, 422, "text is empty"),
    ({"text": "\x00\x1b\x07\x9b"}, 422, "text is empty"),
    ({"text": "x" * (MAX_FACT_CHARS + 1)}, 413, "the limit is 20,000"),
    ({}, 422, "text: Field required"),
    ({"text": 42}, 422, "text: Input should be a valid string"),
    ({"txt": "typo"}, 422, "txt: Extra inputs are not permitted"),
    ({"text": "a", "kind": "opinion"}, 422, "kind: Input should be"),
    ({"text": "a", "valid_at": "last Tuesday"}, 422, "not an ISO 8601 date"),
    ({"text": "a", "valid_at": "2024-02-30"}, 422, "not an ISO 8601 date"),
    ({"text": "a", "supersedes": 999}, 422, "supersedes: there is no item 999"),
    ({"text": "a", "supersedes": 2**70}, 422, "supersedes must be an item id"),
    ([{"text": "a"}], 422, "body: Input should be a valid dictionary"),
])
def test_bad_items_get_clear_4xx(api, body, status, error):
    response = api.post(ITEMS, json=body)
    assert response.status_code == status, response.text
    assert error in response.json()["error"]
    assert api.get(ITEMS).json()["items"] == []


def test_control_characters_are_not_stored(api):
    response = api.post(ITEMS, json={"text": "Durov\x00 arrested\x1b[2J\nat Le\tBourget", "source": "wire\x07"})
    assert response.status_code == 201, response.text
    item = response.json()["item"]
    assert (item["text"], item["source"]) == ("Durov arrested[2J\nat Le\tBourget", "wire")


def test_bad_json_and_lone_surrogates(api):
    headers = {"content-type": "application/json"}
    response = api.post(ITEMS, content=b'{"text": "unterminated', headers=headers)
    assert response.status_code == 422 and "not valid JSON" in response.json()["error"]
    response = api.post(ITEMS, content=b'{"text": "\\ud800 broken"}', headers=headers)
    assert response.status_code == 422 and "lone surrogate" in response.json()["error"]


def test_longest_fact_is_kept_whole(api):
    text = "word " * (MAX_FACT_CHARS // 5 - 1) + "last"
    response = api.post(ITEMS, json={"text": text})
    assert response.status_code == 201
    item = api.get(f"{ITEMS}/{response.json()['id']}").json()
    assert item["text"] == text and item["truncated"] is False


def test_request_body_over_the_limit(api, cfg):
    body = json.dumps({"text": "x" * (cfg.api.max_request_bytes + 10)})
    response = api.post(ITEMS, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "request body over" in response.json()["error"]


def test_valid_at_is_normalised_to_utc(api):
    item = api.post(ITEMS, json={"text": "a", "valid_at": "2024-08-24T23:30:00+02:00"}).json()["item"]
    assert item["valid_at"] == "2024-08-24T21:30:00+00:00"
    item = api.post(ITEMS, json={"text": "b", "valid_at": "2024-08-24T21:30:00Z"}).json()["item"]
    assert item["valid_at"] == "2024-08-24T21:30:00+00:00"


def test_supersede_arrested_then_released(api, store):
    arrested = api.post(ITEMS, json={"text": "Pavel Durov is held in police custody in France.",
                                     "valid_at": "2024-08-24"}).json()["id"]
    released = api.post(ITEMS, json={"text": "Pavel Durov was released under judicial supervision.",
                                     "valid_at": "2024-08-28", "supersedes": arrested}).json()["id"]
    assert api.get(f"{ITEMS}/{arrested}").json()["superseded_by"] == released
    assert api.get(f"{ITEMS}/{released}").json()["supersedes"] == arrested
    store.mark_items([arrested, released], "baked")
    prompt = api.get("/v1/memory/prompt").json()
    assert prompt["item_ids"] == [arrested, released]
    assert prompt["prompt"] == (
        "- Pavel Durov is held in police custody in France. (no longer current: see below)\n"
        "- Pavel Durov was released under judicial supervision.")


def test_memory_prompt_defaults_to_baked_items(api, store):
    baked = api.post(ITEMS, json={"text": "Telegram founder Pavel Durov was arrested.",
                                  "valid_at": "2024-08-24"}).json()["id"]
    api.post(ITEMS, json={"text": "Not baked yet."})
    store.mark_items([baked], "baked")
    prompt = api.get("/v1/memory/prompt").json()
    assert prompt["item_ids"] == [baked]
    assert prompt["prompt"] == "- Telegram founder Pavel Durov was arrested."
    both = api.get("/v1/memory/prompt", params={"status": "pending,baked"}).json()
    assert len(both["item_ids"]) == 2
    assert api.get("/v1/memory/prompt", params={"status": "cooked"}).status_code == 422


def test_memory_prompt_renders_every_kind():
    items = [
        {"id": 3, "kind": "conversation", "text": "user: hi\nassistant: hello", "valid_at": "2024-09-01"},
        {"id": 2, "kind": "prompt", "text": "Answer in one sentence.", "valid_at": None,
         "received_at": "2024-09-02T00:00:00+00:00"},
        {"id": 1, "kind": "headline", "text": "Durov arrested\nat Le Bourget", "published_at": "2024-08-24T22:00:00+00:00"},
    ]
    # Each item as the bake's teacher saw it (prompts.item_memory), oldest first; instructions last.
    assert memory_prompt(items) == (
        "- Durov arrested\nat Le Bourget\n"
        "- Earlier conversation with the user:\nuser: hi\nassistant: hello\n\n"
        "Answer in one sentence.")
    assert memory_prompt([]) == ""


def test_conversation_stored_whole_with_linked_facts(api):
    messages = [
        {"role": "system", "content": "You are a news assistant."},
        {"role": "user", "content": "What happened to Pavel Durov?"},
        {"role": "assistant", "content": "He was charged in France and released on bail.", "name": "newsbot"},
    ]
    response = api.post(CONVERSATIONS, json={
        "messages": messages, "source": "newsbot", "valid_at": "2024-08-29",
        "facts": ["Durov was charged in France on August 28, 2024.",
                  {"text": "Durov's bail was set at 5 million euros.", "valid_at": "2024-08-28"}],
    })
    assert response.status_code == 201, response.text
    body = response.json()
    conversation = api.get(f"{ITEMS}/{body['id']}").json()
    assert conversation["kind"] == "conversation" and conversation["messages"] == messages
    assert conversation["text"].splitlines()[1] == "user: What happened to Pavel Durov?"
    assert [f["parent_id"] for f in conversation["facts"]] == [body["id"]] * 2
    assert [f["id"] for f in conversation["facts"]] == [f["id"] for f in body["facts"]]
    assert [f["valid_at"] for f in conversation["facts"]] == ["2024-08-29", "2024-08-28"]
    assert {f["source"] for f in conversation["facts"]} == {"newsbot"}

    again = api.post(CONVERSATIONS, json={"messages": messages})
    assert again.status_code == 200 and again.json()["id"] == body["id"] and again.json()["duplicate"]


@pytest.mark.parametrize("body, status, error", [
    ({"messages": []}, 422, "messages: List should have at least 1 item"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 422, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, 422, "messages[0].content is missing"),
    ({"messages": [{"role": "user", "content": None}]}, 422, "messages[0].content is missing"),
    ({"messages": [{"role": "user", "content": 5}]}, 422, "messages[0].content must be a string, a list"),
    ({"messages": [{"role": "user", "content": ["hi"]}]}, 422, "messages[0].content[0] must be a content part"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 422,
     "messages[0].content[0].text must be a string"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": "f()"}]}, 422,
     "messages[0].tool_calls must be a list"),
    ({"messages": [{"role": "user", "content": "\x00\x1b\x07 "}]}, 422, "every message content is empty"),
    ({"messages": [{"role": "user", "content": "  "}]}, 422, "every message content is empty"),
    ({"messages": [{"role": "user", "content": "x" * (MAX_CONVERSATION_CHARS + 1)}]}, 413, "the limit is 200,000"),
    ({"messages": [{"role": "user", "content": "hi"}], "facts": [""]}, 422, "facts[0]: text is empty"),
    ({"messages": [{"role": "user", "content": "hi"}], "facts": [{"text": "a", "supersedes": 5}]}, 422,
     "facts[0]: supersedes: there is no item 5"),
])
def test_bad_conversations_get_clear_4xx(api, body, status, error):
    response = api.post(CONVERSATIONS, json=body)
    assert response.status_code == status, response.text
    assert error in response.json()["error"]
    assert api.get(ITEMS).json()["items"] == []  # nothing half-written


def test_list_and_get_items(api, store):
    fact = api.post(ITEMS, json={"text": "a fact"}).json()["id"]
    prompt = api.post(ITEMS, json={"text": "a prompt", "kind": "prompt"}).json()["id"]
    store.mark_items([fact], "baked")
    assert [i["id"] for i in api.get(ITEMS).json()["items"]] == [prompt, fact]
    assert [i["id"] for i in api.get(ITEMS, params={"status": "baked"}).json()["items"]] == [fact]
    assert [i["id"] for i in api.get(ITEMS, params={"kind": "prompt"}).json()["items"]] == [prompt]
    assert len(api.get(ITEMS, params={"limit": 1}).json()["items"]) == 1
    assert api.get(ITEMS).json()["counts"]["baked"] == 1
    for params in ({"status": "cooked"}, {"kind": "rumour"}, {"limit": 0}, {"limit": "many"}):
        assert api.get(ITEMS, params=params).status_code == 422
    missing = api.get(f"{ITEMS}/999")
    assert missing.status_code == 404 and missing.json() == {"error": "no item 999"}
    assert api.get(f"{ITEMS}/abc").status_code == 422
    assert api.get(f"{ITEMS}/{2**64}").status_code == 422


def test_writes_and_reads_need_the_token(api, anon, cfg, monkeypatch):
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    cfg.api.token = "s3cret-token"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"},
                    {"Authorization": "Basic s3cret-token"}, {"Authorization": "Bearer "}):
        for path, body in ((ITEMS, {"text": "a"}), (CONVERSATIONS, {"messages": [{"role": "user", "content": "a"}]}),
                           ("/v1/feeds", {"url": "https://example.org/rss"})):
            response = anon.post(path, json=body, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert response.json() == {"error": "missing or wrong bearer token"}
    for method, path in (("DELETE", "/v1/feeds/1"), ("POST", "/v1/feeds/poll"), ("POST", "/v1/feeds/1/poll"),
                         ("GET", ITEMS), ("GET", f"{ITEMS}/1"), ("GET", "/v1/memory/prompt"), ("GET", "/v1/feeds")):
        response = anon.request(method, path)
        assert response.status_code == 401, (method, path)
        assert response.headers["www-authenticate"] == "Bearer"
    assert calls, "the token is compared in constant time (hmac.compare_digest)"
    good = anon.post(ITEMS, json={"text": "a"}, headers={"Authorization": "Bearer s3cret-token"})
    assert good.status_code == 201
    assert api.get(ITEMS).status_code == 401  # the fixture's token is no longer the one


def test_feeds_api(api, http_server):
    url = http_server.serve("/news.xml", (DATA / "news_v1.xml").read_bytes(), content_type="application/rss+xml")
    created = api.post("/v1/feeds", json={"url": url, "interval": "15m"})
    assert created.status_code == 201
    feed_id = created.json()["id"]
    assert created.json()["feed"]["interval_s"] == 900
    again = api.post("/v1/feeds", json={"url": url})
    assert again.status_code == 200 and again.json() == {**again.json(), "id": feed_id, "duplicate": True}
    for body, error in (({"url": "gopher://x"}, "must be http://"), ({"url": url + "2", "interval": "never"}, "not a duration"),
                        ({}, "url: Field required")):
        response = api.post("/v1/feeds", json=body)
        assert response.status_code == 422 and error in response.json()["error"]

    polled = api.post(f"/v1/feeds/{feed_id}/poll").json()
    assert (polled["new"], polled["error"]) == (3, None)
    assert api.post("/v1/feeds/poll").json()["unchanged"] == 3
    assert [f["id"] for f in api.get("/v1/feeds").json()["feeds"]] == [feed_id]
    assert api.get(ITEMS, params={"kind": "headline"}).json()["counts"]["pending"] == 3

    assert api.delete(f"/v1/feeds/{feed_id}").json() == {"id": feed_id, "removed": True}
    assert api.delete(f"/v1/feeds/{feed_id}").status_code == 404
    assert api.post(f"/v1/feeds/{feed_id}/poll").status_code == 404
    assert api.post("/v1/feeds/12345/poll").json() == {"error": "no feed 12345"}
    assert api.get("/v1/feeds").json()["feeds"] == []


# --- fuzzing ------------------------------------------------------------------------------

# Each strategy mixes well-formed bodies (that must be stored) with anything-goes ones (that must
# get a clear 4xx): no 500, and every acknowledged id must be in the database.
texts = st.one_of(st.text(max_size=60), st.sampled_from(["", " ", "\x00", "a" * 20_001, "Durov"]))
words = st.text(min_size=1, max_size=60).filter(lambda t: strip_control_chars(t).strip())
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**80, max_value=2**80),
                    st.floats(allow_nan=False, allow_infinity=False), texts)
good_dates = st.sampled_from(["2024-08-24", "2024-08-24T21:00:00Z", "2024-08-24T21:00+05:30"])
dates = st.one_of(scalars, good_dates, st.sampled_from(["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-12:00",
                                                         "2024-13-01", "2024-02-30"]))
kinds = st.sampled_from(["fact", "headline", "prompt"])
good_items = st.fixed_dictionaries(
    {"text": words}, optional={"kind": kinds, "source": words, "valid_at": good_dates,
                               "supersedes": st.integers(min_value=1, max_value=3)})
any_items = st.fixed_dictionaries(
    {}, optional={"text": st.one_of(texts, scalars), "kind": st.one_of(kinds, scalars), "source": scalars,
                  "valid_at": dates, "supersedes": st.one_of(st.integers(min_value=-5, max_value=2**64), scalars),
                  "extra": scalars})
item_bodies = st.one_of(good_items, any_items, st.lists(scalars, max_size=2), scalars)

roles = st.sampled_from(["system", "user", "assistant", "tool"])
good_messages = st.fixed_dictionaries({"role": roles, "content": words}, optional={"name": words})
any_messages = st.fixed_dictionaries({}, optional={"role": st.one_of(roles, scalars), "content": st.one_of(texts, scalars),
                                                   "name": scalars})
good_facts = st.one_of(words, st.fixed_dictionaries({"text": words}, optional={"kind": kinds, "valid_at": good_dates}))
good_conversations = st.fixed_dictionaries(
    {"messages": st.lists(good_messages, min_size=1, max_size=4)},
    optional={"facts": st.lists(good_facts, max_size=3), "source": words, "valid_at": good_dates})
any_conversations = st.fixed_dictionaries(
    {}, optional={"messages": st.one_of(st.lists(st.one_of(good_messages, any_messages), max_size=4), scalars),
                  "facts": st.one_of(st.lists(st.one_of(texts, good_items, any_items), max_size=3), scalars),
                  "source": scalars, "valid_at": dates})
conversation_bodies = st.one_of(good_conversations, any_conversations)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


def _post_and_check(api, store, path, body, acked):
    response = api.post(path, json=body)
    event(f"HTTP {response.status_code}")
    assert response.status_code < 500, response.text
    assert response.status_code in (200, 201, 401, 404, 413, 422), response.text
    assert "error" in response.json() or response.status_code < 300
    if response.status_code < 300:
        result = response.json()
        item = store.get_item(result["id"])
        assert item is not None and item["id"] == result["id"]
        acked.add(result["id"])
        for fact in result.get("facts", []):
            if not fact["duplicate"]:  # a fact already known keeps its first provenance
                assert store.get_item(fact["id"])["parent_id"] == result["id"]
            acked.add(fact["id"])


def mixed(good, anything):
    """Lists with at least one well-formed body, in any order among anything-goes ones."""
    return st.tuples(st.lists(good, min_size=1, max_size=3), st.lists(anything, max_size=3)).flatmap(
        lambda lists: st.permutations(lists[0] + lists[1]))


@FUZZ
@given(bodies=mixed(good_items, item_bodies))
def test_fuzz_items(api, store, bodies):
    acked: set[int] = set()
    for body in bodies:
        _post_and_check(api, store, ITEMS, body, acked)
    assert acked and acked <= {i["id"] for i in store.list_items(limit=100_000)}


@FUZZ
@given(bodies=mixed(good_conversations, conversation_bodies))
def test_fuzz_conversations(api, store, bodies):
    acked: set[int] = set()
    for body in bodies:
        _post_and_check(api, store, CONVERSATIONS, body, acked)
    assert acked and acked <= {i["id"] for i in store.list_items(limit=100_000)}


# --- the real daemon ----------------------------------------------------------------------


def test_kill_9_loses_no_acknowledged_item(daemon):
    """Post from several threads, SIGKILL the daemon mid-stream: every 2xx is in the database."""
    acked: dict[int, str] = {}
    enough = threading.Event()

    def post(worker: int):
        with httpx.Client(base_url=daemon.api, headers=daemon.headers, timeout=10) as client:
            for n in range(10_000):
                text = f"worker {worker} fact {n}"
                try:
                    response = client.post(ITEMS, json={"text": text, "source": f"w{worker}"})
                except httpx.HTTPError:
                    return  # the daemon is gone
                assert response.status_code == 201, response.text
                acked[response.json()["id"]] = text
                if len(acked) >= 150:
                    enough.set()

    threads = [threading.Thread(target=post, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    assert enough.wait(60), daemon.output()
    os.killpg(daemon.process.pid, signal.SIGKILL)
    daemon.process.wait(10)
    for t in threads:
        t.join(30)

    store = Store(daemon.state_dir / "agent-memory.db")  # reopen as the restarted daemon would
    stored = {i["id"]: i["text"] for i in store.list_items(limit=100_000)}
    assert len(acked) >= 150
    assert {i: stored.get(i) for i in acked} == acked
    assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_cli_against_the_daemon(daemon, http_server, tmp_path):
    def run(*args, input=None):
        result = daemon.cli(*args, timeout=60) if input is None else _cli_with_stdin(daemon, args, input)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout) if "--json" in args else result.stdout

    first = run("remember", "Pavel Durov was arrested at Le Bourget airport.", "--valid-at", "2024-08-24",
                "--source", "cli-test", "--json")
    assert first["duplicate"] is False
    second = run("remember", "Pavel Durov was released on bail.", "--valid-at", "2024-08-28",
                 "--supersedes", str(first["id"]), "--json")
    assert run("remember", "Pavel Durov was arrested at Le Bourget airport.") == (
        f"already known as item {first['id']} (pending)\n")

    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "Where is Durov?"},
                                             {"role": "assistant", "content": "In France, on bail."}],
                                "facts": ["Durov may not leave France."]}))
    conversation = run("ingest-chat", str(chat), "--json")
    assert len(conversation["facts"]) == 1
    from_stdin = run("ingest-chat", "-", input=json.dumps([{"role": "user", "content": "stdin chat"}]))
    assert from_stdin.startswith("queued conversation item ")

    queue = run("queue", "--json")
    assert queue["counts"]["pending"] == 5
    by_id = {i["id"]: i for i in queue["items"]}
    assert by_id[second["id"]]["supersedes"] == first["id"]
    assert by_id[first["id"]]["source"] == "cli-test"
    text = run("queue")
    assert f"superseded by {second['id']}" in text and f"from conversation {conversation['id']}" in text

    url = http_server.serve("/news.xml", (DATA / "news_v1.xml").read_bytes(), content_type="application/rss+xml")
    feed = run("feeds", "add", url, "--interval", "1h", "--json")
    assert feed["feed"]["interval_s"] == 3600
    # (The daemon's own scheduler may have polled the new feed first: then all 3 are known.)
    assert run("feeds", "poll", str(feed["id"])) in (f"feed {feed['id']}: 3 new, 0 updated, 0 unchanged\n",
                                                    f"feed {feed['id']}: 0 new, 0 updated, 3 unchanged\n")
    assert run("feeds", "poll", "--json")["unchanged"] == 3
    assert [f["url"] for f in run("feeds", "list", "--json")] == [url]
    assert f"{feed['id']}  Test Wire  every 1h" in run("feeds", "list")
    assert run("feeds", "remove", str(feed["id"]), "--json") == {"id": feed["id"], "removed": True}
    assert run("feeds", "list") == "no feeds\n"

    bad = daemon.cli("remember", "  ")
    assert bad.returncode == 1 and bad.stderr.strip() == "error: text is empty"
    bad = daemon.cli("ingest-chat", str(DATA / "page.html"))
    assert bad.returncode == 1 and "is not valid JSON" in bad.stderr and "Traceback" not in bad.stderr


def _cli_with_stdin(daemon, args, text):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "agent_memory.cli", *args], env=daemon.env, input=text,
                          capture_output=True, text=True, timeout=60)


# --- today's OpenAI message format (issue 14 #5) ------------------------------------------

OPENAI_CHAT = [
    {"role": "developer", "content": "You are a news assistant."},
    {"role": "user", "content": [
        {"type": "text", "text": "What happened to Durov?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}},
    ]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "search_news", "arguments": '{"query": "Durov"}'}},
        {"id": "call_2", "type": "custom", "custom": {"name": "lookup", "input": "Le Bourget"}},
    ]},
    {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "Durov was released on bail."}]},
    {"role": "tool", "tool_call_id": "call_2", "content": "An airport near Paris."},
    {"role": "assistant", "content": [{"type": "text", "text": "He was released on bail."}], "refusal": None},
    {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
                                 {"type": "file", "file": {"filename": "notes.pdf", "file_data": "JVBERi0="}}]},
    {"role": "assistant", "content": None, "refusal": "I cannot open that file."},
]
OPENAI_TRANSCRIPT = (
    "developer: You are a news assistant.\n"
    "user: What happened to Durov? [image]\n"
    'assistant: [tool call: search_news({"query": "Durov"})] [tool call: lookup(Le Bourget)]\n'
    "tool: Durov was released on bail.\n"
    "tool: An airport near Paris.\n"
    "assistant: He was released on bail.\n"
    "user: [audio] [file: notes.pdf]\n"
    "assistant: [refusal: I cannot open that file.]"
)


def test_openai_fixture_is_what_the_sdk_accepts():
    """The conversation above is valid by the official SDK's own types (so the test below is
    about the format clients send, not one we made up)."""
    from openai.types.chat import ChatCompletionMessageParam
    from pydantic import TypeAdapter, ValidationError

    adapter = TypeAdapter(list[ChatCompletionMessageParam])
    for message in adapter.validate_python(OPENAI_CHAT):
        list(message.get("tool_calls") or [])  # (validated lazily)
    with pytest.raises(ValidationError):
        adapter.validate_python([{"role": "robot", "content": "hi"}])


def test_openai_content_parts_tool_calls_and_tool_messages_are_accepted(api):
    response = api.post(CONVERSATIONS, json={"messages": OPENAI_CHAT, "facts": ["Durov was released on bail."]})
    assert response.status_code == 201, response.text
    stored = api.get(f"{ITEMS}/{response.json()['id']}").json()
    assert stored["text"] == OPENAI_TRANSCRIPT
    assert stored["messages"] == OPENAI_CHAT  # the rest (images, call ids, ...) is kept whole
    assert [f["text"] for f in stored["facts"]] == ["Durov was released on bail."]


def test_tool_call_notes_are_short():
    from agent_memory.ingest import message_text

    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "x" * 10_000}}
    text = message_text({"role": "assistant", "content": None, "tool_calls": [call]})
    assert text.startswith("[tool call: f(xxx") and text.endswith("…)]") and len(text) < 230
