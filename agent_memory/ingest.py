"""Facts and conversations from agents: validation, normalisation, and the memory prompt.

Limits (documented in the README and the API errors):
- a fact / headline / prompt: 1 to MAX_FACT_CHARS characters. Longer is refused (413), never
  truncated: a cut fact could say something false.
- a conversation: OpenAI chat messages as clients send them today (see check_messages), at most
  MAX_CONVERSATION_CHARS characters of transcript in all, stored as one item of kind
  "conversation": the messages whole (`messages`), their text as the transcript (`text`); facts
  extracted from it (by the agent) are linked to it by `parent_id`.
- stored text has no control characters (NUL, escape sequences, ...); newlines and tabs stay.
- valid_at: an ISO 8601 date or date-time ("2024-08-24", "2024-08-24T21:00:00Z"); date-times
  are stored in UTC, a time without a zone is taken as UTC.
"""

from __future__ import annotations

import json
from datetime import date, datetime, timezone

from .records import ItemKind
from .store import MAX_SQLITE_INT, Store

MAX_FACT_CHARS = 20_000
MAX_CONVERSATION_CHARS = 200_000
MAX_FACTS_PER_CONVERSATION = 200
MAX_SOURCE_CHARS = 200
ROLES = ("system", "developer", "user", "assistant", "tool", "function")  # function: OpenAI's legacy tool role
MAX_NOTE_CHARS = 200  # a tool call's arguments (or a part's type) in the transcript are cut to this

# C0 and C1 control characters and DEL, except newline and tab: NUL breaks C consumers, escape
# sequences rewrite the terminal that prints them.
_CONTROL_CHARS = dict.fromkeys(c for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)] if chr(c) not in "\n\t")


