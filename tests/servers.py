"""Real servers for the storage tests, each on a free loopback port, stopped by PID:
  - an S3 API server (moto's standalone server, a real HTTP S3 endpoint) that checks credentials;
  - a throwaway PostgreSQL cluster (initdb + pg_ctl in a temp folder), never a system instance;
  - a TCP proxy in front of either that can be cut (every connection dropped, new ones refused, as when a
    network path or a load balancer goes away) and restored on the same port."""
from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from glmc_ray.distributed.local_cluster import free_port

# Moto lets this many requests through unauthenticated: the IAM calls that make the test user and its key.
SETUP_ACTIONS = 3


def _wait_for_port(port: int, process: subprocess.Popen, what: str, log: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}: {log.read_text()[-2000:]}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on port {port} within {seconds} s: {log.read_text()[-2000:]}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def s3_server(folder: Path):
    """Yields the environment (endpoint, a user's key, region) of a running moto S3 server whose requests need
    that user's credentials: wrong ones are refused, as AWS refuses them."""
    import boto3

    port = free_port()
    log = folder / "moto.log"
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_ACTIONS)}
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_for_port(port, process, "moto_server", log)
        endpoint = f"http://127.0.0.1:{port}"
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName="glmc")
        key = iam.create_access_key(UserName="glmc")["AccessKey"]
        iam.put_user_policy(UserName="glmc", PolicyName="everything", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        yield {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
               "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}
    finally:
        _stop(process)


def _client(env: dict):
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


def make_bucket(env: dict, bucket: str) -> None:
    _client(env).create_bucket(Bucket=bucket)


def s3_keys(env: dict, bucket: str, prefix: str = "") -> list[str]:
    client = _client(env)
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return keys


def _postgres_bin() -> Path:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not versions:
        raise RuntimeError("PostgreSQL's server programs (initdb, pg_ctl) are not installed; on Debian: "
                           "apt-get install postgresql (.ci/run does)")
    return versions[-1]


@contextlib.contextmanager
def postgres_server(folder: Path):
    """Yields the SQLAlchemy URL of a database in a new PostgreSQL cluster. initdb refuses to run as root:
    as root, the cluster belongs to the `postgres` user (Debian's package makes it)."""
    bin_dir = _postgres_bin()
    data, log, port = folder / "pgdata", folder / "postgres.log", free_port()
    as_user = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        folder.mkdir(parents=True, exist_ok=True)
        for path in (folder, *folder.parents):  # the postgres user must reach its data folder
            if path == Path("/"):
                break
            os.chmod(path, os.stat(path).st_mode | 0o011)
        os.chown(folder, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "glmc", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "start",
                    "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"], check=True, capture_output=True)
    pid = int((data / "postmaster.pid").read_text().splitlines()[0])
    try:
        subprocess.run([*as_user, str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "glmc",
                        "study"], check=True, capture_output=True)
        yield f"postgresql://glmc@127.0.0.1:{port}/study"
    finally:
        os.kill(pid, signal.SIGINT)  # fast shutdown of the postmaster this fixture started
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)


class CuttableProxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target` in threads of this process; `cut()` closes the listening
    socket and every open connection (clients get "connection refused" until `restore()`)."""

    def __init__(self, target: int):
        self.target, self.port = target, free_port()
        self.lock, self.sockets, self.listener = threading.Lock(), set(), None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self.lock:
            doomed, self.sockets = [self.listener, *self.sockets], set()
        for sock in doomed:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # cut
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.sockets |= {client, server}
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with self.lock:
            self.sockets.discard(source)
        source.close()  # the other direction's thread closes `sink`
