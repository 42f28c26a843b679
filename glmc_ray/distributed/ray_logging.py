"""Make Ray Train's LoggingConfig govern all of Ray Train's worker log records, and keep Ray's account of a
lost worker in Ray's log files (the console gets one line of ours, `ray_train.restart_notice_callback`).

`RunConfig(logging_config=LoggingConfig(log_level=...))` sets the console level of the `ray.train` loggers and
keeps every level in Ray's system log files (<Ray session>/logs/train/ray-train-sys-*.log). Ray 2.60's
`ray/train/v2/_internal/execution/context.py` logs through `logging.getLogger(__file__)`, a logger named by its
file path, so its "Reporting training result N: TrainingReport(...)" line (each rank, every report) escapes
that configuration and reaches the console at any level.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

RAY_DATA_LOGGING = Path(__file__).with_name("ray_data_logging.yaml")


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
    keep_off_console(WORKER_FAILURE_LOGGERS)


# Ray Train loggers whose records are full tracebacks that LoggingConfig(log_level="WARNING") still lets onto the
# console (Ray 2.60, ray/train/v2/...). A worker killed in a multi-worker run makes each surviving rank's
# collective fail and the controller shut the group down: ~50 traceback lines, then the restart.
WORKER_FAILURE_LOGGERS = (
    # _internal/util.py::construct_user_exception_with_traceback: "Error in training function:" and the
    # traceback, logged at ERROR by every rank whose train function raised (here: the lost peer's gloo error)
    "ray.train.v2._internal.util",
)
CONTROLLER_FAILURE_LOGGERS = (
    # _internal/callbacks/backend_setup.py: "Graceful shutdown of backend failed ..." with the worker's
    # ActorDiedError traceback (WARNING, exc_info), every time a group with a dead worker is shut down
    "ray.train.v2._internal.callbacks.backend_setup",
    # _internal/execution/scaling_policy/autoscaling_coordinator_client.py: "Failed to send resource request
    # ... If this only happens transiently during network partition or CPU being overloaded, it's safe to
    # ignore this error" with a GetTimeoutError traceback (WARNING, exc_info), seen on a loaded 2-core machine
    "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client",
    # _internal/execution/controller/controller.py: "Error in control loop iteration" and the traceback (ERROR)
    # of an exception in the controller, such as a callback's (a lost storage, fail_fast_callback's NotRetried):
    # the driver gets the same error from trainer.fit() and prints it (one `error:` line, or the traceback)
    "ray.train.v2._internal.execution.controller.controller",
)
# _internal/execution/checkpoint/checkpoint_manager.py: the 3-line "A run snapshot was found in storage folder
# ..." notice (INFO). The controller logs it into its log file on every resume; Result.from_path, which the
# driver calls before a resume (glmc_ray/runs/ray_resume.py), logs it again on the driver's console through the
# `ray` logger's handler.
SNAPSHOT_NOTICE_LOGGER = "ray.train.v2._internal.execution.checkpoint.checkpoint_manager"


def keep_off_console(names) -> None:
    """In a Ray Train worker or controller: the loggers `names` write to Ray Train's log files only
    (<Ray session>/logs/train/ray-train-{sys,app}-*.log, the handlers Ray Train set up from LoggingConfig),
    not to the console. Nothing changes when LoggingConfig shows INFO on the console (`--ray-verbose`).
    Call it after Ray Train has configured the process's logging (in the train function; in a controller
    callback), since that configuration resets the `ray.train.*` loggers."""
    from ray.train.v2._internal.logging.logging import SessionFileHandler

    train = logging.getLogger("ray.train")
    files = [h for h in train.handlers if isinstance(h, SessionFileHandler)]
    if not files or _console_shows_info(train, files):
        return
    for name in names:
        logger = logging.getLogger(name)
        logger.handlers = list(files)
        logger.propagate = False


def controller_console_callback():
    """A Ray Train callback that applies keep_off_console(CONTROLLER_FAILURE_LOGGERS) in the controller as
    soon as it starts (its logging is configured by then). It is one of Ray Train's internal
    ControllerCallbacks, which RunConfig(callbacks=...) accepts next to UserCallbacks ("custom workarounds
    built on top of internal callbacks", data_parallel_trainer.py); the public UserCallback has no start hook."""
    from ray.train.v2._internal.execution.callback import ControllerCallback

    class ControllerConsole(ControllerCallback):
        def after_controller_start(self, train_run_context):
            keep_off_console(CONTROLLER_FAILURE_LOGGERS)

    return ControllerConsole()


def _console_shows_info(train: logging.Logger, files) -> bool:
    probe = logging.LogRecord(train.name, logging.INFO, __file__, 0, "probe", None, None)
    return any(handler.filter(probe) for handler in train.handlers if handler not in files)


def quiet_snapshot_notice(verbose: bool) -> None:
    """On the driver: no "A run snapshot was found" notice on the console (the controller's copy is in its
    log file) unless `verbose`."""
    logging.getLogger(SNAPSHOT_NOTICE_LOGGER).setLevel(logging.INFO if verbose else logging.WARNING)


TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def quiet_ray_console(verbose: bool) -> None:
    """Before this process imports Ray: our lines on the console as they are written, without Ray's
    `(RayTrainWorker pid=...)` prefix and its colour codes (RAY_DISABLE_WORKER_LOG_PREFIX, read when Ray is
    imported), and without the warning that a Ray instance started here uses token authentication (Ray's
    default; set RAY_AUTH_MODE to choose). Ray's log files keep everything; `verbose` leaves the console as
    Ray sets it. A value the user set wins."""
    if verbose:
        return
    os.environ.setdefault("RAY_DISABLE_WORKER_LOG_PREFIX", "1")
    logging.getLogger(TOKEN_AUTH_LOGGER).setLevel(logging.ERROR)


def quiet_ray_data() -> None:
    """Ray Data's INFO lines (execution plans, the progress it logs every few seconds when stdout is not a
    terminal, "registers for logging ...") to its log file only, <Ray session>/logs/ray-data/ray-data.log;
    its warnings stay on the console.

    Through Ray Data's own setting, RAY_DATA_LOGGING_CONFIG (ray_data_logging.yaml: its default with the console
    at WARNING), which the processes of a Ray instance started after this inherit: decode actors, Ray Train's
    split coordinators. Ray Data reads it when imported; in this process, if it was imported already, its
    console handler is lowered here too. A value the user set wins."""
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(RAY_DATA_LOGGING))
    if os.environ["RAY_DATA_LOGGING_CONFIG"] != str(RAY_DATA_LOGGING):
        return
    from ray.data._internal.logging import SessionFileHandler

    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, SessionFileHandler):
            handler.setLevel(logging.WARNING)
