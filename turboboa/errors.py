"""Errors that the command line reports as one line and exit code 2."""


class UserError(Exception):
    """Bad input from the user: the CLI prints ``error: <message>`` on one line and exits 2.

    The message names the problem and the fix, e.g.
    ``--bits 5 is not supported; choose one of 2, 3, 4, 8``.
    """
