"""A two-node Ray cluster on this machine, made with Ray's own CLI, to try cluster commands without a cloud.

    python -m glmc_ray.local_cluster -- python -m glmc_ray.train --config configs/smoke.yaml --nodes 2 \\
        --storage /tmp/glmc-shared

starts a head node and a worker node with `ray start` (their own ports, CPUs and temp dirs; one auth token
for both, since Ray 2.60 turns token auth on for local clusters and a node or driver without the same
token is refused), runs the command with RAY_ADDRESS pointing at the head, then stops only the processes
it started: never `ray stop`, which would end every Ray process of the user on a shared machine.
"""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Node:
    name: str
    cpus: int
    temp_dir: Path
    pids: set[int] = field(default_factory=set)


class LocalCluster:
    """`with LocalCluster() as cluster:` a head and one worker node; `cluster.env` reaches them."""

    def __init__(self, head_cpus: int = 1, worker_cpus: int = 1, root: str | Path | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="glmc-cluster-", dir="/tmp"))
        self.port = free_port()
        self.env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{self.port}", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0"}
        self.head = Node("head", head_cpus, self.root / "head")
        self.worker = Node("worker", worker_cpus, self.root / "worker")

    def __enter__(self) -> LocalCluster:
        try:
            self.start_node(self.head)
            self.start_node(self.worker)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start_node(self, node: Node) -> None:
        """`ray start` for `node` (the head, or a worker joining it); records the processes it started."""
        node.temp_dir.mkdir(parents=True, exist_ok=True)
        command = [str(Path(sys.executable).parent / "ray"), "start", f"--num-cpus={node.cpus}",
                   f"--temp-dir={node.temp_dir}", f"--resources={{\"{node.name}_node\": 1}}",
                   f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"]
        if node is self.head:
            command += ["--head", f"--port={self.port}", f"--dashboard-port={free_port()}",
                        f"--ray-client-server-port={free_port()}"]
        else:
            command += [f"--address=127.0.0.1:{self.port}"]
        subprocess.run(command, env=self.env, check=True, capture_output=True, text=True)
        node.pids |= processes_under(node.temp_dir)

    def stop_node(self, node: Node, timeout: float = 10.0) -> None:
        """SIGKILL every process of `node` and their children, as a lost machine would vanish; returns once
        none is left (a killed process stays visible until it has exited, and a raylet may have just
        started a worker)."""
        deadline = time.monotonic() + timeout
        pids = node.pids | processes_under(node.temp_dir)
        while pids and time.monotonic() < deadline:
            for pid in pids | descendants(pids):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
            pids = processes_under(node.temp_dir) | {pid for pid in node.pids if _running(pid)}
        node.pids = set()

    def stop(self) -> None:
        for node in (self.worker, self.head):
            self.stop_node(node)
        shutil.rmtree(self.root, ignore_errors=True)


def _cmdlines() -> dict[int, str]:
    lines = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                lines[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
    return lines


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited child its parent has not collected yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def processes_under(temp_dir: Path) -> set[int]:
    """PIDs whose command line names `temp_dir` (Ray's GCS, raylet and monitors carry it)."""
    return {pid for pid, line in _cmdlines().items() if str(temp_dir) in line and pid != os.getpid()}


def descendants(pids: set[int]) -> set[int]:
    """Children of `pids`, recursively (Ray's agents and workers rename themselves, so only ancestry finds them)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), set(pids)
    while frontier:
        children = {pid for pid, parent in parents.items() if parent in frontier} - found - pids
        found |= children
        frontier = children
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m glmc_ray.local_cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("--head-cpus", type=int, default=1)
    p.add_argument("--worker-cpus", type=int, default=1)
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command to run against the cluster (after --)")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command to run after --")
    start = time.perf_counter()
    with LocalCluster(args.head_cpus, args.worker_cpus) as cluster:
        print(f"local cluster at {cluster.env['RAY_ADDRESS']} ({time.perf_counter() - start:.1f} s): "
              f"head {cluster.head.cpus} CPU, worker {cluster.worker.cpus} CPU", flush=True)
        return subprocess.run(command, env=cluster.env).returncode


if __name__ == "__main__":
    sys.exit(main())
