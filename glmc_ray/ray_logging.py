"""Make Ray Train's LoggingConfig govern all of Ray Train's worker log records.

`RunConfig(logging_config=LoggingConfig(log_level=...))` sets the console level of the `ray.train` loggers and
keeps every level in Ray's system log files (<Ray session>/logs/train/ray-train-sys-*.log). Ray 2.60's
`ray/train/v2/_internal/execution/context.py` logs through `logging.getLogger(__file__)`, a logger named by its
file path, so its "Reporting training result N: TrainingReport(...)" line (each rank, every report) escapes
that configuration and reaches the console at any level.
"""
from __future__ import annotations

import logging


class _ForwardTo(logging.Handler):
    def __init__(self, logger: logging.Logger):
        super().__init__()
        self.logger = logger

    def emit(self, record: logging.LogRecord) -> None:
        record.name = self.logger.name
        self.logger.handle(record)


def route_train_context_logger() -> None:
    """Hand the path-named logger's records to the `ray.train` logger they belong to, whose handlers (set up by
    Ray Train in each worker) apply LoggingConfig's level on the console and keep them in the system log file.
    Call it in the train function: Ray Train configures a worker's logging before running it."""
    from ray.train.v2._internal.execution import context

    misnamed = logging.getLogger(context.__file__)
    if not any(isinstance(h, _ForwardTo) for h in misnamed.handlers):
        misnamed.addHandler(_ForwardTo(logging.getLogger(context.__name__)))
        misnamed.propagate = False
