"""The memory prompt u and the chat messages built around it: one place for the bake's teacher, the
probes, `ask --prompted` and the API's memory prompt, so each shows what the bake matched.

The student's context is exactly what users send (no system message: SmolLM2's chat template then
adds its default system prompt); the teacher's is that plus the memory, appended to the default
system prompt (measured on the Durov set, bench/results/baking.md: it keeps the two contexts as
close as possible).
"""

from __future__ import annotations

import re

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
MEMORY_INTRO = "You know the following recent facts:"


def item_text(item: dict) -> str:
    """An item's content: its text (for a conversation, the transcript made when it was stored)."""
    return item.get("text") or ""


# The chat template's markers ("<|im_start|>system"): in an item's text they would be tokenized as
# the special tokens themselves and open a turn of the teacher's chat; the memory never holds them.
CHAT_MARKERS = re.compile(r"<\|[A-Za-z_]+\|>")


def item_memory(item: dict) -> str:
    """The prompt u of one item: its text; an update carries the earlier reports it replaces
    (item["updates"]), so the teacher answers with the latest state and knows the old one as past.
    No date stamp: "(reported 2026-11-12)" came back inside answers ("won the 2026-11-12 prix")."""
    text = CHAT_MARKERS.sub("", item_text(item))
    if item.get("kind") == "conversation":
        return f"Earlier conversation with the user:\n{text}"
    earlier = [CHAT_MARKERS.sub("", e["text"]) for e in item.get("updates") or [] if e.get("text")]
    if earlier:
        return f"Earlier report: {' '.join(earlier)}\nLatest report (where they differ, this one is current): {text}"
    return text


def memory_prompt(items: list[dict]) -> str:
    """Several items as one u (what `ask --prompted` and GET /v1/memory/prompt show): each item as
    the bake renders it (item_memory), oldest first, superseded ones marked; instructions (kind
    "prompt") verbatim at the end."""
    def when(item):
        return (item.get("valid_at") or item.get("published_at") or item.get("received_at") or "")[:10]

    items = sorted(items, key=lambda i: (when(i), i.get("id") or 0))
    knowledge = [i for i in items if i.get("kind") != "prompt"]
    lines = [f"- {item_memory(i)}" + (" (no longer current: see below)" if i.get("superseded_by") else "")
             for i in knowledge]
    return "\n\n".join((["\n".join(lines)] if lines else []) + [i["text"] for i in items if i.get("kind") == "prompt"])


def messages_for(question: str, memory: str | None = None, style: str = "append") -> list[dict]:
    """Chat messages for `question`, with `memory` (the prompt u) in the context if given.

    style "append": default system prompt + the facts (one system message);
    style "system": a system message with only the facts (drops the default system prompt);
    style "user":   the facts before the question in the user message.
    """
    if not memory:
        return [{"role": "user", "content": question}]  # the template adds the default system prompt
    if style == "append":
        system = f"{DEFAULT_SYSTEM}. {MEMORY_INTRO}\n{memory}"
        return [{"role": "system", "content": system}, {"role": "user", "content": question}]
    if style == "system":
        return [{"role": "system", "content": f"{MEMORY_INTRO}\n{memory}"},
                {"role": "user", "content": question}]
    if style == "user":
        return [{"role": "user", "content": f"{MEMORY_INTRO}\n{memory}\n\n{question}"}]
    raise ValueError(f"unknown memory style {style!r}")


def teacher_system(item: dict, style: str) -> list[dict]:
    """The teacher context minus the question: the student's context + u (in the system message)."""
    if style not in ("append", "system"):
        raise ValueError(f"memory_style {style!r}: baking puts u in the system message ('append' or 'system')")
    if item.get("kind") == "prompt":  # an instruction: it joins the system prompt as it is
        return [{"role": "system", "content": f"{DEFAULT_SYSTEM}. {CHAT_MARKERS.sub('', item['text'])}"}]
    return messages_for("", item_memory(item), style)[:-1] or [{"role": "system", "content": DEFAULT_SYSTEM}]
