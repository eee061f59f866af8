"""What every benchmark shares: the context line, markdown tables, percentiles, the daemon, results.

A benchmark prints its markdown section to stdout (progress goes to stderr) and also writes it to
bench/results/<name>.md; bench/run.py collects the sections into bench/results/latest.md.
Every table and figure carries the context line: machine (CPU model, cores, RAM), model, seed, date.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = Path(os.environ.get("BENCH_RESULTS_DIR", BENCH / "results"))
sys.path.insert(0, str(REPO / "tests"))  # daemon_proc: the real daemon as a subprocess
sys.path.insert(0, str(REPO))

from daemon_proc import PREPARED_MODEL, DaemonProcess  # noqa: E402

# SIGTERM (run.py's --timeout) unwinds like Ctrl-C, so `finally` blocks stop the daemon and vLLM.
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

QUESTIONS = [
    "What is the capital of France?",
    "Explain in two sentences how a bicycle stays upright.",
    "Write a short poem about the sea.",
    "List three uses of copper.",
    "Why is the sky blue?",
    "Describe a good breakfast.",
    "What does a compiler do?",
    "Give me advice for a job interview.",
    "Who runs Lumora Shipping?",
    "How do vaccines work?",
    "Summarize the plot of a detective story in three sentences.",
    "What should I pack for a weekend of hiking?",
    "Explain what a hash table is.",
    "What is the tallest mountain in Africa?",
    "Describe the water cycle.",
    "Tell me something interesting about octopuses.",
]


# -- arguments and context ---------------------------------------------------------------------

def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a small smoke version (minutes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default="{}", help="engine settings (BakeConfig) to change, as JSON")
    return p


def log(*parts) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, file=sys.stderr, flush=True)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ram_gib() -> float:
    try:
        kb = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines()
                      if ln.startswith("MemTotal")).split()[1])
        return kb / 2**20
    except (OSError, StopIteration, ValueError):
        return float("nan")


def context(seed: int, quick: bool = False, model: Path = PREPARED_MODEL) -> str:
    """One line naming where and how a figure was taken."""
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    mode = "; --quick (smoke run)" if quick else ""
    return (f"machine: {cpu_model()}, {os.cpu_count()} cores, {ram_gib():.1f} GiB RAM; "
            f"model: {model.name}; seed {seed}; {date}{mode}")


# -- numbers and tables -------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); nan for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt(value, digits: int = 2) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class Report:
    """The markdown section of one benchmark: printed at the end and written to results/<name>.md."""

    def __init__(self, name: str, title: str, ctx: str):
        self.name, self.ctx = name, ctx
        self.parts = [f"## {title}\n", f"_{ctx}_\n"]

    def add(self, text: str) -> None:
        self.parts.append(text.rstrip() + "\n")

    def table(self, caption: str, headers: list[str], rows: list[list], note: str = "") -> None:
        self.add(f"**{caption}**\n\n" + table(headers, rows) + (f"\n\n{note}" if note else ""))

    def figure(self, path: Path, caption: str) -> None:
        self.add(f"![{caption}]({path.name})")

    def text(self) -> str:
        return "\n".join(self.parts)

    def finish(self) -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{self.name}.md").write_text(self.text())
        print(self.text(), flush=True)


def plot_path(name: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / f"{name}.png"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, ctx: str) -> Path:
    fig.text(0.5, 0.005, ctx, ha="center", va="bottom", fontsize=6, color="0.35", wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


# -- the daemon ---------------------------------------------------------------------------------

@contextmanager
def running_daemon(prefix: str, config_toml: str = "", **settings: str):
    """The real daemon (and its managed vLLM) in a fresh state dir; killed, with vLLM, on exit.

    `settings` become AGENT_MEMORY_<KEY> env vars; `config_toml`, if given, the config file.
    """
    state = Path(tempfile.mkdtemp(prefix=f"agent-memory-bench-{prefix}-"))
    daemon = DaemonProcess(state, **settings)
    if config_toml:
        (state / "config.toml").write_text(config_toml)
        daemon.env["AGENT_MEMORY_CONFIG"] = str(state / "config.toml")
    started = time.monotonic()
    log(f"starting the daemon (state {state}, vLLM port {daemon.vllm_port}) ...")
    daemon.start()
    ok = False
    try:
        daemon.wait_ready()
        daemon.boot_s = time.monotonic() - started
        log(f"daemon ready in {daemon.boot_s:.0f}s")
        yield daemon
        ok = True
    finally:
        daemon.kill()
        log("daemon stopped" + ("" if ok else f"; its state and logs are kept in {state}"))
        if ok:
            shutil.rmtree(state, ignore_errors=True)


class PeakMemory:
    """Samples the RSS and PSS of process trees in a thread; keeps the peaks (GiB)."""

    def __init__(self, roots: dict[str, callable], interval: float = 1.0):
        self.roots = roots  # label -> function returning the root pid (or None)
        self.interval = interval
        self.peaks = {label: {"rss": 0.0, "pss": 0.0, "processes": 0} for label in roots}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(10)

    def _run(self) -> None:
        while not self.stop.is_set():
            for label, root in self.roots.items():
                rss, pss, count = tree_memory(root(), with_children=label != "daemon")
                peak = self.peaks[label]
                peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
                peak["processes"] = max(peak["processes"], count)
            self.stop.wait(self.interval)


def tree_memory(pid: int | None, with_children: bool = True) -> tuple[float, float, int]:
    """(RSS sum, PSS sum, process count) of `pid` and its descendants, in GiB.

    RSS summed over a tree counts shared pages once per process (an upper bound); PSS splits them.
    """
    import psutil

    if pid is None:
        return 0.0, 0.0, 0
    try:
        root = psutil.Process(pid)
        procs = [root] + (root.children(recursive=True) if with_children else [])
    except psutil.Error:
        return 0.0, 0.0, 0
    rss = pss = 0.0
    for p in procs:
        try:
            info = p.memory_full_info()
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
        except psutil.Error:
            continue
    return rss / 2**30, pss / 2**30, len(procs)


# -- knowledge benchmarks: the engine in this process, no daemon -------------------------------

def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion p over n trials (20-40 questions is a small sample)."""
    if n == 0:
        return float("nan"), float("nan")
    centre, half = p + z * z / (2 * n), z * ((p * (1 - p) + z * z / (4 * n)) / n) ** 0.5
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def load_model(deltas=(), model_dir: Path = PREPARED_MODEL, scale: float = 1.0):
    """The base checkpoint (fp32, eval) with the given baked deltas merged in: what `memory` serves
    (`scale`: each delta at that multiple of its weight)."""
    import torch
    from transformers import AutoModelForCausalLM

    from agent_memory import adapters

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for delta in deltas:
        adapters.merge_into(model, delta, weight=scale)
    return model


