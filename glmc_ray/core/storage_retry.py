"""Object storage that rides out an outage: every call retried with backoff for a bounded time, then one
StorageLost naming the endpoint.

Why not pyarrow's own retries: `S3FileSystem(retry_strategy=...)` counts attempts, not time (the AWS SDK's
backoff makes a count a poor bound on minutes), and the strategy is dropped when the filesystem is pickled
(apache/arrow GH-47348), which is how Ray Train hands its storage filesystem to the workers: they would retry
3 times. A checkpoint whose upload fails part-way must also be uploaded again whole, which a per-request retry
does not do. So this wraps the filesystem in a `pyarrow.fs.PyFileSystem` (picklable, the window travels with
it): writes are staged in a local temp file and uploaded whole on close, reads are read whole, and each call
is retried while the error is one an outage gives (no connection, a timeout, HTTP 5xx, throttling). Errors
that no wait fixes (access denied, no such bucket, a missing key) are raised at once.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.fs as pafs

from glmc_ray.core.errors import StorageLost

# what an outage looks like in pyarrow's message of an AWS / GCS / Azure error
TRANSIENT = ("NETWORK_CONNECTION", "curlCode", "Could not connect", "Couldn't connect", "Couldn't resolve",
             "Connection refused", "Connection reset", "timed out", "Timeout", "REQUEST_TIMEOUT",
             "SERVICE_UNAVAILABLE", "SLOW_DOWN", "THROTTLING", "INTERNAL_FAILURE", "HTTP status 500",
             "HTTP status 502", "HTTP status 503", "HTTP status 504")
FIRST_WAIT, LONGEST_WAIT = 0.5, 15.0  # seconds between attempts: doubling from the first to the longest


def transient(err: BaseException) -> bool:
    if isinstance(err, (FileNotFoundError, PermissionError, StorageLost)) or not isinstance(err, OSError):
        return False
    return isinstance(err, (ConnectionError, TimeoutError)) or any(code in str(err) for code in TRANSIENT)


def retrying(fs: pafs.FileSystem, seconds: float, where: str, setting: str) -> pafs.FileSystem:
    """`fs`, riding out outages of up to `seconds` (`setting` names the option that sets it). Local folders
    are returned as they are: a network filesystem hangs rather than fails, and retries cannot help there."""
    if isinstance(fs, pafs.LocalFileSystem) or seconds <= 0:
        return fs
    return pafs.PyFileSystem(RetryingHandler(fs, seconds, where, setting))


def unwrapped(fs: pafs.FileSystem) -> pafs.FileSystem:
    """The filesystem underneath `retrying`'s wrapper (its type says how writes are made atomic)."""
    if isinstance(fs, pafs.PyFileSystem) and isinstance(fs.handler, RetryingHandler):
        return fs.handler.inner
    return fs


def ride_out(attempt, is_transient, seconds: float, store: str, doing: str, setting: str):
    """attempt(), tried again after each transient error (`is_transient(err)`) with doubling waits until
    `seconds` have passed since the first failure, then StorageLost naming `store`, what it was `doing` and the
    `setting` that gives the window. An outage and its end are said once each on stderr."""
    start, wait, failed = time.monotonic(), FIRST_WAIT, False
    while True:
        try:
            result = attempt()
        except Exception as err:
            if not is_transient(err):
                raise
            waited = time.monotonic() - start
            if waited >= seconds:
                raise StorageLost(f"{store} stayed unreachable for {waited:.0f} s ({setting}={seconds:g}) while "
                                  f"{doing}: {' '.join(str(err).split())}") from None
            if not failed:
                print(f"{store} unreachable while {doing}; retrying for up to {seconds:g} s ({setting})",
                      file=sys.stderr, flush=True)
                failed = True
            time.sleep(min(wait, seconds - waited))
            wait = min(wait * 2, LONGEST_WAIT)
            continue
        if failed:
            print(f"{store} reachable again after {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
        return result


class RetryingHandler(pafs.FileSystemHandler):
    """pyarrow.fs.FileSystemHandler over `inner`; pickled with its window (Ray sends it to every worker)."""

    def __init__(self, inner: pafs.FileSystem, seconds: float, where: str, setting: str):
        self.inner, self.seconds, self.where, self.setting = inner, seconds, where, setting

    def call(self, what: str, function, *args, missing_ok_on_retry: bool = False, **kwargs):
        attempts = 0

        def attempt():
            nonlocal attempts
            attempts += 1
            try:
                return function(*args, **kwargs)
            except FileNotFoundError:
                if missing_ok_on_retry and attempts > 1:  # a delete whose reply was lost took effect
                    return None
                raise

        return ride_out(attempt, transient, self.seconds, f"the storage {self.where}", what, self.setting)

    # ---- pyarrow.fs.FileSystemHandler

    def __eq__(self, other) -> bool:
        return isinstance(other, RetryingHandler) and self.inner.equals(other.inner)

    def __ne__(self, other) -> bool:
        return not self == other

    def get_type_name(self) -> str:
        return f"retrying-{self.inner.type_name}"

    def normalize_path(self, path):
        return self.inner.normalize_path(path)

    def get_file_info(self, paths):
        return self.call(f"reading {paths[0] if paths else ''}", self.inner.get_file_info, paths)

    def get_file_info_selector(self, selector):
        return self.call(f"listing {selector.base_dir}", self.inner.get_file_info, selector)

    def create_dir(self, path, recursive):
        self.call(f"making {path}", self.inner.create_dir, path, recursive=recursive)

    def delete_dir(self, path):
        self.call(f"deleting {path}", self.inner.delete_dir, path, missing_ok_on_retry=True)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.call(f"deleting {path}", self.inner.delete_dir_contents, path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.call("deleting everything", self.inner.delete_dir_contents, "/", accept_root_dir=True)

    def delete_file(self, path):
        self.call(f"deleting {path}", self.inner.delete_file, path, missing_ok_on_retry=True)

    def move(self, src, dest):
        self.call(f"moving {src}", self.inner.move, src, dest)

    def copy_file(self, src, dest):
        self.call(f"copying {src}", self.inner.copy_file, src, dest)

    def open_input_stream(self, path):
        return pa.BufferReader(self.call(f"reading {path}", self._read, path))

    def open_input_file(self, path):
        return pa.BufferReader(self.call(f"reading {path}", self._read, path))

    def open_output_stream(self, path, metadata):
        return pa.PythonFile(_UploadOnClose(self, path, metadata), mode="w")

    def open_append_stream(self, path, metadata):
        return self.call(f"appending to {path}", self.inner.open_append_stream, path, metadata=metadata)

    def _read(self, path) -> bytes:  # whole: a read cut part-way is read again from the start
        with self.inner.open_input_stream(path) as stream:
            return stream.read()


class _UploadOnClose:
    """The file a write goes to: a local temp file, uploaded whole (and again whole after a failure) on close."""

    def __init__(self, handler: RetryingHandler, path: str, metadata):
        self.handler, self.path, self.metadata = handler, path, metadata
        self.staged = tempfile.TemporaryFile(prefix="glmc-upload-")
        self.closed = False

    def write(self, data) -> int:
        return self.staged.write(data)

    def tell(self) -> int:
        return self.staged.tell()

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.handler.call(f"writing {self.path}", self._upload)
        finally:
            self.staged.close()

    def _upload(self) -> None:
        self.staged.seek(0)
        with self.handler.inner.open_output_stream(self.path, metadata=self.metadata) as target:
            shutil.copyfileobj(self.staged, target, 8 << 20)
