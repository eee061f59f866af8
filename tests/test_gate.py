"""gate.decide on plain data: each rule, and the reason a person reads in history."""

from __future__ import annotations

from agent_memory import gate
from agent_memory.config import GateConfig


def results(*rights: bool, expected: str = "x") -> list[dict]:
    return [{"question": f"q{i}", "expected": expected, "answer": "a" if r else "b", "correct": r}
            for i, r in enumerate(rights)]


def test_a_candidate_that_learnt_and_kept_everything_passes():
    candidate = {"items": results(True, True), "durov": results(True, False), "locality": results(True, True)}
    live = {"items": results(False, False), "durov": results(True, False), "locality": results(True, True)}
    verdict = gate.decide(candidate, live, GateConfig())
    assert verdict.passed and verdict.probes["items"] == 1.0 and verdict.live_probes["items"] == 0.0
    assert verdict.locality == {"unchanged": 1.0, "kept": 1.0}


def test_each_rule_rejects_with_its_reason():
    live = {"items": results(False, False), "durov": results(True, True, True, True),
            "locality": results(True, True, True, True)}
    unlearnt = {**live, "items": results(True, False, False)}
    assert gate.decide(unlearnt, live, GateConfig()).reason == "items learned 0.33 < 0.50"
    regressed = {**live, "items": results(True), "durov": results(True, True, False, False)}
    assert gate.decide(regressed, live, GateConfig()).reason == "probe set 'durov' fell from 1.00 to 0.50"
    forgetful = {**live, "items": results(True), "locality": results(True, True, True, False)}
    assert gate.decide(forgetful, live, GateConfig()).reason == "general knowledge kept 0.75 < 0.90"
    assert gate.decide(forgetful, live, GateConfig(min_locality_kept=0.75)).passed


def test_locality_counts_only_questions_the_live_model_knew():
    live = {"locality": results(True, False) + results(True, expected="")}
    candidate = {"locality": results(True, True) + results(False, expected="")}
    verdict = gate.decide(candidate, live, GateConfig())
    assert verdict.locality["kept"] == 1.0  # the unknown one and the no-answer one do not count


def test_a_max_regression_below_zero_demands_an_improvement():
    same = {"durov": results(True, False)}
    assert not gate.decide(same, same, GateConfig(max_regression=-0.1)).passed
    assert gate.decide(same, same, GateConfig()).passed
