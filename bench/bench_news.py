"""Twenty-one headlines baked at once, against prompting with all of them or only the right one. Not a test.

    .venv/bin/python bench/bench_news.py [--quick] [--seeds 1] [--engine KEY=JSON] [--teacher vllm]

The real 2024 headlines of feeds/sample-news.xml become items exactly as the daemon queues them
(feeds.entry_to_item) and go into ONE bake (one delta) on the embedded model, with the engine's
default settings (`--engine samples_per_query=3` overrides one; `--teacher vllm` samples the teacher
from a vLLM server started for the bake, writing results/news_vllm_teacher.md). Probes: probes/news2024.json, one
question and one paraphrase per headline. Conditions, all greedy:
  no prompt        the base model alone
  all in context   the base model prompted with every headline (the realistic alternative to baking)
  oracle           the base model prompted with only the headline the question is about
  baked            the baked model, no context (what `memory` answers)
  baked + all      the baked model prompted with every headline
Gap closed = (baked - no prompt) / (prompted - no prompt), against all-in-context and against the oracle.
Also the bake's cost (the issue's target: 20 headlines in <= 5 min on 2 cores), the trainer's peak
RSS, and locality of the baked model (bench_baking.py's measures). --quick: 5 headlines, 1 seed.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from common import (PREPARED_MODEL, Locality, Report, context, feed_items, load_model, log, parser, running_daemon,
                    wilson)

from agent_memory import hardware, probes, prompts
from agent_memory.engine.bake import bake
from agent_memory.engine.config import EngineConfig


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=1, help="bakes with seeds 0..N-1 (default 1: a bake is minutes)")
    p.add_argument("--engine", action="append", default=[], metavar="KEY=JSON", help="an EngineConfig setting ([bake.engine]); repeatable")
    p.add_argument("--teacher", choices=["local", "vllm"], default="local",
                   help="vllm: sample the teacher from the daemon's vLLM (started for the bake) instead of in-process")
    args = p.parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(hardware.idle_cores())
    items = feed_items()
    probe_list = probes.load_set("news2024")
    if args.quick:
        keep = list(items)[:5]
        items = {k: items[k] for k in keep}
        probe_list = [q for q in probe_list if q["fact"] in items]
    overrides = {k: json.loads(v) for k, _, v in (e.partition("=") for e in args.engine)}
    ctx = context(0, args.quick)
    name = "news" if args.teacher == "local" else "news_vllm_teacher"
    report = Report(name, f"{len(items)} headlines in one bake (teacher: {args.teacher})", ctx)

    # Bake first, in a fresh process state, so the peak RSS below is the trainer's own.
    if args.teacher == "vllm":
        with running_daemon("news") as daemon:  # its `memory` is the base model: no bake yet
            bakes = bake_all(items, {**overrides, "teacher": "vllm", "teacher_url": daemon.vllm,
                                      "teacher_api_key": daemon.model_key}, args.seeds)
    else:
        bakes = bake_all(items, overrides, args.seeds)
    trainer_peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    tok = AutoTokenizer.from_pretrained(PREPARED_MODEL)
    memory = {key: prompts.item_memory(item) for key, item in items.items()}
    everything = "\n".join(memory.values())
    base = load_model()
    log("scoring the base model: no prompt, all in context, oracle ...")
    rows = {"no prompt": score(base, tok, probe_list, lambda q: None),
            "all in context": score(base, tok, probe_list, lambda q: everything),
            "oracle": score(base, tok, probe_list, lambda q: memory[q["fact"]])}
    measure_locality = Locality(base, tok)
    baked_rows, locality = {"baked": [], "baked + all": []}, []
    for b in bakes:
        model = load_model([b["dir"]])
        baked_rows["baked"].append(score(model, tok, probe_list, lambda q: None))
        baked_rows["baked + all"].append(score(model, tok, probe_list, lambda q: everything))
        scores = measure_locality(model)
        locality.append(scores)
        log(f"seed {b['seed']}: baked {probes.accuracy(baked_rows['baked'][-1]):.3f}, locality {scores}")
    write_report(report, items, probe_list, rows, baked_rows, bakes, locality, trainer_peak_gib,
                 {k: v for k, v in bakes[0]["config"].items() if k != "teacher_url" and v != getattr(EngineConfig(), k)})
    return 0


def bake_all(items: dict, overrides: dict, seeds: int) -> list[dict]:
    work = Path(tempfile.mkdtemp(prefix="bench-news-"))
    bakes = []
    for seed in range(seeds):
        cfg = EngineConfig.from_dict({**overrides, "seed": seed})
        log(f"baking {len(items)} headlines, seed {seed}, teacher {cfg.teacher} ...")
        started = time.monotonic()
        result = bake(PREPARED_MODEL, None, list(items.values()), work / f"news-{seed}", cfg)
        bakes.append({"seed": seed, "dir": result.out_dir, "wall_s": time.monotonic() - started, **result.report})
        log(f"seed {seed}: {bakes[-1]['wall_s']:.0f}s, {result.report['steps']} steps, timings {result.report['timings']}")
    return bakes


def score(model, tokenizer, probe_list: list[dict], memory_of) -> list[dict]:
    """Greedy answers with a per-probe context (memory_of(probe): the prompt u, or None)."""
    conversations = [prompts.messages_for(q["question"], memory_of(q)) for q in probe_list]
    answers = probes.generate_local(model, tokenizer, conversations, batch_size=8)
    return [{**q, "answer": a, "correct": probes.is_correct(a, q["answers"])} for q, (a, _) in zip(probe_list, answers)]


def acc(results: list[dict], paraphrase: bool | None = None) -> float:
    picked = [r for r in results if paraphrase is None or r["paraphrase"] == paraphrase]
    return probes.accuracy(picked)


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def write_report(report, items, probe_list, rows, baked_rows, bakes, locality, trainer_peak_gib, overrides) -> None:
    n = len(probe_list)
    table_rows = []
    for name, results in rows.items():
        table_rows.append([name, acc(results), acc(results, False), acc(results, True),
                           "{:.2f}-{:.2f}".format(*wilson(acc(results), n))])
    for name, per_seed in baked_rows.items():
        overall = mean([acc(r) for r in per_seed])
        table_rows.append([name, overall, mean([acc(r, False) for r in per_seed]), mean([acc(r, True) for r in per_seed]),
                           "{:.2f}-{:.2f}".format(*wilson(overall, n * len(per_seed)))])
    none = acc(rows["no prompt"])
    baked = mean([acc(r) for r in baked_rows["baked"]])
    gap = {ref: (baked - none) / (acc(rows[ref]) - none) if acc(rows[ref]) > none else float("nan")
           for ref in ("all in context", "oracle")}
    report.table(f"Accuracy on {n} probes ({n // 2} questions + a paraphrase each), {len(bakes)} seed(s)",
                 ["condition", "all", "direct", "paraphrased", "95% Wilson"], table_rows,
                 note=f"Gap closed by baking: {gap['all in context']:.0%} of all-in-context prompting, "
                      f"{gap['oracle']:.0%} of oracle prompting. Engine overrides: `{json.dumps(overrides)}`.")
    per_item = []
    for key in items:
        def marks(results):
            return "".join("x" if r["correct"] else "." for r in results if r["fact"] == key)
        per_item.append([key, marks(rows["no prompt"]), marks(rows["all in context"]), marks(rows["oracle"]),
                         " ".join(marks(r) for r in baked_rows["baked"])])
    report.table("Per headline (x = right, . = wrong; question then paraphrase; baked: one group per seed)",
                 ["headline", "no prompt", "all in context", "oracle", "baked"], per_item)
    report.table("Cost of the bake", ["seed", "wall s", "teacher s", "train s", "examples", "steps", "train tok/s",
                                      "FLOP share", "dtype", "final KL"],
                 [[b["seed"], b["wall_s"], b["timings"]["teacher_s"], b["timings"]["train_s"], b["examples"], b["steps"],
                   b["tokens_per_s"], b["flops_share"], b["dtype"], b["final_epoch_kl"]] for b in bakes],
                 note=f"Peak RSS of the process during the bake(s), before any evaluation: {trainer_peak_gib:.2f} GiB.")
    report.table("Locality of the baked model (56 unrelated questions, greedy 24 tokens, against the base model)",
                 ["seed", "knowledge kept", "unchanged word for word", "KL(base||baked)/token"],
                 [[b["seed"], s["kept"], s["unchanged"], s["kl"]] for b, s in zip(bakes, locality)])
    report.finish()


if __name__ == "__main__":
    sys.exit(main())
