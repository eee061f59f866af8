"""bench_news.py with the teacher sampled from vLLM (`--teacher vllm`), to set beside the local teacher's
figures: the same bake, knowledge and cost, with the teacher's time moved to the daemon's vLLM server."""

from __future__ import annotations

import sys

from bench_news import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] + ["--teacher", "vllm"]))
