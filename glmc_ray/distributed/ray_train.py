"""Ray Train (V2) around the same loop: one worker per GPU (or CPU worker over gloo), any number of nodes.

The driver builds a TorchTrainer whose train function calls `worker.run_worker` unchanged, with
  - a `Dist` whose all-reduce is torch.distributed's (evaluation sums per-class hit counts, no gathering),
  - Ray's `prepare_model` for DDP (SyncBatchNorm optional), and
  - a reporter that sends every epoch's metrics and rank 0's checkpoint through `ray.train.report`.
The controller, which runs on the driver's node, appends rank 0's record to `<run>/metrics.jsonl` and its
TensorBoard events; the driver writes `final.json` and the plot from rank 0's return value. A restarted worker
group (lost worker, `max_failures`) or `--resume RUN_DIR` continues from the latest reported checkpoint;
config, data and divergence errors end the run at once (`fail_fast_callback`).

Ctrl-C and SIGTERM (core/interrupts.py): the driver runs `trainer.fit()` in a thread, so Ray Train's own SIGINT
handler (an abort during which the workers train on and report epochs the resume then drops) is not installed,
and passes the request to the workers through a `StopFlag` actor they poll: they stop together at a step
boundary and return, and the driver raises Interrupted with the committed epochs intact.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch

from glmc_ray.core import config as config_lib
from glmc_ray.core import storage as storage_lib
from glmc_ray.core.errors import StorageLost, exit_code
from glmc_ray.core.interrupts import Interrupted, StopOnSignal
from glmc_ray.distributed import cluster
from glmc_ray.methods import METHODS
from glmc_ray.runs import mirror, parent_run, provenance, ray_resume, rundir
from glmc_ray.runs.ray_resume import STATE_FILE, STORAGE_FILE
from glmc_ray.training.loop import Dist

SCORE = "checkpoint_score"
PER_CLASS = "test_per_class"  # rank 0's per-class test accuracy travels with its metrics to the controller


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    torch.distributed.all_reduce(tensor)
    return tensor


class StopFlag:
    """The driver's stop request (Ctrl-C, SIGTERM), as a Ray actor every worker polls."""

    def __init__(self):
        self.stop = False

    def request(self) -> None:
        self.stop = True

    def requested(self) -> bool:
        return self.stop


POLL_SECONDS = 1.0  # a worker asks the StopFlag at most this often (the loop asks at its check steps)


class RayReporter:
    """Every rank calls `ray.train.report` once per epoch (it is a barrier); rank 0 attaches the checkpoint.
    `stop`: the driver's StopFlag actor, or None."""

    def __init__(self, dist: Dist, has_val: bool, stop=None):
        self.dist, self.has_val, self.stop = dist, has_val, stop
        self.stopped, self.polled = False, -math.inf

    def stop_requested(self) -> bool:
        import ray

        if self.stop is not None and not self.stopped and time.monotonic() - self.polled >= POLL_SECONDS:
            self.polled = time.monotonic()
            try:
                self.stopped = ray.get(self.stop.requested.remote())
            except ray.exceptions.RayActorError:  # gone with the driver's node: no one is left to ask for a stop
                self.stop = None
        return self.stopped

    def report(self, record: dict, checkpoint, is_best: bool, per_class: list | None) -> None:
        import ray.train

        # Ray keeps the best checkpoints by this score: validation accuracy (-1 on epochs without
        # evaluation), or the epoch when there is no validation split (the latest are kept).
        score = record.get("val_balanced_top1", -1.0) if self.has_val else record["epoch"]
        record = {**record, SCORE: score, PER_CLASS: per_class}
        if not self.dist.is_main:
            ray.train.report(record)
            return
        with tempfile.TemporaryDirectory() as folder:
            state = checkpoint()
            rundir.save_checkpoint(state, Path(folder) / STATE_FILE)
            # the epochs this checkpoint holds: a resume rebuilds <run>/metrics.jsonl from them
            rundir.write_metrics(Path(folder), state["history"])
            ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=f"checkpoint_epoch{record['epoch']:04d}",
                             checkpoint_upload_fn=upload_checkpoint)

    def finish(self, final: dict) -> None:
        pass  # rank 0 returns `final`; the driver writes final.json and the plot


