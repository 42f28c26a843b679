"""A long-tailed image split as Parquet shards, for Ray Data to stream: `python -m glmc_ray.shards build`.

`build` writes a split file's images as shards and a manifest (a killed build resumes), `check` compares a set
with its manifest (`--deep`: every row group decoded and every shard's sha256 compared). The layout of a shard
set is in glmc_ray/data/shard_build.py, what a reader needs of it in glmc_ray/data/shard_format.py.
"""
from __future__ import annotations

import argparse
import os
import sys

from glmc_ray.core.errors import run_command
from glmc_ray.core.version import version_line
from glmc_ray.data import shard_build


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m glmc_ray.shards", description=__doc__.split("\n")[0])
    top.add_argument("--version", action="version", version=version_line())
    commands = top.add_subparsers(dest="command", required=True)
    make = commands.add_parser("build", help="write a split file's images as Parquet shards and a manifest")
    make.add_argument("--split", required=True, help="split file: `relative/path label` per line")
    make.add_argument("--image-root", required=True, help="folder the split file's paths are relative to")
    make.add_argument("--out", required=True, help="local folder or URI (s3://bucket/prefix) of the shard set")
    make.add_argument("--on-error", choices=("skip", "fail"), default="skip",
                      help="an unreadable image: list and skip it (default), or stop")
    make.add_argument("--max-side", type=_positive, default=None,
                      help="re-encode images whose longer side exceeds N as JPEG with that side N")
    make.add_argument("--rows-per-shard", type=_positive, default=512,
                      help="images per Parquet file (default 512; Ray Data reads a file per task)")
    make.add_argument("--row-group-size", type=_positive, default=64,
                      help="images per row group, the unit of a read and of a page checksum (default 64)")
    make.add_argument("--workers", type=_positive, default=os.cpu_count() or 1,
                      help="processes reading and writing images (default: the CPU count)")
    make.add_argument("--seed", type=int, default=0, help="seeds the order of samples over the shards")
    make.set_defaults(run=shard_build.build)
    verify = commands.add_parser("check", help="check a shard set against its manifest (Parquet footers; "
                                               "--deep: the data too)")
    verify.add_argument("uri", help="the shard set: a local folder or a URI (s3://bucket/prefix)")
    verify.add_argument("--deep", action="store_true",
                        help="also decode every row group (page checksums verified) and compare every shard's "
                             "sha256 with the manifest's: reads the whole set")
    verify.add_argument("--workers", type=_positive, default=min(8, os.cpu_count() or 1),
                        help="shards read at once by --deep (default: the CPU count, at most 8)")
    verify.set_defaults(run=shard_build.check)
    return top


def main(argv: list[str] | None = None) -> int:
    options = vars(parser().parse_args(argv))
    command = options.pop("run")
    del options["command"]
    return run_command(lambda: command(**options))


if __name__ == "__main__":
    sys.exit(main())
