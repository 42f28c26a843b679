"""One typed config for a run: dataclasses loaded from YAML, with `--set a.b=value` overrides.

Unknown keys and wrong types are errors that name the key, the value and what was expected, so a typo
in a recipe never silently falls back to a default (the official code ignores `--beta` and `--momentum`).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from glmc_ray.core.method_config import (  # noqa: F401 (the method sections are part of the config's interface)
    DEFAULT_CLASSIFIER,
    DEFAULT_EXPERTS,
    EXPERT_LAYOUTS,
    METHOD_NAMES,
    TEACHER_KEYS,
    TEACHER_REQUIRED,
    ClassBalancedConfig,
    DeiTLTConfig,
    GLMCConfig,
    LDAMDRWConfig,
    LogitAdjustedConfig,
    MDCSConfig,
    MethodConfig,
    RIDEConfig,
    SHIKEConfig,
    default_classifier,
    method_checks,
    rebalanced_stream,
    teacher_of,
)
from glmc_ray.core.schedules import SCHEDULES, WARMUP_SCHEDULES


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message says which and what was expected.

    `key` is the dotted field the error is about, when there is one (so `load` can tell whether a
    `--set` override or the file is to blame)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


@dataclass
class DataConfig:
    # Where images come from (glmc_ray/data/<kind>.py, one module each):
    #   cifar10 | cifar100 | synthetic: in-memory uint8 arrays, crop+flip batched on the training device;
    #   files: a split file (`relative/path label` lines) and an image root, decoded in DataLoader workers;
    #   shards: Parquet shards (`python -m glmc_ray.shards build`) streamed by Ray Data, decoded on CPU actors.
    source: str = "cifar10"
    root: str = ""  # cifar-10-batches-py/ or cifar-100-python/'s parent, the image root, or the shards' parent
    download: bool = False  # CIFAR: fetch the official archive into root when its layout is missing
    imbalance_factor: float = 100.0  # n_max / n_min for CIFAR-LT and synthetic data (>= 1)
    subset_protocol: str = "glmc"  # glmc (official GLMC subset) | ldam (LDAM-DRW community subset)
    subset_seed: int = 3407  # seed of the long-tailed subset draw, separate from train.seed
    sample_with_replacement: bool = False  # the pre-2023-05-23 GLMC bug, kept only as an ablation
    val_fraction: float = 0.0  # in-memory sources: stratified validation split carved from the training subset
    # validation: best.pt and the post-hoc tau are chosen on the validation split the config names (val_fraction or
    # val_split; none: the run reports the last epoch only) | paper: the published figures' protocol, training on
    # the whole subset whatever val_fraction and val_split say (both are dropped), reporting the last epoch and,
    # as the official codes did, the best epoch on test (selected on test: upper-biased, never a selection here)
    protocol: str = "validation"
    val_seed: int = 0
    # files: split files; shards: shard folders or URIs (s3://...). Relative to root unless absolute or a URI.
    train_split: str = ""
    test_split: str = ""
    val_split: str = ""
    # Normalisation per channel (its length is the channel count: 1 for grayscale). Empty: the in-memory
    # dataset's own statistics; files and shards must give it.
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    image_size: int = 32  # training crop side (test: resized and centre-cropped to it); synthetic image side
    augmentation: str = "crop_flip"  # crop_flip: pad by side/8, random crop, flip (CIFAR) | simclr (ImageNet-LT)
    # x2 (and rx2) as a strong view, x1 staying the weak one (MDCS; glmc_ray/data/strong_views.py):
    # none | autoaugment_cutout (CIFAR: AutoAugment's CIFAR-10 policy + Cutout) | randaugment_cutout (ImageNet-LT)
    # | randaugment_erasing (DeiT's: RandAugment m9, random erasing 0.25) | auto (the method's: for mdcs and
    # shike, autoaugment_cutout with crop_flip, randaugment_cutout with simclr; randaugment_erasing for deit_lt;
    # none for the others). SHIKE and DeiT-LT train on their one strong view (x2) when there is one.
    strong_augmentation: str = "auto"
    # files, shards: where the augmentation after the crop runs (jitter, grayscale, blur, flip, normalise).
    # cpu: all of it in the decode workers | device: decode workers crop and draw every parameter, the training
    # device applies the rest batched (the same views on CPU and GPU) | auto: device when training on GPUs
    augment_on: str = "auto"
    num_workers: int = 4  # files: DataLoader worker processes per training worker (decode + augment)
    decode_actors: int = 0  # shards: Ray Data decode actors per stream (0: autoscale from 1 to what the CPUs allow)
    decode_cpus: float = 1.0  # shards: CPUs each decode actor reserves (fractions over-commit small machines)
    # shards, with the tail on the device: where JPEGs are decoded. device: on the training device (nvJPEG on a
    # GPU; the decode actors only read image headers, draw the crops and parameters); cpu: in the decode actors
    decode_on: str = "cpu"
    # shards: decoded rows each worker mixes across shards (~0.3 MB a row at 224 px), on top of a new shard
    # order and a new row order inside each shard every epoch
    shuffle_buffer: int = 1024
    # each image this many times in a row per epoch, each copy its own views (DeiT's repeated augmentation: 3;
    # in-memory and files sources), the epoch as long as one pass over the data
    repeated_augmentation: int = 1
    # The number of classes the recipe's dataset has (0: any): a run whose training split (the CIFAR source, or
    # the split file or shards under data.root) has another number stops before training, naming both
    classes: int = 0
    class_names: str = ""  # a text file naming the classes, one per line in label order (CIFAR: its meta file)
    max_bad_images: int = 20  # unreadable images skipped per split per epoch and worker before the run stops
    synthetic_classes: int = 10  # synthetic data: classes, largest class size, test images per class
    synthetic_max_count: int = 200
    synthetic_test_per_class: int = 20

    @property
    def channels(self) -> int:
        return len(self.mean) or 3  # in-memory datasets are RGB


@dataclass
class ModelConfig:
    # resnet32 (CIFAR) | resnet50 | resnext50_32x4d | a DeiT from timm (glmc_ray/models/transformers.py):
    # deit_{tiny,small,base}_distilled_patch16_224, or deit_micro_distilled_patch4_32 (the same class at 32 px,
    # patch 4, 2 blocks of width 64: CPU size). Smaller inputs are resized to a DeiT's 224 px on the device.
    arch: str = "resnet32"
    width: int = 64  # resnet32 base width: 16 = standard ResNet-32, 64 = GLMC's "channel x4"
    projection_dim: int = 128  # GLMC projection/prediction head width (128 CIFAR, 256 ImageNet)
    norm: str = "batch"  # batch (the paper's) | group (independent of how a batch is split across workers)
    # The inference head (fc_cb): linear | cosine (cosine of features and class vectors, in [-1, 1]: LDAM's
    # NormedLinear) | auto (the method's own: cosine for ldam_drw, linear for the others). Only ldam_drw scales
    # cosines (method.ldam_drw.scale), so cosine with another method is refused.
    classifier: str = "auto"
    # The APA paper's options (glmc_ray/models/activations.py): aglu replaces every ReLU of the backbone by its own
    # AGLU, z * APA(z; lambda, kappa) with two learnable scalars (no weight decay); se adds squeeze-excitation to
    # every residual block, gated by the sigmoid or by APA (the official "gumbel" SE: LayerNorm and dropout too)
    activation: str = "relu"  # relu | aglu
    aglu_gradient: str = "exact"  # exact (autograd) | official (the official lambda gradient, a term short)
    se: str = "none"  # none | sigmoid | apa
    # Multi-expert models (ride, mdcs, shike; glmc_ray/models/experts.py): E experts on a shared trunk, each with
    # a cosine head times expert_scale. 0: the method's (3 for those three, 1 for single-head methods).
    experts: int = 0
    expert_width: str = "reduced"  # reduced (RIDE's reduce_dimension: expert stages 3/4 as wide) | full
    expert_scale: float = 30.0  # s of the experts' cosine heads (the official NormedLinear x 30)
    drop_path: float = 0.0  # DeiT's stochastic depth: the last block's drop rate (timm's drop_path_rate)


@dataclass
class OptimConfig:
    # sgd (momentum, nesterov; every parameter decays, as the official CNN codes) | adamw (betas; as timm's
    # create_optimizer and DeiT: biases, norms and a ViT's tokens and position embedding do not decay)
    name: str = "sgd"
    lr: float = 0.01  # for the effective batch (train.batch_size x train.accumulate); scale linearly with it
    momentum: float = 0.9
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw's
    clip_grad_norm: float = 0.0  # clip the gradients' global L2 norm to this before each step (0: no clipping)
    weight_decay: float = 5e-3
    nesterov: bool = False
    # cosine | warmup_cosine | official_paco | warmup_step | balms_warmup_cosine (glmc_ray/core/schedules.py)
    schedule: str = "cosine"
    warmup_epochs: int = 0
    milestones: list[int] = field(default_factory=list)  # warmup_step: the epochs (0-based) where lr *= gamma
    gamma: float = 0.1  # warmup_step: the factor at each milestone
    warmup_peak: float = 1.0  # balms_warmup_cosine: the lr its warm-up reaches, as a multiple of optim.lr


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 64  # global batch, split across workers
    # batches whose gradients are summed before each optimiser step: the effective batch is batch_size x
    # accumulate whatever the worker count (DeiT-LT's 1024 on CIFAR: 256 x 4); the lr is for that batch
    accumulate: int = 1
    # label smoothing of every method's class targets, eps: (1 - eps) on the label + eps / C on every class
    # (PyTorch's cross_entropy label_smoothing; soft and mixed targets are smoothed before mixing); DeiT's 0.1
    label_smoothing: float = 0.0
    eval_batch_size: int = 500
    seed: int = 3407
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto (bf16 on CUDA) | bf16 | off
    memory_format: str = "auto"  # auto (channels_last on CUDA) | channels_last | contiguous
    eval_every: int = 1  # evaluate every k epochs (and always at the last)
    # Post-hoc logit adjustment of the trained model at every evaluation: argmax z - tau * log pi, tau scanned
    # over 0, step, ..., max and chosen by balanced top-1 on the validation split (never on test; without a
    # validation split nothing is chosen). 0 switches it off.
    posthoc_tau_max: float = 2.0
    posthoc_tau_step: float = 0.1
    # what tau multiplies: log_prior (log pi_c, logit adjustment) | iif (log(n_c / (N - n_c)): the APA paper's
    # IIF "rel" adjustment, z + log((N - n_c) / n_c), is its tau = 1)
    posthoc_offset: str = "log_prior"
    progress_every: int = 50  # print a progress line every k steps (0: only per epoch)
    progress_seconds: float = 30.0  # ... and once this long has passed since the last one (0: not by time)
    # steps between looks at the loss for inf/NaN (each look is a host read, which on a GPU waits for the
    # queue); the run stops naming the first bad step whatever this is, up to this many steps later
    finite_check_every: int = 50
    threads: int = 0  # torch intra-op threads (0: torch default)
    # A run directory (or its storage copy, s3://...) whose latest weights this run starts from: the second
    # stage of a two-stage method (method.shike.stage=retrain). Recorded in the run directory (parent.json).
    init_from: str = ""


@dataclass
class DistConfig:
    sync_batchnorm: bool = False
    max_failures: int = 3  # worker-group restarts Ray Train may make from the latest checkpoint
    keep_checkpoints: int = 2  # best-by-validation checkpoints kept by Ray Train besides the latest
    # how long a run's writes to object storage (checkpoints, the run's copy) retry through an outage before
    # the run stops (exit 75, resumable); the search's study database gets as long
    storage_retry_seconds: float = 300.0


@dataclass
class Config:
    name: str = "glmc"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)


# timm's distilled DeiTs (class and distillation tokens) and a CPU-size one (glmc_ray/models/transformers.py)
TRANSFORMER_ARCHS = ("deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224",
                     "deit_base_distilled_patch16_224", "deit_micro_distilled_patch4_32")

CHOICES = {
    "data.source": ("cifar10", "cifar100", "synthetic", "files", "shards"),
    "data.augmentation": ("crop_flip", "simclr"),
    "data.augment_on": ("auto", "cpu", "device"),
    "data.strong_augmentation": ("auto", "none", "autoaugment_cutout", "randaugment_cutout", "randaugment_erasing"),
    "data.decode_on": ("cpu", "device"),
    "data.subset_protocol": ("glmc", "ldam"),
    "data.protocol": ("validation", "paper"),
    "model.arch": ("resnet32", "resnet50", "resnext50_32x4d", *TRANSFORMER_ARCHS),
    "optim.name": ("sgd", "adamw"),
    "model.norm": ("batch", "group"),
    "model.classifier": ("auto", "linear", "cosine"),
    "model.activation": ("relu", "aglu"),
    "model.aglu_gradient": ("exact", "official"),
    "model.se": ("none", "sigmoid", "apa"),
    "model.expert_width": ("reduced", "full"),
    "method.shike.stage": ("mixture", "retrain"),
    "method.ride.stage": ("experts", "router"),
    "train.posthoc_offset": ("log_prior", "iif"),
    "method.name": METHOD_NAMES,
    "method.glmc.cumulative_shape": ("power", "cosine", "linear"),
    "method.glmc.rebalanced_loss": ("weighted_ce", "balanced_softmax_unofficial"),
    "optim.schedule": SCHEDULES,
    "train.device": ("auto", "cpu", "cuda"),
    "train.amp": ("auto", "bf16", "off"),
    "train.memory_format": ("auto", "channels_last", "contiguous"),
}


def _coerce(key: str, value, expected: type):
    """Return `value` as `expected` or raise a ConfigError naming the key."""
    if typing.get_origin(expected) is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r} ({type(value).__name__})", key)
        (item_type,) = typing.get_args(expected)
        return [_coerce(f"{key}[{i}]", item, item_type) for i, item in enumerate(value)]
    if expected is float:
        return _finite(key, value)
    if expected is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}", key)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {expected.__name__}, got {value!r} ({type(value).__name__})", key)
    choices = CHOICES.get(key)
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}", key)
    return value


def _finite(key: str, value) -> float:
    """A float field's value: YAML ints and strings such as 2e-3 (YAML 1.1 reads them as strings) become floats;
    inf and NaN are refused for every float field, since no field means anything by them."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if isinstance(number, bool) or not isinstance(number, int | float):
        raise ConfigError(f"{key}: expected float, got {value!r} ({type(value).__name__})", key)
    number = float(number)
    if not math.isfinite(number):
        raise ConfigError(f"{key}: {value!r} is not a finite number; expected a finite float", key)
    return number