def upload_checkpoint(checkpoint, name: str):
    """Ray Train's checkpoint upload, file by file through the run's storage filesystem (which retries a
    failed upload whole, storage_retry): pyarrow's copy_files, Ray's default, drops an error raised when a
    Python filesystem's file is closed, which would leave a checkpoint reported that never reached storage."""
    import ray.train

    context = ray.train.get_context().get_storage()
    fs, target = context.storage_filesystem, context.build_checkpoint_path_from_name(name)
    fs.create_dir(target)
    for path in sorted(Path(checkpoint.path).iterdir()):
        with open(path, "rb") as source, fs.open_output_stream(f"{target}/{path.name}") as stream:
            shutil.copyfileobj(source, stream, 8 << 20)
    return ray.train.Checkpoint(target, fs)


def train_fn(loop_config: dict) -> dict:
    """The Ray Train worker function: restore the latest checkpoint, if any, and run the loop.

    `loop_config`: {"config": the run's config as a dict, "restore_from": a checkpoint folder to start from
    when Ray holds none (ray_resume.Resume.folder), or None, "stop": the driver's StopFlag actor, or None}.
    A stop returns {"interrupted": [epoch, step]}: a normal end for Ray Train, which retries no worker."""
    import ray.train
    from ray.train.torch import get_device, prepare_model

    from glmc_ray.distributed.ray_logging import route_train_context_logger
    from glmc_ray.training.worker import run_worker

    route_train_context_logger()
    cfg = config_lib.from_dict(loop_config["config"])
    context = ray.train.get_context()
    dist = Dist(context.get_world_rank(), context.get_world_size(), _all_reduce)
    state, checkpoint = None, ray.train.get_checkpoint()
    if checkpoint is not None:  # Ray's latest: a resume, or a worker group restarted within this run
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)
        restored = checkpoint.path
    elif loop_config["restore_from"] is not None:  # a resume whose snapshot Ray could not use
        state, restored = ray_resume.load_state(loop_config["restore_from"]), loop_config["restore_from"]
    if state is not None and dist.is_main:
        print(f"restored checkpoint {restored}: continuing at epoch {state['epoch']}", flush=True)
    find_unused = not METHODS[cfg.method.name].uses_all_heads

    def prepare(model):
        if dist.world_size == 1:
            return model
        return prepare_model(model, move_to_device=False, parallel_strategy="ddp",
                             parallel_strategy_kwargs={"find_unused_parameters": find_unused})
    reporter = RayReporter(dist, config_lib.has_validation(cfg), loop_config.get("stop"))
    try:  # get_device(): the GPU Ray assigned to this worker (not always cuda:<local rank>), or the CPU
        final = run_worker(cfg, reporter, dist, state, get_device(), prepare, ray.train.get_dataset_shard)
    except Interrupted as interruption:
        return {"interrupted": [interruption.epoch, interruption.step]}
    # version.json holds the driver's device; the workers' can differ (a CPU head node drives GPU nodes)
    return {**final, "workers": {"count": dist.world_size, "rank0_device": provenance.device_description()}}


def metrics_callback(run: Path, remote: str | None = None, ride_out: float = 0.0, names: list[str] | None = None):
    """A controller-side callback that keeps `<run>/metrics.jsonl` (and the TensorBoard events) equal to the
    committed epochs, and their copy at `remote` (run_mirror) when the run has one, riding out storage outages
    of up to `ride_out` seconds."""
    from ray.train import UserCallback

    from glmc_ray.runs.tensorboard_events import EpochEvents

    class MetricsFile(UserCallback):
        def __init__(self):
            self.events = EpochEvents(run, lambda: rundir.read_metrics(run), names)
            self.pushed = None

        def after_report(self, run_context, metrics, checkpoint):
            record = {k: v for k, v in metrics[0].items() if k not in (SCORE, PER_CLASS)}
            rundir.truncate_metrics(run, record["epoch"])  # a replayed epoch replaces, never duplicates
            rundir.append_metrics(run, record)
            self.events.write(record, metrics[0][PER_CLASS])
            if remote is not None:
                self.pushed = mirror.push(run, remote, self.pushed, ride_out)

    return MetricsFile()


