"""Config: defaults, TOML file, env overrides, and one-line errors that name the bad key."""

import pytest

from agent_memory import config
from agent_memory.errors import UserError


def test_defaults_match_the_contract():
    cfg = config.load(env={})
    assert cfg.api.port == 8700 and cfg.api.host == "127.0.0.1"
    assert cfg.vllm.port == 8000 and cfg.vllm.mode == "managed"
    assert cfg.vllm_urls == ["http://127.0.0.1:8000"]
    assert cfg.model_dir.name == "smollm2-135m-instruct"


def test_file_then_env_override(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('state_dir = "/srv/am"\n[api]\nport = 9000\ntoken = "t"\n[vllm]\nkvcache_gib = 1\n')
    cfg = config.load(path, env={"AGENT_MEMORY_API_PORT": "9100", "AGENT_MEMORY_VLLM_EXTRA_ARGS": "--a, --b"})
    assert cfg.state_dir == "/srv/am" and cfg.db_path.parent.as_posix() == "/srv/am"
    assert cfg.api.port == 9100  # env wins over the file
    assert cfg.api.token == "t"
    assert cfg.vllm.extra_args == ["--a", "--b"]


def test_config_path_from_env(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[bake]\nmin_pending = 3\n")
    assert config.load(env={"AGENT_MEMORY_CONFIG": str(path)}).bake.min_pending == 3


def test_external_mode_uses_the_given_urls():
    cfg = config.load(env={"AGENT_MEMORY_VLLM_MODE": "external",
                           "AGENT_MEMORY_VLLM_URLS": "http://a:1/, http://b:2"})
    assert cfg.vllm_urls == ["http://a:1", "http://b:2"]


@pytest.mark.parametrize("text, env, fragment", [
    ("[api]\nprot = 1\n", {}, "unknown config key 'api.prot'"),
    ("colour = 'red'\n", {}, "unknown config key 'colour'"),
    ("[api]\nport = 'x'\n", {}, "config key 'api.port'"),
    ("[api]\nport = 70000\n", {}, "config key 'api.port' must be a TCP port"),
    ("api = 3\n", {}, "config key 'api'"),
    ("[vllm]\nmax_lora_rank = 48\n", {}, "config key 'vllm.max_lora_rank'"),
    ("[vllm]\nmode = 'external'\n", {}, "config key 'vllm.urls'"),
    ("[bake]\nevery = 'soon'\n", {}, "config key 'bake.every'"),
    ("[bake.engine]\nrnak = 8\n", {}, "config key 'bake.engine': unknown bake config keys: ['rnak']"),
    ("[bake.engine]\nlr = 'fast'\n", {}, "config key 'bake.engine': bake config key 'lr' must be float"),
    ("[vllm]\nserve_memory = 'dense'\n", {}, "config key 'vllm.serve_memory'"),
    ("", {"AGENT_MEMORY_API_PROT": "1"}, "unknown config key 'api.prot' (env AGENT_MEMORY_API_PROT)"),
    ("", {"AGENT_MEMORY_VLLM_PORT": "eighty"}, "config key 'vllm.port' (env AGENT_MEMORY_VLLM_PORT)"),
    ("not toml [", {}, "is not valid TOML"),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path, text, env, fragment):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        config.load(path, env=env)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        config.load(tmp_path / "nope.toml", env={})


def test_model_path_must_be_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="model.path"):
        config.load(env={"AGENT_MEMORY_MODEL_PATH": str(tmp_path)})


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("6h", 21600), ("1d", 86400), ("15", 15)])
def test_parse_duration(text, seconds):
    assert config.parse_duration(text) == seconds


@pytest.mark.parametrize("text, fragment", [
    ("", "not a duration"), ("abc", "not a duration"), ("-5m", "between 1s and 365d"),
    ("0", "between 1s and 365d"), ("0.5s", "between 1s and 365d"), ("366d", "between 1s and 365d"),
    ("inf", "between 1s and 365d"), ("-inf", "between 1s and 365d"), ("nan", "between 1s and 365d"),
    ("1e400s", "between 1s and 365d"), ("infd", "between 1s and 365d"),
])
def test_parse_duration_rejects(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        config.parse_duration(text)


def test_parse_duration_bounds_are_inclusive():
    assert config.parse_duration("1s") == 1 and config.parse_duration("365d") == 365 * 86400


def test_shipped_example_config_is_valid():
    """deploy/agent-memory.toml documents every key; it must load as-is."""
    from pathlib import Path

    example = Path(__file__).parent.parent / "deploy" / "agent-memory.toml"
    cfg = config.load(example, env={})
    assert cfg == config.Config(state_dir=cfg.state_dir)  # every other value is the default
