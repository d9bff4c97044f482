"""The error vocabulary every package shares: a user-facing error carries its exit status.

`rl-train` and `rl-swarm` print such an error as one line and exit with its status, never with
a traceback: 2 when the recipe, a path it names or the command line is wrong (fix it and run
again), 1 when the run cannot go on (the line says where it can continue from). It lives at the
bottom of the layers (docs/ARCHITECTURE.md, "Layering") so every package can raise it; an error
class that also derives from a builtin (ValueError, RuntimeError) keeps callers that catch those.
"""

from __future__ import annotations

EXIT_FAILED = 1
EXIT_USAGE = 2


class RolloverError(Exception):
    """A stop a run can meet in normal operation: one line, exit status 1."""

    exit_status = EXIT_FAILED


class UsageError(RolloverError):
    """The recipe, a path it names or the command line is wrong: one line, exit status 2."""

    exit_status = EXIT_USAGE
