"""Serving through the real daemon: `memory` and `base` against the plain checkpoint, hot swaps, memory.

Side by side in one run, on this machine:
1. decode throughput and latency under 1/4/8 concurrent clients (fixed max_tokens, EOS ignored,
   greedy) of `memory` (a non-zero version live) and `base` through the daemon's model port, for
   both serving modes (`vllm.serve_memory` merged, the CPU default, and lora, the earlier way), against
   the plain checkpoint in a vLLM engine of its own started with the same flags (the reference);
2. N hot swaps of `memory` (rollback between two versions: the swap a bake makes) under 3
   concurrent chat streams (memory, memory, base): failed requests and swap latency;
3. peak RSS/PSS of the daemon process and of each vLLM engine's process tree.

    .venv/bin/python bench/bench_serving.py [--quick] [--seed 0]
"""

from __future__ import annotations

import os
import secrets
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from common import (PREPARED_MODEL, QUESTIONS, PeakMemory, Report, context, log, parser, percentile,
                    plot_path, pyplot, running_daemon, save_figure)
from daemon_proc import write_noisy_version

from agent_memory.serving import BASE_NAME, MEMORY_NAME

PLAIN = "plain checkpoint"  # the reference: no proxy, no LoRA, the base weights


def main() -> None:
    args = options()
    ctx = context(args.seed, args.quick)
    report = Report("serving", "Serving: memory and base against the plain checkpoint, hot swaps, memory", ctx)
    boots = {}
    # All three up at once, measured in turns (plain, lora, merged at each load level, twice): on a
    # machine whose speed drifts, only interleaved figures make fair ratios.
    with plain_engine() as (url, key), running_daemon("serving-lora", vllm_serve_memory="lora") as lora, \
            running_daemon("serving") as merged:
        boots = {"lora": lora.boot_s, "merged": merged.boot_s}
        swap_in(lora, write_noisy_version(lora.state_dir, 1, args.seed))
        versions = [write_noisy_version(merged.state_dir, n, args.seed + n) for n in (1, 2)]
        for version in reversed(versions):  # each one's merged checkpoint built, as a bake's compose does
            swap_in(merged, version)
        targets = [(url, key, PLAIN, PLAIN)] + [(d.vllm, d.model_key, mode, model) for mode, d in
                                                (("lora", lora), ("merged", merged))
                                                for model in (MEMORY_NAME, BASE_NAME)]
        loads = throughput(targets, args)
    with running_daemon("serving-swaps") as daemon:  # alone on the machine: swaps and memory
        memory = PeakMemory({"daemon": lambda: daemon.process.pid,
                             **{f"vLLM {role} engine": (lambda r=role: daemon.vllm_pids().get(r))
                                for role in ("memory", "base")}})
        with memory:
            versions = [write_noisy_version(daemon.state_dir, n, args.seed + n) for n in (1, 2)]
            for version in reversed(versions):
                swap_in(daemon, version)
            swaps = hot_swaps(daemon, versions, args)
            swaps["inside"] = swap_seconds(daemon)[-args.swaps:]
    report.add(f"Daemon boot (both names served): merged {boots['merged']:.0f} s, lora {boots['lora']:.0f} s. "
               "`memory` = a live version whose delta (rank 8, random, on the MLPs) changes the answers.")
    report_throughput(report, loads, args, ctx)
    report_swaps(report, swaps, args, ctx)
    report_memory(report, memory.peaks)
    report.finish()


def options():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--swaps", type=int, default=10)
    args = p.parse_args()
    quick = args.quick
    args.concurrency = [1, 4] if quick else [1, 4, 8]
    args.requests_per_client = 1 if quick else 2
    args.max_tokens = 16 if quick else 64
    args.swap_clients = 3
    args.swap_gap_s = 0.5 if quick else 1.0
    return args


class plain_engine:
    """vLLM on the plain checkpoint, started the way the daemon starts its engines, no proxy."""

    def __enter__(self):
        from agent_memory.config import Config
        from agent_memory.serving import ManagedVllm

        cfg = Config(state_dir=os.environ.get("TMPDIR", "/tmp") + "/agent-memory-bench-plain")
        cfg.model.path, cfg.vllm.kvcache_gib = str(PREPARED_MODEL), 1
        self.engine = ManagedVllm(cfg, "plain", PREPARED_MODEL, PLAIN, False, secrets.token_urlsafe(16))
        started = time.monotonic()
        self.engine.launch()
        self.engine.wait_ready()
        log(f"plain engine ready in {time.monotonic() - started:.0f}s")
        return self.engine.endpoint.url, self.engine.api_key

    def __exit__(self, *exc):
        self.engine.stop()


def swap_seconds(daemon) -> list[float]:
    """The daemon's own timing of each swap (reload of the weights on the engine, CURRENT moved),
    from its log lines "swapped memory to vNNNN in S s"."""
    import re

    return [float(s) for s in re.findall(r"swapped memory to v\d+ in ([\d.]+) s", daemon.log_path.read_text())]