class IngestError(ValueError):
    """A request the caller must fix; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


# --- validation ---------------------------------------------------------------------------


def strip_control_chars(text: str) -> str:
    return text.translate(_CONTROL_CHARS)


def check_text(text, what: str = "text", max_chars: int = MAX_FACT_CHARS) -> str:
    """A non-empty string of at most max_chars, outer whitespace removed."""
    if not isinstance(text, str):
        raise IngestError(f"{what} must be a string")
    _check_unicode(text, what)
    text = strip_control_chars(text).strip()
    if not text:
        raise IngestError(f"{what} is empty")
    if len(text) > max_chars:
        raise IngestError(
            f"{what} is {len(text):,} characters; the limit is {max_chars:,} "
            "(split it into several items)", status=413)
    return text


def check_source(source) -> str | None:
    if source is None:
        return None
    if not isinstance(source, str):
        raise IngestError("source must be a string")
    _check_unicode(source, "source")
    source = " ".join(strip_control_chars(source).split())
    if len(source) > MAX_SOURCE_CHARS:
        raise IngestError(f"source is longer than {MAX_SOURCE_CHARS} characters")
    return source or None


def parse_valid_at(value) -> str | None:
    """ISO 8601 date or date-time -> "2024-08-24" or "2024-08-24T21:00:00+00:00" (UTC)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise IngestError("valid_at must be an ISO 8601 date or date-time string")
    text = value.strip()
    try:
        if len(text) == 10:
            return date.fromisoformat(text).isoformat()
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise IngestError(
            f"valid_at {value!r} is not an ISO 8601 date or date-time (e.g. 2024-08-24 or "
            "2024-08-24T21:00:00Z)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    try:
        return moment.astimezone(timezone.utc).isoformat(timespec="seconds")
    except OverflowError:
        raise IngestError(f"valid_at {value!r} is out of range") from None


def check_item_id(value, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SQLITE_INT:
        raise IngestError(f"{what} must be an item id (a positive integer)")
    return value


def _check_unicode(text: str, what: str) -> None:
    # JSON can carry lone surrogates ("\ud800") that no UTF-8 database can store.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise IngestError(f"{what} is not valid Unicode (lone surrogate)") from None


def check_messages(messages) -> list[dict]:
    """OpenAI chat messages as clients send them today: a non-empty list of {"role", "content"}
    where content is a string, a list of content parts ({"type": "text", "text": ...}, images,
    audio, files, refusals), or null/absent on an assistant message (which then makes
    `tool_calls` or has a `refusal`);
    `tool` (and legacy `function`) messages carry the results. Every message is kept whole, its
    extra keys (name, tool_call_id, tool_calls, ...) included; message_text says what of it goes
    into the transcript."""
    if not isinstance(messages, list) or not messages:
        raise IngestError("messages must be a non-empty list of {role, content}")
    checked, total, any_text = [], 0, False
    for number, message in enumerate(messages):
        where = f"messages[{number}]"
        if not isinstance(message, dict):
            raise IngestError(f"{where} must be an object with role and content")
        if message.get("role") not in ROLES:
            raise IngestError(f"{where}.role must be one of {', '.join(ROLES)}")
        _check_unicode(json.dumps(message, ensure_ascii=False, default=str), where)
        text = message_text(message, where)
        total += len(text)
        any_text = any_text or bool(text.strip())
        checked.append(dict(message))
    if total > MAX_CONVERSATION_CHARS:
        raise IngestError(
            f"the conversation is {total:,} characters; the limit is {MAX_CONVERSATION_CHARS:,}",
            status=413)
    if not any_text:
        raise IngestError("the conversation has no text: every message content is empty")
    return checked


def message_text(message: dict, where: str = "message") -> str:
    """A message's text for the transcript: its text parts, and a short note for the rest
    ("[image]", "[tool call: name(args)]"). IngestError for a shape OpenAI does not send."""
    content = message.get("content")
    if isinstance(content, str):
        pieces = [content]
    elif isinstance(content, list):
        pieces = [_part_text(part, f"{where}.content[{n}]") for n, part in enumerate(content)]
    elif content is None:
        pieces = []
    else:
        raise IngestError(f"{where}.content must be a string, a list of content parts, or null")
    if isinstance(message.get("refusal"), str):
        pieces.append(f"[refusal: {message['refusal']}]")
    calls = message.get("tool_calls")
    if calls is not None and not isinstance(calls, list):
        raise IngestError(f"{where}.tool_calls must be a list")
    calls = list(calls or []) + ([message["function_call"]] if message.get("function_call") else [])
    pieces += [_call_text(call) for call in calls]
    if content is None and message.get("role") != "assistant":
        raise IngestError(f"{where}.content is missing (only an assistant message may leave it out)")
    return strip_control_chars(" ".join(p.strip() for p in pieces if p.strip()))


def _part_text(part, where: str) -> str:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise IngestError(f"{where} must be a content part: an object with a type")
    kind = part["type"]
    if kind in ("text", "input_text", "output_text"):
        if not isinstance(part.get("text"), str):
            raise IngestError(f"{where}.text must be a string")
        return part["text"]
    if kind == "refusal":
        return f"[refusal: {part.get('refusal', '')}]"
    names = {"image_url": "image", "input_image": "image", "input_audio": "audio"}
    if kind in ("file", "input_file"):
        filename = (part.get("file") or {}).get("filename") if isinstance(part.get("file"), dict) else part.get("filename")
        return f"[file: {_short(filename)}]" if isinstance(filename, str) else "[file]"
    return f"[{names.get(kind) or _short(kind)}]"


def _call_text(call) -> str:
    """An assistant's tool call ({"type": "function", "function": {"name", "arguments"}}, or
    "custom" with {"name", "input"}) or a legacy function_call ({"name", "arguments"}) as
    "[tool call: name(arguments)]"."""
    call = call if isinstance(call, dict) else {}
    function = call.get("function") or call.get("custom") or call
    function = function if isinstance(function, dict) else {}
    name, arguments = function.get("name"), function.get("arguments", function.get("input"))
    if not isinstance(arguments, str):
        arguments = "" if arguments is None else json.dumps(arguments, ensure_ascii=False, default=str)
    return f"[tool call: {_short(name) if isinstance(name, str) else '?'}({_short(arguments)})]"


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_NOTE_CHARS else text[: MAX_NOTE_CHARS - 1] + "…"


def render_conversation(messages: list[dict]) -> str:
    """The transcript that is the conversation item's text: one "role: text" per message."""
    texts = [(m["role"], message_text(m)) for m in messages]
    return "\n".join(f"{role}: {text}" for role, text in texts if text)


# --- writing ------------------------------------------------------------------------------


def remember(
    store: Store, text, kind: str = ItemKind.FACT, source=None, valid_at=None, supersedes=None,
    *, parent_id: int | None = None,
) -> tuple[dict, bool]:
    """Validate and queue one fact / headline / prompt; returns (item, duplicate).

    `supersedes`: the id of an earlier item this one replaces (arrested -> released); it is
    marked superseded_by this item.
    """
    fact = check_fact(text, kind, source, valid_at, supersedes)
    with store.transaction():
        return _write_fact(store, fact, parent_id)


def check_fact(text, kind=ItemKind.FACT, source=None, valid_at=None, supersedes=None) -> dict:
    if kind not in ItemKind.remembered():
        raise IngestError(f"kind must be one of {', '.join(ItemKind.remembered())}")
    return {
        "kind": kind, "text": check_text(text), "source": check_source(source),
        "valid_at": parse_valid_at(valid_at), "supersedes": check_item_id(supersedes, "supersedes"),
    }


def _write_fact(store: Store, fact: dict, parent_id: int | None) -> tuple[dict, bool]:
    old_id = fact["supersedes"]
    if old_id is not None and store.get_item(old_id) is None:
        raise IngestError(f"supersedes: there is no item {old_id}")
    item, outcome = store.add_item(
        fact["kind"], fact["text"], source=fact["source"] or "api", valid_at=fact["valid_at"],
        parent_id=parent_id,
    )
    if old_id is not None and old_id != item["id"]:
        store.supersede(old_id, item["id"])
        item = store.get_item(item["id"])
    return item, outcome == "duplicate"


def ingest_conversation(store: Store, messages, facts=(), source=None, valid_at=None) -> dict:
    """Validate and queue a conversation and the facts extracted from it, in one transaction.

    `facts`: strings, or objects {text, kind?, valid_at?, supersedes?}; each becomes its own item
    linked to the conversation (parent_id). Returns {"conversation": item, "duplicate": bool,
    "facts": [{"item": item, "duplicate": bool}]}.
    """
    messages = check_messages(messages)
    source = check_source(source)
    valid_at = parse_valid_at(valid_at)
    if not isinstance(facts, (list, tuple)):
        raise IngestError("facts must be a list")
    if len(facts) > MAX_FACTS_PER_CONVERSATION:
        raise IngestError(f"at most {MAX_FACTS_PER_CONVERSATION} facts per conversation")
    checked_facts = []
    for number, fact in enumerate(facts):
        fact = {"text": fact} if isinstance(fact, str) else fact
        if not isinstance(fact, dict):
            raise IngestError(f"facts[{number}] must be a string or an object with text")
        try:
            checked = check_fact(fact.get("text"), fact.get("kind", ItemKind.FACT), source,
                                 fact.get("valid_at", valid_at), fact.get("supersedes"))
        except IngestError as e:
            raise IngestError(f"facts[{number}]: {e}", e.status) from None
        checked_facts.append(checked)
    with store.transaction():
        conversation, outcome = store.add_item(
            ItemKind.CONVERSATION, render_conversation(messages), messages=messages,
            source=source or "api", valid_at=valid_at,
        )
        written = []
        for number, fact in enumerate(checked_facts):
            try:
                written.append(_write_fact(store, fact, conversation["id"]))
            except IngestError as e:  # rolls back the conversation too
                raise IngestError(f"facts[{number}]: {e}", e.status) from None
    return {
        "conversation": conversation,
        "duplicate": outcome == "duplicate",
        "facts": [{"item": item, "duplicate": duplicate} for item, duplicate in written],
    }
