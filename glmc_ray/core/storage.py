"""Where runs, shards and searches are kept: a local or shared folder, or object storage (s3://, gs://, ...),
all through pyarrow.fs.

S3: pyarrow's S3 filesystem takes its credentials from the AWS chain (AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY, AWS_PROFILE and ~/.aws, an instance profile) and a self-hosted S3-compatible endpoint
from AWS_ENDPOINT_URL (or `?endpoint_override=` in the URI). Ray's storage and Ray Data read the same
variables, in every Ray process that inherits them (a node's processes inherit its `ray start` environment).

A write is atomic wherever it lands: object stores make an object visible whole when its upload completes;
local files go through a temp file and a rename. What a run writes while it trains rides out outages of up
to `dist.storage_retry_seconds` (`resolve(..., ride_out=)`, core/storage_retry.py); the checks before a
command makes anything do not wait.
"""
from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from glmc_ray.core.errors import OutputError
from glmc_ray.core.storage_retry import retrying, unwrapped

PARTIAL_SUFFIX = ".partial"  # temp files of atomic_write; a kill can leave one, the next start removes it
# Object stores make a written object visible whole, when its upload completes: no temp key needed there
ATOMIC_PUT_FILESYSTEMS = (pafs.S3FileSystem, pafs.GcsFileSystem, pafs.AzureFileSystem)
RETRY_SETTING = "dist.storage_retry_seconds"
CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")


class StorageError(OutputError):
    """Storage that cannot be used as given (no such bucket, credentials refused, endpoint unreachable, a
    prefix that holds something else); the message names the URI and what is wrong."""


# ---- locations -------------------------------------------------------------------------------------------

def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def resolve(location: str | Path, ride_out: float = 0.0) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path in it) of a local folder (relative or absolute) or a URI such as s3://bucket/prefix.
    `ride_out`: seconds of outage that the filesystem's calls retry through (object storage only)."""
    if is_uri(location):
        try:
            fs, path = pafs.FileSystem.from_uri(str(location))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise StorageError(f"{location}: not a storage URI pyarrow can open ({err})") from None
        where = f"{str(location).split('://')[0]}://{path.split('/')[0]}{_endpoint_note(fs)}"
        # s3://bucket/prefix/ and s3://bucket/prefix name the same place
        return retrying(fs, ride_out, where, RETRY_SETTING), path.rstrip("/")
    return pafs.LocalFileSystem(), str(Path(location).resolve())


def join(location: str | Path, *names: str) -> str:
    """`names` inside `location`, as a full path or URI."""
    if is_uri(location):
        return "/".join([str(location).rstrip("/"), *names])
    return str(Path(location).resolve().joinpath(*names))


def parent(location: str | Path) -> str:
    if is_uri(location):
        return str(location).rstrip("/").rsplit("/", 1)[0]
    return str(Path(location).resolve().parent)


def name(location: str | Path) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def exists(location: str | Path) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_text(fs: pafs.FileSystem, path: str) -> str:
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()


def folders(location: str | Path, prefix: str = "") -> list[str]:
    """The folders directly in `location` whose names start with `prefix`, sorted, as full paths or URIs."""
    fs, path = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(join(location, info.base_name) for info in infos
                  if info.type == pafs.FileType.Directory and info.base_name.startswith(prefix))


