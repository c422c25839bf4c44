"""The one exception type users see: the CLI prints its message on one line and exits 2."""


class UipeError(Exception):
    """Bad input (a file, a key, a tensor): the message names the thing. Exit code 2, no traceback."""

    exit_code = 2
