"""The one exception type for bad input: the CLI prints it as one line and exits with code 2."""


class UserError(ValueError):
    """Bad input from the user (file, key or value); the message names it in one line. A ValueError, so
    API callers can catch it as one; code that catches ValueError around a UserError must re-raise it."""

    exit_code = 2
