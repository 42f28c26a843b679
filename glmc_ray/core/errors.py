"""Failures that a restart cannot fix, and the exit code each ends the command line with.

Bad config or data (a ValueError, ConfigError included, or a missing file) and output that cannot be written
exit with 2, a diverged run (non-finite loss or weights) with 1, storage that stayed unreachable longer than the
run rides out with 75 (EX_TEMPFAIL: try again later, with the resume command it prints). Under Ray Train these
end the run at once instead of being retried: only lost workers and nodes are worth a restart.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable


class OutputError(Exception):
    """A run's output cannot be written (a file given as the output folder, no permission, a full disk); the
    message names the path, the cause and what is still intact. No restart on the same storage fixes it."""


class StorageLost(Exception):
    """Object storage or the study database stayed unreachable for longer than the retry window; the message
    names the endpoint or database, the window and the last error. Not an OSError: nothing that handles a
    storage error (a failed upload turned into StorageError) may take it for one it can explain."""

    run, fresh = None, False  # the run directory, and whether this command started it (set by the trainer)


STORAGE_LOST = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, the command may be tried again
CLOSED_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a command whose reader left (`... | head`)

EXIT_CODES = ((StorageLost, STORAGE_LOST), (FloatingPointError, 1), (FileNotFoundError, 2), (ValueError, 2),
              (OutputError, 2))


def exit_code(error: BaseException) -> int | None:
    """The exit code of a failure no restart can fix, or None for one that a restart may (a lost worker)."""
    return next((code for kind, code in EXIT_CODES if isinstance(error, kind)), None)


def kept_checkpoint(next_epoch: int) -> str:
    """What a failure at `next_epoch` leaves to resume from, said truthfully."""
    if next_epoch == 0:
        return "no checkpoint was written (no epoch finished)"
    return f"the checkpoint after epoch {next_epoch - 1} is kept; --resume continues from there"


def run_command(command: Callable[[], int]) -> int:
    """command(); a failure no restart can fix ends as one `error:` line on stderr and its exit code."""
    try:
        return command()
    except BrokenPipeError:  # the reader of stdout left: end as a command killed by SIGPIPE, without a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python flushes stdout again on exit
        return CLOSED_PIPE
    except Exception as err:
        code = exit_code(err)
        if code is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        return code
