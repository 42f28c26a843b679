"""Ctrl-C and SIGTERM as a user expects them.

The first SIGINT (Ctrl-C) or SIGTERM (`kill`, systemd, a spot preemption's notice) asks the run to stop: the
loop ends at the next step boundary (with several workers, at the next step where they agree, within
train.finite_check_every steps), no new epoch starts, every committed epoch is kept, and the command prints one
line (`interrupted at epoch E ...; resume with: ...`) and exits 128 + the signal: 130 (SIGINT), 143 (SIGTERM).
A second signal exits at once (the committed epochs are kept all the same: checkpoints are written atomically).
What a preemption's grace period buys: the steps since the last committed epoch are given up, never a committed
epoch; a stop takes at most one step (one check interval with several workers) and the way out.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """Raised by the loop at the step boundary where it stopped (a worker returns it under Ray Train)."""

    def __init__(self, epoch: int, step: int):
        super().__init__(epoch, step)
        self.epoch, self.step = epoch, step
        self.run, self.fresh = None, False  # the run directory, and whether this command started it

    def __str__(self) -> str:
        return f"interrupted at epoch {self.epoch} step {self.step}"


class StopOnSignal:
    """Within `with StopOnSignal() as stop:` the first SIGINT or SIGTERM sets `stop.signum` (`stop.requested()`
    turns true) and says so on stderr; a second exits at once with 128 + its number. Outside the main thread (a
    Tune trial, a test's worker thread) nothing is installed and `requested()` stays false."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self) -> StopOnSignal:
        self.install()
        return self

    def install(self) -> None:
        """Put the handlers in place (again, after a library replaced one: ray.init handles SIGTERM itself)."""
        if threading.current_thread() is threading.main_thread():
            previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
            self._previous = self._previous or previous

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            print(f"{signal.Signals(signum).name} again: exiting now", file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)
        self.signum = signum
        print(f"{signal.Signals(signum).name}: stopping at the next step boundary; the committed epochs are kept "
              f"(again to exit at once)", file=sys.stderr, flush=True)


class TermAsInt:
    """SIGTERM handled as Ctrl-C, for a library whose own SIGINT handler stops gracefully (Tune saves the search
    and ends its trials): `install()` after that library's start (ray.init handles SIGTERM itself);
    `exit_code` is then 143 if a SIGTERM came, else 130."""

    def __init__(self):
        self.terminated = False

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)

    @property
    def exit_code(self) -> int:
        return 128 + (signal.SIGTERM if self.terminated else signal.SIGINT)

    def _handle(self, signum: int, frame) -> None:
        self.terminated = True
        os.kill(os.getpid(), signal.SIGINT)
