"""Serving through the real daemon and its managed vLLM: throughput, hot swaps, decode speed, memory.

1. throughput and latency of `memory` (a non-zero LoRA) vs `base` (the zero adapter) vs the raw
   checkpoint (no adapter; internal name, shown only as the no-LoRA reference) under 1/4/8
   concurrent clients, fixed max_tokens (EOS ignored), greedy;
2. N hot swaps of `memory` (each version in a new directory, `Endpoint.load_adapter`) under
   concurrent chat traffic: failed requests and swap latency;
3. single-stream decode tok/s of `memory` before vs after an in-place swap, with a name loaded
   without `load_inplace` as the control (vLLM #33791 made in-place-loaded adapters ~30% slower);
4. peak RSS/PSS of the daemon process and of the vLLM process tree.

    .venv/bin/python bench/bench_serving.py [--quick] [--seed 0]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from common import (PREPARED_MODEL, QUESTIONS, PeakMemory, Report, context, log, median, parser,
                    percentile, plot_path, pyplot, running_daemon, save_figure, vllm_pid)

from agent_memory.serving import BASE_NAME, MEMORY_NAME, RAW_NAME, Endpoint

CONTROL_NAME = "bench-fresh"  # loaded without load_inplace: never had the per-step reload


def main() -> None:
    args = options()
    ctx = context(args.seed, args.quick)
    report = Report("serving", "Serving: throughput, hot swaps, decode speed, memory", ctx)
    workdir = Path(tempfile.mkdtemp(prefix="agent-memory-bench-adapters-"))
    log(f"writing {args.swaps + 2} rank-{args.rank} adapters with random B under {workdir} ...")
    adapters = write_adapters(workdir, args.swaps + 2, args.rank, args.seed)

    with running_daemon("serving") as daemon:
        memory = PeakMemory({"daemon": lambda: daemon.process.pid, "vllm": lambda: vllm_pid(daemon)})
        with memory:
            endpoint = Endpoint(daemon.vllm)
            endpoint.load_adapter(MEMORY_NAME, adapters[0])
            loads = throughput(daemon.vllm, args)
            decode = decode_before_after(daemon.vllm, endpoint, adapters, args)
            swaps = hot_swaps(daemon.vllm, endpoint, adapters[2:], args)
        report.add(f"Daemon + vLLM boot: {daemon.boot_s:.0f} s. `memory` = a rank-{args.rank} LoRA "
                   f"with random B on q/k/v/o/gate/up/down; `base` = the zero adapter.")
    shutil.rmtree(workdir, ignore_errors=True)
    report_throughput(report, loads, args, ctx)
    report_swaps(report, swaps, args, ctx)
    report_decode(report, decode, args)
    report_memory(report, memory.peaks)
    report.finish()


def options():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=8, help="rank of the `memory` adapters")
    p.add_argument("--swaps", type=int, default=10)
    args = p.parse_args()
    quick = args.quick
    args.concurrency = [1, 4] if quick else [1, 4, 8]
    args.requests_per_client = 1 if quick else 4
    args.max_tokens = 16 if quick else 64
    args.decode_tokens = 32 if quick else 128
    args.decode_repeats = 1 if quick else 3
    args.swap_clients = 3
    args.swap_gap_s = 0.5 if quick else 1.0
    return args


# -- adapters -----------------------------------------------------------------------------------

def write_adapters(workdir: Path, count: int, rank: int, seed: int) -> list[Path]:
    """`count` peft LoRA versions with random B (small scale: answers change, stay fluent-ish)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from agent_memory.adapters import TARGET_MODULES

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(PREPARED_MODEL)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGET_MODULES))
    paths = []
    for i in range(count):
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.02)
        path = workdir / f"v{i + 1:04d}"
        peft_model.save_pretrained(path)
        paths.append(path)
    return paths


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


def load(url: str, model: str, clients: int, per_client: int, max_tokens: int) -> dict:
    """`clients` threads, each sending `per_client` requests back to back."""
    def client_run(k: int) -> list[tuple[float, int]]:
        with httpx.Client(base_url=url, timeout=600) as client:
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

def throughput(url: str, args) -> list[dict]:
    results = []
    for model in (MEMORY_NAME, BASE_NAME, RAW_NAME):
        load(url, model, 1, 1, 8)  # warm-up: first request of a name loads its adapter
        for clients in args.concurrency:
            r = load(url, model, clients, args.requests_per_client, args.max_tokens)
            log(f"throughput {model} x{clients}: {r['tok_s']:.1f} tok/s, p50 {r['p50']:.2f}s")
            results.append(r)
    return results


