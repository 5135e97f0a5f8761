"""The one exception type for bad input: the CLI prints it as one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (file, key or value); the message names it in one line."""

    exit_code = 2
