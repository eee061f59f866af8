"""Fact-to-live latency: `agent-memory remember` -> `bake --now --wait` -> the new adapter is live.

Through the real daemon and CLI, one fresh fact per run. Each run's wall time is split into the
bake record's stages (bakery.py's metrics.stages), the training subprocess's own split into its
start (Python, torch, loading the model), teacher, train and probe (the gate's questions), the rest
of the bake (claiming items, bookkeeping: metrics.total_s minus the stages), and what lies outside
the bake (the `remember` command, queueing, CLI start-up and `--wait`'s polling).
The gate is relaxed (min_item_accuracy=0, min_locality_kept=0, max_regression=1) so every
run reaches the swap: this measures the path, not the quality (bench_baking.py does that).
The engine runs with its default settings plus the seed (`--engine KEY=JSON` overrides one);
`--quick` also makes the bake small (QUICK_ENGINE) so the smoke run takes minutes, not tens.

    .venv/bin/python bench/bench_latency.py [--quick] [--runs 3] [--seed 0] [--engine epochs=1]
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time

from common import (PeakMemory, Report, context, log, parser, percentile, plot_path, pyplot, running_daemon,
                    save_figure)

FACTS = [
    "Vesna Kordic was named chief executive of Lumora Shipping on March 3, 2025.",
    "The Harbin ice festival of 2025 used 300,000 cubic meters of ice from the Songhua River.",
    "Tomasz Reller won the 2025 Warsaw marathon in 2 hours 9 minutes.",
    "The town of Keswick Vale opened a solar-powered library on May 12, 2025.",
    "Marisol Ortega became mayor of the city of Puerto Alma in June 2025.",
    "The research ship Aurora Tern found a new coral reef off Tasmania in April 2025.",
]
RELAXED_GATE = ["--gate", "min_item_accuracy=0", "--gate", "min_locality_kept=0",
                "--gate", "max_regression=1"]
QUICK_ENGINE = {"queries_per_item": 3, "anchors": 4, "epochs": 1, "min_steps": 4}
STAGE_NAMES = {"composing_s": "compose", "swapping_s": "swap", "checking_s": "check served"}
TRAINER_PARTS = {"teacher_s": "teacher", "train_s": "train", "probe_s": "probe"}  # bake.json timings
TARGET_P50_S, TARGET_P90_S = 60, 90


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=None, help="bakes to time (default 3, --quick 1)")
    p.add_argument("--engine", action="append", default=[], metavar="KEY=JSON",
                   help="a baking engine setting ([bake.engine]), e.g. epochs=1; repeatable")
    args = p.parse_args()
    runs = args.runs or (1 if args.quick else 3)
    engine = {**(QUICK_ENGINE if args.quick else {}), "seed": args.seed,
              **{k: json.loads(v) for k, _, v in (e.partition("=") for e in args.engine)}}
    ctx = context(args.seed, args.quick)
    report = Report("latency", "Fact-to-live latency", ctx)
    report.add("Engine settings over its defaults: " + ", ".join(f"`{k}={v}`" for k, v in engine.items()))
    if importlib.util.find_spec("agent_memory.engine.bake") is None:
        report.add("**Skipped:** the baking engine (`agent_memory.engine`) is not installed yet; "
                   "nothing can be baked.")
        report.finish()
        return 0
    config = "[bake.engine]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in engine.items())
    with running_daemon("latency", config_toml=config, bake_min_pending="1000", bake_every="30d") as daemon:
        roots = {"daemon": lambda: daemon.process.pid, "trainer": lambda: trainer_pid(daemon.process.pid),
                 **{f"vLLM {role} engine": (lambda r=role: daemon.vllm_pids().get(r)) for role in ("memory", "base")}}
        with PeakMemory(roots, interval=0.5) as memory:
            results = [one_run(daemon, FACTS[i % len(FACTS)] + (f" (run {i + 1})" if i >= len(FACTS) else ""))
                       for i in range(runs)]
    write_report(report, results, ctx, memory.peaks)
    return 0


def trainer_pid(daemon_pid: int) -> int | None:
    """The daemon's training subprocess (`python -m agent_memory.engine JOB.json`), while one runs."""
    import psutil

    try:
        for child in psutil.Process(daemon_pid).children():
            if "agent_memory.engine" in child.cmdline():
                return child.pid
    except psutil.Error:
        pass
    return None


