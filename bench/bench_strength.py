"""How hard to bake: the half-baking curve and Prompt Pursuit iterations, on the Durov u2 fact. Not a test.

    .venv/bin/python bench/bench_strength.py [--quick] [--seed 0] [--fact u2]

Half-baking (the paper's partial strength): the same bake given a budget of more and more optimizer
steps (EngineConfig epochs=1, min_steps=S, the lr schedule spanning them; S = 0 is the base model).
For each: accuracy on the 40 Durov probes unprompted, the bake's last-epoch KL(teacher || student) per token, and locality
against the base model (knowledge kept, KL(base || baked) on 56 unrelated questions).
Prompt Pursuit (paper, section 5): bake u, then bake u again with the *baked* model prompted with u
as the teacher, and so on; each iteration is one more stacked delta, as the daemon would stack a
re-bake. For each iteration: accuracy unprompted and prompted, and locality.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from common import (PREPARED_MODEL, Locality, Report, context, load_model, log, parser, plot_path, pyplot,
                    save_figure)

from agent_memory import adapters, hardware, probes, prompts
from agent_memory.engine.bake import bake
from agent_memory.engine.config import EngineConfig


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--fact", default="u2", help="the Durov fact to bake (u1 or u2)")
    args = p.parse_args()
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(hardware.idle_cores())
    tok = AutoTokenizer.from_pretrained(PREPARED_MODEL)
    facts = probes.set_facts("durov")
    item = {"id": args.fact, "kind": "headline", "source": "bench", **facts[args.fact]}
    memory = prompts.item_memory(item)
    probe_list = probes.load_set("durov")
    base = load_model()
    locality = Locality(base, tok)
    work = Path(tempfile.mkdtemp(prefix="bench-strength-"))

    def measure(model, extra: dict) -> dict:
        scores = locality(model)
        result = {**extra, "unprompted": probes.accuracy(probes.run_local(model, tok, probe_list)),
                  "prompted": probes.accuracy(probes.run_local(model, tok, probe_list, memory=memory)),
                  "kept": scores["kept"], "kl_base": scores["kl"]}
        log(result)
        return result

    steps_list = [0, 10, 30] if args.quick else [0, 5, 10, 20, 30, 60]
    curve = []
    for steps in steps_list:
        if steps == 0:
            curve.append(measure(base, {"steps": 0, "teacher_kl": float("nan"), "seconds": 0.0}))
            continue
        cfg = EngineConfig(seed=args.seed, epochs=1, min_steps=steps)
        started = time.monotonic()
        result = bake(PREPARED_MODEL, None, [item], work / f"half-{steps}", cfg)
        curve.append(measure(load_model([result.out_dir]), {
            "steps": result.report["steps"], "teacher_kl": result.report["final_epoch_kl"],
            "seconds": time.monotonic() - started}))

    iterations = 2 if args.quick else 3
    pursuit, deltas, live = [], [], None
    for i in range(1, iterations + 1):
        started = time.monotonic()
        result = bake(PREPARED_MODEL, live, [item], work / f"pursuit-{i}", EngineConfig(seed=args.seed + i))
        deltas.append(result.out_dir)
        live = work / f"pursuit-live-{i}"
        adapters.compose(deltas, live, max_rank=64)
        pursuit.append(measure(load_model([live]), {"iteration": i, "teacher_kl": result.report["final_epoch_kl"],
                                                    "seconds": time.monotonic() - started}))

    ctx = context(args.seed, args.quick)
    report = Report("strength", f"Half-baking and Prompt Pursuit (Durov {args.fact})", ctx)
    prompted_base = curve[0]["prompted"]
    report.table(f"Half-baking: one bake of {args.fact} given a budget of S optimizer steps (S = 0: base model)",
                 ["steps", "accuracy", "gap closed", "teacher KL/token (last epoch)", "knowledge kept",
                  "KL(base||baked)/token", "bake s"],
                 [[c["steps"], c["unprompted"], gap(c["unprompted"], curve[0]["unprompted"], prompted_base),
                   c["teacher_kl"], c["kept"], c["kl_base"], c["seconds"]] for c in curve],
                 note=f"Accuracy = share of the 40 Durov probes right, unprompted; the base model prompted "
                      f"with {args.fact} gets {prompted_base:.3f}. The engine's default bake is 30 steps.")
    report.table("Prompt Pursuit: iteration i bakes u again with the model after iteration i-1, prompted, as teacher",
                 ["iteration", "unprompted", "gap closed", "prompted", "teacher KL/token (last epoch)",
                  "knowledge kept", "KL(base||baked)/token", "bake s"],
                 [[0, curve[0]["unprompted"], "", prompted_base, "", 1.0, 0.0, ""]] +
                 [[p["iteration"], p["unprompted"], gap(p["unprompted"], curve[0]["unprompted"], prompted_base),
                   p["prompted"], p["teacher_kl"], p["kept"], p["kl_base"], p["seconds"]] for p in pursuit],
                 note="Gap closed is against the base model prompted (row 0); the paper's point is that the "
                      "prompted column can rise above it as iterations go on.")
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot([c["steps"] for c in curve], [c["unprompted"] for c in curve], "o-", label="baked, unprompted")
    left.axhline(prompted_base, ls="--", color="0.5", label="base, prompted")
    left.plot([c["steps"] for c in curve], [c["kept"] for c in curve], "s:", label="knowledge kept")
    left.set(xlabel="optimizer steps", ylabel="share", ylim=(0, 1.05), title="half-baking")
    left.legend(fontsize=7)
    its = [0] + [p["iteration"] for p in pursuit]
    right.plot(its, [curve[0]["unprompted"]] + [p["unprompted"] for p in pursuit], "o-", label="unprompted")
    right.plot(its, [prompted_base] + [p["prompted"] for p in pursuit], "s-", label="prompted")
    right.set(xlabel="Prompt Pursuit iteration", ylim=(0, 1.05), xticks=its, title="Prompt Pursuit")
    right.legend(fontsize=7)
    report.figure(save_figure(fig, plot_path("strength"), ctx), "half-baking curve and Prompt Pursuit")
    report.finish()
    return 0


def gap(value: float, none: float, prompted: float):
    return f"{(value - none) / (prompted - none):.0%}" if prompted > none else "n/a"


if __name__ == "__main__":
    sys.exit(main())
