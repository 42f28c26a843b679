"""A run directory's copy on storage (s3://bucket/runs/<run> or a shared folder): what keeps a run readable and
resumable from its storage URI alone when the machine that held the run directory is gone.

`push` uploads the files of the run directory that changed since the last push: checkpoints first, then the
records that name their epochs (metrics.jsonl, TensorBoard events), final.json last, each object whole. A kill
between two uploads leaves a checkpoint newer than metrics.jsonl at worst, which a resume resolves as it does
on local disk (the checkpoint's history is the truth). `pull` brings such a copy back into a local run
directory. What Ray Train keeps beside the copy (its checkpoint folders, its run snapshot and the snapshots a
resume set aside, its marker files) is Ray's and never copied either way.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.fs as pafs

from glmc_ray.core import storage
from glmc_ray.core.storage import PARTIAL_SUFFIX, atomic_write
from glmc_ray.runs.ray_resume import SNAPSHOT

FIRST = ("checkpoint.pt", "best.pt")  # an epoch's state lands before any record that names the epoch
LAST = ("final.json",)  # its presence says the run finished
RAY_FILES = SNAPSHOT  # and the `.unusable-<stamp>` copies ray_resume sets aside


def _copied(name: str) -> bool:
    return not (name.startswith(".") or name.startswith(RAY_FILES) or name.endswith(PARTIAL_SUFFIX))


def _order(path: Path) -> tuple[int, str]:
    return (0 if path.name in FIRST else 2 if path.name in LAST else 1), path.name


def push(run: Path, remote: str, pushed: dict | None = None, ride_out: float = 0.0) -> dict:
    """Upload run's files that changed since `pushed` (name -> (size, mtime), what the last push returned),
    riding out storage outages of up to `ride_out` seconds (then StorageLost)."""
    pushed = dict(pushed or {})
    fs, base = storage.resolve(remote, ride_out)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(base, recursive=True)
    files = [p for p in run.iterdir() if p.is_file() and _copied(p.name)]
    for path in sorted(files, key=_order):
        stat = path.stat()
        if pushed.get(path.name) == (stat.st_size, stat.st_mtime_ns):
            continue

        def copy(where, filesystem, path=path):
            with open(path, "rb") as source, filesystem.open_output_stream(where) as target:
                shutil.copyfileobj(source, target, 8 << 20)

        try:
            storage.write_file(fs, f"{base}/{path.name}", copy)
        except OSError as err:
            raise storage.StorageError(f"cannot upload {path} to {remote}: {storage.explain(err, fs)}") from None
        pushed[path.name] = (stat.st_size, stat.st_mtime_ns)
    return pushed


def pull(remote: str, run: Path) -> Path:
    """Download the files of the run copy at `remote` into `run` (made if missing; files there are replaced)."""
    fs, base = storage.resolve(remote)
    infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    run.mkdir(parents=True, exist_ok=True)
    for info in infos:
        if info.type != pafs.FileType.File or not _copied(info.base_name):
            continue

        def copy(tmp: Path, info=info):
            with fs.open_input_stream(info.path) as source, open(tmp, "wb") as target:
                shutil.copyfileobj(source, target, 8 << 20)

        atomic_write(run / info.base_name, copy)
    return run


def find(parent: str, run_name: str) -> str | None:
    """The newest run named `<run_name>-<stamp>` in `parent` (a folder or URI), or None."""
    runs = storage.folders(parent, f"{run_name}-")
    return runs[-1] if runs else None
