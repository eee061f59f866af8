"""6. probe: the gate's questions, candidate and live, in this process.

The gate's questions (gate.probe_plan), answered greedily by the live model (before training) and
the candidate (the new delta merged in): here, where the model already sits in memory, not through
the model server (the gate decides on the answers, gate.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..probes import run_local, scored


def probe_live(model, tokenizer, plan: dict[str, dict], live_cache: Path | None = None) -> dict:
    """The live model's answers to the gate's questions: {set: results}, asked of the plain live
    model before the delta is added. They only change when the live version does, so they are kept
    in `live_cache` (one file per live version, answers by question) and asked again only for
    questions not answered there; each bake scores them against its own keywords."""
    cache = json.loads(live_cache.read_text()) if live_cache and live_cache.exists() else {}
    out = {}
    for name, entry in plan.items():
        probes_, tokens = entry["probes"], entry["max_tokens"]
        keys = [f"answer|{tokens}|{p['question']}" for p in probes_]
        missing = {k: p for p, k in zip(probes_, keys) if k not in cache}
        if missing:
            answered = run_local(model, tokenizer, list(missing.values()), max_new_tokens=tokens)
            cache.update({k: [r["answer"], r["score"]] for k, r in zip(missing, answered)})
        out[name] = [scored(p, *cache[k]) for p, k in zip(probes_, keys)]
    if live_cache:
        live_cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = live_cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, live_cache)
    return out


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

