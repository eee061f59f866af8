"""Prompt Baking figures on the Durov set (the paper's Table 1), locality and cost. Not a test.

    python bench/bench_baking.py [--seeds 3] [--quick] [--out bench/results/baking.md]

Rows: prompting (u in the context) / baking (u baked into deltas, no context); columns: no prompt,
u1, u2, both (baking: u1 then u2 stacked as two deltas, the second baked on top of the first).
Accuracy = share of the 40 Durov probes (20 questions + paraphrases) whose greedy answer contains
an accepted keyword. Gap closed = (baked - none) / (prompted - none).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent_memory import adapters, hardware, probes  # noqa: E402
from agent_memory.engine.bake import bake  # noqa: E402
from agent_memory.engine.config import EngineConfig  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from common import PREPARED_MODEL, RESULTS, Locality, context, load_model as load, wilson  # noqa: E402

MODEL = PREPARED_MODEL


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=None, help="bakes per column with seeds 0..N-1 (default 3, --quick 1)")
    ap.add_argument("--quick", action="store_true", help="u1 only, fewer probes")
    ap.add_argument("--config", default="{}", help="EngineConfig overrides as JSON")
    ap.add_argument("--out", default=str(RESULTS / "baking.md"))
    args = ap.parse_args()
    args.seeds = args.seeds or (1 if args.quick else 3)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL)
    torch.set_num_threads(hardware.idle_cores())
    facts = probes.set_facts("durov")
    items = {k: {"id": k, "kind": "headline", "text": v["text"], "valid_at": v["valid_at"], "source": "bench"}
             for k, v in facts.items()}
    memory = {"u1": facts["u1"]["text"], "u2": facts["u2"]["text"],
              "both": facts["u1"]["text"] + "\n" + facts["u2"]["text"]}
    columns = ["u1"] if args.quick else ["u1", "u2", "both"]
    probe_list = probes.load_set("durov")
    log = lambda *a: print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)  # noqa: E731

    base = load([])
    acc = lambda results: probes.accuracy(results)  # noqa: E731
    none = acc(probes.run_local(base, tok, probe_list))
    prompted = {c: acc(probes.run_local(base, tok, probe_list, memory=memory[c])) for c in columns}
    log("none", none, "prompted", prompted)

    baked = {c: [] for c in columns}
    baked_prompted = {c: [] for c in columns}  # the paper's fourth condition: baked model + u in context
    costs, locality, kept, kls = [], [], [], []
    measure_locality = Locality(base, tok)
    work = Path(tempfile.mkdtemp(prefix="bench-baking-"))
    for seed in range(args.seeds):
        cfg = EngineConfig(**{**json.loads(args.config), "seed": seed})
        deltas = {}
        for name, live, item in (("u1", None, "u1"), ("u2", None, "u2"), ("both", "u1", "u2")):
            if name not in columns:
                continue
            live_dir = None
            if live:
                live_dir = work / f"live-{seed}"
                adapters.compose([deltas[live]], live_dir, max_rank=64)
            t = time.monotonic()
            # As the daemon does: the items of the live deltas are passed as `earlier`.
            earlier = [items[live]] if live else []
            result = bake(MODEL, live_dir, [items[item]], work / f"{name}-{seed}", cfg, earlier=earlier)
            deltas[name] = result.out_dir
            r = result.report
            costs.append({"bake": name, "seconds": round(time.monotonic() - t, 1), **r["timings"],
                          "tokens_per_s": r["tokens_per_s"], "flops_share": r["flops_share"],
                          "gflops": r["train_gflops_per_s"], "matmul_gflops": r["matmul_gflops_per_s"],
                          "dtype": r["dtype"], "final_kl": r["final_epoch_kl"], "steps": r["steps"]})
            stack = [deltas["u1"], deltas["both"]] if name == "both" else [deltas[name]]
            model = load(stack)
            baked[name].append(acc(probes.run_local(model, tok, probe_list)))
            baked_prompted[name].append(acc(probes.run_local(model, tok, probe_list, memory=memory[name])))
            log(f"seed {seed} {name}: baked acc {baked[name][-1]:.3f}", costs[-1])
            if name == columns[-1]:
                scores = measure_locality(model)
                locality.append(scores["unchanged"])
                kept.append(scores["kept"])
                kls.append(scores["kl"])
                log(f"locality unchanged {locality[-1]:.3f}, kept {kept[-1]:.3f}, KL/token {kls[-1]:.4f}")

    floor = measure_locality.floor()
    mean = lambda xs: statistics.mean(xs) if xs else float("nan")  # noqa: E731
    lines = ["## Prompt Baking on the Durov set (the paper's Table 1)", "", f"_{context(seed=0, quick=args.quick)}_", "",
             f"{time.strftime('%Y-%m-%d %H:%M')}, seeds: {args.seeds}, probes: {len(probe_list)}, "
             f"config: {json.dumps({**asdict(EngineConfig(**json.loads(args.config)))})}", "",
             "| row | no prompt | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns),
             f"| prompting | {none:.3f} | " + " | ".join(f"{prompted[c]:.3f}" for c in columns) + " |",
             f"| baking | {none:.3f} | " + " | ".join(f"{mean(baked[c]):.3f}" for c in columns) + " |",
             "| baking + prompting | | " + " | ".join(f"{mean(baked_prompted[c]):.3f}" for c in columns) + " |",
             "| baking, 95% Wilson | | " + " | ".join(
                 "{:.2f}-{:.2f}".format(*wilson(mean(baked[c]), len(probe_list) * len(baked[c]))) for c in columns) + " |",
             "| gap closed | | " + " | ".join(
                 f"{(mean(baked[c]) - none) / (prompted[c] - none):.0%}" if prompted[c] > none else "n/a"
                 for c in columns) + " |", "",
             f"Per seed: {json.dumps(baked)}", "",
             "Accuracy = share of all 40 Durov probes (u1 and u2 questions, with paraphrases) answered with an "
             "accepted keyword, greedy, 32 tokens; gap closed = (baked - none) / (prompted - none); the u1 "
             "column can pass 100% when the baked model answers questions the prompted one misses. "
             "`both` = u1 baked, then u2 baked on top as a second stacked delta.", "",
             f"Locality ({len(probes.locality_probes())} unrelated questions, greedy 24 tokens, base vs baked "
             f"`{columns[-1]}`): general knowledge kept {mean(kept):.3f} (of the answers base got right, the share "
             f"still right); answers unchanged word for word {mean(locality):.3f}; "
             f"KL(base||baked) per token {mean(kls):.4f}. The floor of word-for-word identity, models that "
             "learnt nothing: " + "; ".join(f"{name}: unchanged {x['unchanged']:.3f}, kept {x['kept']:.3f}, KL "
                                            f"{x['kl']:.4f}" for name, x in floor.items()), "",
             "**Cost**", "", "| bake | wall s | load | teacher | train | steps | train tok/s | GFLOP/s | matmul GFLOP/s | share | dtype | final KL |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in costs:
        lines.append(f"| {c['bake']} | {c['seconds']} | {c['load_s']} | {c['teacher_s']} | {c['train_s']} | {c['steps']} | "
                     f"{c['tokens_per_s']} | {c['gflops']} | {c['matmul_gflops']} | {c['flops_share']} | {c['dtype']} | {c['final_kl']} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
