"""Building and checking Parquet shard sets (`python -m glmc_ray.shards build|check`, glmc_ray/shards.py).

    <out>/part-00000.parquet, ...  columns image (the file's bytes), label (int32), path (the split file's
                                   relative path), index (int64: position among the split file's samples);
                                   rows in a seeded random order, so every shard holds many classes; a
                                   CRC-32 on every Parquet page
    <out>/manifest.json            rows, per-class counts, shards with rows, bytes and sha256, skipped
                                   images; written last: a shard set without one is unfinished
    <out>/_progress/plan.json      what is being built; a re-run with another plan is refused
    <out>/_progress/part-*.json    one per finished shard: a killed build resumes from the missing ones

<out> is a local folder or any URI pyarrow understands (s3://bucket/prefix, gs://..., hdfs://...). What a reader
needs of the format is in glmc_ray/data/shard_format.py; `check` compares a set with its manifest (`--deep`:
every row group decoded and every shard's sha256 compared, so storage corruption is found before a long run).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from glmc_ray.core.storage import check_writable, remove_partial_writes, write_bytes
from glmc_ray.data.files import SplitLine, parse_split_lines
from glmc_ray.data.images import UNREADABLE_IMAGE_ERRORS
from glmc_ray.data.shard_format import (
    BUILD_COMMAND,
    FORMAT_VERSION,
    MANIFEST,
    SCHEMA,
    check_data,
    check_shards,
    join,
    read_manifest,
    read_text,
    resolve,
    sha256,
)

PROGRESS = "_progress"
PLAN = "plan.json"
JPEG_QUALITY = 90


def _write_json(fs: pafs.FileSystem, path: str, document: dict) -> None:
    write_bytes(fs, path, json.dumps(document, indent=1).encode())


# ---- building one ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardJob:
    """What a pool worker needs to write one shard."""

    out: str
    number: int
    samples: list[tuple[int, SplitLine]]  # (index among the split's samples, its line)
    image_root: str
    split_name: str
    max_side: int | None
    row_group_size: int
    fail_on_error: bool


def shard_name(number: int) -> str:
    return f"part-{number:05d}.parquet"


def _progress_path(base: str, number: int) -> str:
    return f"{base}/{PROGRESS}/{shard_name(number).replace('.parquet', '.json')}"


def build_shard(job: ShardJob) -> dict:
    """Read, check and (with max_side) shrink the job's images, write its shard, then its progress record."""
    fs, base = resolve(job.out)
    columns = {"image": [], "label": [], "path": [], "index": []}
    skipped = []
    for index, sample in job.samples:
        try:
            image = _image_bytes(Path(job.image_root) / sample.path, job.max_side)
        except UNREADABLE_IMAGE_ERRORS as err:
            place = f"{job.split_name}:{sample.line}: {sample.path}"
            if job.fail_on_error:
                raise ValueError(f"{place}: {_reason(err)} (--on-error fail)") from None
            skipped.append({"line": sample.line, "path": sample.path, "reason": _reason(err)})
            continue
        for column, value in zip(columns, (image, sample.label, sample.path, index), strict=True):
            columns[column].append(value)
    table = pa.table(columns, schema=SCHEMA)
    encoded = pa.BufferOutputStream()  # in memory first: its sha256 without reading the shard back
    pq.write_table(table, encoded, row_group_size=job.row_group_size, write_page_checksum=True)
    data = encoded.getvalue()
    path = f"{base}/{shard_name(job.number)}"
    write_bytes(fs, path, data)
    record = {"file": shard_name(job.number), "rows": table.num_rows, "bytes": fs.get_file_info(path).size,
              "sha256": sha256(data),
              "class_counts": {str(label): n for label, n in sorted(Counter(columns["label"]).items())},
              "skipped": skipped}
    _write_json(fs, _progress_path(base, job.number), record)
    return record


def _image_bytes(path: Path, max_side: int | None) -> bytes:
    """The file's bytes after a full decode (a truncated file fails here); re-encoded as JPEG when its
    longer side exceeds max_side."""
    data = path.read_bytes()  # FileNotFoundError for a missing image: an OSError, as PIL's errors
    if not data:
        raise OSError("empty file (0 bytes)")
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if max_side is None or max(image.size) <= max_side:
            return data
        return _shrunk_jpeg(image, max_side)