def swap_in(daemon, version: str) -> float:
    """`rollback VERSION` through the API (the swap a bake makes); returns its round trip in s."""
    started = time.perf_counter()
    response = httpx.post(f"{daemon.api}/v1/rollback", json={"version": version}, headers=daemon.headers,
                          timeout=600)
    response.raise_for_status()
    return time.perf_counter() - started


# -- requests -----------------------------------------------------------------------------------

def chat(client: httpx.Client, model: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    """One greedy chat completion of exactly max_tokens tokens: (latency s, completion tokens)."""
    started = time.perf_counter()
    response = client.post("/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
    })
    latency = time.perf_counter() - started
    response.raise_for_status()
    return latency, response.json()["usage"]["completion_tokens"]


def client_for(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=600, headers={"Authorization": f"Bearer {key}"})


def load(url: str, key: str, model: str, clients: int, per_client: int, max_tokens: int) -> dict:
    """`clients` threads, each sending `per_client` requests back to back."""
    def client_run(k: int) -> list[tuple[float, int]]:
        with client_for(url, key) as client:
            return [chat(client, model, QUESTIONS[(k + i) % len(QUESTIONS)], max_tokens)
                    for i in range(per_client)]

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client_run, range(clients)) for r in rs]
    wall = time.perf_counter() - started
    latencies = [lat for lat, _ in results]
    tokens = sum(n for _, n in results)
    return {"model": model, "clients": clients, "requests": len(results), "tokens": tokens,
            "wall_s": wall, "tok_s": tokens / wall, "p50": percentile(latencies, 50),
            "p90": percentile(latencies, 90)}


# -- 1. throughput --------------------------------------------------------------------------------

def throughput(targets: list[tuple], args) -> list[dict]:
    """Each (url, key, mode, model) at each load level, in turns, twice; the two turns summed."""
    for url, key, _, model in targets:
        load(url, key, model, 1, 1, 8)  # warm-up
    results = []
    for clients in args.concurrency:
        turns = {}
        for _ in range(2):
            for url, key, mode, model in targets:
                r = load(url, key, model, clients, args.requests_per_client, args.max_tokens)
                turns.setdefault((mode, model), []).append(r)
        for (mode, model), rs in turns.items():
            tokens, wall = sum(r["tokens"] for r in rs), sum(r["wall_s"] for r in rs)
            row = {"label": model if model == PLAIN else f"{model} ({mode})", "clients": clients,
                   "requests": sum(r["requests"] for r in rs), "tokens": tokens, "wall_s": wall,
                   "tok_s": tokens / wall, "p50": max(r["p50"] for r in rs), "p90": max(r["p90"] for r in rs)}
            log(f"throughput {row['label']} x{clients}: {row['tok_s']:.1f} tok/s, p50 {row['p50']:.2f}s")
            results.append(row)
    return sorted(results, key=lambda r: (r["label"] != PLAIN, r["label"], r["clients"]))


def report_throughput(report: Report, results: list[dict], args, ctx: str) -> None:
    plain = {r["clients"]: r["tok_s"] for r in results if r["label"] == PLAIN}
    rows = [[r["label"], r["clients"], r["requests"], r["tokens"], r["tok_s"], f"{r['tok_s'] / plain[r['clients']]:.2f}x",
             r["p50"], r["p90"]] for r in results]
    report.table(
        f"1. Throughput and latency ({args.max_tokens} tokens per request, EOS ignored, greedy, "
        f"{args.requests_per_client} requests per client, two turns; all engines up, measured in turns)",
        ["served", "clients", "requests", "tokens", "tokens/s", "vs plain", "p50 latency s", "p90 latency s"], rows,
        note="tokens/s = completion tokens of all clients / wall time; p50/p90 = the worse of the two turns. "
             "merged = the default on CPU: `memory` "
             "as dense weights (base + live deltas), `base` in its own engine, both behind the daemon's "
             "model port; lora = both names as LoRA adapters on one engine (vLLM's CPU LoRA path).")
    checks = [f"{r['label']} x{r['clients']} {r['tok_s'] / plain[r['clients']]:.2f}x" for r in results
              if r["label"].endswith("(merged)") and r["clients"] in (1, 8)]
    report.add("**Target** (`memory` and `base` >= 0.9x the plain checkpoint at 1 and 8 clients, the default "
               f"merged mode): {'; '.join(checks)}.")
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.8))
    for name in dict.fromkeys(r["label"] for r in results):
        mine = [r for r in results if r["label"] == name]
        xs = [r["clients"] for r in mine]
        ax1.plot(xs, [r["tok_s"] for r in mine], marker="o", label=name)
        ax2.plot(xs, [r["p50"] for r in mine], marker="o", label=name)
    ax1.set(xlabel="concurrent clients", ylabel="tokens/s", title="throughput")
    ax2.set(xlabel="concurrent clients", ylabel="p50 latency (s)", title=f"latency ({args.max_tokens} tokens)")
    ax1.legend(fontsize=7)
    report.figure(save_figure(fig, plot_path("serving_throughput"), ctx), "serving throughput")


# -- 2. hot swaps under traffic --------------------------------------------------------------------