class NotRetried(Exception):
    """Raised in the controller to end a run whose worker failed in a way no restart can fix."""

    def __init__(self, rank: int, error: BaseException):
        super().__init__(rank, error)  # pickling rebuilds an exception from its args (Ray sends it to the driver)
        self.rank, self.error = rank, error

    def __str__(self) -> str:
        return f"worker {self.rank}: {self.error}"


def fail_fast_callback():
    """Ends the run at the first config, data or divergence error of any worker instead of retrying it.

    Ray Train 2.60 retries every worker error up to `max_failures`, and its failure policy is internal; an
    exception raised from a UserCallback is a controller error, which it never retries."""
    from ray.train import UserCallback

    class FailFast(UserCallback):
        def after_exception(self, run_context, worker_exceptions):
            for rank, error in sorted(worker_exceptions.items()):
                if exit_code(error) is not None:
                    raise NotRetried(rank, error)

    return FailFast()


def restart_notice_callback(run: Path, max_failures: int):
    """A controller-side callback that says on the console, in one line, that Ray Train restarts the worker
    group: "worker lost, restarting from epoch N" (or "worker R failed (Error: ...), restarting ..." for an
    error of the worker itself). Ray's own account (the surviving ranks' and the controller's tracebacks)
    goes to its log files (ray_logging.keep_off_console). Nothing is said when Ray gives up (max_failures
    spent: the driver prints the error) or when fail_fast_callback ends the run."""
    from ray.train import UserCallback

    class RestartNotice(UserCallback):
        def __init__(self):
            # the epoch after the latest committed one: the checkpoint a restarted group starts from
            self.next_epoch = max((r["epoch"] + 1 for r in rundir.read_metrics(run)), default=0)
            self.failures = 0

        def after_report(self, run_context, metrics, checkpoint):
            if checkpoint is not None:
                self.next_epoch = metrics[0]["epoch"] + 1

        def after_exception(self, run_context, worker_exceptions):
            errors = sorted(worker_exceptions.items())
            if any(exit_code(error) is not None for _, error in errors):
                return  # not retried (fail_fast_callback)
            if not any(_preempted(error) for _, error in errors):  # preemptions have their own budget (-1)
                self.failures += 1
                if 0 <= max_failures < self.failures:
                    return
            if any(_lost(error) for _, error in errors):
                what = "worker lost"
            else:
                rank, error = errors[0]
                last_line = (str(error).strip().splitlines() or [""])[-1]
                what = f"worker {rank} failed ({type(error).__name__}: {last_line})"
            print(f"{what}, restarting from epoch {self.next_epoch}", flush=True)

    return RestartNotice()


def _actor_error(error: BaseException):
    """The RayActorError behind a worker error, if any: a dead worker process shows as Ray Train's
    WorkerHealthCheckFailedError around it."""
    from ray.exceptions import RayActorError

    error = getattr(error, "health_check_failure", error)
    return error if isinstance(error, RayActorError) else None


def _lost(error: BaseException) -> bool:
    return _actor_error(error) is not None


def _preempted(error: BaseException) -> bool:
    return bool(getattr(_actor_error(error), "preempted", False))


