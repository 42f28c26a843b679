"""Parquet shards (`python -m glmc_ray.shards build`) streamed by Ray Data from any filesystem pyarrow reads.

Each stream is `ShardSource` (one read task per shard, a new shard order every epoch) -> `Decode` on an
autoscaling pool of CPU actors (decode, augment, two uint8 views per row) -> Ray Train's
`streaming_split(equal=True)` across the workers -> `iter_torch_batches` with a local shuffle buffer; views are
normalised on the training device.

A read task fetches its shard whole, then decodes it row group by row group. A row group whose bytes no longer
decode (storage corruption after the build) becomes as many rows that carry a `damage` description instead of an
image, and the worker that meets the first of them stops the run with one error naming the shard and its rows:
a failed Ray Data read task would instead be retried, then end the stream with pages of tracebacks that do not
name the shard. An image that no longer decodes inside a readable row group is skipped and counted, as ever.

The class-re-balanced second stream reads the same shards. Ray Data has no weighted sampler, so each row of
class c is emitted k ~ Poisson(lambda_c) times, lambda_c ∝ n_c^-q: the Poissonised form of the official
`WeightedRandomSampler(replacement=True)` (row i is drawn with probability ∝ n_c^-q, independently per draw).
It is row-local, so it streams and scales to any number of classes, and q is an argument of the stream, not of
the shards: every run (every search trial) chooses its own. The expected length is set a few standard
deviations above the uniform stream's so that the uniform stream, read exactly once per epoch, ends the epoch.

`streaming_split(equal=True)` gives every rank the same number of rows of each stream, so every rank takes
the same number of steps; it leaves out the `rows % workers` rows (fewer than the workers) that cannot be
shared equally, a different few each epoch since the order is new.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import torch

from glmc_ray.core.config import rebalanced_stream, strong_view, weak_rotation
from glmc_ray.core.longtail import class_balanced_weights
from glmc_ray.data import shard_format
from glmc_ray.data.batches import DataBundle
from glmc_ray.data.device_augment import (
    PARAMS,
    STREAM_IDS,
    DeviceTail,
    JpegDecoder,
    KeyedViews,
    augment_on_device,
    header_size,
    view_key,
)
from glmc_ray.data.images import (
    BadImageLog,
    Normalizer,
    Unreadable,
    decode,
    decode_tensor,
    test_transform,
)
from glmc_ray.data.strong_views import view_transforms
from glmc_ray.methods.base import Batch

COLUMNS = shard_format.SCHEMA.names  # image, label, path, index
# A read block: the shard's columns, `damage` ("" for the rows of a row group that decodes) and `execution`
# (the how-manyth pass over the shards this is: the epoch of a training stream)
BLOCK_SCHEMA = pa.schema([*shard_format.SCHEMA, pa.field("damage", pa.string()), pa.field("execution", pa.int64())])
STREAMS = {"uniform": "train", "rebalanced": "train_rebalanced"}  # stream -> Ray Train dataset name
MARGIN_SIGMAS = 5.0  # the re-balanced stream runs short of the uniform one with probability ~3e-7 an epoch
DECODE_BATCH = 32  # rows per Decode call (per-row work dominates; small batches keep the actors' memory low)


def location(data, split: str) -> str:
    """A shard set's URI or path: absolute paths and URIs as given, others under data.root."""
    if "://" in split or split.startswith("/"):
        return split
    return f"{data.root.rstrip('/')}/{split}"


def open_split(data, split: str) -> tuple[dict, list[str]]:
    """The manifest of a shard set, checked against its shards' footers, and the shard paths."""
    uri = location(data, split)
    manifest = shard_format.read_manifest(uri)
    shard_format.check_shards(uri, manifest)
    return manifest, shard_format.shard_paths(uri, manifest)


