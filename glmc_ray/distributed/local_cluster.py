"""A two-node Ray cluster on this machine, made with Ray's own CLI, to try cluster commands without a cloud.

    python -m glmc_ray.distributed.local_cluster -- python -m glmc_ray.train --config configs/smoke.yaml --nodes 2 \\
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
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free now. The sockets stay bound until all are chosen: ports picked one at a
    time can repeat (the kernel may hand a just-released port out again), and a head given the same port
    for GCS and the client server fails to start."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


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
        self.port = 0  # chosen when the head starts
        self.env = {**os.environ, "RAY_AUTH_MODE": "token",
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

    def start_node(self, node: Node, attempts: int = 3) -> None:
        """`ray start` for `node` (the head, or a worker joining it); records the processes it started.

        Ports are free when chosen but another process may take one before Ray binds it, so a failed start
        is cleaned up and tried again on new ports; the last failure raises with Ray's own output."""
        for _ in range(attempts):
            node.temp_dir.mkdir(parents=True, exist_ok=True)
            agent_port, gcs_port, dashboard_port, client_port = free_ports(4)
            command = [str(Path(sys.executable).parent / "ray"), "start", f"--num-cpus={node.cpus}",
                       f"--temp-dir={node.temp_dir}", f"--resources={{\"{node.name}_node\": 1}}",
                       f"--dashboard-agent-listen-port={agent_port}", "--disable-usage-stats"]
            if node is self.head:
                self.port = gcs_port
                self.env["RAY_ADDRESS"] = f"127.0.0.1:{self.port}"
                command += ["--head", f"--port={self.port}", f"--dashboard-port={dashboard_port}",
                            f"--ray-client-server-port={client_port}"]
            else:
                command += [f"--address=127.0.0.1:{self.port}"]
            done = subprocess.run(command, env=self.env, capture_output=True, text=True)
            node.pids |= processes_under(node.temp_dir)
            if done.returncode == 0:
                return
            self.stop_node(node)
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        raise RuntimeError(f"`ray start` for the {node.name} node failed {attempts} times; the last said:\n"
                           f"{(done.stdout + done.stderr)[-3000:]}")

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
    p = argparse.ArgumentParser(prog="python -m glmc_ray.distributed.local_cluster",
                                description=__doc__.split("\n\n")[0])
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
