"""Ray Train (V2) around the same loop: one worker per GPU (or CPU worker over gloo), any number of nodes.

The driver builds a TorchTrainer whose train function calls `worker.run_worker` unchanged, with
  - a `Dist` whose all-reduce is torch.distributed's (evaluation sums per-class hit counts, no gathering),
  - Ray's `prepare_model` for DDP (SyncBatchNorm optional), and
  - a reporter that sends every epoch's metrics and rank 0's checkpoint through `ray.train.report`.
The controller, which runs on the driver's node, appends rank 0's record to `<run>/metrics.jsonl` and its
TensorBoard events; the driver writes `final.json` and the plot from rank 0's return value. A restarted worker
group (lost worker, `max_failures`) or `--resume RUN_DIR` continues from the latest reported checkpoint;
config, data and divergence errors end the run at once (`fail_fast_callback`).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from glmc_ray import config as config_lib
from glmc_ray import provenance, rundir
from glmc_ray.errors import exit_code
from glmc_ray.loop import Dist
from glmc_ray.methods import METHODS

STATE_FILE = "state.pt"
SCORE = "checkpoint_score"
PER_CLASS = "test_per_class"  # rank 0's per-class test accuracy travels with its metrics to the controller
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs", "9p")


@dataclass
class Scaling:
    workers: int
    use_gpu: bool
    nodes: int = 1
    cpus_per_worker: float = 1.0


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    torch.distributed.all_reduce(tensor)
    return tensor


class RayReporter:
    """Every rank calls `ray.train.report` once per epoch (it is a barrier); rank 0 attaches the checkpoint."""

    def __init__(self, dist: Dist, has_val: bool):
        self.dist, self.has_val = dist, has_val

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
                             checkpoint_dir_name=f"checkpoint_epoch{record['epoch']:04d}")

    def finish(self, final: dict) -> None:
        pass  # rank 0 returns `final`; the driver writes final.json and the plot


def train_fn(loop_config: dict) -> dict:
    """The Ray Train worker function: restore the latest checkpoint, if any, and run the loop."""
    import ray.train
    from ray.train.torch import get_device, prepare_model

    from glmc_ray.ray_logging import route_train_context_logger
    from glmc_ray.worker import run_worker

    route_train_context_logger()
    cfg = config_lib.from_dict(loop_config)
    context = ray.train.get_context()
    dist = Dist(context.get_world_rank(), context.get_world_size(), _all_reduce)
    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)
        if dist.is_main:
            print(f"restored checkpoint {checkpoint.path}: continuing at epoch {state['epoch']}", flush=True)
    find_unused = not METHODS[cfg.method.name].uses_all_heads

    def prepare(model):
        if dist.world_size == 1:
            return model
        return prepare_model(model, move_to_device=False, parallel_strategy="ddp",
                             parallel_strategy_kwargs={"find_unused_parameters": find_unused})
    reporter = RayReporter(dist, has_validation(cfg))
    # get_device(): the GPU Ray assigned to this worker (not always cuda:<local rank>), or the CPU
    final = run_worker(cfg, reporter, dist, state, get_device(), prepare, ray.train.get_dataset_shard)
    # version.json holds the driver's device; the workers' can differ (a CPU head node drives GPU nodes)
    return {**final, "workers": {"count": dist.world_size, "rank0_device": provenance.device_description()}}


def has_validation(cfg) -> bool:
    return cfg.data.val_fraction > 0 or bool(cfg.data.val_split)


def metrics_callback(run: Path):
    """A controller-side callback that keeps `<run>/metrics.jsonl` (and the TensorBoard events) equal to the
    committed epochs."""
    from ray.train import UserCallback

    from glmc_ray.tensorboard_events import EpochEvents

    class MetricsFile(UserCallback):
        def __init__(self):
            self.events = EpochEvents(run)

        def after_report(self, run_context, metrics, checkpoint):
            record = {k: v for k, v in metrics[0].items() if k not in (SCORE, PER_CLASS)}
            rundir.truncate_metrics(run, record["epoch"])  # a replayed epoch replaces, never duplicates
            rundir.append_metrics(run, record)
            self.events.write(record, metrics[0][PER_CLASS])

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


def restore_committed_epochs(run: Path, storage: str) -> None:
    """Before a Ray resume: metrics.jsonl becomes the history of the checkpoint Ray will restore, and
    checkpoint folders Ray no longer tracks are deleted.

    Ray's checkpoint manager commits a checkpoint before the metrics callback appends its line, and deletes
    dropped checkpoints after that; a driver killed in between left an epoch missing or a folder orphaned."""
    from ray.train import Result

    rundir.remove_partial_writes(run)
    try:
        result = Result.from_path(f"{storage.rstrip('/')}/{run.name}")
    except RuntimeError:  # no checkpoint manager snapshot
        result = None
    if result is None or result.checkpoint is None:  # no epoch was committed
        rundir.write_metrics(run, [])
        return
    latest = result.checkpoint
    with latest.filesystem.open_input_stream(f"{latest.path}/{rundir.METRICS}") as stream:
        history = [json.loads(line) for line in stream.read().decode().splitlines()]
    _write_missing_events(run, history)
    rundir.write_metrics(run, history)
    _delete_untracked_checkpoints(latest, {latest.path, *(c.path for c, _ in result.best_checkpoints)})


def _write_missing_events(run: Path, history: list[dict]) -> None:
    """TensorBoard points of committed epochs whose metrics line was never written (their per-class
    accuracy is not in the history, only the scalars)."""
    from glmc_ray.tensorboard_events import EpochEvents

    written = {record["epoch"] for record in rundir.read_metrics(run)}
    missing = [record for record in history if record["epoch"] not in written]
    if missing:
        events = EpochEvents(run)
        for record in missing:
            events.write(record)
        events.close()


def _delete_untracked_checkpoints(latest, tracked: set[str]) -> None:
    import pyarrow.fs

    folder = os.path.dirname(latest.path)
    for info in latest.filesystem.get_file_info(pyarrow.fs.FileSelector(folder)):
        if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("checkpoint_") \
                and info.path not in tracked:
            latest.filesystem.delete_dir(info.path)


def cluster_hosts() -> int:
    import ray

    return len({n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]})


def check_shared_storage(storage: str, nodes: int, hosts: int) -> None:
    """A run across machines needs storage every node sees: a URI (s3://, gs://, ...) or a network filesystem.

    Nodes that share one host (a simulated cluster) share its disk, so any path works there.
    """
    if nodes <= 1 or hosts <= 1 or "://" in storage:
        return
    fstype = _filesystem_type(Path(storage))
    if fstype not in NETWORK_FILESYSTEMS:
        raise ValueError(f"--storage {storage} is on a node-local filesystem ({fstype}); a run on {nodes} nodes "
                         f"needs storage that every node sees: s3://bucket/path, gs://..., or an NFS mount")


def _filesystem_type(path: Path) -> str:
    path = path.resolve()
    best, fstype = "", "unknown"
    with open("/proc/mounts") as mounts:
        for line in mounts:
            _, mount_point, kind = line.split()[:3]
            inside = path == Path(mount_point) or Path(mount_point) in path.parents
            if inside and len(mount_point) > len(best):
                best, fstype = mount_point, kind
    return fstype


def scaling_for(nodes: int | None, workers: int | None, gpus_per_node: int | None) -> Scaling:
    """Workers = nodes x GPUs per node on GPU clusters; with no GPU, `workers` CPU workers over gloo."""
    import ray

    if gpus_per_node is None:
        gpus = [n["Resources"].get("GPU", 0) for n in ray.nodes() if n["Alive"]]
        gpus_per_node = int(max(gpus, default=0))
    nodes = nodes or 1
    if gpus_per_node > 0:
        if workers is not None and workers != nodes * gpus_per_node:
            raise ValueError(f"--workers {workers} disagrees with --nodes {nodes} x --gpus-per-node {gpus_per_node}")
        return Scaling(nodes * gpus_per_node, True, nodes)
    return Scaling(workers or nodes, False, nodes)


def check_scaling(cfg, scaling: Scaling) -> None:
    if cfg.dist.sync_batchnorm and not scaling.use_gpu and scaling.workers > 1:
        raise config_lib.ConfigError("dist.sync_batchnorm: torch's SyncBatchNorm synchronises CUDA tensors only; "
                                     "on CPU workers use model.norm=group (independent of the batch split)")


def launch(cfg, scaling: Scaling, output: str | Path = "runs", resume: Path | None = None,
           storage: str | None = None, ray_verbose: bool = False, callbacks: list = ()) -> tuple[Path, dict]:
    """Check the request, then make the run directory (or take `resume`'s) and run the loop under a
    TorchTrainer; the run's name and storage make it resumable. Nothing is written when a check fails.

    `ray_verbose` shows Ray Train's own INFO lines on the console (always in its log files); `callbacks`:
    extra Ray Train UserCallbacks (the search forwards each epoch to Tune with one)."""
    check_scaling(cfg, scaling)
    if resume is not None and (resume / rundir.CHECKPOINT).exists():
        raise ValueError(f"{resume} was trained in-process; resume it without Ray options")
    storage = storage or str(resume.parent if resume is not None else Path(output).resolve())
    check_shared_storage(storage, scaling.nodes, cluster_hosts())
    if resume is not None:
        restore_committed_epochs(resume, storage)
        provenance.record_resume(resume)
    run = resume or rundir.new_run_dir(output, cfg)
    print(f"run directory: {run} ({scaling.workers} {'GPU' if scaling.use_gpu else 'CPU'} workers "
          f"on {scaling.nodes} node(s))", flush=True)
    with rundir.removed_if_failed_start(run, fresh=resume is None):
        return run, _fit(cfg, run, storage, scaling, ray_verbose, callbacks)


def _fit(cfg, run: Path, storage: str, scaling: Scaling, ray_verbose: bool, callbacks: list = ()) -> dict:
    from ray.train import CheckpointConfig, ControllerError, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from glmc_ray.data import ray_datasets

    resources = {"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {})}
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=config_lib.to_dict(cfg),
        datasets=ray_datasets(cfg, METHODS[cfg.method.name].uses_rebalanced_stream) or None,  # split per worker
        scaling_config=ScalingConfig(num_workers=scaling.workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy="SPREAD" if scaling.nodes > 1 else "PACK"),
        run_config=RunConfig(
            name=run.name, storage_path=storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.dist.keep_checkpoints,
                checkpoint_score_attribute=SCORE, checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=cfg.dist.max_failures, controller_failure_limit=3),
            callbacks=[metrics_callback(run), fail_fast_callback(), *callbacks],
            # Ray Train's INFO lines (each rank's "Reporting training result" dump every epoch, which
            # train_fn's route_train_context_logger brings under this setting, the worker group's start)
            # would bury the epoch lines; its system log files in <Ray session>/logs/train/ keep every level.
            logging_config=LoggingConfig(log_level="INFO" if ray_verbose else "WARNING"),
            # Ray Train's print patch would show every rank-0 line twice on the driver.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}))
    try:
        result = trainer.fit()
    except ControllerError as err:
        if isinstance(err.controller_failure, NotRetried):
            raise err.controller_failure.error from None  # the worker's own error, as in-process
        raise
    if result.error is not None:
        raise result.error
    final = result.return_value
    rundir.write_final(run, final, cfg)
    return final


def connect(address: str | None, workers: int, data_cpus: float = 0.0) -> None:
    """Join a cluster (`--address`, RAY_ADDRESS, or one running on this node, such as a `ray up` head node),
    else start a local Ray instance in-process, with `data_cpus` more logical CPUs for Ray Data streams."""
    import ray
    from ray._private.services import canonicalize_bootstrap_address

    if ray.is_initialized():
        return
    # Ray's own discovery (RAY_ADDRESS, then a cluster started on this node), resolved to host:port first:
    # ray.init(address="auto") lost the Train controller on a simulated 2-node cluster in our tests.
    address = address or canonicalize_bootstrap_address(None)
    if address:
        ray.init(address=address)
    else:  # no cluster here: logical CPUs may exceed the cores, the workers then share them
        # Nothing drains the node of a Ray instance started here (no autoscaler, no preemptible machine), so
        # Ray Train's preemption watcher would only add an actor and a console error about it. Read by
        # TorchTrainer.fit from the driver's environment; a value set by the user wins.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        ray.init(num_cpus=max(os.cpu_count() or 1, workers + 1) + math.ceil(data_cpus), include_dashboard=None)