def feed_items(path: Path = REPO / "feeds" / "sample-news.xml") -> dict[str, dict]:
    """A feed file's entries as the daemon queues them (feeds.entry_to_item), keyed by guid tail."""
    import feedparser

    from agent_memory import feeds

    source = {"id": 0, "title": "bench", "url": str(path)}
    items = {}
    for entry in feedparser.parse(str(path)).entries:
        key = (entry.get("id") or entry.get("link") or entry.title).removeprefix("agent-memory-sample-2024-")
        item = feeds.entry_to_item(entry, source, max_chars=4000)
        items[key] = {"id": key, "kind": "headline", **{k: item[k] for k in ("text", "title", "valid_at", "source")}}
    return items


class Locality:
    """How much baked models change answers to unrelated questions, against the base (asked once).

    locality(model) -> {"unchanged", "kept", "kl"} (probes.locality_scores + KL(base||model)/token).
    floor() -> the same for two models that learnt nothing: the base cast to bf16, and the base with
    weights nudged by 0.3% noise. Word-for-word identity of 24-token greedy answers breaks at any
    near-tie, so these say how much "unchanged" a change of no meaning already costs.
    """

    TOKENS = 24

    def __init__(self, base, tokenizer):
        from agent_memory import probes

        self.base, self.tok, self.questions = base, tokenizer, probes.locality_probes()
        self.base_answers = probes.run_local(base, tokenizer, self.questions, max_new_tokens=self.TOKENS)

    def __call__(self, model) -> dict:
        from agent_memory import probes

        answers = probes.run_local(model, self.tok, self.questions, max_new_tokens=self.TOKENS)
        scores = probes.locality_scores(self.base_answers, answers)
        scores["kl"] = probes.kl_per_token(self.base, model, self.tok, [q["question"] for q in self.questions])
        return scores

    def floor(self, noise: float = 3e-3) -> dict[str, dict]:
        import copy

        import torch

        bf16 = copy.deepcopy(self.base).to(torch.bfloat16)
        scores = {"base in bf16": self(bf16)}
        del bf16
        nudged = copy.deepcopy(self.base)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in nudged.named_parameters():
                if p.dim() == 2 and "embed" not in name:
                    p.add_(torch.randn(p.shape, generator=generator) * p.std() * noise)
        scores[f"base + {noise:.1%} weight noise"] = self(nudged)
        return scores
