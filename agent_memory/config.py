"""Configuration: one TOML file with documented defaults, overridable by `AGENT_MEMORY_*` env vars.

Keys live in sections (`[api] port = 8700`); the env var for a key is `AGENT_MEMORY_<SECTION>_<KEY>`
(`AGENT_MEMORY_API_PORT`), and for a top-level key `AGENT_MEMORY_<KEY>` (`AGENT_MEMORY_STATE_DIR`).
Every value is validated at start; a bad one is reported as one line naming the key.
`deploy/agent-memory.toml` lists every key with its default and meaning.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

ENV_PREFIX = "AGENT_MEMORY_"
# Env vars with the prefix that are not config keys.
ENV_NOT_KEYS = {"AGENT_MEMORY_CONFIG", "AGENT_MEMORY_PARENT_PID"}  # the latter: see orphan.py
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class ApiConfig:
    host: str = "127.0.0.1"  # bind address of the daemon API; loopback unless you mean it
    port: int = 8700
    # Bearer token for writes and for reads of memory contents. Empty: the daemon makes one at its
    # first start in <state_dir>/api-token (0600), where the CLI reads it.
    token: str = ""
    max_request_bytes: int = 1_000_000  # larger request bodies get 413


@dataclass
class VllmConfig:
    # managed: the daemon runs vLLM as a child; external: use `urls`; off: no model (ingest only)
    mode: str = "managed"
    host: str = "127.0.0.1"
    port: int = 8000
    urls: list[str] = field(default_factory=list)  # external mode: OpenAI-compatible base URLs
    # How `memory` is served (serving.py): "merged" (base + live deltas as dense weights, reloaded in
    # place at each swap; `base` in a second engine), "lora" (one engine, both names as LoRA adapters),
    # or "auto": merged on CPU, where vLLM's LoRA path is several times slower, lora on CUDA.
    serve_memory: str = "auto"
    # The key clients pass as their OpenAI API key to the model port; empty = the daemon creates one at
    # first start in <state_dir>/model-api-key (mode 0600).
    api_key: str = ""
    max_lora_rank: int = 64  # lora mode: the served adapter's rank budget (stacked deltas are compacted to it)
    max_loras: int = 2  # lora mode: adapters in one batch (base as a zero adapter, memory)
    kvcache_gib: int = 2  # VLLM_CPU_KVCACHE_SPACE (whole GiB); vLLM otherwise asks for 92% of RAM
    # CPUs for vLLM's worker threads: "all" (every core, default), "auto" (vLLM's own choice,
    # which reserves one core for its engine process), "nobind", or a list such as "0-1".
    omp_threads_bind: str = "all"
    max_model_len: int = 4096
    # torch.compile the model (vLLM's default). On our 2-core CPU compiling took ~2.5 min at every
    # boot (vLLM 0.32 cannot load its compile cache on CPU) for a few percent of throughput
    # (bench/results/serving.md), so engines run eager unless this is set.
    compile: bool = False
    # "auto": bfloat16 where this CPU multiplies it fast (AMX / AVX-512 BF16), else float32 (measured
    # at start, see hardware.py); or any vLLM --dtype value. A GPU wants "auto" or "bfloat16".
    dtype: str = "auto"
    boot_timeout_s: float = 300.0
    restart_limit: int = 5  # restarts within `restart_window_s` before the daemon gives up
    # An engine that answers no health check for this long (stopped, hung) is killed and restarted.
    unresponsive_restart_s: float = 120.0
    restart_window_s: float = 600.0
    extra_args: list[str] = field(default_factory=list)  # appended to the vLLM command line


@dataclass
class ModelConfig:
    # Directory of a local HF checkpoint; empty = the embedded SmolLM2-135M-Instruct, prepared
    # into <state_dir>/models by `agent-memory model prepare`.
    path: str = ""


@dataclass
class FeedsConfig:
    file: str = "feeds/feeds.toml"  # default sources, loaded into the database at start
    default_interval: str = "30m"
    timeout_s: float = 20.0
    max_item_chars: int = 2000
    # http(s) feeds on this machine (127.0.0.1, ::1, localhost); the daemon's own ports never
    allow_loopback: bool = False


@dataclass
class BakeConfig:
    min_pending: int = 20  # bake when this many items are pending ...
    every: str = "6h"  # ... or this long after the last bake, whichever comes first
    # A bake takes at most this many items: a longer queue is shared out in bakes of equal size
    # (60 items: 30, then 30; not 50, then a lone 10), each started as soon as the one before ends.
    # (Two stacked bakes of 20 recalled 40 facts no better than one bake of 40: bench/results/knowledge.md.)
    max_items: int = 50
    # A stage that fails for an infrastructure reason (trainer killed, vLLM restarting or stopped) is
    # tried again this many times, waiting `retry_wait`, then twice that, ...; a bake that still
    # fails puts its items back in the queue, and an item in `max_attempts` failed bakes goes to
    # `failed` (`agent-memory retry` takes it out). An item a live bake did not learn goes back to the
    # queue too, and to `rejected` once `max_attempts` bakes have left it unsettled.
    retries: int = 3
    retry_wait: str = "15s"
    max_attempts: int = 3
    # A live bake that left items unlearnt is followed at once by the next bake (those items' next
    # try, stacked on it), not `every` later; `max_attempts` bounds the chain. So is a bake that left
    # items in the queue (`max_items`), live or rejected.
    follow_up: bool = True
    # Training settings passed to the engine (agent_memory.engine.config.EngineConfig fields), e.g. rank, lr.
    engine: dict = field(default_factory=dict)


@dataclass
class GateConfig:
    """When a candidate adapter may replace the live one."""

    # An item is learnt when the candidate answers, unprompted, this share of as many of its own
    # probes as its teacher (the live model, the item in its prompt) answers; a bake that learnt
    # none is rejected, one that passes the rest goes live with the items it learnt.
    min_item_accuracy: float = 0.5
    max_regression: float = 0.1  # a registered probe set may fall at most this much
    # Of the general-knowledge questions the live model answers right, the share the candidate still
    # answers right. (The share of answers left word for word is recorded too, not gated: a 135M
    # model rewords freely after any update.)
    min_locality_kept: float = 0.9
    # Of the neighbour questions (news-like, about other subjects), the share whose answers newly name
    # an entity of the bake (one the live model did not already name there): a leak.
    max_leak: float = 0.1
    # Never-taught control subjects: the share of answers that claim something may rise at most this
    # much over the live model's (a 135M model attempts most of them already).
    max_hallucination_increase: float = 0.125
    probe_sets: list[str] = field(default_factory=lambda: ["durov"])  # built-in or JSON file paths


@dataclass
class Config:
    state_dir: str = "state"
    log_level: str = "info"
    api: ApiConfig = field(default_factory=ApiConfig)
    vllm: VllmConfig = field(default_factory=VllmConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    feeds: FeedsConfig = field(default_factory=FeedsConfig)
    bake: BakeConfig = field(default_factory=BakeConfig)
    gate: GateConfig = field(default_factory=GateConfig)

    # Paths derived from state_dir: one place decides the state layout.
    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).expanduser().resolve()

    @property
    def db_path(self) -> Path:
        return self.state_path / "agent-memory.db"

    @property
    def models_dir(self) -> Path:
        return self.state_path / "models"

    @property
    def adapters_dir(self) -> Path:
        return self.state_path / "adapters"

    @property
    def logs_dir(self) -> Path:
        return self.state_path / "logs"

    @property
    def api_token_path(self) -> Path:
        return self.state_path / "api-token"

    @property
    def model_api_key_path(self) -> Path:
        return self.state_path / "model-api-key"

    @property
    def model_dir(self) -> Path:
        from .model import EMBEDDED_DIRNAME

        if self.model.path:
            return Path(self.model.path).expanduser().resolve()
        return self.models_dir / EMBEDDED_DIRNAME

    @property
    def api_url(self) -> str:
        host = "127.0.0.1" if self.api.host in ("0.0.0.0", "::") else self.api.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.api.port}"

    @property
    def vllm_urls(self) -> list[str]:
        if self.vllm.mode == "external":
            return [u.rstrip("/") for u in self.vllm.urls]
        if self.vllm.mode == "off":
            return []
        return [f"http://{self.vllm.host}:{self.vllm.port}"]


SECTIONS = {f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.default_factory)}


def load(path: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> Config:
    """Defaults <- TOML file (`path`, else $AGENT_MEMORY_CONFIG) <- AGENT_MEMORY_* env vars."""
    env = dict(os.environ if env is None else env)
    path = path or env.get("AGENT_MEMORY_CONFIG")
    cfg = Config()
    if path:
        _apply_file(cfg, Path(path))
    _apply_env(cfg, env)
    validate(cfg)
    return cfg


def _apply_file(cfg: Config, path: Path) -> None:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {path} is not valid TOML: {e}") from None
    for key, value in data.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise UserError(f"config key '{key}' in {path} must be a [section]")
            for sub, subvalue in value.items():
                _set(cfg, f"{key}.{sub}", subvalue, origin=str(path))
        else:
            _set(cfg, key, value, origin=str(path))


def _apply_env(cfg: Config, env: dict[str, str]) -> None:
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or name in ENV_NOT_KEYS:
            continue
        _set(cfg, _env_to_key(name), raw, origin=f"env {name}", from_env=True)


def _env_to_key(name: str) -> str:
    rest = name[len(ENV_PREFIX):].lower()
    section, _, key = rest.partition("_")
    if section in SECTIONS and key:
        return f"{section}.{key}"
    return rest


def _set(cfg: Config, dotted: str, value: Any, *, origin: str, from_env: bool = False) -> None:
    """Set `dotted` (e.g. "api.port") on cfg, converting and type-checking the value."""
    target: Any = cfg
    *parents, leaf = dotted.split(".")
    for part in parents:
        target = getattr(target, part, None)
    fields = {f.name: f for f in dataclasses.fields(target)} if dataclasses.is_dataclass(target) else {}
    if leaf not in fields or dataclasses.is_dataclass(getattr(target, leaf)):
        raise UserError(f"unknown config key '{dotted}' ({origin})")
    expected = type(getattr(target, leaf))
    try:
        setattr(target, leaf, _convert(value, expected, from_env))
    except (TypeError, ValueError):
        raise UserError(
            f"config key '{dotted}' ({origin}) must be {expected.__name__}, got {value!r}"
        ) from None


def _convert(value: Any, expected: type, from_env: bool) -> Any:
    if from_env:  # env values are strings; parse them into the key's type
        if expected is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(value)
        if expected is list:
            return [v.strip() for v in value.split(",") if v.strip()]
        return expected(value)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    if type(value) is not expected:
        raise TypeError(value)
    return value


MIN_DURATION_S = 1.0
MAX_DURATION_S = 365 * 86400.0


def parse_duration(text: str) -> float:
    """'90s', '30m', '6h', '1d' or plain seconds -> seconds, between 1 s and 365 days
    (so "inf", "nan" and "1e400s" are refused, not stored to break date arithmetic later)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = str(text).strip().lower()
    try:
        if text and text[-1] in units:
            seconds = float(text[:-1]) * units[text[-1]]
        else:
            seconds = float(text)
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 30m, 6h, 1d)") from None
    if not MIN_DURATION_S <= seconds <= MAX_DURATION_S:  # also False for nan
        raise ValueError(f"duration must be between 1s and 365d: {text!r}")
    return seconds