# ---- writing -------------------------------------------------------------------------------------------

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> None:
    """write(tmp_path) then rename over `path`: a crash leaves the old file or the new one, never half.

    The file gets the mode a plain open() would give (mkstemp makes 0600, which other users of a shared
    run folder could not read)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX)
    except OSError as err:
        raise OutputError(f"cannot write {path}: {err.strerror or err}") from err
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as err:  # a full disk, a quota, storage gone read-only: the old file is untouched
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {err.strerror or err}") from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_partial_writes(folder: Path) -> list[Path]:
    """Delete temp files that a killed atomic_write left in `folder`; returns what was removed."""
    leftovers = sorted(folder.glob(f".*{PARTIAL_SUFFIX}"))
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers


def write_file(fs: pafs.FileSystem, path: str, write) -> None:
    """write(where, filesystem) so that a reader sees the old file or the new one, never a half-written one."""
    if isinstance(fs, pafs.LocalFileSystem):
        atomic_write(Path(path), lambda tmp: write(str(tmp), fs))
    elif isinstance(unwrapped(fs), ATOMIC_PUT_FILESYSTEMS):
        write(path, fs)
    else:  # HDFS and the like: a rename is atomic there
        temp = f"{path}.{os.getpid()}.partial"
        write(temp, fs)
        fs.move(temp, path)


def write_bytes(fs: pafs.FileSystem, path: str, data) -> None:
    def write(where, filesystem):
        with filesystem.open_output_stream(where) as stream:
            stream.write(data)

    write_file(fs, path, write)


# ---- checks before anything is made ---------------------------------------------------------------------

def check_writable(location: str, option: str) -> None:
    """For a URI: the bucket exists and this process may list, write and delete under `location` (a probe
    object, deleted again). Raises StorageError naming `option`, the URI and what is wrong; local folders are
    left to the callers (they make their folders and report what fails)."""
    if not is_uri(location):
        return
    fs, path = resolve(location)
    bucket = path.split("/", 1)[0]
    try:
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise StorageError(f"{option} {location}: the bucket {bucket!r} does not exist{_endpoint_note(fs)}; "
                               f"create it first")
        probe = f"{path}/.glmc-write-check-{uuid.uuid4().hex}"
        write_bytes(fs, probe, b"")
        fs.delete_file(probe)
    except OSError as err:
        raise StorageError(f"{option} {location}: {explain(err, fs)}") from None


def explain(err: OSError, fs: pafs.FileSystem | None = None) -> str:
    """What an object store's error means for the user, from pyarrow's message (it carries the AWS error)."""
    text = " ".join(str(err).split())
    where = _endpoint_note(fs)
    if "NO_SUCH_BUCKET" in text:
        return f"the bucket does not exist{where} ({text})"
    if any(code in text for code in ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH",
                                     "HTTP status 403", "HTTP status 401")):
        return f"access denied{where}: {_credentials_note()} ({text})"
    if any(code in text for code in ("NETWORK_CONNECTION", "curlCode", "Could not connect", "Couldn't resolve")):
        return f"cannot reach the storage endpoint{where}; check AWS_ENDPOINT_URL and the network ({text})"
    s3 = isinstance(unwrapped(fs), pafs.S3FileSystem) or (fs is None and "AWS Error" in text)
    if not _credentials_found() and s3:
        return f"{_credentials_note()}{where} (the storage said: {text})"
    return text


def _endpoint_note(fs: pafs.FileSystem | None) -> str:
    if isinstance(unwrapped(fs), pafs.S3FileSystem):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return f" at {endpoint}" if endpoint else " on AWS S3 (no AWS_ENDPOINT_URL set)"
    return ""


def _credentials_found() -> bool:
    files = [Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")).expanduser(),
             Path(os.environ.get("AWS_CONFIG_FILE", "~/.aws/config")).expanduser()]
    return any(os.environ.get(v) for v in CREDENTIAL_VARIABLES) or any(f.is_file() for f in files)


def _credentials_note() -> str:
    if _credentials_found():
        return "the credentials given (AWS_ACCESS_KEY_ID / AWS_PROFILE / ~/.aws) are wrong or lack permission here"
    return ("no credentials found (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws/credentials; "
            "on AWS an instance profile also gives them)")


def check_free(location: str, option: str, what: str) -> None:
    """`location` must not exist yet: a prefix that holds something else is never written into."""
    try:
        taken = exists(location)
    except OSError as err:
        raise StorageError(f"{option} {location}: {explain(err)}") from None
    if taken:
        raise StorageError(f"{option}: {location} already exists; it holds another {what}, which this one would "
                           f"mix with; choose another place or delete it")
