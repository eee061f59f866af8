"""The one exception type a user sees: the CLI prints its message as one line and exits non-zero."""


class UserError(Exception):
    """A mistake or a broken environment the user can fix; never shown with a traceback."""