def launch(cfg, scaling: cluster.Scaling, output: str | Path = "runs", resume: Path | None = None,
           storage: str | None = None, ray_verbose: bool = False, callbacks: list = (),
           stop: StopOnSignal | None = None) -> tuple[Path, dict]:
    """Check the request, then make the run directory (or take `resume`'s) and run the loop under a
    TorchTrainer; the run's name and storage make it resumable. Nothing is written when a check fails.

    `storage`: where Ray Train keeps the checkpoints (default: the run directory's parent; a resume takes the
    one the run recorded). Storage elsewhere (s3://...) also gets a copy of the run directory, every epoch.
    `ray_verbose` shows Ray Train's own INFO lines on the console (always in its log files); `callbacks`:
    extra Ray Train UserCallbacks (the search forwards each epoch to Tune with one); `stop`: the command's
    signal handler, whose request stops the workers (Interrupted is raised then)."""
    from glmc_ray.data import ray_cpus
    from glmc_ray.distributed.ray_logging import quiet_snapshot_notice

    cluster.check_scaling(cfg, scaling)
    cluster.check_resources(scaling, ray_cpus(cfg))
    quiet_snapshot_notice(ray_verbose)  # reading the run's snapshot on a resume would print Ray's notice
    if resume is not None and (resume / rundir.CHECKPOINT).exists():
        raise ValueError(f"{resume} was trained in-process; resume it without Ray options")
    storage = run_storage(resume, storage) or str(Path(output).resolve())
    cluster.check_shared_storage(storage, scaling.nodes, cluster.cluster_hosts())
    storage_lib.check_writable(storage, "--storage")
    restore_from = None
    if resume is not None:
        restore_from = ray_resume.prepare(resume, storage).folder
        provenance.record_resume(resume)
    run = resume or rundir.new_run_dir(output, cfg)
    print(f"run directory: {run} ({scaling.workers} {'GPU' if scaling.use_gpu else 'CPU'} workers "
          f"on {scaling.nodes} node(s))", flush=True)
    remote = storage_lib.join(storage, run.name)
    mirrored = storage_lib.is_uri(storage) or Path(storage).resolve() != run.parent.resolve()
    try:
        with rundir.removed_if_failed_start(run, fresh=resume is None, quiet=(Interrupted, StorageLost)):
            if resume is None:
                if mirrored:  # checked before anything is written there (and so before the clean-up below)
                    storage_lib.check_free(remote, "--storage", "run")
                (run / STORAGE_FILE).write_text(json.dumps({"storage": storage}) + "\n")
                parent_run.record(run, cfg)
            with _removed_if_no_checkpoint(remote if mirrored and resume is None else None):
                final = _fit(cfg, run, storage, scaling, ray_verbose, callbacks, restore_from,
                             remote if mirrored else None, stop)
            return run, final
    except (Interrupted, StorageLost) as stopped:
        stopped.run, stopped.fresh = run, resume is None
        raise


def run_storage(resume: Path | None, storage: str | None) -> str | None:
    """The storage a run uses: the one given, or the one a resumed run recorded (a different one is refused:
    its checkpoints would not be found there)."""
    recorded = None
    if resume is not None and (resume / STORAGE_FILE).is_file():
        recorded = json.loads((resume / STORAGE_FILE).read_text())["storage"]
    if storage and recorded and storage_lib.join(storage) != storage_lib.join(recorded):
        raise ValueError(f"--storage {storage}: {resume} keeps its checkpoints in {recorded} ({STORAGE_FILE}); "
                         f"resume it without --storage")
    return storage or recorded or (str(resume.parent) if resume is not None else None)


@contextlib.contextmanager
def _removed_if_no_checkpoint(remote: str | None):
    """A fresh run that fails before its first checkpoint leaves nothing under its prefix on storage (Ray made
    it). On S3 the storage prefix itself may keep an empty folder marker (pyarrow makes one when the last
    object under a folder is deleted, as after the write check)."""
    try:
        yield
    except BaseException:
        if remote is not None:
            fs, path = storage_lib.resolve(remote)
            with contextlib.suppress(OSError):  # storage that is gone keeps what Ray made; the error goes on
                if not ray_resume.checkpoint_folders(fs, path) and storage_lib.exists(remote):
                    fs.delete_dir(path)
        raise