def hot_swaps(daemon, versions: list[str], args) -> dict:
    """Swap `memory` back and forth between `versions` while clients chat with `memory` (and one
    with `base`).

    Traffic runs from before the first swap until every client has finished a request that
    started after the last one, so every swap lands on requests in flight.
    """
    stop = threading.Event()
    done: list[tuple[float, float, str]] = []  # (started at, finished at, model)
    failures: list[str] = []
    t0 = time.perf_counter()
    last_swap = [float("inf")]
    caught_up: list[threading.Event] = []

    def traffic(model: str, finished_one_after: threading.Event) -> None:
        with client_for(daemon.vllm, daemon.model_key) as client:
            i = 0
            while not stop.is_set():
                started = time.perf_counter() - t0
                try:
                    chat(client, model, QUESTIONS[i % len(QUESTIONS)], 16)
                    done.append((started, time.perf_counter() - t0, model))
                    if started > last_swap[0]:
                        finished_one_after.set()
                except Exception as e:  # noqa: BLE001 - any failure counts
                    failures.append(f"{model}: {e!r}"[:200])
                i += 1

    models = [MEMORY_NAME] * (args.swap_clients - 1) + [BASE_NAME]
    threads = []
    for model in models:
        caught_up.append(threading.Event())
        threads.append(threading.Thread(target=traffic, args=(model, caught_up[-1])))
    for t in threads:
        t.start()
    swaps = []  # (started at, latency)
    try:
        time.sleep(2 * args.swap_gap_s)
        for i in range(args.swaps):
            started = time.perf_counter()
            swaps.append((started - t0, swap_in(daemon, versions[(i + 1) % len(versions)])))
            time.sleep(args.swap_gap_s)
        last_swap[0] = swaps[-1][0]
        for event in caught_up:
            event.wait(600)
    finally:
        stop.set()
        for t in threads:
            t.join(600)
    in_flight = sum(any(start < t < end for t, _ in swaps) for start, end, _ in done)
    log(f"{len(swaps)} swaps, {len(done)} requests ({in_flight} across a swap), {len(failures)} failed")
    return {"swaps": swaps, "done": done, "failures": failures, "clients": models, "in_flight": in_flight}


def report_swaps(report: Report, result: dict, args, ctx: str) -> None:
    swap_ms = [lat * 1000 for _, lat in result["swaps"]]
    inside_ms = [s * 1000 for s in result["inside"]]
    latencies = [end - start for start, end, _ in result["done"]]
    rows = [[len(swap_ms), len(result["clients"]), len(result["done"]), result["in_flight"],
             len(result["failures"]), percentile(inside_ms, 50), max(inside_ms, default=float("nan")),
             percentile(swap_ms, 50), max(swap_ms, default=float("nan")),
             percentile(latencies, 50), max(latencies, default=float("nan"))]]
    report.table(
        f"2. Hot swaps of `memory` under concurrent chat traffic ({', '.join(result['clients'])}; "
        f"16 tokens per request; a swap every {args.swap_gap_s:g} s; merged mode: weights reloaded in place)",
        ["swaps", "clients", "requests done", "of them across a swap", "failed requests",
         "swap p50 ms", "swap max ms", "rollback call p50 ms", "rollback call max ms", "request p50 s",
         "request max s"], rows,
        note="swap = the daemon's own timing (the merged weights reloaded in place on the engine while it "
             "serves, the prefix cache reset with running requests re-computed, CURRENT moved); rollback "
             "call = the `POST /v1/rollback` round trip around it (API, database, history).")
    p50 = percentile(inside_ms, 50)
    report.add(f"**Target** (0 failed requests, swap p50 <= 1000 ms): {len(result['failures'])} failed, "
               f"swap p50 {p50:.0f} ms ({'met' if p50 <= 1000 and not result['failures'] else 'missed'}).")
    if result["failures"]:
        report.add("Failures:\n\n" + "\n".join(f"- `{f}`" for f in result["failures"][:10]))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.5))
    for model, color in ((MEMORY_NAME, "tab:blue"), (BASE_NAME, "tab:orange")):
        pts = [(end, end - start) for start, end, m in result["done"] if m == model]
        ax.scatter([t for t, _ in pts], [lat for _, lat in pts], s=10, color=color, label=model)
    for i, (t, _) in enumerate(result["swaps"]):
        ax.axvline(t, color="0.6", lw=0.8, ls="--", label="swap" if i == 0 else None)
    ax.set(xlabel="time a request finished (s)", ylabel="request latency (s)",
           title="chat requests around hot swaps of `memory`")
    ax.legend(fontsize=8)
    report.figure(save_figure(fig, plot_path("serving_swaps"), ctx), "hot swaps under traffic")


# -- 3. memory --------------------------------------------------------------------------------------

def report_memory(report: Report, peaks: dict) -> None:
    rows = [[name, p["processes"], p["rss"], p["pss"]] for name, p in peaks.items()]
    report.table("3. Peak memory of the merged-mode daemon over this benchmark (sampled every 1 s)",
                 ["process", "processes", "peak RSS GiB", "peak PSS GiB"], rows,
                 note="RSS summed over a tree counts shared pages in every process; PSS shares them out.")


if __name__ == "__main__":
    sys.exit(main())