def poisson_rates(class_counts, exponent: float, margin_sigmas: float = MARGIN_SIGMAS) -> np.ndarray:
    """lambda_c per class: rows of class c are repeated Poisson(lambda_c) times, so class c's expected share is
    n_c^(1-q) / sum n^(1-q) (the official sampler's) and the expected total is N + margin_sigmas * sqrt(N)."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    weights = class_balanced_weights(counts, exponent).double()
    total = counts.sum()
    target = total + margin_sigmas * total.sqrt()
    return (target * weights / (counts * weights).sum()).numpy()


class ShardDamaged(ValueError):
    """Rows of a shard that no longer decode as Parquet: the shard changed after it was built."""


def read_shard(path: str, execution: int = 0) -> Iterator[pa.Table]:
    """A read task: the shard at `path`, one block per row group (BLOCK_SCHEMA). An I/O error raises, as in any
    read; a row group whose bytes do not decode becomes as many rows carrying its damage."""
    for part in shard_format.row_groups(shard_format.fetch(path), path, COLUMNS):
        if isinstance(part, shard_format.Damage):
            rows = part.rows or 1  # a footer that no longer decodes: its row count is unknown here
            yield pa.table({"image": [b""] * rows, "label": [-1] * rows, "path": [path] * rows,
                            "index": [-1] * rows, "damage": [str(part)] * rows, "execution": [execution] * rows},
                           schema=BLOCK_SCHEMA)
        else:
            damage = pa.array([""] * part.num_rows, pa.string())
            passes = pa.array([execution] * part.num_rows, pa.int64())
            yield pa.Table.from_arrays([*part.columns, damage, passes], schema=BLOCK_SCHEMA)


def shard_source(paths: list[str], seed: int, shuffle: bool):
    """The Ray Data Datasource of the shards at `paths`: one read task per shard (`read_shard`), in a new
    seeded order each execution (each epoch) when `shuffle`. Ray is imported on use."""
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class ShardSource(Datasource):
        def __init__(self):
            super().__init__()
            self.executions = 0

        def estimate_inmemory_data_size(self):
            return None  # the manifest's bytes are encoded images; decoded, they are larger

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            order, execution = list(paths), self.executions
            if shuffle:
                np.random.default_rng([seed, execution]).shuffle(order)
            self.executions += 1
            return [ReadTask(functools.partial(read_shard, path, execution),
                             BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=[path]),
                             schema=BLOCK_SCHEMA, per_task_row_limit=per_task_row_limit)
                    for path in order]

    return ShardSource()


class Decode:
    """Ray Data actor: decode and augment encoded images into uint8 views (duplicates, if `rates` repeats rows,
    get their own augmentations).

    With `keyed` (training with the tail on the device) a view is the crop and its parameters (`p1`, `p2`), both
    drawn from a key made of the stream's seed, the pass over the shards, the image's id and its copy number:
    the same image in the same epoch gets the same views whichever actor, batch or worker handles it.

    Unreadable images become rows with `ok` False and zero pixels, so the worker can name and count them (once
    per image and epoch), and an actor does not decode one again (the re-balanced stream redraws tail images); rows
    of a damaged row group (a non-empty `damage`) pass through once, without pixels, for the worker to stop at."""

    def __init__(self, augmentation: str, size: int, channels: int, train: bool, rates=None, keyed: bool = False,
                 seed: int = 0, stream: int = 0, decode_on_device: bool = False, strong: str = "none",
                 mean: tuple = (), std: tuple = (), rotation: float = 0.0):
        if keyed and train:
            self.transform = KeyedViews(augmentation, size)
        elif train:  # x1 and x2: the preset twice, or the preset and the strong view
            self.transforms = view_transforms(augmentation, size, strong, mean, std, rotation)
        else:
            self.transforms = (test_transform(augmentation, size),)
        self.views, self.channels, self.keyed = 2 if train else 1, channels, keyed and train
        self.headers_only = decode_on_device and self.keyed  # ship the JPEG and its boxes, not pixels
        self.size, self.rates, self.train, self.seed, self.stream = size, rates, train, seed, stream
        self.rng = np.random.default_rng()
        self.unreadable = {}  # image index -> why: this actor's redraws of a bad image are not decoded again

    def _rows(self, batch: dict, damaged: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
        """The rows to emit, in order, and each one's copy number (0 unless `rates` repeats it)."""
        rows = np.arange(len(batch["label"]))
        if not self.train:
            return rows, np.zeros_like(rows)
        copies = np.ones_like(rows)
        if self.rates is not None:
            labels = np.where(damaged, 0, batch["label"])  # damaged rows have no label (-1)
            copies = np.where(damaged, 1, rng.poisson(self.rates[labels]))
        rows = np.repeat(rows, copies)
        copy = np.arange(len(rows)) - np.repeat(np.cumsum(copies) - copies, copies)
        order = rng.permutation(len(rows))  # new order inside each block every epoch; spreads duplicates
        return rows[order], copy[order]

    def _rng(self, batch: dict):
        """Keyed: the Poisson draws and the order come from the batch's first image and the pass, as the views do."""
        if not self.keyed or "execution" not in batch or not len(batch["label"]):
            return self.rng
        return np.random.default_rng([self.seed, self.stream, int(batch["execution"][0]),
                                      int(batch["index"][0]) + 1])

    def _keys(self, batch: dict, row: int, copy: int) -> list[int]:
        execution = int(batch["execution"][row]) if "execution" in batch else 0
        position = f"{int(batch['index'][row])}.{copy}"
        return [view_key(self.seed, execution, self.stream, position, v) for v in range(self.views)]

    def _draw(self, image, batch: dict, row: int, copy: int) -> list:
        if not self.keyed:
            return [(transform(image), None) for transform in self.transforms[:self.views]]
        return [self.transform(image, key) for key in self._keys(batch, row, copy)]

    def _boxes(self, batch: dict, rows: np.ndarray, copies: np.ndarray, damaged: np.ndarray) -> dict:
        """decode_on device: per row the encoded image, and per view its crop box (from the header's size) and
        parameters; a header that does not read makes the row unreadable."""
        boxes = np.zeros((self.views, len(rows), 4), dtype=np.int64)
        params = np.zeros((self.views, len(rows), PARAMS), dtype=np.float32)
        ok, reasons = ~damaged[rows], [""] * len(rows)
        for i, (row, copy) in enumerate(zip(rows, copies, strict=True)):
            size = header_size(bytes(batch["image"][row])) if ok[i] else ""
            if isinstance(size, str):
                ok[i], reasons[i] = False, size
                continue
            for v, key in enumerate(self._keys(batch, row, int(copy))):
                box, drawn = self.transform.draw_for_size(*size, key)
                boxes[v, i], params[v, i] = box, drawn.numpy()
        return {"jpeg": batch["image"][rows], **{f"box{v + 1}": boxes[v] for v in range(self.views)},
                **{f"p{v + 1}": params[v] for v in range(self.views)}, "ok": ok,
                "reason": np.array(reasons, dtype=object)}

    def __call__(self, batch: dict) -> dict:
        damage = batch.get("damage", np.full(len(batch["label"]), "", dtype=object))  # absent: not from a read task
        damaged = damage != ""
        rows, copies = self._rows(batch, damaged, self._rng(batch))
        common = {"label": batch["label"][rows].astype(np.int64), "index": batch["index"][rows],
                  "path": batch["path"][rows], "damage": damage[rows]}
        if self.headers_only:
            return {**self._boxes(batch, rows, copies, damaged), **common}
        views = np.zeros((self.views, len(rows), self.channels, self.size, self.size), dtype=np.uint8)
        params = np.zeros((self.views, len(rows), PARAMS), dtype=np.float32)
        ok, reasons = np.ones(len(rows), dtype=bool), [""] * len(rows)
        for i, (row, copy) in enumerate(zip(rows, copies, strict=True)):
            if damaged[row]:
                ok[i] = False
                continue
            index = int(batch["index"][row])
            if index in self.unreadable:
                ok[i], reasons[i] = False, self.unreadable[index]
                continue
            read = decode_tensor if self.keyed else decode  # the device tail crops tensors
            image = read(bytes(batch["image"][row]), self.channels, str(batch["path"][row]))
            if isinstance(image, Unreadable):
                ok[i], reasons[i] = False, image.reason
                self.unreadable[index] = image.reason
                continue
            for v, (crop, drawn) in enumerate(self._draw(image, batch, row, int(copy))):
                views[v, i] = crop.numpy()
                if drawn is not None:
                    params[v, i] = drawn.numpy()
        out = {f"x{v + 1}": views[v] for v in range(self.views)}
        if self.keyed:
            out |= {f"p{v + 1}": params[v] for v in range(self.views)}
        return {**out, **common, "ok": ok, "reason": np.array(reasons, dtype=object)}


