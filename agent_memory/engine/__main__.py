"""`python -m agent_memory.engine JOB.json` runs one bake from a job file (the daemon's subprocess)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..orphan import stop_when_orphaned
from .bake import bake
from .config import EngineConfig


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m agent_memory.engine JOB.json", file=sys.stderr)
        return 2
    stop_when_orphaned()  # a bake whose daemon was killed -9 must not finish a delta
    job = json.loads(Path(argv[0]).read_text())

    def progress(stage, done, total):
        print(f"{stage} {done}/{total}", flush=True)

    result = bake(job["model_dir"], job.get("live_adapter"), job["items"], job["out_dir"],
                  EngineConfig.from_dict(job.get("config")), progress, job.get("earlier", []),
                  job.get("probe_plan"), job.get("live_cache"), job.get("live_version"))
    r = result.report
    print(f"baked {len(job['items'])} items -> {result.out_dir} in {r['timings']['total_s']}s "
          f"(final KL/token {r['final_epoch_kl']}, {r['tokens_per_s']} train tok/s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
