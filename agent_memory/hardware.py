"""What this machine computes fast: the cores free to use and the dtype worth using.

Measured, not guessed. CPUs with AMX or AVX-512 BF16 multiply bf16 several times faster than fp32;
AVX2-only CPUs emulate bf16 (~1 GFLOP/s against ~70 for fp32 on one thread here), so bf16 there
would make training and serving ~50x slower. Both vLLM (serving) and the baking engine ask here.
"""

from __future__ import annotations

import os
import time

import torch


def idle_cores() -> int:
    """Cores not busy elsewhere (1-minute load average). Measured on 2 shared cores: with another
    process busy, 2 OpenMP threads ran a training step 4.5x SLOWER than 1 (threads spin on barriers
    while descheduled), so we only take the cores that are free."""
    cores = os.cpu_count() or 1
    return max(1, min(cores, round(cores - os.getloadavg()[0] + 0.3)))


def matmul_gflops(dtype=torch.bfloat16, n: int = 1024, reps: int = 20) -> float:
    """Matmul throughput of this process's torch threads: the peak we compare training against."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def pick_dtype(name: str = "auto") -> torch.dtype:
    """"bfloat16", "float32", or "auto": bf16 only where it multiplies 1.2x faster than fp32."""
    if name != "auto":
        return torch.bfloat16 if name == "bfloat16" else torch.float32
    bf16, fp32 = matmul_gflops(torch.bfloat16, 256, 3), matmul_gflops(torch.float32, 256, 3)
    return torch.bfloat16 if bf16 > 1.2 * fp32 else torch.float32