def report_throughput(report: Report, results: list[dict], args, ctx: str) -> None:
    rows = [[label(r["model"]), r["clients"], r["requests"], r["tokens"], r["tok_s"], r["p50"], r["p90"]]
            for r in results]
    report.table(
        f"1. Throughput and latency ({args.max_tokens} tokens per request, EOS ignored, greedy, "
        f"{args.requests_per_client} requests per client)",
        ["model", "clients", "requests", "tokens", "tokens/s", "p50 latency s", "p90 latency s"], rows,
        note="tokens/s = completion tokens of all clients / wall time. "
             f"`{RAW_NAME}` is internal (no adapter slot): the no-LoRA reference only.")
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.8))
    for model in (MEMORY_NAME, BASE_NAME, RAW_NAME):
        mine = [r for r in results if r["model"] == model]
        xs = [r["clients"] for r in mine]
        ax1.plot(xs, [r["tok_s"] for r in mine], marker="o", label=label(model))
        ax2.plot(xs, [r["p50"] for r in mine], marker="o", label=label(model))
    ax1.set(xlabel="concurrent clients", ylabel="tokens/s", title="throughput")
    ax2.set(xlabel="concurrent clients", ylabel="p50 latency (s)",
            title=f"latency ({args.max_tokens} tokens)")
    ax1.legend(fontsize=8)
    report.figure(save_figure(fig, plot_path("serving_throughput"), ctx), "serving throughput")


def label(model: str) -> str:
    return {MEMORY_NAME: "memory (LoRA)", BASE_NAME: "base (zero LoRA)",
            RAW_NAME: "raw checkpoint (no LoRA)"}.get(model, model)


# -- 2. hot swaps under traffic --------------------------------------------------------------------

def hot_swaps(url: str, endpoint: Endpoint, versions: list[Path], args) -> dict:
    """Swap `memory` through `versions` while clients chat with `memory` (and one with `base`).

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
        with httpx.Client(base_url=url, timeout=600) as client:
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
        for path in versions:
            started = time.perf_counter()
            endpoint.load_adapter(MEMORY_NAME, path)
            swaps.append((started - t0, time.perf_counter() - started))
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
    latencies = [end - start for start, end, _ in result["done"]]
    rows = [[len(swap_ms), len(result["clients"]), len(result["done"]), result["in_flight"],
             len(result["failures"]), percentile(swap_ms, 50), max(swap_ms, default=float("nan")),
             percentile(latencies, 50), max(latencies, default=float("nan"))]]
    report.table(
        f"2. Hot swaps of `memory` under concurrent chat traffic ({', '.join(result['clients'])}; "
        f"16 tokens per request; a swap every {args.swap_gap_s:g} s; each version a new directory, "
        "`load_inplace`)",
        ["swaps", "clients", "requests done", "of them across a swap", "failed requests",
         "swap p50 ms", "swap max ms", "request p50 s", "request max s"], rows,
        note="swap latency = the `POST /v1/load_lora_adapter` round trip while the engine is busy.")
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


# -- 3. decode speed before and after an in-place swap ---------------------------------------------

def decode_rate(url: str, model: str, args) -> float:
    """Median single-stream tok/s over a few requests (one client, nothing else running)."""
    rates = []
    with httpx.Client(base_url=url, timeout=600) as client:
        chat(client, model, QUESTIONS[0], 4)  # warm-up
        for i in range(args.decode_repeats):
            latency, tokens = chat(client, model, QUESTIONS[i % len(QUESTIONS)], args.decode_tokens)
            rates.append(tokens / latency)
    return median(rates)


def decode_before_after(url: str, endpoint: Endpoint, adapters: list[Path], args) -> list[tuple[str, float]]:
    rows = [("`memory`, first loaded in place", decode_rate(url, MEMORY_NAME, args))]
    endpoint.load_adapter(MEMORY_NAME, adapters[1])
    rows.append(("`memory` after an in-place swap (new dir)", decode_rate(url, MEMORY_NAME, args)))
    endpoint.load_adapter(CONTROL_NAME, adapters[1], inplace=False)
    rows.append(("same adapter under a new name, no `load_inplace` (control)",
                 decode_rate(url, CONTROL_NAME, args)))
    endpoint.unload_adapter(CONTROL_NAME)
    rows.append(("`base` (zero adapter)", decode_rate(url, BASE_NAME, args)))
    for name, rate in rows:
        log(f"decode {name}: {rate:.1f} tok/s")
    return rows


def report_decode(report: Report, rows: list[tuple[str, float]], args) -> None:
    control = rows[2][1]
    report.table(
        f"3. Single-stream decode speed ({args.decode_tokens} tokens incl. a short prefill, "
        f"median of {args.decode_repeats})",
        ["adapter", "tokens/s", "vs control"], [[name, rate, f"{rate / control:.2f}x"] for name, rate in rows],
        note="Without the vllm_entry.py fix an in-place-loaded adapter is re-read from disk every "
             "step (vLLM #33791), ~30% slower than the control.")


# -- 4. memory --------------------------------------------------------------------------------------

def report_memory(report: Report, peaks: dict) -> None:
    rows = [[name, p["processes"], p["rss"], p["pss"]] for name, p in
            (("daemon process", peaks["daemon"]), ("vLLM process tree", peaks["vllm"]))]
    report.table("4. Peak memory over this benchmark (sampled every 1 s)",
                 ["process", "processes", "peak RSS GiB", "peak PSS GiB"], rows,
                 note="RSS summed over a tree counts shared pages in every process; PSS shares them out.")


if __name__ == "__main__":
    sys.exit(main())
