"""The strong view (data.strong_augmentation, MDCS's x2) on the in-memory, DataLoader and Ray Data decode paths."""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF1
from torchvision.transforms.v2 import functional as TF2

from glmc_ray.core import config as config_lib
from glmc_ray.core.config import ConfigError
from glmc_ray.data import build_data
from glmc_ray.data.arrays import EpochDraws
from glmc_ray.data.cifar import NORMALIZATION
from glmc_ray.data.images import TwoViews
from glmc_ray.data.shards import Decode
from glmc_ray.data.strong_views import cutout, mean_fill, random_erasing, view_transforms
from tests.test_methods import SMOKE

STRONG = "data.strong_augmentation=autoaugment_cutout"
MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.3)


def _first_batch(*overrides, rank=0, world_size=1):
    cfg = config_lib.load(SMOKE, ["data.synthetic_max_count=64", "train.batch_size=16", *overrides])
    data = build_data(cfg, torch.device("cpu"), rank, world_size)
    return next(iter(data.train.epoch(3)))


def test_cutout_fills_one_square_clipped_at_the_border():
    images = torch.zeros(3, 3, 32, 32, dtype=torch.uint8)
    out = cutout(images, torch.tensor([[16, 16], [0, 0], [31, 5]]), 16, torch.tensor([9, 8, 7], dtype=torch.uint8))
    holes = out[:, 0] == 9
    assert holes.sum(dim=(1, 2)).tolist() == [256, 64, 9 * 13]  # rows 23-31, columns 0-12
    assert holes[0, 8:24, 8:24].all() and holes[1, :8, :8].all() and holes[2, 23:, :13].all()
    assert (out[:, 1][holes] == 8).all() and (out[:, 2][holes] == 7).all()
    assert mean_fill(MEAN).tolist() == [128, 102, 76]


@pytest.mark.parametrize("strong", ["autoaugment_cutout", "randaugment_cutout"])
def test_in_memory_strong_view_leaves_x1_alone_and_differs_from_the_weak_view(strong, cifar_root):
    """On real CIFAR-10 (the synthetic images' pixel noise makes a shifted crop as far as any strong view), over a
    batch of 128 (on 16 images, the distance of two weak crops varies as much as the gap)."""
    cifar = ["data.source=cifar10", f"data.root={cifar_root}", "train.batch_size=128"]
    plain, strong = _first_batch(*cifar), _first_batch(*cifar, f"data.strong_augmentation={strong}")
    assert torch.equal(plain.x1, strong.x1) and torch.equal(plain.y, strong.y)
    assert torch.equal(plain.rx1, strong.rx1) and torch.equal(plain.ry, strong.ry)  # the re-balanced stream too
    assert not torch.equal(plain.x2, strong.x2) and not torch.equal(plain.rx2, strong.rx2)
    assert (strong.x2 - strong.x1).abs().mean() > (plain.x2 - plain.x1).abs().mean()  # farther from the weak view
    # the hole: the mean colour (as pixel levels), about 0 once normalised
    zero = (strong.x2.abs() < 0.01).all(dim=1).flatten(1).sum(dim=1)
    assert (zero >= 64).all()  # at least the quarter of a 16 x 16 square a corner leaves


def _epoch_views(*overrides, batch_size=16, world_size=1) -> tuple[torch.Tensor, torch.Tensor]:
    """(x1, x2) of epoch 2 of the in-memory source in the epoch's order, the ranks' shares interleaved back."""
    cfg = config_lib.load(SMOKE, ["data.synthetic_max_count=64", f"train.batch_size={batch_size}", *overrides])
    ranks = [build_data(cfg, torch.device("cpu"), r, world_size).train.epoch(2) for r in range(world_size)]
    views = []
    for shares in zip(*ranks, strict=True):
        steps = [torch.empty((sum(len(b) for b in shares), 3, 32, 32)) for _ in "12"]
        for rank, share in enumerate(shares):
            steps[0][rank::world_size], steps[1][rank::world_size] = share.x1, share.x2
        views.append(steps)
    return torch.cat([x1 for x1, _ in views]), torch.cat([x2 for _, x2 in views])


