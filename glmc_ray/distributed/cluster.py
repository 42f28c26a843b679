"""The Ray cluster a command runs on: joining one or starting a local instance, what the workers need of it
(workers, CPUs, GPUs) against what it has, and storage every node sees. ray_train.py runs the loop on it."""
from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from glmc_ray.core import config as config_lib

NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs", "9p")


@dataclass
class Scaling:
    workers: int
    use_gpu: bool
    nodes: int = 1
    cpus_per_worker: float = 1.0


def cluster_hosts() -> int:
    import ray

    return len({n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]})


def check_shared_storage(storage: str, nodes: int, hosts: int) -> None:
    """A run across machines needs storage every node sees: a URI (s3://, gs://, ...) or a network filesystem.

    Nodes that share one host (a simulated cluster) share its disk, so any path works there.
    """
    if nodes <= 1 or hosts <= 1 or "://" in storage:
        return
    fstype = filesystem_type(Path(storage))
    if fstype not in NETWORK_FILESYSTEMS:
        raise ValueError(f"--storage {storage} is on a node-local filesystem ({fstype}); a run on {nodes} nodes "
                         f"needs storage that every node sees: s3://bucket/path, gs://..., or an NFS mount")


def filesystem_type(path: Path) -> str:
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


def check_resources(scaling: Scaling, data_cpus: float) -> None:
    """What the workers (and the Ray Data streams beside them) need against what the cluster has: more than it
    has, with no autoscaler to add nodes, is refused (it would wait forever); more than is free now is said
    once (the run waits for it)."""
    import ray

    need = {"CPU": scaling.workers * scaling.cpus_per_worker + data_cpus,
            **({"GPU": float(scaling.workers)} if scaling.use_gpu else {})}
    total, free = ray.cluster_resources(), ray.available_resources()
    short = {kind: n for kind, n in need.items() if n > total.get(kind, 0.0) + 1e-9}
    what = ", ".join(f"{n:g} {kind}s" for kind, n in need.items())
    if short and not autoscaling():
        has = ", ".join(f"{total.get(kind, 0.0):g} {kind}s" for kind in short)
        raise ValueError(f"{scaling.workers} workers need {what} (with the data streams), but this Ray cluster has "
                         f"{has} and no autoscaler to add nodes: use fewer workers, or a cluster that has them")
    if short or any(n > free.get(kind, 0.0) + 1e-9 for kind, n in need.items()):
        print(f"waiting for resources: the workers need {what}; free now: "
              f"{', '.join(f'{free.get(kind, 0.0):g} of {total.get(kind, 0.0):g} {kind}s' for kind in need)}"
              f"{' (the autoscaler may add nodes)' if short else ''}", file=sys.stderr, flush=True)


def autoscaling() -> bool:
    """Whether an autoscaler that can add nodes runs for this cluster (`ray up`'s, v1 or v2); when that cannot
    be told, True: a request is then waited for, never refused.

    A head started by `ray start --head` without an autoscaling config runs the v1 monitor too, over Ray's
    read-only node provider, which launches nothing: its status maps each node to a node type of its own,
    named `node_<node id>`, where a `ray up` cluster's names the config's types (gpu_worker, ...)."""
    import json

    import ray
    from ray._private import ray_constants
    from ray._raylet import GcsClient
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        if status is not None:  # the v1 monitor's
            types = json.loads(status)["autoscaler_report"].get("node_type_mapping") or {}
            return not types or any(kind != f"node_{node}" for node, kind in types.items())
        reply = GetClusterStatusReply()
        reply.ParseFromString(GcsClient(address=ray.get_runtime_context().gcs_address).get_cluster_status())
        return reply.autoscaling_state.autoscaler_state_version > 0  # a v2 autoscaler has reported
    except Exception:  # noqa: BLE001 - an API this Ray lacks, a slow GCS: do not refuse on a guess
        return True


def check_scaling(cfg, scaling: Scaling) -> None:
    if cfg.dist.sync_batchnorm and not scaling.use_gpu and scaling.workers > 1:
        raise config_lib.ConfigError("dist.sync_batchnorm: torch's SyncBatchNorm synchronises CUDA tensors only; "
                                     "on CPU workers use model.norm=group (independent of the batch split)")


def connect(address: str | None, workers: int, data_cpus: float = 0.0, verbose: bool = False,
            worker_output: bool = True) -> None:
    """Join a cluster (`--address`, RAY_ADDRESS, or one running on this node, such as a `ray up` head node),
    else start a local Ray instance in-process, with `data_cpus` more logical CPUs for Ray Data streams.
    `verbose`: Ray's own start-up lines and the `(Actor pid=...)` prefixes on the console too;
    `worker_output`: what Ray's workers print reaches this console (a search's trials keep theirs in Ray's
    log files and their run directories; `verbose` brings it back)."""
    from glmc_ray.distributed.ray_logging import quiet_ray_console, quiet_ray_data

    quiet_ray_console(verbose)  # before Ray is imported: it reads the setting then
    import ray
    from ray._private.services import canonicalize_bootstrap_address

    quiet_ray_data()
    if ray.is_initialized():
        return
    init = {"log_to_driver": worker_output or verbose}
    if not verbose:
        init["logging_level"] = logging.WARNING  # no start-up banner
    # Ray's own discovery (RAY_ADDRESS, then a cluster started on this node), resolved to host:port first:
    # ray.init(address="auto") lost the Train controller on a simulated 2-node cluster in our tests.
    address = address or canonicalize_bootstrap_address(None)
    if address:
        ray.init(address=address, **init)
    else:  # no cluster here: logical CPUs may exceed the cores, the workers then share them
        # Nothing drains the node of a Ray instance started here (no autoscaler, no preemptible machine), so
        # Ray Train's preemption watcher would only add an actor and a console error about it. Read by
        # TorchTrainer.fit from the driver's environment; a value set by the user wins.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        start_local(max(os.cpu_count() or 1, workers + 1) + math.ceil(data_cpus), include_dashboard=None, **init)
        if workers > (os.cpu_count() or 1):
            print(f"note: {workers} workers share this machine's {os.cpu_count()} CPU cores (a Ray instance started "
                  f"here gives each a logical CPU); each trains on a fraction of a core", file=sys.stderr, flush=True)


def start_local(num_cpus: int, **init_kwargs) -> None:
    """`ray.init` a new Ray instance in this process, with its State API address in the environment.

    Ray Train's PlacementGroupCleaner (an actor) asks the State API whether the controller still lives.
    Without an address it looks for Ray instances on this machine and, finding another one (a second run, a
    test session), its thread dies with "ConnectionError: Found multiple active Ray instances": a traceback
    on the console, and no placement group clean-up if the controller dies. Ray's processes inherit this
    process's environment (ray.init starts the raylet), so RAY_API_SERVER_ADDRESS, which Ray's State API
    client reads first, names this instance's dashboard. It stays set until the process ends (unset it
    after ray.shutdown() to start another instance without start_local)."""
    import ray

    from glmc_ray.distributed.local_cluster import free_port

    port = free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=num_cpus, dashboard_host="127.0.0.1", dashboard_port=port, **init_kwargs)