def _build(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}", prefix.rstrip("."))
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in known:
            if path in MOVED:
                raise ConfigError(f"{path}: moved to {MOVED[path]} (each method's settings are in its own section, "
                                  f"method.<name>)", path)
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
            raise ConfigError(f"unknown key {path!r}; {hint}valid keys here: {', '.join(sorted(known))}", path)
        expected = hints[key]
        if dataclasses.is_dataclass(expected):
            kwargs[key] = _build(expected, value, f"{path}.")
        else:
            kwargs[key] = _coerce(path, value, expected)
    return cls(**kwargs)


# The flat GLMC keys of `method` before each method had its own section: an error says where each went.
MOVED = {f"method.{f.name}": f"method.glmc.{f.name}" for f in dataclasses.fields(GLMCConfig)}


def from_dict(values: dict) -> Config:
    cfg = _build(Config, _carried_over(values), "")
    _check_method_sections(values.get("method", {}), cfg.method.name)
    if cfg.data.protocol == "paper":  # the config a run saves says what ran: no split held out
        cfg.data.val_fraction, cfg.data.val_split = 0.0, ""
    validate(cfg)
    return cfg


def _carried_over(values: dict) -> dict:
    """A config written before DeiT-LT's label smoothing became every method's train.label_smoothing (a run's
    config.yaml: its resume, its comparison) reads as it trained; one giving both keys is refused."""
    deit = (values.get("method") or {}).get("deit_lt") if isinstance(values.get("method"), dict) else None
    if not isinstance(deit, dict) or "label_smoothing" not in deit:
        return values
    values = copy.deepcopy(values)
    smoothing = values["method"]["deit_lt"].pop("label_smoothing")
    train = values.setdefault("train", {})
    if isinstance(train, dict) and train.setdefault("label_smoothing", smoothing) != smoothing:
        raise ConfigError(f"method.deit_lt.label_smoothing: {smoothing!r} and train.label_smoothing: "
                          f"{train['label_smoothing']!r}; it is train.label_smoothing now (every method's): give that "
                          f"one only", "method.deit_lt.label_smoothing")
    return values


