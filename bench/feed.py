"""How many CPU cores keep one GPU fed, per design of the ImageNet-LT input: the CPU ms per two-view
224-px row of each design, one thread, side by side in each round, and the pipelines that deliver them.

Designs (one row = one image decoded once and augmented into two views, the official ImageNet-LT list):
  (a) old_list      PIL decode + the list with torchvision's GaussianBlur(23) (the first design), all on the CPU
  (b) official      PIL decode + the official list with PIL's ImageFilter blur (data.augment_on: cpu)
  (c) device_tail   the CPU side of data.augment_on: device: torchvision decode + two keyed crops and their
                    parameters; the tail (jitter, grayscale, blur, flip) runs on the training device. Its cost,
                    were it run on this CPU instead, is measured apart (tail_on_cpu, batches of 64).
  (d) gpu_decode    data.decode_on: device: the CPU reads each JPEG's header and draws the boxes and parameters
                    (gpu_decode_cpu_side, measured here); decode, crops and tail run on the GPU, measured where
                    CUDA is present (bench/gpu_check.py, "feed").

Pipelines, N processes each, rounds alternating: a DataLoader over the files and Ray Data over Parquet shards,
each with the official list (b) and with the device tail's CPU side (c); the rows/s once running, per core,
and Ray Data's object-store peak. From the CPU ms per row it prints the cores that one GPU needs at 5,000
two-view rows/s (an H100 on GLMC's two ResNet-50 passes) and writes bench/results/feed.json.

    python bench/feed.py [--images 1500] [--rounds 3] [--processes 2] [--serial-images 100]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).parent))
from decode_throughput import (  # noqa: E402
    BATCH,
    ROWS_PER_SLOT,
    SLOTS_PER_GPU,
    ObjectStore,
    dataloader_pipeline,
    decode_config,
    describe,
    encoded_images,
    image_tree,
    machine,
    median,
    ray_data_pipeline,
    shard_set,
    timed_epoch,
)

from glmc_ray.data.batches import EpochPlan  # noqa: E402
from glmc_ray.data.device_augment import PARAMS, KeyedViews, augment_tail, header_size, view_key  # noqa: E402
from glmc_ray.data.files import (  # noqa: E402
    ImageListDataset,
    ReadableBatches,
    _PlannedBatchSampler,
    collate_readable,
    read_split_file,
)
from glmc_ray.data.images import BadImageLog, TwoViews, decode, decode_tensor, train_transform  # noqa: E402
from glmc_ray.data.shards import stream  # noqa: E402

ROWS_PER_GPU = SLOTS_PER_GPU * ROWS_PER_SLOT  # 5,000 two-view rows/s
SIZE = 224


def old_list() -> T.Compose:
    """The simclr list of the first design: torchvision's 23x23 GaussianBlur on the PIL image."""
    steps = train_transform("simclr", SIZE).transforms
    return T.Compose([T.RandomApply([T.GaussianBlur(23, (0.1, 2.0))], p=0.5) if isinstance(s, T.RandomApply)
                      else s for s in steps])


def serial_ms_per_row(encoded: list[bytes]) -> dict[str, float]:
    """CPU ms per row of each design, one thread, the same images one after the other."""
    lists = {"old_list": TwoViews(old_list()), "official": TwoViews(train_transform("simclr", SIZE))}
    views = KeyedViews("simclr", SIZE)
    out = {}
    for name, two_views in lists.items():
        start = time.perf_counter()
        for data in encoded:
            two_views(decode(data, 3))
        out[name] = (time.perf_counter() - start) * 1e3 / len(encoded)
    start, crops, params = time.perf_counter(), [], []
    for position, data in enumerate(encoded):
        image = decode_tensor(data, 3)
        for view in (0, 1):
            crop, drawn = views(image, view_key(0, 0, 0, position, view))
            crops.append(crop)
            params.append(drawn)
    out["device_tail"] = (time.perf_counter() - start) * 1e3 / len(encoded)
    start = time.perf_counter()  # (d): the decode actors read the header and draw; the GPU decodes
    for position, data in enumerate(encoded):
        size = header_size(data)
        for view in (0, 1):
            views.draw_for_size(*size, view_key(0, 0, 0, position, view))
    out["gpu_decode_cpu_side"] = (time.perf_counter() - start) * 1e3 / len(encoded)
    crops, params = torch.stack(crops), torch.stack(params)
    batch, start = min(BATCH, len(crops)), time.perf_counter()
    for first in range(0, len(crops) - batch + 1, batch):
        augment_tail(crops[first:first + batch], params[first:first + batch])
    tail_views = (len(crops) // batch) * batch
    out["tail_on_cpu"] = (time.perf_counter() - start) * 1e3 / tail_views * 2  # per row: two views
    return out


def keyed_dataloader_pipeline(split: Path, workers: int):
    """data.source=files with the device tail's CPU side: the source's own keyed sampler over a shuffled epoch
    plan feeds (index, view keys) batches; the workers return crops and parameters."""
    paths, labels = read_split_file(split, split.parent)
    dataset = ImageListDataset(paths, labels, KeyedViews("simclr", SIZE), channels=3)
    sampler = _PlannedBatchSampler(EpochPlan(len(labels), BATCH, None, seed=0), "uniform", keyed=True)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                         collate_fn=collate_readable, persistent_workers=True)
    batches = ReadableBatches(loader, BadImageLog(0), "train")

    def epoch():
        sampler.epoch += 1  # a new order and new keys each pass, as over a run's epochs
        return timed_epoch(batches, lambda batch: len(batch[1]))
    return epoch


