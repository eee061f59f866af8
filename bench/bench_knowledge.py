"""Per-item recall by batch size, leaks into neighbouring answers, hallucination on controls. Not a test.

    .venv/bin/python bench/bench_knowledge.py [--quick] [--seeds 1] [--first-seed 0] [--sizes 1,5,20,40] [--singles 5]
                                              [--variant NAME=JSON ...] [--scales 1,1.2] [--stacked K]

Data: bench/data/knowledge.json, 40 fictional news facts (so the base model knows none) with held-out
questions of four kinds each (direct, paraphrase, reverse: from the object back to the subject,
implication: one hop), 150 neighbour questions (the same kinds of question about other subjects) and
25 controls (made-up subjects nobody baked). None of it is in the engine's templates or the gate's.

For each size N, one bake of the first N facts (N = 1: each of the first --singles facts in its own
bake), run as the daemon runs it (`python -m agent_memory.engine`, so the trainer's peak RSS is its
own). The first --singles facts are in every bake: their recall, against the one-fact bakes, is the
"recall does not fall with batch size" ratio. Each --variant (engine settings over the defaults) gets
the same bakes; `defaults` is always first. With --scales, each bake's delta is also measured merged at
those multiples of its weight (no new bake: how recall and drift move with the delta's size).

Measured on the baked model, greedy, no context: recall by question kind; leak = share of neighbour
answers naming an entity of the bake (the base model's share, with the same names, beside it);
hallucination = share of control answers claiming something; general knowledge kept and
KL(base||memory)/token on the locality questions (common.Locality). References on the first 20 facts
(or fewer): the base model with no context, all of them in context, and the right fact alone (oracle).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from common import PREPARED_MODEL, Locality, Report, context, load_model, log, parser, wilson
from knowledge import Evaluator, as_item, bake, by_kind, interval, load

from agent_memory import hardware, prompts

KINDS = ["direct", "paraphrase", "reverse", "implication"]
REFERENCE_FACTS = 20


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--first-seed", type=int, default=0, help="seeds run: first-seed .. first-seed + seeds - 1")
    p.add_argument("--sizes", default=None, help="batch sizes, comma-separated (default 1,5,20,40; --quick 1,5)")
    p.add_argument("--singles", type=int, default=None, help="facts baked alone for N=1 (default 5; --quick 2)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                   help="engine settings over the defaults to compare, e.g. 'before={\"steps_per_item\":0}'")
    p.add_argument("--skip-defaults", action="store_true", help="only the --variant settings")
    p.add_argument("--name", default="knowledge", help="results file name (bench/results/NAME.md)")
    p.add_argument("--stacked", type=int, default=0, metavar="K",
                   help="bake each N > K as stacked bakes of K facts, each on the ones before (rows 'VARIANT stacked K'): "
                   "what a daemon with bake.max_items K serves")
    p.add_argument("--scales", default="1", help="each bake's delta also evaluated times these, e.g. 1,1.2,1.4 "
                   "(rows 'VARIANT xS'): a stronger or weaker delta without another bake")
    args = p.parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(hardware.idle_cores())
    data = load("knowledge")
    sizes = [int(s) for s in (args.sizes or ("1,5" if args.quick else "1,5,20,40")).split(",")]
    singles = args.singles or (2 if args.quick else 5)
    scales = [float(s) for s in args.scales.split(",")]
    variants = ({} if args.skip_defaults else {"defaults": {}}) | \
        {k: json.loads(v) for k, _, v in (e.partition("=") for e in args.variant)}
    entries = data["items"]
    shared = entries[:singles]
    ctx = context(0, args.quick)
    report = Report(args.name, "Knowledge: recall by batch size, leaks, hallucination", ctx)

    tok = AutoTokenizer.from_pretrained(PREPARED_MODEL)
    base = load_model()
    evaluate = Evaluator(base, tok, data)
    locality = Locality(base, tok)
    work = Path(tempfile.mkdtemp(prefix="bench-knowledge-"))
    rows = []
    for name, overrides in variants.items():
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            config = {**overrides, "seed": seed}
            for n in sizes:
                groups = [[e] for e in shared] if n == 1 else [entries[:n]]
                measured, costs = {s: ([], []) for s in scales}, []  # scale -> (results, effects)
                for g, group in enumerate(groups):
                    deltas = stacked_bakes(group, work / f"{name}-s{seed}-n{n}-{g}", config, args.stacked, costs)
                    for s, (results, effects) in measured.items():
                        model = load_model(deltas, scale=s)
                        results += evaluate.recall(model, group)
                        effects.append(evaluate.side_effects(model, [as_item(e) for e in group]) | locality(model))
                        del model
                for s, (results, effects) in measured.items():
                    label = (name if s == 1 else f"{name} x{s:g}") + \
                        (f" stacked {args.stacked}" if 0 < args.stacked < n else "")
                    rows.append({"variant": label, "seed": seed, "n": n, "results": results, "effects": effects,
                                 "costs": costs})
                    log(f"{label} seed {seed} N={n}: recall {by_kind(results)}, shared "
                        f"{by_kind([r for r in results if r['fact'] in {e['id'] for e in shared}])['all']:.2f}, "
                        + ", ".join(f"{k} {mean(e[k] for e in effects):.3f}" for k in
                                    ("leak", "base_leak", "hallucination", "base_hallucination", "kept", "kl"))
                        + f"; leak by relation: {by_relation(effects)}")
    # All N facts in one context costs N times the prompt: past 20 facts (~800 tokens) the CPU takes
    # longer over the references than over the bakes, so they are measured on the first 20.
    references = reference_rows(evaluate, base, entries[:min(max(sizes), REFERENCE_FACTS)])
    write(report, rows, references, shared, variants, args.seeds)
    return 0


def stacked_bakes(group: list[dict], out: Path, config: dict, size: int, costs: list) -> list[Path]:
    """The group baked in one bake, or (0 < size < its length) in bakes of `size` facts, each on
    the ones before, their facts its earlier items. Returns the deltas, oldest first; each bake's
    cost goes to `costs`."""
    if not 0 < size < len(group):
        costs.append(bake([as_item(e) for e in group], out, config))
        return [out]
    deltas: list[Path] = []
    for start in range(0, len(group), size):
        part = out.with_name(f"{out.name}-part{start}")
        costs.append(bake([as_item(e) for e in group[start:start + size]], part, config, on=deltas,
                          earlier=[as_item(e) for e in group[:start]]))
        deltas.append(part)
    return deltas


def reference_rows(evaluate: Evaluator, base, entries: list[dict]) -> dict[str, list[dict]]:
    """The base model with no context, all the facts in context, and the right fact alone (oracle)."""
    everything = "\n".join(prompts.item_memory(as_item(e)) for e in entries)
    log(f"references on {len(entries)} facts: no context, all in context, oracle ...")
    return {"no context": evaluate.recall(base, entries),
            f"all {len(entries)} in context": evaluate.recall(base, entries, everything),
            "oracle (the right fact in context)": evaluate.recall(base, entries, lambda e: prompts.item_memory(as_item(e)))}


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def write(report: Report, rows: list[dict], references: dict, shared: list[dict], variants: dict, seeds: int) -> None:
    shared_ids = {e["id"] for e in shared}
    single = {(r["variant"], r["seed"]): by_kind([x for x in r["results"] if x["fact"] in shared_ids])["all"]
              for r in rows if r["n"] == 1}
    table = []
    for r in rows:
        kinds = by_kind(r["results"])
        mine = by_kind([x for x in r["results"] if x["fact"] in shared_ids])["all"]
        alone = single.get((r["variant"], r["seed"]))
        costs = r["costs"]
        table.append([r["variant"], r["seed"], r["n"], mine, f"{mine / alone:.2f}" if alone else "-",
                      *[kinds.get(k, float("nan")) for k in KINDS], kinds["all"],
                      interval(kinds["all"], len(r["results"])),
                      mean(c["wall_s"] for c in costs), mean(c["timings"]["teacher_s"] for c in costs),
                      mean(c["timings"]["train_s"] for c in costs), mean(c["steps"] for c in costs),
                      max(c["peak_rss_gib"] for c in costs)])
    report.table(f"Recall by batch size (the first {len(shared)} facts are in every bake; N=1: each baked alone)",
                 ["variant", "seed", "N", f"recall of the {len(shared)}", "vs alone", *KINDS, "all N",
                  "95% Wilson", "bake s", "teacher s", "train s", "steps", "trainer peak RSS GiB"], table,
                 note="Bake seconds: the whole trainer subprocess (load, teacher, training, save), one bake "
                      "(N=1: the mean of the single bakes); a row 'VARIANT xS' is that bake's delta merged at S times its "
                      "weight (--scales). Variants: " +
                      "; ".join(f"`{k}` = `{json.dumps(v)}`" for k, v in variants.items()))
    side = []
    for r in rows:
        e = r["effects"]
        side.append([r["variant"], r["seed"], r["n"], mean(x["leak"] for x in e), mean(x["base_leak"] for x in e),
                     mean(x["hallucination"] for x in e), mean(x["base_hallucination"] for x in e),
                     mean(x["kept"] for x in e), mean(x["kl"] for x in e), by_relation(e)])
    n_neigh, n_ctrl = rows[0]["effects"][0]["neighbours"], rows[0]["effects"][0]["controls"]
    report.table(f"Side effects ({n_neigh} neighbour questions, {n_ctrl} controls; 56 general-knowledge questions)",
                 ["variant", "seed", "N", "leak", "leak (base)", "hallucination", "hallucination (base)",
                  "knowledge kept", "KL(base||memory)/token", "leak by relation"], side,
                 note="Leak: the share of neighbour answers naming an entity of the bake; the base model's share "
                      "with the same names is what it says anyway. Examples of leaks in the largest bake of "
                      f"each variant: {examples(rows)}")
    ref = []
    for name, results in references.items():
        kinds = by_kind(results)
        ref.append([name, *[kinds.get(k, float("nan")) for k in KINDS], kinds["all"],
                    interval(kinds["all"], len(results))])
    facts = len({r["fact"] for r in references["no context"]})
    biggest = max((r["n"] for r in rows if r["n"] <= facts), default=max(r["n"] for r in rows))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        per_seed = [by_kind(r["results"]) for r in rows if r["variant"] == variant and r["n"] == biggest]
        if per_seed:
            overall = mean(k["all"] for k in per_seed)
            ref.append([f"baked ({variant}, N={biggest}, {len(per_seed)} seed(s))",
                        *[mean(k.get(x, float("nan")) for k in per_seed) for x in KINDS], overall,
                        "{:.2f}-{:.2f}".format(*wilson(overall, len(references["no context"]) * len(per_seed)))])
    report.table(f"Baked against prompting, the first {facts} facts (baked: the bake of N={biggest})",
                 ["condition", *KINDS, "all", "95% Wilson"], ref)
    report.finish()


def by_relation(effects: list[dict]) -> str:
    """The leak by kind of neighbour question ("prize 0.17, election 0.06, ..."), over the bakes of a row."""
    relations = dict.fromkeys(rel for e in effects for rel in e.get("leak_by_relation", {}))
    return ", ".join(f"{rel} {mean(e['leak_by_relation'][rel] for e in effects):.2f}" for rel in relations)


def examples(rows: list[dict]) -> str:
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        biggest = max((r for r in rows if r["variant"] == variant), key=lambda r: r["n"])
        shown = [x for e in biggest["effects"] for x in e["leak_examples"]][:2]
        out.append(f"{variant}: " + (" / ".join(f"\"{s}\"" for s in shown) if shown else "none"))
    return "; ".join(out) + "."


if __name__ == "__main__":
    sys.exit(main())