@pytest.mark.parametrize("overrides", [[], [STRONG], ["data.strong_augmentation=randaugment_erasing"],
                                       ["method.name=mdcs", "data.repeated_augmentation=3"]],
                         ids=["weak", "autoaugment_cutout", "randaugment_erasing", "rotation_repeated"])
def test_in_memory_views_do_not_depend_on_the_batch_size_or_the_workers(overrides):
    """The image at a place in the epoch gets the same two views at batch 16 on 1 worker, batch 8 on 1 and batch
    12 on 2 (DeiT's view, MDCS's rotated weak view and the copies of repeated augmentation included)."""
    x1, x2 = _epoch_views(*overrides)
    for batch_size, world_size in ((8, 1), (12, 2)):
        y1, y2 = _epoch_views(*overrides, batch_size=batch_size, world_size=world_size)
        assert torch.equal(y1, x1) and torch.equal(y2, x2)
    assert not torch.equal(x1, x2)


@pytest.mark.parametrize("strong", [STRONG, "data.strong_augmentation=randaugment_erasing"])
def test_in_memory_strong_view_is_the_same_for_any_number_of_workers_and_any_call(strong):
    whole = _first_batch(strong)
    assert torch.equal(whole.x2, _first_batch(strong).x2)
    shares = [_first_batch(strong, rank=r, world_size=2) for r in (0, 1)]
    for rank, share in enumerate(shares):
        assert torch.equal(share.x2, whole.x2[rank::2]) and torch.equal(share.y, whole.y[rank::2])


def test_in_memory_strong_view_keys_only_the_cpu_generator_and_restores_it(monkeypatch):
    """Each image's key seeds the CPU generator torchvision draws from, not every GPU's (dropout's)."""
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    state = torch.get_rng_state()
    _first_batch(STRONG)
    assert not reseeded and torch.equal(torch.get_rng_state(), state)


