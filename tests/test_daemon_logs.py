"""The daemon's log lines, its web server's included, are in one format on stdout/stderr (what
journald records) and in the state dir's daemon.log (issue 14 #2)."""

from __future__ import annotations

import re
import signal

from daemon_proc import DaemonProcess

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")


def test_uvicorns_lines_and_ours_share_one_format(tmp_path):
    proc = DaemonProcess(tmp_path / "state", vllm_mode="off", model_path="")
    proc.start()
    try:
        proc.wait_ready(timeout=60)
        proc.process.send_signal(signal.SIGTERM)
        assert proc.wait_exit(60) == 0
    finally:
        proc.kill()
    lines = [ln for ln in proc.log_path.read_text().splitlines() if ln.strip()]
    assert [ln for ln in lines if not LINE.match(ln)] == []
    assert any(" uvicorn.error: Application startup complete" in ln for ln in lines)
    assert any(" agent_memory: ready: API" in ln for ln in lines)
    in_file = (proc.state_dir / "logs" / "daemon.log").read_text()
    assert "uvicorn.error: Application shutdown complete" in in_file
