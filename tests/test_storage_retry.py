"""core/storage_retry.py on its own: which errors are an outage, a write uploaded whole again after a failed
upload, the window and its error, and what survives pickling (how Ray Train hands the filesystem to its
workers). The filesystem under the wrapper is a real local one that fails its first calls as S3 fails when its
endpoint cannot be reached; test_storage_outages.py cuts a real S3 endpoint under whole runs."""
import pickle
import time

import pyarrow.fs as pafs
import pytest

from glmc_ray.core import storage
from glmc_ray.core.errors import StorageLost
from glmc_ray.core.storage_retry import RetryingHandler, retrying, ride_out, transient, unwrapped

OUTAGE = OSError("When uploading part for key 'runs/x': AWS Error NETWORK_CONNECTION during UploadPart "
                 "operation: curlCode: 7, Could not connect to server")


class FailingFirst:
    """A local filesystem whose first `failures` uploads and deletes fail as an unreachable S3 endpoint does
    (an upload part-way: the bytes written so far reach the file, as a multipart upload's parts would)."""

    type_name = "failing-local"

    def __init__(self, failures: int, error: OSError = OUTAGE):
        self.local, self.failures, self.error, self.calls = pafs.LocalFileSystem(), failures, error, 0

    def _fail(self) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error

    def open_output_stream(self, path, metadata=None):
        outer = self

        class Stream:
            def __init__(self):
                self.target = outer.local.open_output_stream(path)

            def __enter__(self):
                return self

            def write(self, data):
                self.target.write(bytes(data)[: len(data) // 2])  # half the bytes, then the connection drops
                self.target.close()
                outer._fail()
                self.target = outer.local.open_output_stream(path)
                self.target.write(data)

            def __exit__(self, *exc):
                self.target.close()

        return Stream()

    def delete_file(self, path):
        self.local.delete_file(path)
        self._fail()  # deleted, but the reply was lost

    def open_input_stream(self, path):
        self._fail()
        return self.local.open_input_stream(path)


def _fs(inner, seconds=30.0):
    return pafs.PyFileSystem(RetryingHandler(inner, seconds, "s3://bucket at http://127.0.0.1:9", "the.setting"))


def test_an_outage_is_transient_and_an_answer_from_the_storage_is_not():
    assert transient(OUTAGE) and transient(OSError("AWS Error SLOW_DOWN")) and transient(ConnectionResetError())
    assert transient(OSError("AWS Error UNKNOWN (HTTP status 503) during PutObject"))
    for answer in (OSError("AWS Error ACCESS_DENIED during PutObject"), FileNotFoundError("gone"),
                   OSError("AWS Error NO_SUCH_BUCKET"), ValueError("a bug"), StorageLost("lost already")):
        assert not transient(answer), answer


def test_a_failed_upload_is_uploaded_again_whole(tmp_path, capsys):
    inner = FailingFirst(2)
    with _fs(inner).open_output_stream(str(tmp_path / "state.pt")) as stream:
        stream.write(b"0123456789" * 1000)
    assert (tmp_path / "state.pt").read_bytes() == b"0123456789" * 1000 and inner.calls == 3
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (f"the storage s3://bucket at http://127.0.0.1:9 unreachable while writing {tmp_path}/state.pt; "
                      f"retrying for up to 30 s (the.setting)")
    assert err[1].startswith("the storage s3://bucket at http://127.0.0.1:9 reachable again after") and len(err) == 2


def test_a_read_and_a_delete_ride_out_the_outage(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    assert _fs(FailingFirst(1)).open_input_file(str(tmp_path / "metrics.jsonl")).read() == b"{}\n"
    inner = FailingFirst(1)
    _fs(inner).delete_file(str(tmp_path / "metrics.jsonl"))  # the retry finds it gone: done
    assert not (tmp_path / "metrics.jsonl").exists() and inner.calls == 1


def test_past_the_window_the_error_names_the_storage_the_setting_and_the_last_error(tmp_path):
    start = time.monotonic()
    with pytest.raises(StorageLost) as lost:
        with _fs(FailingFirst(10**6), seconds=1.5).open_output_stream(str(tmp_path / "x")) as stream:
            stream.write(b"x")
    assert 1.5 <= time.monotonic() - start < 5
    assert str(lost.value).startswith(f"the storage s3://bucket at http://127.0.0.1:9 stayed unreachable for 2 s "
                                      f"(the.setting=1.5) while writing {tmp_path}/x: When uploading part")


def test_an_answer_from_the_storage_is_raised_at_once(tmp_path):
    denied = FailingFirst(1, OSError("AWS Error ACCESS_DENIED during PutObject operation: Access Denied"))
    with pytest.raises(OSError, match="ACCESS_DENIED"):
        with _fs(denied).open_output_stream(str(tmp_path / "x")) as stream:
            stream.write(b"x")
    assert denied.calls == 1


def test_ride_out_gives_up_on_the_first_error_that_is_not_an_outage():
    calls = []

    def attempt():
        calls.append(1)
        raise (ConnectionRefusedError() if len(calls) == 1 else KeyError("not an outage"))

    with pytest.raises(KeyError):
        ride_out(attempt, lambda err: isinstance(err, ConnectionError), 30, "the db", "connecting", "s")
    assert len(calls) == 2


def test_the_window_and_the_endpoint_travel_with_the_filesystem_and_local_folders_are_not_wrapped(tmp_path):
    fs, path = storage.resolve("s3://bucket/runs?endpoint_override=http://127.0.0.1:9&region=us-east-1", 42)
    copy = pickle.loads(pickle.dumps(fs))
    assert path == "bucket/runs" and copy.handler.seconds == 42 and copy.equals(fs)
    assert isinstance(unwrapped(copy), pafs.S3FileSystem) and "127.0.0.1:9" in str(unwrapped(copy).__reduce__())
    assert storage.resolve("s3://bucket/runs?region=us-east-1")[0].type_name == "s3"  # no window: as it is
    assert isinstance(storage.resolve(tmp_path, 42)[0], pafs.LocalFileSystem)
    assert retrying(pafs.LocalFileSystem(), 42, "here", "s").type_name == "local"
