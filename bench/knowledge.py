"""What the knowledge benchmarks share: held-out fictional news (bench/data/), bakes in a subprocess
as the daemon runs them, and one evaluator for recall by probe kind, leaks and hallucination.

Not a benchmark itself (bench_knowledge.py, bench_updates.py use it).
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import BENCH, PREPARED_MODEL, log, wilson

from agent_memory import adapters, probes

DATA = BENCH / "data"
TOKENS = 48  # as the gate's item probes: a news answer takes a sentence to get to the point


def load(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text())


def as_item(entry: dict, kind: str = "fact") -> dict:
    """A data entry as the daemon would queue it (a posted fact)."""
    return {"id": entry["id"], "kind": kind, "text": entry["text"], "valid_at": entry.get("valid_at"),
            "title": None, "source": "bench"}


def bake(items: list[dict], out_dir: Path, config: dict, on: list[Path] = (), earlier: list[dict] = ()) -> dict:
    """One bake through `python -m agent_memory.engine JOB.json`, the daemon's trainer subprocess,
    on top of the deltas `on` (its live model: their exact sum, as the daemon stacks bakes); returns
    bake.json plus wall seconds and the trainer's peak RSS (GiB, from wait4)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    live_adapter = None
    if on:
        live_adapter = out_dir.with_name(out_dir.name + "-live")
        adapters.compose(list(on), live_adapter, max_rank=10**6)  # no compaction: the exact sum
    job = out_dir.with_suffix(".job.json")
    job.write_text(json.dumps({"model_dir": str(PREPARED_MODEL), "live_adapter": str(live_adapter) if live_adapter else None,
                               "items": items, "out_dir": str(out_dir), "config": config, "earlier": list(earlier)}))
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "agent_memory.engine", str(job)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail = []
    for line in process.stdout:
        tail = (tail + [line.rstrip()])[-20:]
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"bake failed ({process.returncode}):\n" + "\n".join(tail))
    report = json.loads((out_dir / "bake.json").read_text())
    report.update(wall_s=time.monotonic() - started, peak_rss_gib=usage.ru_maxrss / 2**20, dir=out_dir)
    log(f"baked {len(items)} items in {report['wall_s']:.0f} s ({report['steps']} steps, "
        f"timings {report['timings']}, peak RSS {report['peak_rss_gib']:.2f} GiB)")
    return report


def item_probes(entries: list[dict]) -> list[dict]:
    """The data's own questions about these entries, each with its kind and item id."""
    return [{"question": p["question"], "answers": p["answers"], "kind": p["kind"], "fact": e["id"]}
            for e in entries for p in e["probes"]]


class Evaluator:
    """Greedy answers of a model to the items' questions, the neighbour questions and the controls.

    recall by kind; leak = share of neighbour answers naming an entity of the baked items (the same
    count for the base model is the floor: names it would say anyway), except the names of a baked
    item that answers the question (its "answered_by": "where was the most recent strong earthquake?"
    after a bake of an earthquake); hallucination = share of control answers that claim something
    (probes.grade: not "I don't know")."""

    def __init__(self, base, tokenizer, data: dict):
        self.tok, self.data = tokenizer, data
        self.neighbours = [{"question": n["question"], "answers": [], "kind": "neighbour", "relation": n.get("relation", ""),
                            "answered_by": n.get("answered_by", [])} for n in data["neighbours"]]
        self.controls = [{"question": c["question"], "answers": [], "kind": "control"} for c in data["controls"]]
        self.base_neighbours = self._ask(base, self.neighbours)
        self.base_controls = self._ask(base, self.controls)

    def _ask(self, model, probe_list: list[dict], memory: str | None = None) -> list[dict]:
        return [{**p, **r} for p, r in zip(probe_list, probes.run_local(model, self.tok, probe_list, memory=memory,
                                                                         max_new_tokens=TOKENS))]

    def recall(self, model, entries: list[dict], memory=None) -> list[dict]:
        """Results of the entries' questions; `memory`: a context for all (str) or per item (callable)."""
        probe_list = item_probes(entries)
        if callable(memory):
            out = []
            for e in entries:
                out += self._ask(model, [p for p in probe_list if p["fact"] == e["id"]], memory(e))
            return out
        return self._ask(model, probe_list, memory)

    def side_effects(self, model, baked: list[dict]) -> dict:
        """leak (memory and base) on the neighbours, hallucination (memory and base) on the controls."""
        names = probes.bake_entities(baked)
        answering = {i["id"]: set(probes.bake_entities([i])) for i in baked}

        def leak(results):
            hits = []
            for r in results:
                right = set().union(*(answering.get(i, set()) for i in r["answered_by"]))
                if any(probes.is_correct(r["answer"], [n]) for n in names
                       if n.lower() not in r["question"].lower() and n not in right):
                    hits.append(r)
            return len(hits) / len(results), hits

        memory_leak, examples = leak(self._ask(model, self.neighbours))
        base_leak, _ = leak(self.base_neighbours)
        controls = self._ask(model, self.controls)
        relations = collections.Counter(n["relation"] for n in self.neighbours)
        leaked = collections.Counter(r["relation"] for r in examples)
        return {"leak": memory_leak, "base_leak": base_leak, "neighbours": len(self.neighbours),
                "leak_by_relation": {rel: leaked[rel] / count for rel, count in relations.items()},
                "leak_examples": [f"{r['question']} -> {r['answer'][:90]}" for r in examples[:3]],
                "hallucination": probes.attempted(controls), "base_hallucination": probes.attempted(self.base_controls),
                "controls": len(self.controls)}


def by_kind(results: list[dict]) -> dict[str, float]:
    kinds = sorted({r["kind"] for r in results})
    return {k: probes.accuracy([r for r in results if r["kind"] == k]) for k in kinds} | {"all": probes.accuracy(results)}


def interval(p: float, n: int) -> str:
    return "{:.2f}-{:.2f}".format(*wilson(p, n))
