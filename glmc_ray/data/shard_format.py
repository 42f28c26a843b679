"""The Parquet shard format of `python -m glmc_ray.shards build`, as its readers see it.

    <set>/part-00000.parquet, ...  columns image (the file's bytes), label (int32), path (the split file's
                                   relative path), index (int64: position among the split file's samples);
                                   Parquet page checksums (CRC-32) on every page
    <set>/manifest.json            rows, per-class counts, shards with rows, bytes and sha256, skipped images;
                                   written last: a shard set without one is unfinished

<set> is a local folder or any URI pyarrow understands (s3://bucket/prefix, gs://..., hdfs://...). Manifests
written before checksums were recorded have no `sha256` per shard; they are read as before.

Everything here only reads: the builder (glmc_ray/shards.py) and the Ray Data stream (glmc_ray/data/shards.py)
both import it.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from glmc_ray.core.storage import StorageError, explain, join, read_text, resolve  # noqa: F401 (the readers' names)

FORMAT_VERSION = 1
FORMAT_KEY = b"glmc_ray.shards.format"  # Parquet schema metadata of every shard
MANIFEST = "manifest.json"
BUILD_COMMAND = "python -m glmc_ray.shards build"
CHECK_COMMAND = "python -m glmc_ray.shards check --deep"
SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int32()), ("path", pa.string()), ("index", pa.int64())],
                   metadata={FORMAT_KEY: str(FORMAT_VERSION).encode()})
# What pyarrow raises for bytes that do not decode as Parquet (thrift, snappy, a page checksum, a size that
# does not add up); only ever caught around decoding bytes already in memory, never around I/O
DECODE_ERRORS = (pa.ArrowException, OSError)


def read_manifest(uri: str | Path) -> dict:
    """The manifest of a finished shard set; an error says what is wrong with `uri` otherwise."""
    fs, base = resolve(uri)
    try:
        found = fs.get_file_info(base).type != pafs.FileType.NotFound
    except OSError as err:  # object storage: credentials refused, endpoint unreachable
        raise StorageError(f"shard set {uri}: {explain(err, fs)}") from None
    if not found:
        raise FileNotFoundError(f"shard set {uri} does not exist")
    path = f"{base}/{MANIFEST}"
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri} has no {MANIFEST}: it is not a finished shard set (`{BUILD_COMMAND}` "
                                f"writes the manifest last; run it again to finish the set)")
    try:
        manifest = json.loads(read_text(fs, path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{join(uri, MANIFEST)} is not JSON ({err})") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"{join(uri, MANIFEST)}: written by format {manifest.get('format')}, this version reads "
                         f"{FORMAT_VERSION}; rebuild with `{BUILD_COMMAND} --out` to a new place")
    return manifest


def check_shards(uri: str | Path, manifest: dict) -> None:
    """Each listed shard exists with the manifest's size, row count and format (Parquet footers only)."""
    fs, base = resolve(uri)
    for shard in manifest["shards"]:
        name, path = join(uri, shard["file"]), f"{base}/{shard['file']}"
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            _mismatch(name, "a file", "none")
        if info.size != shard["bytes"]:
            _mismatch(name, f"{shard['bytes']} bytes", f"{info.size}")
        try:
            footer = pq.read_metadata(path, filesystem=fs)
        except pa.ArrowException as err:
            _mismatch(name, "a Parquet footer", f"none that reads ({err})")
        if footer.num_rows != shard["rows"]:
            _mismatch(name, f"{shard['rows']} rows", f"{footer.num_rows}")
        found_format = (footer.metadata or {}).get(FORMAT_KEY)
        if found_format != str(FORMAT_VERSION).encode():
            _mismatch(name, f"{FORMAT_KEY.decode()}={FORMAT_VERSION}", f"{found_format!r}")
    total = sum(shard["rows"] for shard in manifest["shards"])  # each just checked against its shard's footer
    if total != manifest["num_rows"]:
        raise ValueError(f"{join(uri, MANIFEST)}: the manifest says num_rows={manifest['num_rows']}, its shards "
                         f"hold {total} rows (their Parquet footers, summed); the manifest does not match its shards")


def shard_paths(uri: str | Path, manifest: dict) -> list[str]:
    """The shards' full paths or URIs (what the Ray Data stream reads)."""
    return [join(uri, shard["file"]) for shard in manifest["shards"]]


def _mismatch(name: str, expected: str, found: str) -> NoReturn:
    raise ValueError(f"{name}: the manifest expects {expected}, the shard has {found}; the manifest does not match "
                     f"its shards")


# ---- the data inside a shard ---------------------------------------------------------------------------------

def fetch(path: str) -> pa.Buffer:
    """The bytes of the shard at `path` (a full path or URI), in memory: decoding errors found after this are
    damage, not I/O (which raises here, as the filesystem's error)."""
    fs, where = resolve(path)
    with fs.open_input_stream(where) as stream:
        return stream.read_buffer()


def sha256(data) -> str:
    """Hex sha256 of bytes or a pyarrow Buffer (the manifest's per-shard checksum)."""
    return hashlib.sha256(memoryview(data)).hexdigest()


@dataclass(frozen=True)
class Damage:
    """A part of a shard that does not decode: a row group (`first`, `rows`: its rows, counted from 0 in the
    shard) or, with `row_group` None, the whole shard (its footer)."""

    shard: str
    row_group: int | None
    first: int
    rows: int | None
    reason: str

    @property
    def what(self) -> str:
        if self.row_group is None:
            return f"its Parquet footer does not decode ({self.reason})"
        last = self.first + self.rows - 1
        return f"rows {self.first}-{last} (row group {self.row_group}) do not decode ({self.reason})"

    def __str__(self) -> str:
        return f"{self.shard}: {self.what}"


def row_groups(data: pa.Buffer, name: str, columns: list[str] | None = None) -> Iterator[pa.Table | Damage]:
    """Each row group of the shard `name` whose bytes are `data`, decoded, page checksums verified where the
    build wrote them; a Damage in place of one that does not decode (the others are still read)."""
    try:
        parquet = pq.ParquetFile(pa.BufferReader(data), page_checksum_verification=True)
        sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
    except DECODE_ERRORS as err:
        yield Damage(name, None, 0, None, one_line(err))
        return
    first = 0
    for group, rows in enumerate(sizes):
        try:
            table = parquet.read_row_group(group, columns=columns)
        except DECODE_ERRORS as err:
            yield Damage(name, group, first, rows, one_line(err))
        else:
            yield table
        first += rows


def check_data(uri: str | Path, shard: dict) -> list[str]:
    """What is wrong with the data of one shard the manifest lists: every row group decoded (page checksums
    verified) and the file's sha256 compared with the manifest's, when it records one. [] if nothing is."""
    try:
        data = fetch(join(uri, shard["file"]))
    except OSError as err:
        return [f"its bytes cannot be read ({one_line(err)})"]
    problems = [part.what for part in row_groups(data, shard["file"]) if isinstance(part, Damage)]
    if "sha256" in shard and (digest := sha256(data)) != shard["sha256"]:
        problems.append(f"its sha256 is {digest[:16]}..., the manifest's {shard['sha256'][:16]}...")
    return problems


def one_line(err: BaseException) -> str:
    """`Type: message` with the message's line breaks (pyarrow's have several) as spaces."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"