def pipelines(split: Path, shards: list[str], processes: int, store: ObjectStore) -> dict:
    data = decode_config(processes)
    return {"dataloader": dataloader_pipeline(split, processes),
            "dataloader_device_tail": keyed_dataloader_pipeline(split, processes),
            "ray_data": ray_data_pipeline(stream(data, shards, seed=0, train=True), store),
            "ray_data_device_tail": ray_data_pipeline(stream(data, shards, seed=0, train=True, keyed=True), store)}


def cores(ms_per_row: float) -> float:
    return ROWS_PER_GPU * ms_per_row / 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", type=int, default=1500, help="images in the generated tree")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per variant (the median is reported)")
    p.add_argument("--processes", type=int, default=2, help="DataLoader workers = Ray Data decode actors")
    p.add_argument("--serial-images", type=int, default=100, help="images per round of the serial measurement")
    p.add_argument("--cache", default="/tmp/glmc_bench_images", help="generated images and shards (reused)")
    p.add_argument("--json", default="bench/results/feed.json", help="the results (JSON)")
    args = p.parse_args()
    torch.set_num_threads(1)  # per-core figures; workers and actors run one thread each
    host, cache = machine(), Path(args.cache)
    split = image_tree(cache, args.images)
    shards = shard_set(split, cache / f"shards_{args.images}", None)
    encoded = encoded_images(shards)
    images = describe(encoded)
    print(json.dumps(images), flush=True)

    import ray
    import ray.data

    ray.init(address="local", num_cpus=args.processes + 2, log_to_driver=False)  # + read and list tasks
    ray.data.DataContext.get_current().enable_progress_bars = False
    store = ObjectStore()
    runners = pipelines(split, shards, args.processes, store)
    for name in ("dataloader", "dataloader_device_tail"):  # start the persistent workers
        print(f"warm-up {name}: {runners[name]().seconds:.1f} s", flush=True)
    epochs, serial, loads = {name: [] for name in runners}, [], []
    for round_index in range(args.rounds):
        serial.append(serial_ms_per_row(encoded[:args.serial_images]))
        print(f"round {round_index} serial ms/row: " + ", ".join(f"{k} {v:.2f}" for k, v in serial[-1].items()),
              flush=True)
        for name, run in runners.items():
            epoch = run()
            epochs[name].append(epoch)
            print(f"round {round_index} {name:24s} {epoch.running_rate:6.1f} rows/s running, "
                  f"{epoch.epoch_rate:6.1f} epoch, first batch {epoch.first_batch_seconds:.1f} s"
                  + (f", object store peak {epoch.store_peak_mb:.0f} MB" if epoch.store_peak_mb else ""), flush=True)
        loads.append(os.getloadavg()[0])

    ms = {name: median(r[name] for r in serial) for name in serial[0]}
    ratios = {name: median(r["old_list"] / r[name] for r in serial)
              for name in ("official", "device_tail", "gpu_decode_cpu_side")}
    rates = {name: {"running_rows_per_s": median(e.running_rate for e in runs),
                    "running_rows_per_s_per_core": median(e.running_rate for e in runs) / args.processes,
                    "epoch_rows_per_s": median(e.epoch_rate for e in runs),
                    "first_batch_seconds": median(e.first_batch_seconds for e in runs),
                    **({"object_store_peak_mb": max(e.store_peak_mb for e in runs)} if runs[0].store_peak_mb else {})}
             for name, runs in epochs.items()}
    pipeline_ratio = {kind: median(d.running_rate / c.running_rate for d, c in
                                   zip(epochs[f"{kind}_device_tail"], epochs[kind], strict=True))
                      for kind in ("dataloader", "ray_data")}
    feeding = {"rows_per_s": ROWS_PER_GPU,
               **{f"serial_{name}": cores(value) for name, value in ms.items() if name != "tail_on_cpu"},
               **{f"pipeline_{name}": ROWS_PER_GPU / figures["running_rows_per_s_per_core"]
                  for name, figures in rates.items()}}
    report = {"machine": {**host, "load_average_by_round": loads}, "settings": vars(args) | {"batch": BATCH,
              "params_per_view": PARAMS}, "images": images, "serial_ms_per_row": ms,
              "serial_speedup_over_old_list": ratios, "pipelines": rates,
              "pipeline_device_tail_over_cpu_list": pipeline_ratio, "cores_per_gpu": feeding,
              "serial_rounds": serial, "epochs": {n: [asdict(e) for e in runs] for n, runs in epochs.items()}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"\nCPU ms per row, 1 thread (median of {args.rounds} rounds): "
          + ", ".join(f"{k} {v:.2f}" for k, v in ms.items()))
    print("speed-up over the old list, per round: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    for name, figures in rates.items():
        per_core = figures["running_rows_per_s_per_core"]
        print(f"{name:24s} {figures['running_rows_per_s']:6.1f} rows/s running ({per_core:.1f} per core), "
              f"first batch {figures['first_batch_seconds']:.1f} s")
    print(f"cores for one GPU at {ROWS_PER_GPU} rows/s: " + ", ".join(f"{k} {v:.0f}" for k, v in feeding.items()
                                                                     if k != "rows_per_s"))
    print(f"JSON in {args.json}")


if __name__ == "__main__":
    main()
