"""hardware.py: the trainer takes only the cores that are free right now."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from agent_memory import hardware


def test_a_spinning_process_counts_as_a_busy_core_at_once():
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # a load average would take a minute to notice it
        assert hardware.busy_cores(1.0) >= 0.8
        assert hardware.idle_cores() <= max(1, (os.cpu_count() or 1) - 0.5)
    finally:
        spin.kill()
        spin.wait()
    assert 1 <= hardware.idle_cores() <= (os.cpu_count() or 1)
