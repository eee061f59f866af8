"""The gate: may a candidate replace the live version? A pure function of probe results and policy.

The trainer answers every probe set twice, with the candidate (the new delta on) and the live model
(the delta off); decide() turns those answers into a verdict. Nothing here talks to a model, so
every rule is unit-tested on plain data (tests/test_gate.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import probes
from .config import GateConfig

ITEMS = "items"  # the bake's own item probes (probes.item_probes)
LOCALITY = "locality"  # unrelated general knowledge (probes.locality_probes)


@dataclass
class Verdict:
    passed: bool
    reason: str
    probes: dict  # probe set -> accuracy of the candidate
    live_probes: dict  # probe set -> accuracy of the live version it would replace
    locality: dict = field(default_factory=dict)  # unchanged (word for word) and kept, see probes.locality_scores


def decide(candidate: dict[str, list[dict]], live: dict[str, list[dict]], policy: GateConfig) -> Verdict:
    """`candidate`, `live`: probe set -> scored results (probes._result dicts), same probes in the
    same order for both. Items must be learnt, no registered set may regress, general knowledge
    must be kept."""
    scores = {name: probes.accuracy(results) for name, results in candidate.items() if results}
    live_scores = {name: probes.accuracy(results) for name, results in live.items() if results}
    locality = {}
    if candidate.get(LOCALITY) and live.get(LOCALITY):
        locality = probes.locality_scores(live[LOCALITY], candidate[LOCALITY])
    problems = []
    if ITEMS in scores and scores[ITEMS] < policy.min_item_accuracy:
        problems.append(f"items learned {scores[ITEMS]:.2f} < {policy.min_item_accuracy:.2f}")
    for name, live_score in live_scores.items():
        if name in (ITEMS, LOCALITY) or name not in scores:
            continue
        if scores[name] < live_score - policy.max_regression:
            problems.append(f"probe set '{name}' fell from {live_score:.2f} to {scores[name]:.2f}")
    if locality and locality["kept"] < policy.min_locality_kept:
        problems.append(f"general knowledge kept {locality['kept']:.2f} < {policy.min_locality_kept:.2f}")
    reason = "; ".join(problems) or (
        f"items {scores.get(ITEMS, 0):.2f} (live {live_scores.get(ITEMS, 0):.2f}), "
        f"general knowledge kept {locality.get('kept', 1.0):.2f}, no regression")
    return Verdict(not problems, reason, scores, live_scores, locality)



# Probe answers are checked for keywords. General-knowledge and probe-set answers state them early;
# a news answer takes a sentence to get to the point.
GATE_MAX_TOKENS = 24
ITEM_MAX_TOKENS = 48


def probe_plan(items: list[dict], cfg) -> dict[str, dict]:
    """What the trainer asks the candidate and the live model: probe set -> {"probes", "max_tokens"}.
    The bake's items, every registered set (`gate.probe_sets`), general knowledge."""
    plan = {ITEMS: {"probes": probes.item_probes(items), "max_tokens": ITEM_MAX_TOKENS}}
    for name, probe_list in probes.registered_sets(cfg).items():
        plan[name] = {"probes": probe_list, "max_tokens": GATE_MAX_TOKENS}
    plan[LOCALITY] = {"probes": probes.locality_probes(), "max_tokens": GATE_MAX_TOKENS}
    return {name: p for name, p in plan.items() if p["probes"]}
