"""Updates that supersede: a feed baked in two rounds, the second carrying updates of the first. Not a test.

    .venv/bin/python bench/bench_updates.py [--quick] [--seeds 1] [--link auto|explicit|none]
                                            [--config JSON] [--round1 DIR] [--recompose]

Data: bench/data/updates.json, 12 fictional stories, each an earlier report and a later one that
changes the state (a transfer that collapsed, a resignation, a re-dating...), with a question about
the current state (`new` keywords right, `stale` keywords the old answer) and one about the past.
Round 1 bakes every earlier report in one bake; round 2 bakes every later report in one bake on top
of it, as the daemon stacks deltas. How round 2 knows which items it updates (--link):
  auto      as the daemon links a feed's items: probes.updated_by (same named subject)
  explicit  every pair linked, as `remember --supersedes` does
  none      no link: the later reports baked as unrelated news (what the daemon did before)
After round 2, greedy and without context: latest state answered (target >= 0.8), stale answer
given (target <= 0.1), the past question answered. After round 1 the same questions show what the
model had learnt to say before the update. --config: engine settings over the defaults, both rounds;
--round1: an earlier run's round-1 delta (seed 0) instead of baking round 1 again, to compare round-2
settings on the same starting model. --recompose: round 2 on the base instead, round 1's delta dropped
and the earlier reports no update links baked again beside the updates (what `forget` does to a
bake: the stale state leaves with its delta). --ceiling: also the teacher's ceiling, the same questions asked
of the base and the round-1 model with the update in their context, written five ways (MEMORIES).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from common import PREPARED_MODEL, Report, context, load_model, log, parser
from knowledge import TOKENS, bake, interval, load

from agent_memory import hardware, probes, prompts


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--link", action="append", choices=["auto", "explicit", "none"], default=None,
                   help="how round 2 links its updates (repeatable; default: auto and none)")
    p.add_argument("--round1", type=Path, help="a round-1 delta to reuse (seed 0): only round 2 is baked")
    p.add_argument("--ceiling", action="store_true", help="also the teacher's ceiling (MEMORIES, base and round 1)")
    p.add_argument("--recompose", action="store_true",
                   help="round 2 without round 1's delta: the updates and the earlier reports none of them "
                        "links baked together on the base (as forget drops a bake and re-queues its mates)")
    args = p.parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(hardware.idle_cores())
    pairs = load("updates")["pairs"][: 4 if args.quick else None]
    links = args.link or ["auto", "none"]
    tok = AutoTokenizer.from_pretrained(PREPARED_MODEL)
    report = Report("updates", f"Updates that supersede: {len(pairs)} stories baked in two rounds", context(0, args.quick))
    work = Path(tempfile.mkdtemp(prefix="bench-updates-"))
    before = [{"id": i + 1, "kind": "fact", "text": p["before"]["text"], "valid_at": p["before"]["valid_at"],
               "source": "bench"} for i, p in enumerate(pairs)]
    rows = []
    for seed in range(args.seeds):
        config = {**json.loads(args.config), "seed": seed}
        first = {"dir": args.round1, "wall_s": "-"} if args.round1 and seed == 0 else \
            bake(before, work / f"round1-s{seed}", config)
        after_round1 = ask(load_model([first["dir"]]), tok, pairs)
        if args.ceiling and seed == 0:
            report.table("The teacher's ceiling: greedy answers with the update in the context",
                         ["model", "memory (u)", "latest state", "stale answer", "past answered"],
                         [[name, memory, *scores(ask(model, tok, pairs, memory))]
                          for name, model in (("base", load_model([])), ("round 1", load_model([first["dir"]])))
                          for memory in MEMORIES],
                         note="The engine's u is prompts.item_memory (earlier report, then the latest).")
        rows.append(["after round 1", seed, "-", *scores(after_round1), first["wall_s"], "-"])
        for link in links:
            after = [{"id": 100 + i, "kind": "fact", "text": p["after"]["text"], "valid_at": p["after"]["valid_at"],
                      "source": "bench", "supersedes": i + 1 if link == "explicit" else None}
                     for i, p in enumerate(pairs)]
            linked = 0
            for item in after:
                updates = probes.updated_by(item, before) if link != "none" else []
                item["updates"] = [{"id": u["id"], "text": u["text"], "valid_at": u["valid_at"]} for u in updates]
                linked += bool(updates)
            if args.recompose:  # the superseded bake dropped: its reports no update links are baked again
                linked_ids = {u["id"] for item in after for u in item["updates"]}
                mates = [b for b in before if b["id"] not in linked_ids]
                second = bake(after + mates, work / f"round2-{link}-recomposed-s{seed}", config)
                deltas = [second["dir"]]
            else:
                second = bake(after, work / f"round2-{link}-s{seed}", config, on=[first["dir"]], earlier=before)
                deltas = [first["dir"], second["dir"]]
            results = ask(load_model(deltas), tok, pairs)
            recomposed = ", round 1's delta dropped" if args.recompose else ""
            rows.append([f"after round 2, link {link}{recomposed}", seed, f"{linked}/{len(pairs)}", *scores(results),
                         second["wall_s"], examples(results)])
            log(f"seed {seed} link {link}: {scores(results)}")
    n = len(pairs)
    report.table(f"{n} update pairs, greedy answers without context",
                 ["model", "seed", "pairs linked", "latest state", "95% Wilson", "stale answer", "95% Wilson",
                  "past answered", "bake s", "examples (question -> answer)"],
                 [r[:3] + [r[3], interval(r[3], n), r[4], interval(r[4], n), r[5]] + r[6:] for r in rows],
                 note="Targets (after round 2): latest state >= 0.8, stale answer <= 0.1. `stale answer` counts answers "
                      "naming the old state's keywords without the new state's.")
    report.finish()
    return 0


# The update in the teacher's context, written five ways (x: the earlier report, y: the update).
MEMORIES = {
    "the engine's u": lambda x, y: prompts.item_memory({"kind": "fact", "text": y, "updates": [{"text": x}]}),
    "update only": lambda x, y: y,
    "latest first": lambda x, y: f"{y}\n(Out of date: an earlier report said: {x})",
    "correction": lambda x, y: f"Correction. Earlier report, no longer true: {x}\nWhat is true now: {y}",
    "update twice": lambda x, y: f"{y}\nEarlier report (out of date): {x}\nLatest, true now: {y}",
}


def ask(model, tok, pairs: list[dict], memory: str | None = None) -> list[dict]:
    """Each pair's current-state and past questions, greedy, graded against the new, stale and past
    keywords; with `memory` (a MEMORIES key), the pair's update written that way in the context."""
    def run(question, answers):
        if memory is None:
            return probes.run_local(model, tok, [{"question": p[question], "answers": p[answers]} for p in pairs],
                                    max_new_tokens=TOKENS)
        return [probes.run_local(model, tok, [{"question": p[question], "answers": p[answers]}], max_new_tokens=TOKENS,
                                 memory=MEMORIES[memory](p["before"]["text"], p["after"]["text"]))[0] for p in pairs]

    current, past = run("question", "new"), run("past_question", "past")
    return [{"question": p["question"], "answer": c["answer"], "latest": c["correct"],
             "stale": probes.is_correct(c["answer"], p["stale"]) and not c["correct"], "past": q["correct"]}
            for p, c, q in zip(pairs, current, past)]


def scores(results: list[dict]) -> list[float]:
    n = len(results)
    return [sum(r["latest"] for r in results) / n, sum(r["stale"] for r in results) / n,
            sum(r["past"] for r in results) / n]


def examples(results: list[dict]) -> str:
    return " / ".join(f"{r['question']} -> {r['answer'][:70]}" for r in results[:2])


if __name__ == "__main__":
    sys.exit(main())