def validate(cfg: Config) -> None:
    """Check values that have the right type but a wrong meaning; one line per problem."""
    checks = [
        ("api.port", 0 < cfg.api.port < 65536, "a TCP port (1-65535)"),
        ("vllm.port", 0 < cfg.vllm.port < 65536, "a TCP port (1-65535)"),
        ("vllm.mode", cfg.vllm.mode in ("managed", "external", "off"), "'managed', 'external' or 'off'"),
        ("vllm.urls", cfg.vllm.mode != "external" or bool(cfg.vllm.urls),
         "at least one URL when vllm.mode = 'external'"),
        ("vllm.max_lora_rank", cfg.vllm.max_lora_rank in VLLM_LORA_RANKS,
         f"one of {', '.join(map(str, VLLM_LORA_RANKS))} (what vLLM accepts)"),
        ("vllm.max_loras", cfg.vllm.max_loras >= 2, "at least 2 (base and memory)"),
        ("vllm.serve_memory", cfg.vllm.serve_memory in ("auto", "merged", "lora"), "'auto', 'merged' or 'lora'"),
        ("bake.retries", cfg.bake.retries >= 0, "0 or more"),
        ("bake.max_attempts", cfg.bake.max_attempts >= 1, "at least 1"),
        ("vllm.kvcache_gib", cfg.vllm.kvcache_gib > 0, "positive"),
        ("vllm.unresponsive_restart_s", cfg.vllm.unresponsive_restart_s >= 10, "at least 10"),
        ("api.max_request_bytes", cfg.api.max_request_bytes >= 1024, "at least 1024"),
        ("bake.min_pending", cfg.bake.min_pending >= 1, "at least 1"),
        ("bake.max_items", cfg.bake.max_items >= 1, "at least 1"),
        ("log_level", cfg.log_level in ("debug", "info", "warning", "error"),
         "one of debug, info, warning, error"),
    ]
    for key, ok, meaning in checks:
        if not ok:
            raise UserError(f"config key '{key}' must be {meaning}")
    validate_gate(cfg.gate)
    for key in ("feeds.default_interval", "bake.every", "bake.retry_wait"):
        section, leaf = key.split(".")
        try:
            parse_duration(getattr(getattr(cfg, section), leaf))
        except ValueError as e:
            raise UserError(f"config key '{key}': {e}") from None
    from .engine.config import EngineConfig  # no torch: the engine's settings only

    try:
        EngineConfig.from_dict(cfg.bake.engine)
    except (TypeError, ValueError) as e:
        raise UserError(f"config key 'bake.engine': {e}") from None
    if cfg.model.path and not (cfg.model_dir / "config.json").exists():
        raise UserError(f"config key 'model.path': no HF checkpoint (config.json) in {cfg.model_dir}")


def validate_gate(gate: GateConfig) -> None:
    """Shares are in [0, 1]; max_regression may be negative (demand an improvement)."""
    for key, low in (("min_item_accuracy", 0.0), ("max_regression", -1.0), ("min_locality_kept", 0.0)):
        if not low <= getattr(gate, key) <= 1.0:
            raise UserError(f"config key 'gate.{key}' must be between {low:g} and 1")