def _fit(cfg, run: Path, storage: str, scaling: cluster.Scaling, ray_verbose: bool, callbacks: list = (),
         restore_from: str | None = None, remote: str | None = None, stop: StopOnSignal | None = None) -> dict:
    import ray
    from ray.train import CheckpointConfig, ControllerError, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from glmc_ray.data import class_names, ray_datasets
    from glmc_ray.distributed.ray_logging import controller_console_callback

    resources = {"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {})}
    # Ray Train's own writes (checkpoints, its snapshot) ride out outages as the run's copy does; pickled
    # with the trainer, the filesystem takes its window and endpoint to every worker
    ride_out = cfg.dist.storage_retry_seconds
    filesystem, storage_path = storage_lib.resolve(storage, ride_out) if storage_lib.is_uri(storage) \
        else (None, storage)
    flag = None
    if stop is not None:  # on the driver's node, as Ray Train's controller: a lost worker node does not take it
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        flag = ray.remote(num_cpus=0, scheduling_strategy=here)(StopFlag).remote()
    trainer = TorchTrainer(
        train_fn,
        train_loop_config={"config": config_lib.to_dict(cfg), "restore_from": restore_from, "stop": flag},
        datasets=ray_datasets(cfg, scaling.use_gpu) or None,
        scaling_config=ScalingConfig(num_workers=scaling.workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy="SPREAD" if scaling.nodes > 1 else "PACK"),
        run_config=RunConfig(
            name=run.name, storage_path=storage_path, storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.dist.keep_checkpoints,
                checkpoint_score_attribute=SCORE, checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=cfg.dist.max_failures, controller_failure_limit=3),
            callbacks=[metrics_callback(run, remote, ride_out, class_names(cfg)), fail_fast_callback(),
                       restart_notice_callback(run, cfg.dist.max_failures), controller_console_callback(),
                       *callbacks],
            # Ray Train's INFO lines (each rank's "Reporting training result" dump every epoch, which
            # train_fn's route_train_context_logger brings under this setting, the worker group's start)
            # would bury the epoch lines; its system log files in <Ray session>/logs/train/ keep every level.
            logging_config=LoggingConfig(log_level="INFO" if ray_verbose else "WARNING"),
            # Ray Train's print patch would show every rank-0 line twice on the driver.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}))
    try:
        result = _fit_watching(trainer, stop, flag)
    except ControllerError as err:
        if isinstance(err.controller_failure, NotRetried):
            raise err.controller_failure.error from None  # the worker's own error, as in-process
        lost = _storage_lost(err.controller_failure)
        if lost is not None:  # the controller's own writes (its snapshot, the run's copy)
            raise lost from None
        raise
    if result.error is not None:
        raise result.error
    ray_resume.delete_untracked_checkpoints(result)  # those from before a resume that fell back (none otherwise)
    final = result.return_value
    if "interrupted" in final:
        raise Interrupted(*final["interrupted"])
    rundir.write_final(run, final, cfg)
    if remote is not None:
        mirror.push(run, remote, ride_out=ride_out)
    return final


def _storage_lost(error: BaseException | None) -> StorageLost | None:
    """The StorageLost in a controller failure's chain of causes, if any."""
    while error is not None and not isinstance(error, StorageLost):
        error = error.__cause__ or error.__context__
    return error


def _fit_watching(trainer, stop: StopOnSignal | None, flag):
    """trainer.fit() in a thread (so Ray Train installs no SIGINT handler of its own) while this thread, the
    main one, handles the signals and passes a stop request on to the workers through `flag`."""
    if stop is None:
        return trainer.fit()
    outcome = {}

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # handed to the main thread as it is
            outcome["error"] = err

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    passed = False
    while thread.is_alive():
        thread.join(0.2)  # short waits: signal handlers run in this thread between them
        if stop.requested() and not passed:
            flag.request.remote()
            passed = True
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]

