"""The gate: may a candidate replace the live version? A pure function of probe results and policy.

The trainer answers every probe set twice, with the candidate (the new delta on) and the live model
(the delta off); decide() turns those answers into a verdict. Nothing here talks to a model, so
every rule is unit-tested on plain data (tests/test_gate.py).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from . import probes
from .config import GateConfig

ITEMS = "items"  # the bake's own item probes (probes.item_probes)
LOCALITY = "locality"  # unrelated general knowledge (probes.locality_probes)
NEIGHBOURS = "neighbours"  # same kind of question, other subjects: must not name the bake's entities
CONTROLS = "controls"  # never-taught subjects: must not be answered more confidently than before
STALE = "stale"  # what items updated by this bake said: must not be answered more than before
OWN_RULES = (ITEMS, LOCALITY, NEIGHBOURS, CONTROLS, STALE)


@dataclass
class Verdict:
    passed: bool
    reason: str
    probes: dict  # probe set -> accuracy of the candidate
    live_probes: dict  # probe set -> accuracy of the live version it would replace
    locality: dict = field(default_factory=dict)  # unchanged (word for word) and kept, see probes.locality_scores
    knowledge: dict = field(default_factory=dict)  # leak, hallucination, stale: candidate and live
    learnt: list = field(default_factory=list)  # ids of the items whose probes the candidate answers
    missed: list = field(default_factory=list)  # ids of the items it does not (back to the queue if it goes live)
    unteachable: list = field(default_factory=list)  # of `missed`, those whose teacher answered none (not requeued)


def decide(candidate: dict[str, list[dict]], live: dict[str, list[dict]], policy: GateConfig,
           teacher: dict[str, list[dict]] | None = None) -> Verdict:
    """`candidate`, `live`: probe set -> scored results (probes.rescore dicts), same probes in the
    same order for both; `teacher`: the item probes' answers of the live model with each item in its
    prompt ({ITEMS: results}). Items are judged one by one, against what their teacher answers
    (judge_items), and the bake must have learnt at least one; no registered set may regress,
    general knowledge must be kept, the bake must not leak into neighbouring answers, invent answers
    about unknown subjects or keep answering what its items superseded. Those rules guard the rest
    of the model, so they hold for the whole bake: a bake that passes them goes live with the items
    it learnt, and the bakery requeues the others."""
    scores = {name: probes.accuracy(results) for name, results in candidate.items() if results}
    live_scores = {name: probes.accuracy(results) for name, results in live.items() if results}
    locality = {}
    if candidate.get(LOCALITY) and live.get(LOCALITY):
        locality = probes.locality_scores(live[LOCALITY], candidate[LOCALITY])
    knowledge = knowledge_scores(candidate, live)
    learnt, missed, unteachable = judge_items(candidate.get(ITEMS) or [], policy.min_item_accuracy,
                                              (teacher or {}).get(ITEMS) or [])
    problems = []
    if ITEMS in scores and not learnt:
        problems.append(f"learnt none of its {len(missed)} item(s): item probes answered {scores[ITEMS]:.2f}, "
                        f"an item needs {policy.min_item_accuracy:.2f} of those its teacher answers")
    for name, live_score in live_scores.items():
        if name in OWN_RULES or name not in scores:
            continue
        if scores[name] < live_score - policy.max_regression:
            problems.append(f"probe set '{name}' fell from {live_score:.2f} to {scores[name]:.2f}")
    if locality and locality["kept"] < policy.min_locality_kept:
        problems.append(f"general knowledge kept {locality['kept']:.2f} < {policy.min_locality_kept:.2f}")
    if "leak" in knowledge and knowledge["leak"] > policy.max_leak:
        problems.append(f"leaks into neighbouring answers: {knowledge['leak']:.2f} of them name the bake's "
                        f"entities ({', '.join(knowledge['leaked'][:3])}) > {policy.max_leak:.2f}")
    if "hallucination" in knowledge and \
            knowledge["hallucination"] > knowledge["live_hallucination"] + policy.max_hallucination_increase:
        problems.append(f"claims knowledge of never-taught subjects {knowledge['hallucination']:.2f} "
                        f"(live {knowledge['live_hallucination']:.2f})")
    if "stale" in knowledge and knowledge["stale"] > knowledge["live_stale"]:
        problems.append(f"answers the superseded state {knowledge['stale']:.2f} (live {knowledge['live_stale']:.2f})")
    learnt_note = f"learnt {len(learnt)} of {len(learnt) + len(missed)} items, " if missed else ""
    if unteachable:
        learnt_note += f"{len(unteachable)} of them unteachable (their teacher answered none of their questions), "
    reason = "; ".join(problems) or (
        f"{learnt_note}items {scores.get(ITEMS, 0):.2f} (live {live_scores.get(ITEMS, 0):.2f}), "
        f"general knowledge kept {locality.get('kept', 1.0):.2f}, leak {knowledge.get('leak', 0):.2f}, no regression")
    return Verdict(not problems, reason, scores, live_scores, locality, knowledge, learnt, missed, unteachable)


def judge_items(results: list[dict], min_share: float, teacher: list[dict] = ()) -> tuple[list, list, list]:
    """(learnt, missed, unteachable) item ids. A bake teaches what the prompted live model says
    (Prompt Baking), so an item is measured against its teacher (`teacher`: that model's answers to
    the item's probes, the item in its prompt): learnt when the candidate answers at least
    `min_share` of as many probes as the teacher does (`gate.min_item_accuracy`); of all of them
    where no teacher answers are given. An item whose teacher answered none of its probes and the
    candidate none either is unteachable: missed, and no later bake can do better (the bakery does
    not requeue it). Results without an item id (a delta trained before probes carried one) are
    judged together, as the id None."""
    hits: dict = defaultdict(list)
    for r in results:
        hits[r.get("item")].append(bool(r["correct"]))
    taught: dict = defaultdict(int)
    for r in teacher:
        taught[r.get("item")] += bool(r["correct"])
    told = {r.get("item") for r in teacher}
    learnt, unteachable = [], []
    for i, h in hits.items():
        answerable = taught[i] if i in told else len(h)
        if sum(h) >= min_share * answerable and (answerable or any(h) or not min_share):
            learnt.append(i)
        elif not answerable:
            unteachable.append(i)
    return learnt, [i for i in hits if i not in learnt], unteachable


def knowledge_scores(candidate: dict[str, list[dict]], live: dict[str, list[dict]]) -> dict:
    """leak: share of neighbour answers naming a bake entity that the live model's answers to the
    neighbours never named (so a name the model uses anyway, "United States", never counts);
    hallucination: share of control answers that claim something; stale: share answering the
    superseded state. Each for the candidate, the last two for the live model too."""
    out: dict = {}
    if candidate.get(NEIGHBOURS) and live.get(NEIGHBOURS):
        said = " ".join(r["answer"] for r in live[NEIGHBOURS])
        leaked, hits = [], 0
        for r in candidate[NEIGHBOURS]:
            names = [e for e in (r["expected"].split("|") if r["expected"] else [])
                     if probes.is_correct(r["answer"], [e]) and not probes.is_correct(said, [e])]
            hits += bool(names)
            leaked += [e for e in names if e not in leaked]
        out.update(leak=hits / len(candidate[NEIGHBOURS]), leaked=leaked)
    if candidate.get(CONTROLS) and live.get(CONTROLS):
        out.update(hallucination=probes.attempted(candidate[CONTROLS]), live_hallucination=probes.attempted(live[CONTROLS]))
    if candidate.get(STALE) and live.get(STALE):
        out.update(stale=probes.accuracy(candidate[STALE]), live_stale=probes.accuracy(live[STALE]))
    return out


# After a swap the served `memory` is asked a few item probes (bakery._check_served). vLLM's bf16
# kernels are not transformers', so a greedy answer may flip either way; one flip is not a verdict.
SERVED_FLIPS = 1


def served_problem(served: list[dict], candidate: list[dict], live: list[dict]) -> str | None:
    """Does the served model answer like the version that was tested? A swap that did not take (the
    old weights still served) answers like the live model. A problem only when the served model
    does no better than the live one AND got more than SERVED_FLIPS fewer right than the candidate
    did: a bake that taught one answer of three cannot be told from kernel noise, and is let through."""
    hits = {k: sum(bool(r["correct"]) for r in v) for k, v in (("served", served), ("candidate", candidate), ("live", live))}
    if hits["served"] <= hits["live"] and hits["candidate"] - hits["served"] > SERVED_FLIPS:
        return (f"the served memory answered {hits['served']} of {len(served)} item probes, no better than the "
                f"old version ({hits['live']}), against {hits['candidate']} tested")
    return None


# Probe answers are checked for keywords. General-knowledge and probe-set answers state them early;
# a news answer takes a sentence to get to the point.
GATE_MAX_TOKENS = 24
ITEM_MAX_TOKENS = 48


def probe_plan(items: list[dict], cfg) -> dict[str, dict]:
    """What the trainer asks the candidate and the live model: probe set -> {"probes", "max_tokens"}.
    The bake's items, every registered set (`gate.probe_sets`), general knowledge, neighbours,
    controls, and the stale states of the items this bake updates."""
    plan = {ITEMS: {"probes": probes.item_probes(items), "max_tokens": ITEM_MAX_TOKENS}}
    for name, probe_list in probes.registered_sets(cfg).items():
        plan[name] = {"probes": probe_list, "max_tokens": GATE_MAX_TOKENS}
    plan[LOCALITY] = {"probes": probes.locality_probes(), "max_tokens": GATE_MAX_TOKENS}
    plan[NEIGHBOURS] = {"probes": probes.neighbour_probes(items), "max_tokens": GATE_MAX_TOKENS}
    plan[CONTROLS] = {"probes": probes.control_probes(), "max_tokens": GATE_MAX_TOKENS}
    plan[STALE] = {"probes": probes.stale_probes(items), "max_tokens": ITEM_MAX_TOKENS}
    return {name: p for name, p in plan.items() if p["probes"]}
