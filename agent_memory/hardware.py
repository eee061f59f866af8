"""What this machine computes fast: the cores free to use and the dtype worth using.

Measured, not guessed. CPUs with AMX or AVX-512 BF16 multiply bf16 several times faster than fp32;
AVX2-only CPUs emulate bf16 (~1 GFLOP/s against ~70 for fp32 on one thread here), so bf16 there
would make training and serving ~50x slower. Both vLLM (serving) and the baking engine ask here.
"""

from __future__ import annotations

import os
import time

import torch


def idle_cores(window: float = 0.5) -> int:
    """Cores not busy elsewhere right now. Measured on 2 shared cores: with another process busy,
    2 OpenMP threads ran a training step 4.5x SLOWER than 1 (threads spin on barriers while
    descheduled), so we only take the cores that are free. Sampled over `window` seconds, not the
    1-minute load average: that lags, and after vLLM's probing of the previous bake it handed the next
    bake 1 thread on an idle machine (training 127 s instead of 60)."""
    cores = os.cpu_count() or 1
    return max(1, min(cores, round(cores - busy_cores(window) + 0.3)))


def busy_cores(window: float = 0.5) -> float:
    """How many cores' worth of CPU time the whole machine used over the last `window` seconds."""
    try:
        total0, idle0 = _cpu_times()
        time.sleep(window)
        total1, idle1 = _cpu_times()
    except (OSError, ValueError, IndexError):  # not Linux: fall back on the load average
        return os.getloadavg()[0]
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(total1 - total0, 1))


def _cpu_times() -> tuple[int, int]:
    """(all, idle) jiffies from /proc/stat's cpu line: user nice system idle iowait irq softirq steal."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    return sum(values), values[3] + values[4]


def device() -> torch.device:
    """Where the engine trains: the GPU when torch sees one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def matmul_gflops(dtype=torch.bfloat16, n: int = 1024, reps: int = 20, tries: int = 3,
                  on: torch.device | None = None) -> float:
    """Matmul throughput of this process's torch threads: the peak we compare training against.
    The best of `tries` timings: single 1024-wide bf16 runs gave 776-975 GFLOP/s on one machine."""
    on = on or torch.device("cpu")
    a, b = torch.randn(n, n, dtype=dtype, device=on), torch.randn(n, n, dtype=dtype, device=on)
    a @ b
    best = 0.0
    for _ in range(tries):
        _sync(on)
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(on)
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9)
    return best


def _sync(on: torch.device) -> None:
    if on.type == "cuda":
        torch.cuda.synchronize(on)


def pick_dtype(name: str = "auto") -> torch.dtype:
    """"bfloat16", "float32", or "auto": bf16 only where it multiplies 1.2x faster than fp32.

    512-wide matrices, best of 3 short runs: 256-wide ones timed over 3 products flipped the choice
    to fp32 on a machine where bf16 is 3-4x faster (one noisy sample decided it)."""
    if name != "auto":
        return torch.bfloat16 if name == "bfloat16" else torch.float32
    if torch.cuda.is_available():
        return torch.bfloat16  # every GPU vLLM supports for training-size models runs bf16 natively
    bf16 = matmul_gflops(torch.bfloat16, 512, 5)
    fp32 = matmul_gflops(torch.float32, 512, 5)
    return torch.bfloat16 if bf16 > 1.2 * fp32 else torch.float32
