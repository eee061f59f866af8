"""The credentials the daemon makes: the API's bearer token and the model port's API key.

Each is a setting (`api.token`, `vllm.api_key`) or, when that is empty, a random secret in a 0600
file in the state dir (`api-token`, `model-api-key`). The daemon makes the file at its first start
(`ensure_secret`); the CLI and other local clients read it (`read_secret`) and send
`auth_header(token)`. The API compares tokens in constant time (`token_matches`).
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import stat
from pathlib import Path

from .config import Config
from .errors import UserError

log = logging.getLogger(__name__)


def auth_header(token: str) -> dict[str, str]:
    """The header every API client sends: `Authorization: Bearer <token>`."""
    return {"Authorization": f"Bearer {token}"}


def token_matches(authorization: str | None, expected: str) -> bool:
    """Does an Authorization header carry `expected`? Never true for an empty expected token."""
    scheme, _, given = (authorization or "").partition(" ")
    # compare_digest: constant time, so the token cannot be guessed byte by byte from timings.
    return bool(expected) and scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), expected.encode())


def ensure_token(cfg: Config) -> str:
    """At daemon start: `api.token` if configured, else the token file's, made on first start."""
    cfg.api.token = ensure_secret(cfg.api.token, cfg.api_token_path, API_TOKEN)
    return cfg.api.token


def read_token(cfg: Config) -> str | None:
    """For clients: `api.token`, else the daemon's token file (None before the daemon's first start)."""
    return read_secret(cfg.api.token, cfg.api_token_path, API_TOKEN)


# What each secret is called in messages, and the setting that replaces its file.
API_TOKEN = ("API token", "api.token")
MODEL_API_KEY = ("model API key", "vllm.api_key")


def ensure_secret(configured: str, path: Path, names: tuple[str, str]) -> str:
    """At daemon start: the configured value if any, else the secret in the 0600 file at `path`,
    made at the first start (a file others can read is made 0600 again)."""
    if configured:
        return configured
    secret = read_secret("", path, names)
    if secret is None:
        secret = _create(path, names)
        log.info("created the %s in %s (clients read it from there)", names[0], path)
    elif stat.S_IMODE(path.stat().st_mode) & 0o077:
        os.chmod(path, 0o600)
        log.warning("%s was readable by others: made it 0600", path)
    return secret


def read_secret(configured: str, path: Path, names: tuple[str, str]) -> str | None:
    """For clients: the configured value, else the daemon's file (None before its first start)."""
    if configured:
        return configured
    what, setting = names
    try:
        secret = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as e:
        env = "AGENT_MEMORY_" + setting.upper().replace(".", "_")
        raise UserError(f"cannot read the {what} file {path} ({e.strerror}): run as the daemon's user, "
                        f"or set {setting} ({env})") from None
    if not secret:
        raise UserError(f"the {what} file {path} is empty: delete it and restart the daemon")
    return secret


def _create(path: Path, names: tuple[str, str]) -> str:
    """A fresh random secret in a 0600 file, written whole before it appears under its name."""
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.unlink(missing_ok=True)  # a leftover of a crash: O_EXCL below then makes it 0600 anew
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # fails if another process made it first: then theirs counts
    except FileExistsError:
        return read_secret("", path, names)
    except OSError as e:
        raise UserError(f"cannot create the {names[0]} file {path}: {e.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return token
