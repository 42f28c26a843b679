"""Decoded + augmented two-view 224x224 rows per second of the ImageNet-LT input pipeline: Ray Data (the
training stream) against a torch DataLoader, side by side in one process.

  dataloader                  data.source=files: ImageListDataset over the JPEG files in N DataLoader workers
  ray_data                    data.source=shards: glmc_ray.data.shards.stream over Parquet shards of the original
                              bytes (read_parquet -> Decode on up to N actors of 1 CPU), iter_torch_batches on
                              the driver
  ray_data_max_side           the same over shards built with --max-side (longer side re-encoded to 256 px)
  ray_data[_max_side]_small_blocks   stream() plus one line: the read cut into 64-row blocks before Decode
                              (a candidate fix, not the training stream)
  serial                      one process, one thread: PIL decode + convert only, and the two augmented views
                              only, step by step

Every pipeline decodes each image once and augments it into two uint8 views with the official ImageNet-LT list,
TwoViews(train_transform("simclr", 224)): one two-view row; batches of 64. After a warm-up epoch of the
DataLoader and of one Ray Data pipeline, rounds alternate the pipelines. Rates are medians over
rounds; ratios to the DataLoader are taken per round (neighbours in time), then the median. "Epoch" rates count
the whole pass; "running" rates leave out the start-up (Ray Data lists the files and starts its actors anew
every epoch). Per-core rates divide by N: the machine has N cores, shared with the driver and Ray's daemons.
The object-store peak is sampled from the raylet while each Ray Data epoch runs.

The images are ImageNet-like (300-500 px sides, ~110 KB JPEGs at quality 90, RGB but for a PNG, a grayscale and
a CMYK file), written once under --cache by glmc_ray.data.synthetic.write_image_tree and sharded twice by the
builder's CLI (python -m glmc_ray.shards build, with and without --max-side). From the per-core rates it
prints how many cores keep one GPU fed at 2,500 image slots/s (5,000 two-view rows/s) and writes
bench/results/decode_throughput.json.

    python bench/decode_throughput.py [--images 1500] [--rounds 3] [--processes 2] [--max-side 256]
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow
import pyarrow.parquet as pq
import torch
import torchvision
from PIL import Image

from glmc_ray.core import config as config_lib
from glmc_ray.data import shard_format
from glmc_ray.data.cifar import long_tailed_counts
from glmc_ray.data.files import ImageListDataset, ReadableBatches, collate_readable, read_split_file
from glmc_ray.data.images import BadImageLog, TwoViews, decode, train_transform
from glmc_ray.data.shards import COLUMNS, DECODE_BATCH, Decode, stream
from glmc_ray.data.synthetic import write_image_tree

SIDES = (300, 500)  # ImageNet's sides are mostly 333-500 px; with the generator's noise, ~110 KB JPEGs
CLASSES, IMBALANCE = 20, 10.0  # the class profile only shapes the shards; decode cost does not depend on it
BATCH = 64
ROWS_PER_SHARD = 256  # ray-notes' ~200-500 images a shard (Ray 2.60 packs shards into ~128 MiB read units)
SLOTS_PER_GPU = 2500  # the target: image slots/s of an H100 on the ImageNet-LT recipe (given, not measured here)
ROWS_PER_SLOT = 2  # a slot is one uniform and one re-balanced image, each decoded once into 2 views: 2 rows
CLUSTER_CPUS_PER_GPU = 12  # cluster.yaml: g5.12xlarge, 48 vCPUs / 4 GPUs
# Pipelines whose running rate is a rate: the training stream hands over 128 MiB output blocks (~450 rows) at
# once, so its "running" rows come in 2-4 deliveries whose timing need not follow the decoding
BATCH_BY_BATCH = ("dataloader", "ray_data_small_blocks", "ray_data_max_side_small_blocks")


# ---- data ------------------------------------------------------------------------------------------------

def image_tree(cache: Path, images: int) -> Path:
    """The train split file of a long-tailed tree of about `images` JPEGs, written once (the split file last)."""
    root = cache / f"images_{images}"
    split = root / "ImageNet_LT_train.txt"
    if not split.is_file():
        profile = [(1 / IMBALANCE) ** (c / (CLASSES - 1)) for c in range(CLASSES)]
        counts = long_tailed_counts(round(images / sum(profile)), CLASSES, IMBALANCE)
        print(f"writing {sum(counts)} images under {root} (once)", flush=True)
        write_image_tree(root, counts, seed=0, corrupt=0, sides=SIDES, mixed=False)
    return split


def shard_set(split: Path, out: Path, max_side: int | None) -> list[str]:
    """Shard paths of `split` built by the real CLI (it does nothing when the set is complete)."""
    command = [sys.executable, "-m", "glmc_ray.shards", "build", "--split", str(split), "--image-root",
               str(split.parent), "--out", str(out), "--rows-per-shard", str(ROWS_PER_SHARD)]
    subprocess.run(command + (["--max-side", str(max_side)] if max_side else []), check=True)
    return shard_format.shard_paths(out, shard_format.read_manifest(out))


def encoded_images(paths: list[str]) -> list[bytes]:
    return [image for path in paths for image in pq.read_table(path, columns=["image"])["image"].to_pylist()]


def describe(encoded: list[bytes]) -> dict:
    """Mean sides and file size of encoded images, and the share of RGB JPEGs."""
    sides, kinds = [], []
    for data in encoded:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            sides.append(image.size)
            kinds.append((image.format, image.mode))
    width, height = np.mean(sides, axis=0)
    return {"images": len(encoded), "mean_width": float(width), "mean_height": float(height),
            "mean_kb": float(np.mean([len(d) for d in encoded]) / 1e3),
            "rgb_jpeg_share": kinds.count(("JPEG", "RGB")) / len(kinds)}


# ---- timing ----------------------------------------------------------------------------------------------

@dataclass
class Epoch:
    """One pass of a pipeline over the data. The first delivery is the first batch and those that arrive within
    FIRST_DELIVERY_S of it: Ray Data hands over a whole output block at once, a DataLoader its workers' first
    batches together; both were decoded during start-up."""

    rows: int
    seconds: float
    first_batch_seconds: float
    first_delivery_rows: int
    first_delivery_seconds: float
    store_start_mb: float | None = None
    store_peak_mb: float | None = None

    @property
    def epoch_rate(self) -> float:
        return self.rows / self.seconds

    @property
    def running_rate(self) -> float:
        """Rows/s once running: the rows after the first delivery over the time after it (NaN if none came
        after it: too few images for the pipeline's block size)."""
        if self.rows == self.first_delivery_rows:
            return math.nan
        return (self.rows - self.first_delivery_rows) / (self.seconds - self.first_delivery_seconds)


FIRST_DELIVERY_S = 0.5


def timed_epoch(batches: Iterable, rows_of: Callable) -> Epoch:
    start, arrivals, rows = time.perf_counter(), [], 0
    for batch in batches:
        rows += rows_of(batch)
        arrivals.append((time.perf_counter() - start, rows))
    first = arrivals[0][0]
    delivery_seconds, delivery_rows = [a for a in arrivals if a[0] <= first + FIRST_DELIVERY_S][-1]
    return Epoch(rows, time.perf_counter() - start, first, delivery_rows, delivery_seconds)


class ObjectStore:
    """Object-store memory in use on the node, read from the raylet as Ray Data's own spill accounting reads it
    (internal_api.get_memory_info_reply; Ray's release benchmarks sample the same for their peak):
    Dataset.stats() reports no peak in Ray 2.60."""

    def __init__(self, interval: float = 0.2):
        import ray
        from ray._private.internal_api import get_state_from_address

        self.state = get_state_from_address(ray.get_runtime_context().gcs_address)
        self.interval = interval
        self.empty = self.used()  # before any epoch

    def stats(self):
        from ray._private.internal_api import get_memory_info_reply

        return get_memory_info_reply(self.state).store_stats

    def used(self) -> int:
        return self.stats().object_store_bytes_used

    def settle(self, timeout: float = 10.0) -> None:
        """Ray frees a finished epoch's blocks asynchronously (within ~2 s here): wait until the store holds
        what it held before the first epoch, so that a peak belongs to the epoch that follows."""
        deadline = time.monotonic() + timeout
        while self.used() > self.empty and time.monotonic() < deadline:
            time.sleep(self.interval)

    @contextmanager
    def peak(self) -> Iterator[list[int]]:
        """[bytes in use at the start, most in use while the block runs], sampled every `interval`."""
        self.settle()
        sample, done = [self.used()] * 2, threading.Event()

        def watch():
            while not done.wait(self.interval):
                sample[1] = max(sample[1], self.used())
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            yield sample
        finally:
            done.set()
            watcher.join()


# ---- pipelines -------------------------------------------------------------------------------------------

def dataloader_pipeline(split: Path, workers: int) -> Callable[[], Epoch]:
    """data.source=files as LoaderBatches builds it (persistent workers, collate_readable), with a shuffled
    sampler instead of the epoch plan."""
    paths, labels = read_split_file(split, split.parent)
    dataset = ImageListDataset(paths, labels, TwoViews(train_transform("simclr", 224)), channels=3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers,
                                         collate_fn=collate_readable, persistent_workers=True)
    batches = ReadableBatches(loader, BadImageLog(0), "train")
    return lambda: timed_epoch(batches, lambda batch: len(batch[1]))


def decode_config(workers: int):
    """configs/recipes/imagenet_lt/glmc.yaml read from shards, with N decode actors of 1 CPU."""
    return config_lib.load("configs/recipes/imagenet_lt/glmc.yaml",
                           ["data.source=shards", f"data.decode_actors={workers}", "data.decode_cpus=1"]).data


def small_block_stream(data, paths: list[str], seed: int):
    """stream() with one line more: the read cut into BATCH-row blocks before Decode (Ray Data's streaming
    repartition). Measured to size that line's effect; the training stream does not have it."""
    import ray.data

    shuffle = ray.data.FileShuffleConfig(seed=seed, reseed_after_execution=True)
    dataset = ray.data.read_parquet(paths, shuffle=shuffle).select_columns(COLUMNS)
    dataset = dataset.repartition(target_num_rows_per_block=BATCH)
    pool = ray.data.ActorPoolStrategy(min_size=1, max_size=data.decode_actors)
    return dataset.map_batches(
        Decode, fn_constructor_kwargs={"augmentation": data.augmentation, "size": data.image_size,
                                       "channels": data.channels, "train": True},
        batch_size=DECODE_BATCH, compute=pool, num_cpus=data.decode_cpus)


def torch_views():
    """The training collate's work: the views (and their parameters, for the device tail) and labels of
    readable rows as torch tensors."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class TorchViews(NumpyBatchCollateFn):
        def __call__(self, rows: dict) -> dict:
            ok = rows["ok"]
            return {k: torch.from_numpy(rows[k][ok]) for k in ("x1", "x2", "p1", "p2", "label") if k in rows}
    return TorchViews()


def ray_data_pipeline(dataset, store: ObjectStore) -> Callable[[], Epoch]:
    """Iterated on the driver as a training worker iterates its shard (iter_torch_batches, prefetch 2), without
    the local shuffle buffer, whose fill would delay the first batch of these short epochs."""
    def epoch() -> Epoch:
        batches = dataset.iter_torch_batches(batch_size=BATCH, collate_fn=torch_views(), prefetch_batches=2)
        with store.peak() as sample:
            result = timed_epoch(batches, lambda batch: len(batch["label"]))
        result.store_start_mb, result.store_peak_mb = (value / 2**20 for value in sample)
        return result
    return epoch


def serial_rates(encoded: list[bytes]) -> dict:
    """One process, one thread: PIL decodes + converts per second, two-view augmentations per second, and each
    augmentation step's share of the augmentation time (its steps applied one by one, as Compose does)."""
    steps = train_transform("simclr", 224).transforms
    start = time.perf_counter()
    images = [decode(data, 3) for data in encoded]
    decode_seconds = time.perf_counter() - start
    step_seconds = [0.0] * len(steps)
    for image in images:
        for _view in range(2):
            view = image
            for number, step in enumerate(steps):
                begin = time.perf_counter()
                view = step(view)
                step_seconds[number] += time.perf_counter() - begin
    augment_seconds = sum(step_seconds)
    return {"decode_per_s": len(encoded) / decode_seconds, "augment_rows_per_s": len(encoded) / augment_seconds,
            "rows_per_s": len(encoded) / (decode_seconds + augment_seconds),
            "decode_share": decode_seconds / (decode_seconds + augment_seconds),
            **{f"augment_share {step_name(step)}": seconds / augment_seconds
               for step, seconds in zip(steps, step_seconds, strict=True)}}


def step_name(step) -> str:
    inner = getattr(step, "transforms", None)  # RandomApply: name what it applies
    return f"{type(step).__name__}({type(inner[0]).__name__})" if inner else type(step).__name__


# ---- report ----------------------------------------------------------------------------------------------

def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    import ray

    return {"cpu": model, "cores": os.cpu_count(), "load_average_at_start": os.getloadavg()[0],
            "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "ray": ray.__version__, "pyarrow": pyarrow.__version__, "pillow": Image.__version__}


def cores_per_gpu(rows_per_s_per_core: float) -> float:
    return SLOTS_PER_GPU * ROWS_PER_SLOT / rows_per_s_per_core


def median(values: Iterable[float]) -> float:
    """The median of the numbers that are not NaN (NaN if none are)."""
    numbers = [v for v in values if not math.isnan(v)]
    return statistics.median(numbers) if numbers else math.nan


def summarise(epochs: dict[str, list[Epoch]], serial: dict[str, list[dict]], processes: int) -> dict:
    """Medians over rounds; ratios to the DataLoader per round, then the median; cores per GPU."""
    rates = {}
    for name, runs in epochs.items():
        running = median(e.running_rate for e in runs)
        rates[name] = {"running_rows_per_s": running, "running_rows_per_s_per_core": running / processes,
                       "epoch_rows_per_s": median(e.epoch_rate for e in runs),
                       "first_batch_seconds": median(e.first_batch_seconds for e in runs)}
        if name != "dataloader":
            rates[name]["object_store_peak_mb"] = max(e.store_peak_mb for e in runs)
            rates[name]["object_store_at_start_mb"] = median(e.store_start_mb for e in runs)
    ratios = {}
    for name in [name for name in epochs if name != "dataloader"]:
        ratios[name] = {}
        for kind in ("running_rate", "epoch_rate"):
            per_round = [getattr(ray_epoch, kind) / getattr(loader_epoch, kind)
                         for ray_epoch, loader_epoch in zip(epochs[name], epochs["dataloader"], strict=True)]
            ratios[name][kind] = {"median": median(per_round), "rounds": per_round}
    serial_median = {source: {key: median(r[key] for r in runs) for key in runs[0]}
                     for source, runs in serial.items()}
    per_core = {name: rates[name]["running_rows_per_s_per_core"] for name in BATCH_BY_BATCH if name in rates}
    per_core |= {f"serial_{source}": figures["rows_per_s"] for source, figures in serial_median.items()}
    need = {name: {"cores_per_gpu": cores_per_gpu(rate),
                   "slots_per_s_fed_by_cluster_cpus": CLUSTER_CPUS_PER_GPU * rate / ROWS_PER_SLOT}
            for name, rate in per_core.items()}
    return {"rates": rates, "ratios_to_dataloader": ratios, "serial_per_core": serial_median,
            "feeding_one_gpu": {"slots_per_s": SLOTS_PER_GPU, "rows_per_s": SLOTS_PER_GPU * ROWS_PER_SLOT,
                                "cluster_cpus_per_gpu": CLUSTER_CPUS_PER_GPU, **need}}


def print_report(summary: dict, epochs: dict[str, list[Epoch]]) -> None:
    print(f"\n{'pipeline':32s} {'running rows/s':>14s} {'per core':>8s} {'epoch rows/s':>12s} {'1st batch s':>11s} "
          f"{'store peak MB':>13s}  running rows/s by round")
    for name, figures in summary["rates"].items():
        rounds = ", ".join(f"{e.running_rate:.1f}" for e in epochs[name])
        peak = f"{figures['object_store_peak_mb']:.0f}" if "object_store_peak_mb" in figures else "-"
        label = name if name in BATCH_BY_BATCH else f"{name} *"
        print(f"{label:32s} {figures['running_rows_per_s']:14.1f} {figures['running_rows_per_s_per_core']:8.1f} "
              f"{figures['epoch_rows_per_s']:12.1f} {figures['first_batch_seconds']:11.1f} {peak:>13s}  {rounds}")
    print("* output in ~450-row blocks: the running rate rests on 2-4 deliveries, read the epoch rate\n")
    for name, ratio in summary["ratios_to_dataloader"].items():
        for kind, figures in ratio.items():
            print(f"{name + ' / dataloader, ' + kind.replace('_rate', ''):52s} {figures['median']:5.2f}  "
                  f"(rounds {', '.join(f'{r:.2f}' for r in figures['rounds'])})")
    print()
    for source, figures in summary["serial_per_core"].items():
        shares = ", ".join(f"{key.removeprefix('augment_share ')} {value:.0%}" for key, value in figures.items()
                           if key.startswith("augment_share"))
        print(f"serial, 1 core, {source:9s}: decode {figures['decode_per_s']:.0f} img/s, two views "
              f"{figures['augment_rows_per_s']:.1f} rows/s, both {figures['rows_per_s']:.1f} rows/s "
              f"(decode {figures['decode_share']:.0%} of the time; augmentation: {shares})")
    feed = summary["feeding_one_gpu"]
    print(f"\none GPU at {feed['slots_per_s']} slots/s needs {feed['rows_per_s']} two-view rows/s:")
    for name, figures in feed.items():
        if isinstance(figures, dict):
            print(f"  {name:32s} {figures['cores_per_gpu']:5.0f} cores per GPU; {feed['cluster_cpus_per_gpu']} "
                  f"CPUs feed {figures['slots_per_s_fed_by_cluster_cpus']:.0f} slots/s")


def pipelines(split: Path, shard_sets: dict[str, list[str]], processes: int,
              store: ObjectStore) -> dict[str, Callable[[], Epoch]]:
    data = decode_config(processes)
    original, max_side = shard_sets["original"], shard_sets["max_side"]
    return {"dataloader": dataloader_pipeline(split, processes),
            "ray_data": ray_data_pipeline(stream(data, original, seed=0, train=True), store),
            "ray_data_max_side": ray_data_pipeline(stream(data, max_side, seed=0, train=True), store),
            "ray_data_small_blocks": ray_data_pipeline(small_block_stream(data, original, seed=0), store),
            "ray_data_max_side_small_blocks": ray_data_pipeline(small_block_stream(data, max_side, seed=0), store)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", type=int, default=1500, help="images in the generated tree")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds, after a warm-up epoch")
    p.add_argument("--processes", type=int, default=2, help="N: DataLoader workers = Ray Data decode actors")
    p.add_argument("--max-side", type=int, default=256, help="longer side of the re-encoded shard set")
    p.add_argument("--serial-images", type=int, default=100, help="images per round of the serial measurement")
    p.add_argument("--cache", default="/tmp/glmc_bench_images", help="generated images and shards (reused)")
    p.add_argument("--json", default="bench/results/decode_throughput.json", help="the results (JSON)")
    args = p.parse_args()
    torch.set_num_threads(1)  # the serial figures are per core; workers and actors run 1 thread each too
    host, cache = machine(), Path(args.cache)
    split = image_tree(cache, args.images)
    shard_sets = {"original": shard_set(split, cache / f"shards_{args.images}", None),
                  "max_side": shard_set(split, cache / f"shards_{args.images}_max{args.max_side}", args.max_side)}
    encoded = {source: encoded_images(paths) for source, paths in shard_sets.items()}
    images = {source: describe(data) for source, data in encoded.items()}
    print(json.dumps(images), flush=True)

    import ray
    import ray.data

    # N decode actors of 1 CPU, plus 1 logical CPU each for the read task and the ListFiles task, which takes
    # one whatever it is given (ray-notes pitfall 5): without them the read stage waits for a free CPU
    ray.init(address="local", num_cpus=args.processes + 2, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    store = ObjectStore()
    runners = pipelines(split, shard_sets, args.processes, store)
    # Warm-up: the DataLoader starts its persistent workers, Ray its first worker processes (later Ray epochs
    # start new actors anyway: that is measured). Whole epochs: an iteration left unfinished keeps its blocks
    # in the object store (seen here with Ray 2.60), which would inflate the peaks that follow.
    for name in ("dataloader", "ray_data_small_blocks"):
        print(f"warm-up {name}: {runners[name]().seconds:.1f} s", flush=True)
    epochs = {name: [] for name in runners}
    serial = {source: [] for source in encoded}
    load_by_round = []  # 1-minute load averages; this benchmark alone makes about N + 1
    for round_index in range(args.rounds):
        for name, run in runners.items():
            epoch = run()
            epochs[name].append(epoch)
            peak = f", object store peak {epoch.store_peak_mb:.0f} MB" if epoch.store_peak_mb is not None else ""
            print(f"round {round_index} {name:32s} {epoch.running_rate:6.1f} rows/s running, {epoch.epoch_rate:6.1f} "
                  f"epoch ({epoch.rows} rows in {epoch.seconds:.1f} s, first batch {epoch.first_batch_seconds:.1f} s"
                  f"{peak})", flush=True)
        for source, data in encoded.items():
            serial[source].append(serial_rates(data[:args.serial_images]))
            print(f"round {round_index} serial {source:9s} decode {serial[source][-1]['decode_per_s']:.0f} img/s, "
                  f"two views {serial[source][-1]['augment_rows_per_s']:.1f} rows/s", flush=True)
        load_by_round.append(os.getloadavg()[0])
        print(f"round {round_index}: load average {load_by_round[-1]:.1f}", flush=True)
    store_capacity = store.stats().object_store_bytes_avail

    summary = summarise(epochs, serial, args.processes)
    print_report(summary, epochs)
    report = {"machine": {**host, "load_average_by_round": load_by_round},
              "settings": {**vars(args), "batch": BATCH, "rows_per_shard": ROWS_PER_SHARD, "sides": SIDES,
                           "transform": 'TwoViews(train_transform("simclr", 224))',
                           "ray_logical_cpus": args.processes + 2, "first_delivery_s": FIRST_DELIVERY_S,
                           "object_store_capacity_mb": store_capacity / 2**20},
              "images": images, **summary,
              "epochs": {name: [asdict(e) | {"running_rate": e.running_rate, "epoch_rate": e.epoch_rate}
                                for e in runs] for name, runs in epochs.items()}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