def stream(data, paths: list[str], seed: int, train: bool, rates=None, keyed: bool = False, stream_id: int = 0,
           strong: str = "none", rotation: float = 0.0):
    """A Ray Dataset of decoded rows of the shards at `paths` (lazy: each iteration is a new execution);
    `keyed`: crops and their parameters for the device tail (with data.decode_on device: the JPEGs, their
    crop boxes and parameters); `strong`: x2 is that strong view (config.strong_view); `rotation`: x1's
    (config.weak_rotation)."""
    import ray.data

    dataset = ray.data.read_datasource(shard_source(paths, seed, shuffle=train), override_num_blocks=len(paths))
    pool = ray.data.ActorPoolStrategy(min_size=1, max_size=data.decode_actors or None)
    return dataset.map_batches(
        Decode, fn_constructor_kwargs={"augmentation": data.augmentation, "size": data.image_size,
                                       "channels": data.channels, "train": train, "rates": rates, "keyed": keyed,
                                       "seed": seed, "stream": stream_id,
                                       "decode_on_device": data.decode_on == "device",
                                       "strong": strong, "mean": tuple(data.mean), "std": tuple(data.std),
                                       "rotation": rotation},
        batch_size=DECODE_BATCH, compute=pool, num_cpus=data.decode_cpus)