def _shrunk_jpeg(image: Image.Image, max_side: int) -> bytes:
    scale = max_side / max(image.size)
    size = tuple(max(1, round(side * scale)) for side in image.size)
    kept_mode = image.convert("L" if image.mode in ("1", "L", "LA") else "RGB")  # CMYK, palette, alpha: RGB
    smaller = kept_mode.resize(size, Image.LANCZOS, reducing_gap=3.0)  # reduce() by integer factors first: fast
    encoded = io.BytesIO()
    smaller.save(encoded, format="JPEG", quality=JPEG_QUALITY)
    return encoded.getvalue()


def _reason(err: BaseException) -> str:
    if isinstance(err, FileNotFoundError):
        return "file does not exist"
    return f"{type(err).__name__}: {err}"


def make_plan(split: Path, image_root: Path, rows_per_shard: int, row_group_size: int, seed: int,
              max_side: int | None, num_samples: int) -> dict:
    """The fields that fix a shard set's content: a resume must find the same ones."""
    return {"format": FORMAT_VERSION, "split_file": split.name,
            "split_sha256": hashlib.sha256(split.read_bytes()).hexdigest(), "image_root": str(image_root.resolve()),
            "rows_per_shard": rows_per_shard, "row_group_size": row_group_size, "seed": seed,
            "max_side": max_side, "shards": math.ceil(num_samples / rows_per_shard)}


def _claim(fs: pafs.FileSystem, base: str, out: str, plan: dict) -> None:
    """Write the plan into a new `out`, or check that the one there is the same."""
    path = f"{base}/{PROGRESS}/{PLAN}"
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        if fs.get_file_info(f"{base}/{MANIFEST}").type != pafs.FileType.NotFound:
            raise ValueError(f"{out} holds a {MANIFEST} but no {PROGRESS}/{PLAN}: it was not made by this build; "
                             f"use another --out or delete it")
        fs.create_dir(f"{base}/{PROGRESS}", recursive=True)
        _write_json(fs, path, plan)
        return
    found = json.loads(read_text(fs, path))
    for field, value in plan.items():
        if found.get(field) != value:
            raise ValueError(f"{join(out, f'{PROGRESS}/{PLAN}')}: this shard set was planned with {field}="
                             f"{found.get(field)!r}, this build has {field}={value!r}; use another --out or delete it")


def _finished_shards(fs: pafs.FileSystem, base: str, count: int) -> dict[int, dict]:
    """number -> progress record of the shards a previous build finished (record there, file of that size)."""
    finished = {}
    for number in range(count):
        path = _progress_path(base, number)
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            continue
        record = json.loads(read_text(fs, path))
        if fs.get_file_info(f"{base}/{record['file']}").size == record["bytes"]:
            finished[number] = record
    return finished


def _jobs(samples: list[SplitLine], plan: dict, out: str, fail_on_error: bool, todo: set[int]) -> list[ShardJob]:
    """The shards still to write; a seeded permutation of the split assigns samples to shards."""
    order = np.random.default_rng(plan["seed"]).permutation(len(samples))
    size = plan["rows_per_shard"]
    return [ShardJob(out, number, [(int(i), samples[i]) for i in order[number * size:(number + 1) * size]],
                     plan["image_root"], plan["split_file"], plan["max_side"], plan["row_group_size"],
                     fail_on_error)
            for number in sorted(todo)]


def _run_jobs(jobs: list[ShardJob], workers: int, total: int, done: int) -> list[dict]:
    """Each job in a pool process; the first failure cancels the jobs not started and is raised."""
    if not jobs:
        return []
    plan_split = jobs[0].split_name  # the same in every job
    # forkserver, not fork: the parent may hold threads (tqdm, pyarrow). The preload imports the heavy
    # dependencies (torch comes with glmc_ray.data) once, not once per worker; not this module itself, which
    # a worker runs again as __mp_main__ when it is the command (runpy would warn it was imported already)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["glmc_ray.data.files", "glmc_ray.runs.rundir", "pyarrow.parquet"])
    records, images, start = [], 0, time.monotonic()
    with tqdm(total=total, initial=done, unit="shard", file=sys.stderr, dynamic_ncols=True) as bar, \
            ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
        pending = {pool.submit(build_shard, job) for job in jobs}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    record = future.result()
                    records.append(record)
                    for skip in record["skipped"]:
                        tqdm.write(f"warning: skipped {plan_split}:{skip['line']}: {skip['path']}: "
                                   f"{skip['reason']}", file=sys.stderr)
                    images += record["rows"] + len(record["skipped"])
                    bar.update(1)
                    bar.set_postfix(images_per_s=f"{images / (time.monotonic() - start):.0f}")
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    return records