def _picture(size=40, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.mark.parametrize("augmentation,strong,size", [("crop_flip", "autoaugment_cutout", 32),
                                                      ("crop_flip", "randaugment_cutout", 32),
                                                      ("simclr", "randaugment_cutout", 48)])
def test_decode_workers_make_a_weak_and_a_strong_view(augmentation, strong, size):
    torch.manual_seed(0)
    weak_only, _ = TwoViews(*view_transforms(augmentation, size, "none", MEAN, STD))(_picture(64))
    torch.manual_seed(0)
    weak, strong_view = TwoViews(*view_transforms(augmentation, size, strong, MEAN, STD))(_picture(64))
    assert torch.equal(weak, weak_only)  # x1 is drawn first, the same with or without the strong view
    assert weak.shape == strong_view.shape == (3, size, size) and strong_view.dtype == torch.uint8
    fill = mean_fill(MEAN).view(3, 1, 1)
    assert (strong_view == fill).all(dim=0).sum() >= (size // 4) ** 2  # Cutout's hole, clipped at most to a quarter


def test_random_erasing_paints_timms_rectangle_with_noise_that_is_normal_once_normalised():
    """400 draws on a constant image: a quarter erased (binomial bounds), each a rectangle of 2-33 % of the image
    with an aspect in 0.3-3.3 (to the rounding of its sides), its pixels mean + std * N(0, 1) as levels (a
    mean and std that the clipping to 0-255 leaves alone)."""
    mean, std = (0.5, 0.45, 0.55), (0.1, 0.08, 0.12)
    image, erased, levels = torch.full((3, 64, 64), 7, dtype=torch.uint8), 0, []
    for seed in range(400):
        out = random_erasing(image, torch.Generator().manual_seed(seed), mean, std)
        changed = (out != image).any(dim=0)
        if not changed.any():
            continue
        erased += 1
        rows, cols = changed.any(dim=1).nonzero().flatten(), changed.any(dim=0).nonzero().flatten()
        h, w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert 0.02 * 0.8 <= h * w / 64 ** 2 <= 1 / 3 * 1.2 and 0.3 * 0.8 <= h / w <= 1 / 0.3 * 1.2, (seed, h, w)
        levels.append(out[:, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].flatten(1).float())
    assert 400 * 0.25 - 4 * (400 * 0.25 * 0.75) ** 0.5 <= erased <= 400 * 0.25 + 4 * (400 * 0.25 * 0.75) ** 0.5
    normalised = (torch.cat(levels, dim=1) / 255 - torch.tensor(mean)[:, None]) / torch.tensor(std)[:, None]
    assert normalised.mean(dim=1).abs().max() < 0.05 and (normalised.std(dim=1) - 1).abs().max() < 0.1


def test_decode_workers_make_deits_view():
    torch.manual_seed(0)
    weak, deit = TwoViews(*view_transforms("simclr", 48, "randaugment_erasing", MEAN, STD))(_picture(64))
    torch.manual_seed(0)
    _, again = TwoViews(*view_transforms("simclr", 48, "randaugment_erasing", MEAN, STD))(_picture(64))
    assert deit.shape == (3, 48, 48) and deit.dtype == torch.uint8 and torch.equal(deit, again)


def test_ray_data_decode_actor_makes_the_strong_view_without_ray():
    pictures = []
    for seed in range(3):
        buffer = io.BytesIO()
        _picture(40, seed).save(buffer, "JPEG")
        pictures.append(buffer.getvalue())
    batch = {"image": np.array(pictures, dtype=object), "label": np.arange(3), "index": np.arange(3),
             "path": np.array([f"{i}.jpg" for i in range(3)], dtype=object)}
    torch.manual_seed(0)
    out = Decode("crop_flip", 32, 3, train=True, strong="autoaugment_cutout", mean=MEAN)(batch)
    assert out["x1"].shape == out["x2"].shape == (3, 3, 32, 32) and out["ok"].all()
    fill = mean_fill(MEAN).numpy().reshape(1, 3, 1, 1)
    assert ((out["x2"] == fill).all(axis=1).sum(axis=(1, 2)) >= 64).all()


@pytest.mark.parametrize("overrides,key", [
    (["data.augment_on=device"], "data.augment_on"),
    (["data.source=shards", "data.augmentation=simclr", "data.decode_on=device"], "data.decode_on"),
])
def test_a_strong_view_with_the_tail_on_the_device_is_refused(overrides, key):
    files = ["data.source=files", "data.train_split=a.txt", "data.test_split=b.txt", "data.mean=[0.5]",
             "data.std=[0.5]", "data.val_fraction=0"]
    with pytest.raises(ConfigError, match=rf"^--set .*: {key}: device, but the strong view \(autoaugment_cutout, "
                                          rf"data.strong_augmentation\) runs its policy"):
        config_lib.load(SMOKE, [*files, STRONG, *overrides])


@pytest.mark.parametrize("overrides,view", [
    ([], "none"), (["method.name=mdcs"], "autoaugment_cutout"), (["method.name=shike"], "autoaugment_cutout"),
    (["method.name=mdcs", "data.augmentation=simclr", "data.source=files", "data.train_split=a", "data.test_split=b",
      "data.mean=[0.5]", "data.std=[0.5]", "data.val_fraction=0"], "randaugment_cutout"),
    (["method.name=mdcs", "data.strong_augmentation=randaugment_cutout"], "randaugment_cutout"),
    (["data.strong_augmentation=autoaugment_cutout"], "autoaugment_cutout"),  # any method may ask for one
    (["method.name=deit_lt", "model.arch=deit_micro_distilled_patch4_32", "method.deit_lt.teacher=t"],
     "randaugment_erasing"),
])
def test_auto_is_the_strong_view_of_the_methods_that_need_one(overrides, view):
    assert config_lib.strong_view(config_lib.load(SMOKE, overrides)) == view


def test_the_setting_round_trips_and_names_its_choices():
    cfg = config_lib.load(SMOKE, [STRONG])
    assert config_lib.from_dict(config_lib.to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match=r"data.strong_augmentation: 'cutout' is not one of auto, none, "
                                          r"autoaugment_cutout, randaugment_cutout"):
        config_lib.load(SMOKE, ["data.strong_augmentation=cutout"])


# ----------------------------------------------------------------- the weak view's rotation (RIDE's and MDCS's x1)

FILES = ["data.source=files", "data.train_split=a", "data.test_split=b", "data.mean=[0.5]", "data.std=[0.5]",
         "data.val_fraction=0"]


@pytest.mark.parametrize("overrides,degrees", [
    (["method.name=mdcs"], 15.0), (["method.name=ride"], 15.0), ([], 0.0), (["method.name=shike"], 0.0),
    (["method.name=mdcs", "method.mdcs.weak_rotation=0"], 0.0),
    (["method.name=mdcs", "data.augmentation=simclr", *FILES], 0.0),  # the ImageNet-LT list has none officially
])
def test_the_weak_view_of_ride_and_mdcs_rotates_as_their_official_cifar_lists(overrides, degrees):
    """Official: RandomCrop(32, 4), RandomHorizontalFlip(), RandomRotation(15) (MDCS's augmentation_weak and
    RIDE's train_trsfm, data_loader/cifar_data_loaders.py)."""
    cfg = config_lib.load(SMOKE, overrides)
    assert config_lib.weak_rotation(cfg) == degrees
    weak, second = view_transforms(cfg.data.augmentation, 32, config_lib.strong_view(cfg), MEAN, STD, degrees)
    steps = [type(step).__name__ for step in weak.transforms]
    if cfg.data.augmentation == "crop_flip":
        rotate = ["RandomRotation"] if degrees else []
        assert steps == ["Resize", "CenterCrop", "RandomCrop", "RandomHorizontalFlip", *rotate, "PILToTensor"]
    if degrees:
        rotation = weak.transforms[4]
        assert rotation.degrees == [-degrees, degrees] and rotation.fill == 0
        assert rotation.interpolation == InterpolationMode.NEAREST
        assert "RandomRotation" not in [type(step).__name__ for step in second.transforms]  # x2 is not the weak view


def test_in_memory_weak_view_is_each_crop_rotated_at_its_keyed_angle_as_pil_rotates(cifar_root):
    """x1 of an MDCS batch is the same crops as without the rotation, each rotated as PIL's RandomRotation does
    (nearest, black corners) at an angle drawn for its place in the epoch; x2 (the strong view) is untouched."""
    cifar = ["data.source=cifar10", f"data.root={cifar_root}", "method.name=mdcs"]
    rotated = _first_batch(*cifar)
    plain = _first_batch(*cifar, "method.mdcs.weak_rotation=0")
    assert torch.equal(rotated.x2, plain.x2) and not torch.equal(rotated.x1, plain.x1)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) * 255 for v in NORMALIZATION["cifar10"])
    crops = (plain.x1 * std + mean).round().to(torch.uint8)
    cfg = config_lib.load(SMOKE, ["data.synthetic_max_count=64", "train.batch_size=16", *cifar])
    plan = build_data(cfg, torch.device("cpu")).train.plan
    draws = EpochDraws.draw(plan.seed, 3, "uniform", plan.num_samples, 4, 32)
    angles = (draws.turns[next(iter(plan.steps(3))).positions] * 15).tolist()
    assert max(map(abs, angles)) <= 15 and len({round(a, 6) for a in angles}) == 16  # one angle per image
    got = (rotated.x1 * std + mean).round().to(torch.uint8)
    for crop, angle, view in zip(crops, angles, got, strict=True):
        assert torch.equal(view, TF2.rotate(crop, angle, interpolation=InterpolationMode.NEAREST, fill=0))
        pil = TF1.rotate(Image.fromarray(crop.permute(1, 2, 0).numpy()), angle, InterpolationMode.NEAREST, fill=0)
        same = (torch.from_numpy(np.array(pil)).permute(2, 0, 1) == view).all(dim=0).float().mean()
        assert same >= 0.99  # torchvision's kernel and PIL's differ at a few nearest-neighbour ties (<= 3 of 1024)
    shares = [_first_batch(*cifar, rank=r, world_size=2) for r in (0, 1)]
    for rank, share in enumerate(shares):  # each image's angle is its own, whoever draws the batch
        assert torch.equal(share.x1, rotated.x1[rank::2])


def test_the_weak_views_rotation_with_the_tail_on_the_device_is_refused():
    with pytest.raises(ConfigError, match=r"data.augment_on: device, but the weak view's rotation "
                                          r"\(method.ride.weak_rotation=15\) runs in the decode workers"):
        config_lib.load(SMOKE, ["method.name=ride", *FILES, "data.augment_on=device"])