def ray_datasets(cfg, gpu: bool = False) -> dict:
    """The training streams, as callables Ray Train calls when a worker group starts (also after a restart).
    `gpu`: the workers train on GPUs (data.augment_on auto then puts the tail there)."""
    data, (manifest, paths) = cfg.data, open_split(cfg.data, cfg.data.train_split)
    strong, rotation = strong_view(cfg), weak_rotation(cfg)
    keyed = augment_on_device(data, gpu, strong, rotation)
    datasets = {STREAMS["uniform"]: lambda: stream(data, paths, cfg.train.seed, train=True, keyed=keyed,
                                                   stream_id=STREAM_IDS["uniform"], strong=strong, rotation=rotation)}
    if (exponent := rebalanced_stream(cfg)) is not None:
        rates = poisson_rates(manifest["class_counts"], exponent)
        datasets[STREAMS["rebalanced"]] = lambda: stream(data, paths, cfg.train.seed + 1, train=True, rates=rates,
                                                         keyed=keyed, stream_id=STREAM_IDS["rebalanced"],
                                                         strong=strong, rotation=rotation)
    return datasets


def ray_cpus(cfg) -> float:
    """Per stream (two training streams and one evaluation): its decode actor and a read task (1 CPU)."""
    return 3 * (cfg.data.decode_cpus + 1)


def kept_rows(num_classes: int, bad_images: BadImageLog, split: str):
    """The collate function of a stream: decoded rows as torch tensors, unreadable ones logged and dropped."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class KeptRows(NumpyBatchCollateFn):
        def __call__(self, rows: dict) -> dict:
            damaged = rows["damage"] != ""
            if damaged.any():
                raise ShardDamaged(f"{rows['damage'][damaged][0]}; the shard changed after it was built: "
                                   f"`{shard_format.CHECK_COMMAND} {rows['path'][damaged][0].rpartition('/')[0]}` "
                                   f"lists every damaged shard of its set")
            ok = rows["ok"]
            bad_images.add(split, [Unreadable(str(p), str(r)) for p, r in
                                   zip(rows["path"][~ok], rows["reason"][~ok], strict=True)])
            labels = torch.from_numpy(rows["label"][ok])
            if len(labels) and int(labels.max()) >= num_classes:
                path = rows["path"][ok][int(labels.argmax())]
                raise ValueError(f"{path}: label {int(labels.max())} is outside the training manifest's "
                                 f"{num_classes} classes")
            tensors = ("x1", "x2", "p1", "p2", "box1", "box2", "index")
            out = {k: torch.from_numpy(rows[k][ok]) for k in tensors if k in rows}
            if "jpeg" in rows:  # decoded on the device: the encoded images, and their paths to name a bad one
                out |= {"jpeg": [bytes(b) for b in rows["jpeg"][ok]], "path": [str(p) for p in rows["path"][ok]]}
            return {**out, "label": labels}
    return KeptRows()


class RowBatches:
    """One stream's decoded rows as torch batches of this rank (`shard`: a DataIterator or Dataset; None: no
    rows for this rank)."""

    def __init__(self, shard, batch_size: int, shuffle_buffer: int, collate):
        self.shard, self.batch_size, self.shuffle_buffer, self.collate = shard, batch_size, shuffle_buffer, collate

    def __iter__(self) -> Iterator[dict]:
        if self.shard is None:
            return iter(())
        return iter(self.shard.iter_torch_batches(
            batch_size=self.batch_size, collate_fn=self.collate, prefetch_batches=2,
            local_shuffle_buffer_size=self.shuffle_buffer or None))


def _repeating(batches: RowBatches) -> Iterator[dict]:
    """The re-balanced stream, restarted in the (rare) case it ends before the uniform one; every rank holds
    as many of its rows as the others, so all ranks restart at the same step."""
    while True:
        yield from batches


class ShardBatches:
    """The training batch source: the uniform stream read once per epoch, zipped with the re-balanced one;
    views finished on the device by `finish`: a Normalizer, or a DeviceTail for crops with parameters, after
    `decoder` has decoded and cropped the JPEGs there when they travel encoded (data.decode_on: device)."""

    def __init__(self, uniform: RowBatches, rebalanced: RowBatches | None, steps: int,
                 finish: Normalizer | DeviceTail, decoder: JpegDecoder | None = None):
        self.uniform, self.rebalanced, self.steps, self.finish = uniform, rebalanced, steps, finish
        self.decoder = decoder

    def __len__(self) -> int:
        return self.steps

    def _finished(self, rows: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(view 1, view 2, labels) of the rows, on the device; rows whose image nothing decodes are left out."""
        if self.decoder is not None:
            images, kept = self.decoder.decode(rows["jpeg"], rows["path"])
            return (*(self.finish((self.decoder.crops(images, rows[f"box{v}"][kept]), rows[f"p{v}"][kept]))
                      for v in (1, 2)), rows["label"][kept])
        if isinstance(self.finish, DeviceTail):
            return (*(self.finish((rows[f"x{v}"], rows[f"p{v}"])) for v in (1, 2)), rows["label"])
        return self.finish(rows["x1"]), self.finish(rows["x2"]), rows["label"]

    def epoch(self, epoch: int) -> Iterator[Batch]:
        second = _repeating(self.rebalanced) if self.rebalanced is not None else None
        for rows in self.uniform:
            x1, x2, y = self._finished(rows)
            if second is None:
                yield Batch(x1, x2, y)
                continue
            rx1, rx2, ry = self._finished(next(second))
            k = min(len(y), len(ry))  # bad images dropped: the method pairs the streams by position
            yield Batch(x1[:k], x2[:k], y[:k], rx1[:k], rx2[:k], ry[:k])