def assemble_manifest(plan: dict, records: list[dict], num_classes: int) -> dict:
    """The manifest from the plan and every shard's progress record."""
    class_counts = [0] * num_classes
    for record in records:
        for label, count in record["class_counts"].items():
            class_counts[int(label)] += count
    records = sorted(records, key=lambda record: record["file"])
    skipped = sorted((skip for record in records for skip in record["skipped"]), key=lambda skip: skip["line"])
    return {"format": FORMAT_VERSION, "split_file": plan["split_file"], "split_sha256": plan["split_sha256"],
            "num_rows": sum(class_counts), "num_classes": num_classes, "class_counts": class_counts,
            "shards": [{key: r[key] for key in ("file", "rows", "bytes", "sha256")} for r in records],
            "skipped": skipped, "max_side": plan["max_side"], "rows_per_shard": plan["rows_per_shard"],
            "row_group_size": plan["row_group_size"], "seed": plan["seed"],
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def build(split: str | Path, image_root: str | Path, out: str, on_error: str = "skip", max_side: int | None = None,
          rows_per_shard: int = 512, row_group_size: int = 64, workers: int = 1, seed: int = 0) -> int:
    """Write `split`'s images (paths relative to `image_root`) as Parquet shards and a manifest at `out`; a
    re-run with the same plan resumes a killed build. `on_error`: skip (and list) or fail on an unreadable image."""
    split, image_root = Path(split), Path(image_root)
    samples = parse_split_lines(split)
    if not image_root.is_dir():
        raise FileNotFoundError(f"--image-root {image_root} is not a folder")
    plan = make_plan(split, image_root, rows_per_shard, row_group_size, seed, max_side, len(samples))
    check_writable(out, "--out")  # object storage: the bucket, the credentials, the endpoint
    fs, base = resolve(out)
    fs.create_dir(base, recursive=True)
    _claim(fs, base, out, plan)
    if fs.get_file_info(f"{base}/{MANIFEST}").type != pafs.FileType.NotFound:
        print(f"{out} is complete: {MANIFEST} is there for this plan; nothing to do")
        return 0
    if isinstance(fs, pafs.LocalFileSystem):
        for folder in (Path(base), Path(base) / PROGRESS):
            remove_partial_writes(folder)  # temp files of a killed build
    finished = _finished_shards(fs, base, plan["shards"])
    for record in finished.values():  # finished by a version that recorded no checksum
        if "sha256" not in record:
            with fs.open_input_stream(f"{base}/{record['file']}") as stream:
                record["sha256"] = sha256(stream.read_buffer())
    jobs = _jobs(samples, plan, out, on_error == "fail", set(range(plan["shards"])) - set(finished))
    records = [*finished.values(), *_run_jobs(jobs, workers, plan["shards"], len(finished))]
    manifest = assemble_manifest(plan, records, max(s.label for s in samples) + 1)
    _write_json(fs, f"{base}/{MANIFEST}", manifest)
    print(f"wrote {out}: {manifest['num_rows']} rows of {manifest['num_classes']} classes in "
          f"{len(manifest['shards'])} shards ({len(jobs)} written now); skipped images: {len(manifest['skipped'])}")
    return 0


def check(uri: str, deep: bool = False, workers: int = 1) -> int:
    """Compare a shard set with its manifest (Parquet footers); `deep`: decode every row group and compare every
    shard's sha256 too. Damaged shards: listed on stderr, then a ValueError with the repair."""
    manifest = read_manifest(uri)
    check_shards(uri, manifest)
    shards = manifest["shards"]
    summary = (f"{uri}: {manifest['num_rows']} rows, {manifest['num_classes']} classes, {len(shards)} shards, "
               f"{len(manifest['skipped'])} skipped; shards match the manifest")
    if not deep:
        print(f"{summary} (Parquet footers; `--deep` reads the data)")
        return 0
    damaged = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:  # pyarrow and hashlib release the GIL
        for shard, problems in zip(shards, pool.map(lambda shard: check_data(uri, shard), shards), strict=True):
            if problems:
                damaged += 1
                print(f"damaged shard {join(uri, shard['file'])}: {'; '.join(problems)}", file=sys.stderr,
                      flush=True)
    unchecked = sum("sha256" not in shard for shard in shards)
    if unchecked:
        print(f"note: the manifest records no sha256 for {unchecked} of {len(shards)} shards (built before "
              f"checksums were recorded): their row groups were decoded, their bytes not compared with the build's",
              flush=True)
    if damaged:
        raise ValueError(f"{uri}: {damaged} of {len(shards)} shards are damaged (listed above); delete them "
                         f"and {MANIFEST}, then run the same `{BUILD_COMMAND}` again: it writes only missing shards")
    print(f"{summary}; every row group decodes" + ("" if unchecked else ", every sha256 matches the manifest's"))
    return 0
