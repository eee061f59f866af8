"""Run every benchmark in bench/ and collect their figures into bench/results/latest.md.

    .venv/bin/python bench/run.py                 # everything (`make bench`)
    .venv/bin/python bench/run.py --quick         # a small smoke version of each
    .venv/bin/python bench/run.py --only serving  # one (or several: --only a --only b)

Each bench/bench_*.py runs as its own subprocess (some twice: EXTRA_RUNS), one after the other (one vLLM server at a time),
so a failing benchmark does not stop the rest. A benchmark prints its markdown section on stdout
(and may write it to bench/results/<name>.md, which is preferred when it does); its progress on
stderr is shown here and kept in bench/results/<name>.log. The exit status is non-zero when any
benchmark failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from common import RESULTS, context, table  # noqa: E402

# Benchmarks run once more with other arguments, each extra run under its own results name.
EXTRA_RUNS = {"sequential": [("sequential_grouped", ["--grouped"])]}


def main() -> int:
    args = options()
    chosen = select(jobs(), args.only)
    if not chosen:
        print(f"no benchmark matches {args.only}; have: {', '.join(name for name, _, _ in jobs())}", file=sys.stderr)
        return 1
    RESULTS.mkdir(parents=True, exist_ok=True)
    outcomes = [run(job, args) for job in chosen]
    write_latest(outcomes + earlier_sections(chosen), args)
    print(f"\nwrote {RESULTS / 'latest.md'}", file=sys.stderr)
    return 0 if all(o["code"] == 0 for o in outcomes) else 1



def options() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Run the benchmarks and collect bench/results/latest.md.")
    p.add_argument("--quick", action="store_true", help="a small smoke version of each benchmark")
    p.add_argument("--only", action="append", metavar="NAME",
                   help="run only this benchmark (e.g. serving or bench_serving); repeatable")
    p.add_argument("--timeout", type=float, default=None, help="seconds per benchmark (default: none)")
    return p.parse_args()


def short(script: Path) -> str:
    return script.stem.removeprefix("bench_")


def jobs() -> list[tuple[str, Path, list[str]]]:
    """(results name, script, arguments): each bench/bench_*.py once, plus its EXTRA_RUNS."""
    return [job for s in sorted(BENCH.glob("bench_*.py")) for job in [(short(s), s, [])] + [(name, s, extra) for name, extra in
                                                                   EXTRA_RUNS.get(short(s), [])]]


def select(jobs: list[tuple], only: list[str] | None) -> list[tuple]:
    """The jobs named in --only: by results name, or by script (all of that script's runs)."""
    if not only:
        return jobs
    wanted = {name.removeprefix("bench_").removesuffix(".py") for name in only}
    return [j for j in jobs if j[0] in wanted or short(j[1]) in wanted]


def run(job: tuple[str, Path, list[str]], args) -> dict:
    """Run one benchmark; return its name, exit code, duration and markdown section."""
    name, script, extra = job
    command = [sys.executable, str(script)] + extra + (["--quick"] if args.quick else [])
    log_path = RESULTS / f"{name}.log"
    section_path = RESULTS / f"{name}.md"
    print(f"\n=== {name}: {' '.join(command[1:])} (log: {log_path})", file=sys.stderr, flush=True)
    started_wall, started = time.time(), time.monotonic()
    env = {**os.environ, "BENCH_RESULTS_DIR": str(RESULTS), "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=BENCH.parent, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stdout: list[str] = []
        readers = [threading.Thread(target=copy_lines, args=(process.stderr, log), daemon=True),
                   threading.Thread(target=lambda: stdout.append(process.stdout.read()), daemon=True)]
        for reader in readers:
            reader.start()
        wait(process, args.timeout)
        for reader in readers:
            reader.join(30)
    code = process.returncode
    seconds = time.monotonic() - started
    print(f"=== {name}: exit {code} after {seconds:.0f}s", file=sys.stderr, flush=True)
    fresh = section_path.exists() and section_path.stat().st_mtime >= started_wall
    section = section_path.read_text() if fresh else "".join(stdout).strip()
    if code != 0:
        section = failure_section(name, code, section, log_path)
    return {"name": name, "code": code, "seconds": seconds, "section": section}


def copy_lines(stream, log) -> None:
    for line in stream:
        sys.stderr.write(line)
        log.write(line)
        log.flush()


def wait(process: subprocess.Popen, timeout: float | None) -> None:
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        print(f"timed out after {timeout:.0f}s: stopping it", file=sys.stderr, flush=True)
        process.terminate()  # a benchmark stops its own daemon (and vLLM) on SIGTERM
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def earlier_sections(ran: list[tuple]) -> list[dict]:
    """With --only: the other benchmarks' last sections (results/<name>.md), each with its own date."""
    others = [name for name, _, _ in jobs() if name not in {j[0] for j in ran}]
    return [{"name": name, "code": None, "seconds": None, "section": (RESULTS / f"{name}.md").read_text()}
            for name in others if (RESULTS / f"{name}.md").exists()]


def failure_section(name: str, code: int, section: str, log_path: Path) -> str:
    tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
    text = section or f"## {name}"
    return (f"{text}\n\n**{name} failed (exit {code}).** Last lines of `{log_path.name}`:\n\n"
            + "```\n" + "\n".join(tail) + "\n```\n")


def write_latest(outcomes: list[dict], args) -> None:
    rows = [[o["name"], result(o["code"]), "-" if o["seconds"] is None else f"{o['seconds']:.0f}"]
            for o in outcomes]
    header = ["# agent-memory benchmarks", "",
              f"_{context(seed=0, quick=args.quick)}_ (seed 0 unless a section says otherwise)", "",
              table(["benchmark", "result", "seconds"], rows), ""]
    body = [o["section"].strip() + "\n" for o in outcomes]
    (RESULTS / "latest.md").write_text("\n".join(header + body))


def result(code: int | None) -> str:
    if code is None:
        return "not run this time (its last section)"
    return "ok" if code == 0 else f"failed (exit {code})"


if __name__ == "__main__":
    sys.exit(main())