def one_run(daemon, fact: str) -> dict:
    started = time.perf_counter()
    result = daemon.cli("remember", fact, "--kind", "fact", "--json")
    if result.returncode != 0:
        raise RuntimeError(f"remember failed: {result.stderr.strip()}")
    remembered = time.perf_counter()
    result = daemon.cli("bake", "--now", "--wait", "--json", *RELAXED_GATE, timeout=3600)
    wall = time.perf_counter() - started
    if result.returncode not in (0, 2):
        raise RuntimeError(f"bake failed: {result.stderr.strip()}")
    record = json.loads(result.stdout)
    metrics = record.get("metrics") or {}
    recorded = dict(metrics.get("stages") or {})
    timings = ((metrics.get("train") or {}).get("timings") or {})
    training = recorded.pop("training_s", 0.0)
    stages = {"trainer start": training - sum(timings.get(k, 0.0) for k in TRAINER_PARTS)}
    stages.update({name: timings.get(k, 0.0) for k, name in TRAINER_PARTS.items()})
    stages.update({STAGE_NAMES.get(k, k.removesuffix("_s")): v for k, v in recorded.items()})
    total = metrics.get("total_s", sum(stages.values()))
    run = {"bake": record["id"], "status": record["status"], "wall_s": wall,
           "remember_s": remembered - started, "stages": stages, "total_s": total,
           "bake_other_s": total - sum(stages.values()), "outside_s": wall - total,
           "items_acc": (metrics.get("probes") or {}).get("items")}
    log(f"bake {run['bake']}: {run['status']} in {wall:.1f}s wall; stages {stages}")
    return run


def write_report(report: Report, runs: list[dict], ctx: str, peaks: dict) -> None:
    stage_names = list(dict.fromkeys(name for r in runs for name in r["stages"]))
    columns = stage_names + ["bake other", "bake total", "outside bake", "wall"]

    def values(r: dict) -> list[float]:
        return ([r["stages"].get(n, 0.0) for n in stage_names]
                + [r["bake_other_s"], r["total_s"], r["outside_s"], r["wall_s"]])

    rows = [[f"bake {r['bake']} ({r['status']})"] + values(r) for r in runs]
    per_column = list(zip(*(values(r) for r in runs)))
    rows.append(["p50"] + [percentile(list(c), 50) for c in per_column])
    rows.append(["p90"] + [percentile(list(c), 90) for c in per_column])
    report.table(
        f"Seconds from `remember` to live, by stage ({len(runs)} run(s), one fact each, relaxed gate)",
        ["run"] + columns, rows,
        note="trainer start = the training subprocess's Python and torch start and model load; "
             "probe = the gate's questions answered by the candidate and the live model in the trainer; "
             "check served = a few item questions asked of the served `memory` after the swap; "
             "bake other = claiming items and bookkeeping inside the bake; outside bake = the "
             "`remember` command, queueing, CLI start-up and `bake --wait`'s polling. "
             "Item probe accuracy per run: "
             + ", ".join("n/a" if r["items_acc"] is None else f"{r['items_acc']:.2f}" for r in runs) + ".")
    walls = [r["wall_s"] for r in runs]
    p50, p90 = percentile(walls, 50), percentile(walls, 90)
    report.add(f"**Targets** (fact to live p50 <= {TARGET_P50_S} s, p90 <= {TARGET_P90_S} s): "
               f"p50 {p50:.0f} s ({'met' if p50 <= TARGET_P50_S else f'missed by {p50 - TARGET_P50_S:.0f} s'}), "
               f"p90 {p90:.0f} s ({'met' if p90 <= TARGET_P90_S else f'missed by {p90 - TARGET_P90_S:.0f} s'}).")
    report.table("Peak memory over the runs (GiB, sampled every 0.5 s)", ["process", "processes", "RSS", "PSS"],
                 [[name, p["processes"], p["rss"], p["pss"]] for name, p in peaks.items()],
                 note="trainer = the daemon's training subprocess; each vLLM engine = its API server, engine "
                      "core and worker processes. RSS summed over a tree counts shared pages once per process; PSS splits them.")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 2.2 + 0.5 * len(runs)))
    parts = stage_names + ["bake other", "outside bake"]
    left = [0.0] * len(runs)
    for name in parts:
        widths = [r["stages"].get(name, 0.0) if name in stage_names else
                  r["bake_other_s"] if name == "bake other" else r["outside_s"] for r in runs]
        ax.barh([f"bake {r['bake']}" for r in runs], widths, left=left, label=name)
        left = [a + b for a, b in zip(left, widths)]
    ax.set(xlabel="seconds")
    ax.set_title("fact-to-live latency by stage", pad=28)
    ax.legend(fontsize=7, ncol=len(parts), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    report.figure(save_figure(fig, plot_path("latency"), ctx), "fact-to-live latency")
    report.finish()


if __name__ == "__main__":
    sys.exit(main())
