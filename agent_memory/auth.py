"""The API credential: one bearer token, from `api.token` or a 0600 file in the state dir.

The daemon makes the file at its first start (`ensure_token`); the CLI and other local clients read
it (`read_token`) and send `auth_header(token)`. The API compares tokens in constant time
(`token_matches`).
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import stat

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
    if cfg.api.token:
        return cfg.api.token
    path = cfg.api_token_path
    token = _read(path)
    if token is None:
        token = _create(path)
        log.info("created the API token in %s (clients read it from there)", path)
    elif stat.S_IMODE(path.stat().st_mode) & 0o077:
        os.chmod(path, 0o600)
        log.warning("%s was readable by others: made it 0600", path)
    cfg.api.token = token
    return token


def read_token(cfg: Config) -> str | None:
    """For clients: `api.token`, else the daemon's token file (None before the daemon's first start)."""
    return cfg.api.token or _read(cfg.api_token_path)


def _read(path) -> str | None:
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UserError(f"cannot read the API token file {path} ({e.strerror}): run as the daemon's user, "
                        f"or set api.token (AGENT_MEMORY_API_TOKEN)") from None
    if not token:
        raise UserError(f"the API token file {path} is empty: delete it and restart the daemon")
    return token


def _create(path) -> str:
    """A fresh random token in a 0600 file, written whole before it appears under its name."""
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
        return _read(path)
    except OSError as e:
        raise UserError(f"cannot create the API token file {path}: {e.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return token
