"""The errors a user can fix.

Every error the project raises for bad input (a name, a path, a prompt file, a setting that
cannot work, a server that does not answer) is an `EraseError`, raised before any heavy work
where it can be: the `erase` command prints its message on one line and exits 2. Anything else
is a bug or a failure of the environment and keeps its traceback (exit 1).
"""


class EraseError(Exception):
    """Bad input or a setting that cannot work; the message names the problem and the fix."""