class EvalBatches:
    """This rank's share of an evaluation shard set, decoded anew each evaluation, as (normalised x, y)."""

    def __init__(self, rows: RowBatches, normalizer: Normalizer):
        self.rows, self.normalizer = rows, normalizer

    def __iter__(self):
        for batch in self.rows:
            yield self.normalizer(batch["x1"]), batch["label"]


def training_class_counts(cfg) -> list[int]:
    return shard_format.read_manifest(location(cfg.data, cfg.data.train_split))["class_counts"]


def build(cfg, device, rank: int, world_size: int, memory_format, dataset_shard=None) -> DataBundle:
    """`dataset_shard` (Ray Train's get_dataset_shard) gives this rank's split of the training streams; without
    it (one process, in-process run) the streams are made here."""
    data, train = cfg.data, cfg.train
    manifest, _ = open_split(data, data.train_split)
    counts, rows = manifest["class_counts"], manifest["num_rows"]
    if train.batch_size < world_size:
        raise ValueError(f"train.batch_size {train.batch_size} is smaller than the {world_size} workers")
    per_rank_batch = train.batch_size // world_size
    steps = math.ceil(rows // world_size / per_rank_batch)
    gpu = torch.device(device).type == "cuda"
    if dataset_shard is None:
        streams = ray_datasets(cfg, gpu)
        dataset_shard = {name: make().iterator() for name, make in streams.items()}.__getitem__
    bad_images = BadImageLog(data.max_bad_images)

    def rows_of(shard, batch_size, split, buffer=0):
        return RowBatches(shard, batch_size, buffer, kept_rows(len(counts), bad_images, split))
    uniform = rows_of(dataset_shard(STREAMS["uniform"]), per_rank_batch, "train", data.shuffle_buffer)
    second = rows_of(dataset_shard(STREAMS["rebalanced"]), per_rank_batch, "train", data.shuffle_buffer) \
        if rebalanced_stream(cfg) is not None else None
    normalizer = Normalizer(data.mean, data.std, device, memory_format)
    evals = {}
    for name, split in (("val", data.val_split), ("test", data.test_split)):
        if split:
            eval_manifest, paths = open_split(data, split)
            if eval_manifest["num_classes"] > len(counts):
                raise ValueError(f"data.{name}_split {location(data, split)}: {eval_manifest['num_classes']} "
                                 f"classes, more than the training manifest's {len(counts)}")
            # whole shards per rank: every row is read and decoded once, by one rank (shares may differ in size)
            mine = paths[rank::world_size]
            dataset = stream(data, mine, train.seed, train=False) if mine else None
            evals[name] = EvalBatches(rows_of(dataset, train.eval_batch_size, name), normalizer)
    on_device = augment_on_device(data, gpu, strong_view(cfg), weak_rotation(cfg))
    finish = DeviceTail(normalizer) if on_device else normalizer
    decoder = JpegDecoder(device, data.channels, data.image_size, bad_images) if data.decode_on == "device" else None
    return DataBundle(ShardBatches(uniform, second, steps, finish, decoder), evals, counts, bad_images)
