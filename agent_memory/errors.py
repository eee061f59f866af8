"""The errors a user or a client can act on. Each class carries the HTTP status the API answers
with (api.py maps every exception to a response in one place); the CLI prints the message as one
line and exits non-zero, never with a traceback."""


class UserError(Exception):
    """A mistake or a broken environment the user can fix: a request to correct (422)."""

    status = 422
    headers: dict[str, str] | None = None


class NotFound(UserError, LookupError):
    """No such item, feed, bake or version."""

    status = 404


class ConflictError(UserError):
    """Not now: the state forbids it (a bake is running, nothing to roll back to)."""

    status = 409


class Unauthorized(UserError):
    """The API token is missing or wrong."""

    status = 401
    headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(UserError):
    """A request the daemon refuses whoever sends it (a cross-origin browser request)."""

    status = 403


class TooLarge(UserError):
    status = 413


class UnsupportedMediaType(UserError):
    """A body that is not JSON on a JSON route."""

    status = 415


class MisdirectedRequest(UserError):
    """A Host header that names someone else (DNS rebinding)."""

    status = 421
