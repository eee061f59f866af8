"""6. probe: the gate's questions, candidate, live and teacher, in this process.

The gate's questions (gate.probe_plan), answered greedily by the live model (before training), by
its teacher (the live model with the item in its prompt: the item questions only) and by the
candidate (the new delta merged in): here, where the model already sits in memory, not through the
model server (the gate decides on the answers, gate.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..gate import ITEMS
from ..probes import generate_local, run_local, scored
from ..prompts import messages_for, teacher_system


def probe_live(model, tokenizer, plan: dict[str, dict], live_cache: Path | None = None,
               items: list[dict] = (), memory_style: str = "append") -> tuple[dict, dict]:
    """(live, teacher): the live model's answers to the gate's questions, {set: results}, asked of
    the plain live model before the delta is added; and its answers as the teacher, with each item
    in its prompt as the bake's teacher has it, to that item's questions ({ITEMS: results}; empty
    without `items`): what the prompted model says is all a bake can teach (gate.judge_items).
    Both only change when the live version does, so they are kept in `live_cache` (one file per live
    version, answers by question and context) and asked again only where not answered there; each
    bake scores them against its own keywords."""
    cache = json.loads(live_cache.read_text()) if live_cache and live_cache.exists() else {}
    contexts = {i.get("id"): teacher_system(i, memory_style) for i in items}
    live, teacher = {}, {}
    for name, entry in plan.items():
        live[name] = _answered(model, tokenizer, entry["probes"], entry["max_tokens"], cache)
        if name == ITEMS and contexts:
            taught = [p for p in entry["probes"] if p.get("item") in contexts]
            teacher[name] = _answered(model, tokenizer, taught, entry["max_tokens"], cache, contexts)
    if live_cache:
        live_cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = live_cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, live_cache)
    return live, teacher


def _answered(model, tokenizer, probes_: list[dict], tokens: int, cache: dict, contexts: dict | None = None) -> list[dict]:
    """Greedy answers to `probes_`, bare or each with its item's teacher context (`contexts`), from
    `cache` where there (updated with the rest), scored."""
    def conversation(p):
        return (contexts[p["item"]] + [{"role": "user", "content": p["question"]}]) if contexts else messages_for(p["question"])

    keys = [json.dumps([tokens, contexts[p["item"]], p["question"]]) if contexts else f"answer|{tokens}|{p['question']}"
            for p in probes_]
    missing = {k: p for p, k in zip(probes_, keys) if k not in cache}
    if missing:
        answered = generate_local(model, tokenizer, [conversation(p) for p in missing.values()], max_new_tokens=tokens)
        cache.update({k: [answer, score] for k, (answer, score) in zip(missing, answered)})
    return [scored(p, *cache[k]) for p, k in zip(probes_, keys)]


def probe_candidate(peft_model, tokenizer, plan: dict[str, dict], progress=None) -> dict:
    """The candidate's answers: {set: results}. The delta is merged into the weights while it
    answers (a LoRA branch on every MLP doubles a decoding step's small operations), then taken out."""
    peft_model.eval()
    peft_model.merge_adapter()
    try:
        out = {}
        for done, (name, entry) in enumerate(plan.items(), 1):
            out[name] = run_local(peft_model, tokenizer, entry["probes"], max_new_tokens=entry["max_tokens"])
            if progress:
                progress("probe", done, len(plan))
        return out
    finally:
        peft_model.unmerge_adapter()