def has_validation(cfg: Config) -> bool:
    return cfg.data.val_fraction > 0 or bool(cfg.data.val_split)


def _check_method_sections(method: dict, name: str) -> None:
    """Only the chosen method's section may be written: another's settings would be silently ignored."""
    for section in (f.name for f in dataclasses.fields(MethodConfig)):
        if section in ("name", name) or section not in method:
            continue
        keys = method[section]
        key = f"method.{section}" + (f".{next(iter(keys))}" if isinstance(keys, dict) and keys else "")
        raise ConfigError(f"{key}: set, but method.name is {name!r}; method.{section} applies only with "
                          f"method.name={section} (to switch a recipe's method, replace its whole method section: "
                          f"--set 'method={{name: <method>, <method>: {{...}}}}')", key)


def to_dict(cfg: Config) -> dict:
    """The config as nested dicts (what config.yaml holds and Ray workers receive); `method` holds only the
    chosen method's section, so `from_dict(to_dict(cfg)) == cfg`."""
    values = dataclasses.asdict(cfg)
    method = values["method"]
    values["method"] = {"name": method["name"], **({cfg.method.name: method[cfg.method.name]}
                                                  if cfg.method.name in method else {})}
    return values


def _set_path(values: dict, dotted: str, raw: str) -> None:
    parts = dotted.split(".")
    node = values
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {part!r} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {dotted}={raw}: the value is not valid YAML ({err})") from None


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` strings (value parsed as YAML) onto a nested dict, in order."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. optim.lr=0.02")
        dotted, raw = item.split("=", 1)
        _set_path(values, dotted.strip(), raw.strip())
    return values


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict:
    """A YAML file's top-level mapping; a missing, empty, binary or malformed file is an error naming it."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory; expected a YAML file")
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not a text file (not UTF-8); expected YAML") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {path} is not valid YAML: {err}") from None
    if values is None:
        raise ConfigError(f"{what} {path} is empty; expected YAML sections such as train: and data: "
                          f"(omit --config to use the defaults on purpose)")
    if not isinstance(values, dict):
        raise ConfigError(f"{what} {path}: expected a mapping at top level, got {type(values).__name__}")
    return values


def load(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load a YAML recipe (or the defaults when `path` is None) and apply `--set` overrides.

    An error is blamed on the `--set` item that wrote the key it names, otherwise on the file."""
    values = read_yaml_mapping(path) if path is not None else {}
    overrides = list(overrides)
    merged = apply_overrides(values, overrides)  # its errors name the --set item already
    try:
        return from_dict(merged)
    except ConfigError as err:
        culprit = next((item for item in reversed(overrides) if _names_same_field(item, err.key)), None)
        if culprit is not None:
            raise ConfigError(f"--set {culprit}: {err}", err.key) from None
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{err}", err.key) from None


def load_for_workers(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """`load`, with data.root made absolute: Ray workers and Tune trials run in other working directories."""
    cfg = load(path, overrides)
    if cfg.data.root and "://" not in cfg.data.root:  # a URI (s3://bucket/shards) is the same everywhere
        cfg.data.root = str(Path(cfg.data.root).resolve())
    if cfg.data.class_names:
        cfg.data.class_names = str(Path(cfg.data.class_names).resolve())
    return cfg


def _names_same_field(item: str, key: str | None) -> bool:
    """Whether the override `item` (a.b=value) set `key` or a section holding it (or a field inside `key`)."""
    dotted = item.split("=", 1)[0].strip()
    return key is not None and (dotted == key or key.startswith((dotted + ".", dotted + "[")) or
                                dotted.startswith(key + "."))


def to_yaml(cfg: Config) -> str:
    """The config as YAML that `load` reads back to the same config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save(cfg: Config, path: Path) -> None:
    path.write_text(to_yaml(cfg))


def validate(cfg: Config) -> None:
    """Range checks that types alone do not catch."""
    checks = [
        (cfg.data.imbalance_factor >= 1, "data.imbalance_factor", cfg.data.imbalance_factor, "a number >= 1"),
        (0 <= cfg.data.val_fraction < 1, "data.val_fraction", cfg.data.val_fraction, "a fraction in [0, 1)"),
        (cfg.model.width > 0, "model.width", cfg.model.width, "a positive integer"),
        *method_checks(cfg.method),
        (cfg.optim.lr > 0, "optim.lr", cfg.optim.lr, "a positive number"),
        (0 <= cfg.optim.momentum < 1, "optim.momentum", cfg.optim.momentum, "in [0, 1)"),
        (cfg.optim.weight_decay >= 0, "optim.weight_decay", cfg.optim.weight_decay, ">= 0"),
        (0 <= cfg.optim.warmup_epochs < cfg.train.epochs, "optim.warmup_epochs", cfg.optim.warmup_epochs,
         "in [0, train.epochs)"),
        (cfg.train.epochs > 0, "train.epochs", cfg.train.epochs, "a positive integer"),
        (cfg.train.batch_size > 0, "train.batch_size", cfg.train.batch_size, "a positive integer"),
        (cfg.train.accumulate >= 1, "train.accumulate", cfg.train.accumulate, "a positive integer (1: none)"),
        (0 <= cfg.train.label_smoothing < 1, "train.label_smoothing", cfg.train.label_smoothing,
         "in [0, 1) (0: none; DeiT's 0.1)"),
        (cfg.optim.clip_grad_norm >= 0, "optim.clip_grad_norm", cfg.optim.clip_grad_norm, ">= 0 (0: no clipping)"),
        (len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas), "optim.betas", cfg.optim.betas,
         "two values in [0, 1)"),
        (0 <= cfg.model.drop_path < 1, "model.drop_path", cfg.model.drop_path, "a rate in [0, 1)"),
        (cfg.train.eval_every > 0, "train.eval_every", cfg.train.eval_every, "a positive integer"),
        (cfg.train.progress_seconds >= 0, "train.progress_seconds", cfg.train.progress_seconds,
         ">= 0 (0: progress lines by steps only)"),
        (cfg.train.finite_check_every > 0, "train.finite_check_every", cfg.train.finite_check_every,
         "a positive integer (1: every step)"),
        (0 <= cfg.train.posthoc_tau_max <= 10, "train.posthoc_tau_max", cfg.train.posthoc_tau_max,
         "in [0, 10] (0: no post-hoc adjustment)"),
        (0 < cfg.train.posthoc_tau_step and cfg.train.posthoc_tau_max / cfg.train.posthoc_tau_step <= 1000,
         "train.posthoc_tau_step", cfg.train.posthoc_tau_step, "> 0, at most 1000 steps up to train.posthoc_tau_max"),
        (cfg.data.synthetic_classes >= 2, "data.synthetic_classes", cfg.data.synthetic_classes, ">= 2"),
        (cfg.data.classes >= 0, "data.classes", cfg.data.classes, ">= 0 (0: any number)"),
        (cfg.data.max_bad_images >= 0, "data.max_bad_images", cfg.data.max_bad_images, ">= 0 (0: any is fatal)"),
        (cfg.data.image_size >= 8, "data.image_size", cfg.data.image_size, "a side of at least 8 pixels"),
        (cfg.data.num_workers >= 0, "data.num_workers", cfg.data.num_workers, ">= 0 (0: decode in the trainer)"),
        (cfg.data.decode_actors >= 0, "data.decode_actors", cfg.data.decode_actors, ">= 0 (0: autoscale)"),
        (cfg.data.decode_cpus > 0, "data.decode_cpus", cfg.data.decode_cpus, "> 0"),
        (cfg.data.shuffle_buffer >= 0, "data.shuffle_buffer", cfg.data.shuffle_buffer, ">= 0 (0: no mixing)"),
        (1 <= cfg.data.repeated_augmentation <= 16, "data.repeated_augmentation", cfg.data.repeated_augmentation,
         "copies of each image in [1, 16] (1: none; DeiT's 3)"),
        (cfg.dist.storage_retry_seconds >= 0, "dist.storage_retry_seconds", cfg.dist.storage_retry_seconds,
         ">= 0 (0: no retry, the first storage error stops the run)"),
    ]
    checks.sort(key=lambda check: check[1] != "train.epochs")  # warmup's bound is train.epochs: judge that first
    for ok, key, value, expected in checks:
        if not ok:
            raise ConfigError(f"{key}: {value!r} is out of range; expected {expected}", key)
    _validate_schedule(cfg.optim, cfg.train.epochs)
    _validate_data(cfg.data, strong_view(cfg))
    if weak_rotation(cfg) and cfg.data.source not in IN_MEMORY_SOURCES and cfg.data.augment_on == "device":
        raise ConfigError(f"data.augment_on: device, but the weak view's rotation (method.{cfg.method.name}."
                          f"weak_rotation={weak_rotation(cfg):g}) runs in the decode workers, on PIL images; use "
                          f"auto, or method.{cfg.method.name}.weak_rotation=0", "data.augment_on")
    _validate_experts(cfg)
    _validate_transformer(cfg)
    if cfg.model.classifier == "cosine" and DEFAULT_CLASSIFIER.get(cfg.method.name) != "cosine":
        raise ConfigError(f"model.classifier: cosine outputs cosines in [-1, 1], which only ldam_drw scales "
                          f"(method.ldam_drw.scale); method.name is {cfg.method.name!r}: use auto or linear",
                          "model.classifier")
    if cfg.model.aglu_gradient != "exact" and cfg.model.activation != "aglu":
        raise ConfigError(f"model.aglu_gradient: {cfg.model.aglu_gradient} is AGLU's; model.activation is "
                          f"{cfg.model.activation!r} (set model.activation=aglu, or drop it)", "model.aglu_gradient")


def _validate_schedule(optim: OptimConfig, epochs: int) -> None:
    """What a schedule's keys must be (train.epochs and optim.warmup_epochs's range are checked before)."""
    schedule, warmup, milestones = optim.schedule, optim.warmup_epochs, optim.milestones
    if warmup and schedule not in WARMUP_SCHEDULES:
        raise ConfigError(f"optim.warmup_epochs: {warmup}, but optim.schedule {schedule!r} has no warm-up; use one "
                          f"of {', '.join(WARMUP_SCHEDULES)}", "optim.warmup_epochs")
    least = {"official_paco": 1, "balms_warmup_cosine": 2}.get(schedule, 0)
    if warmup < least:
        raise ConfigError(f"optim.warmup_epochs: {warmup}; optim.schedule {schedule} needs at least {least}",
                          "optim.warmup_epochs")
    if milestones and schedule != "warmup_step":
        raise ConfigError(f"optim.milestones: {milestones}, but optim.schedule is {schedule!r}; milestones are "
                          f"warmup_step's", "optim.milestones")
    if sorted(set(milestones)) != milestones:
        raise ConfigError(f"optim.milestones: {milestones} are not in increasing order (each epoch once)",
                          "optim.milestones")
    for milestone in milestones:
        if not warmup <= milestone < epochs:
            where = "past the last epoch" if milestone >= epochs else "inside the warm-up"
            raise ConfigError(f"optim.milestones: {milestone} is {where}; expected epochs in [optim.warmup_epochs, "
                              f"train.epochs) = [{warmup}, {epochs})", "optim.milestones")
    if not 0 < optim.gamma <= 1:
        raise ConfigError(f"optim.gamma: {optim.gamma} is out of range; expected a factor in (0, 1]", "optim.gamma")
    if optim.name == "adamw" and optim.nesterov:
        raise ConfigError("optim.nesterov: true is SGD's; optim.name is adamw (set optim.nesterov=false)",
                          "optim.nesterov")
    if optim.warmup_peak <= 0:
        raise ConfigError(f"optim.warmup_peak: {optim.warmup_peak} is out of range; expected > 0",
                          "optim.warmup_peak")


def experts_of(cfg: Config) -> int:
    """E of the run: model.experts, or the method's default when it is 0 (1 for single-head methods)."""
    if cfg.model.experts:
        return cfg.model.experts
    return DEFAULT_EXPERTS if cfg.method.name in EXPERT_LAYOUTS else 1


def _validate_experts(cfg: Config) -> None:
    """A multi-expert method's model and stages, and a single-head method's: a key that cannot apply is an error."""
    name, model, experts = cfg.method.name, cfg.model, experts_of(cfg)
    if name not in EXPERT_LAYOUTS:
        if experts != 1:
            raise ConfigError(f"model.experts: {experts}, but method.name={name} trains one head; multi-expert "
                              f"models are for {', '.join(EXPERT_LAYOUTS)} (use 0 or 1)", "model.experts")
        return
    if model.experts < 0 or experts > 16:
        raise ConfigError(f"model.experts: {model.experts} is out of range; expected 0 (the method's: "
                          f"{DEFAULT_EXPERTS}) or 1 to 16", "model.experts")
    _require_defaults(model, ("classifier", "activation", "se"),
                      f"method.name={name} builds its experts with cosine heads, ReLU and no SE")
    if EXPERT_LAYOUTS[name] == "shike" and model.arch != "resnet32":
        raise ConfigError(f"model.arch: {model.arch}, but SHIKE's shallow experts are defined for the CIFAR "
                          f"ResNet-32 only (use resnet32)", "model.arch")
    if name == "shike" and experts < 2:
        raise ConfigError(f"model.experts: {experts}; SHIKE's mutual and transfer terms need at least 2 experts",
                          "model.experts")
    if name == "mdcs" and len(cfg.method.mdcs.prior_exponents) != experts:
        raise ConfigError(f"method.mdcs.prior_exponents: {cfg.method.mdcs.prior_exponents} has "
                          f"{len(cfg.method.mdcs.prior_exponents)} values for {experts} experts (model.experts); "
                          f"expected one q per expert", "method.mdcs.prior_exponents")
    if name == "mdcs" and strong_view(cfg) == "none":
        raise ConfigError("data.strong_augmentation: none, but method.name=mdcs distils from a weak view (x1) to a "
                          "strong view (x2) of the same images; set autoaugment_cutout (CIFAR) or "
                          "randaugment_cutout (ImageNet-LT)", "data.strong_augmentation")
    second = {"shike": ("retrain", "re-trains the heads of"), "ride": ("router", "trains the router on")}.get(name)
    if second and cfg.method.section.stage == second[0] and not cfg.train.init_from:
        raise ConfigError(f"train.init_from: empty, but method.{name}.stage={second[0]} {second[1]} a stage-1 run; "
                          f"set it to that run's directory (or its storage copy)", "train.init_from")
    if name == "ride" and cfg.method.ride.stage == "router" and cfg.method.ride.teacher:
        raise ConfigError(f"method.ride.teacher: {cfg.method.ride.teacher!r}, but method.ride.stage is router; the "
                          f"teacher distils into stage 1 (method.ride.stage: experts)", "method.ride.teacher")
    if name == "ride" and cfg.method.ride.stage == "router" and cfg.train.label_smoothing:
        raise ConfigError(f"train.label_smoothing: {cfg.train.label_smoothing}, but method.ride.stage is router, "
                          f"whose loss is on the routers' yes/no targets, not on classes; use 0",
                          "train.label_smoothing")
    if name == "ride" and cfg.method.ride.stage == "router" and experts < 2:
        raise ConfigError(f"method.ride.stage: router, but model.experts is {experts}; the router adds experts "
                          f"to the first one (at least 2)", "method.ride.stage")


def _require_defaults(model: ModelConfig, keys: tuple[str, ...], why: str) -> None:
    """Each of model.<keys> at its default: `why` says why another value cannot apply."""
    defaults = ModelConfig()
    for key in keys:
        if getattr(model, key) != getattr(defaults, key):
            raise ConfigError(f"model.{key}: {getattr(model, key)!r}, but {why}; leave model.{key} at "
                              f"{getattr(defaults, key)}", f"model.{key}")


def _validate_transformer(cfg: Config) -> None:
    """The CNN-only model keys against a DeiT, and DeiT-only ones against a CNN: a key that cannot apply."""
    model = cfg.model
    if cfg.method.name == "deit_lt" and model.arch not in TRANSFORMER_ARCHS:
        raise ConfigError(f"model.arch: {model.arch}, but method.name=deit_lt trains a DeiT's class and distillation "
                          f"tokens; use one of {', '.join(TRANSFORMER_ARCHS)}", "model.arch")
    if cfg.method.name in TEACHER_REQUIRED and teacher_of(cfg) is None:
        key = TEACHER_KEYS[cfg.method.name]
        raise ConfigError(f"{key}: empty; {cfg.method.name} distils from a finished run of this harness (its "
                          "directory or storage copy), e.g. an ldam_drw run on the same data", key)
    if model.arch not in TRANSFORMER_ARCHS:
        if model.drop_path:
            raise ConfigError(f"model.drop_path: {model.drop_path:g}, but model.arch={model.arch} has no stochastic "
                              f"depth; it is for {', '.join(TRANSFORMER_ARCHS)} (use 0)", "model.drop_path")
        return
    if cfg.method.name in EXPERT_LAYOUTS:
        raise ConfigError(f"model.arch: {model.arch}, but method.name={cfg.method.name} builds its experts from a "
                          f"CNN's stages; use resnet32, resnet50 or resnext50_32x4d", "model.arch")
    _require_defaults(model, ("norm", "activation", "se"),
                      f"it is a CNN option: {model.arch} has its own LayerNorms and GELUs and no SE")
    if cfg.dist.sync_batchnorm:
        raise ConfigError(f"dist.sync_batchnorm: true, but {model.arch} has no BatchNorm", "dist.sync_batchnorm")


IN_MEMORY_SOURCES = ("cifar10", "cifar100", "synthetic")


def strong_view(cfg: Config) -> str:
    """data.strong_augmentation resolved: auto is the strong preset of the augmentation list for the methods
    that train on a strong view (MDCS: weak and strong; SHIKE: its one view), DeiT's view for DeiT-LT (its one
    view), none for the others."""
    if cfg.data.strong_augmentation != "auto":
        return cfg.data.strong_augmentation
    if cfg.method.name == "deit_lt":
        return "randaugment_erasing"
    if cfg.method.name not in ("mdcs", "shike"):
        return "none"
    return "randaugment_cutout" if cfg.data.augmentation == "simclr" else "autoaugment_cutout"


def weak_rotation(cfg: Config) -> float:
    """Degrees of x1's random rotation (and rx1's): the method's weak_rotation (RIDE, MDCS) with the crop_flip
    list, 0 otherwise."""
    if cfg.data.augmentation != "crop_flip":
        return 0.0
    return getattr(cfg.method.section, "weak_rotation", 0.0)


def _validate_data(data: DataConfig, strong: str) -> None:
    if data.source in IN_MEMORY_SOURCES:
        if data.augmentation != "crop_flip":
            raise ConfigError(f"data.augmentation: in-memory sources (data.source={data.source}) augment on the "
                              f"device with crop_flip only; use data.source=files or shards for "
                              f"{data.augmentation}", "data.augmentation")
        if data.augment_on == "cpu":
            raise ConfigError(f"data.augment_on: in-memory sources (data.source={data.source}) hold the images on "
                              f"the training device and augment there; use auto or device", "data.augment_on")
    else:
        for key in ("train_split", "test_split", "mean", "std"):
            if not getattr(data, key):
                raise ConfigError(f"data.{key}: required for data.source={data.source}", f"data.{key}")
    if strong != "none" and data.source not in IN_MEMORY_SOURCES and "device" in (data.augment_on, data.decode_on):
        key = "data.augment_on" if data.augment_on == "device" else "data.decode_on"
        raise ConfigError(f"{key}: device, but the strong view ({strong}, data.strong_augmentation) runs its policy "
                          f"(torchvision's AutoAugment / RandAugment) on PIL images in the decode workers; use "
                          f"{key}={'auto' if key == 'data.augment_on' else 'cpu'}", key)
    if data.decode_on == "device" and (data.source != "shards" or data.augmentation != "simclr"
                                       or data.augment_on == "cpu"):
        raise ConfigError(f"data.decode_on: device decodes the JPEGs of data.source=shards on the training device "
                          f"with the simclr list's tail there (data.augmentation=simclr, data.augment_on auto or "
                          f"device); got source {data.source}, augmentation {data.augmentation}, augment_on "
                          f"{data.augment_on}", "data.decode_on")
        if data.val_fraction:
            raise ConfigError(f"data.val_fraction: data.source={data.source} takes its validation set from "
                              f"data.val_split", "data.val_fraction")
    if data.source == "shards" and data.repeated_augmentation > 1:
        raise ConfigError(f"data.repeated_augmentation: {data.repeated_augmentation}, but data.source=shards "
                          f"streams each image once a pass (Ray Data); use 1, or the files source",
                          "data.repeated_augmentation")
    if len(data.mean) != len(data.std) or len(data.mean) not in (0, 1, 3):
        raise ConfigError(f"data.mean, data.std: {data.mean} and {data.std}; expected one value per channel, "
                          f"1 (grayscale) or 3 (RGB), the same number in both", "data.mean")
    if any(s <= 0 for s in data.std):
        raise ConfigError(f"data.std: {data.std}; every value must be > 0", "data.std")
