"""Subset protocols, splits, split files, epoch plans and the batched augmentation."""
import numpy as np
import pytest
import torch

from glmc_ray.core import config as config_lib
from glmc_ray.core.evaluation import accuracy_metrics, shot_groups
from glmc_ray.data import cifar, files
from glmc_ray.data.arrays import random_crop_flip
from glmc_ray.data.batches import EpochPlan


@pytest.mark.parametrize("max_count,classes,factor,total", [
    (5000, 10, 100, 12406), (5000, 10, 50, 13996), (5000, 10, 10, 20431),
    (500, 100, 100, 10847), (500, 100, 50, 12608), (500, 100, 10, 19573)])
def test_long_tailed_counts_match_official_totals(max_count, classes, factor, total):
    assert sum(cifar.long_tailed_counts(max_count, classes, factor)) == total


def test_cifar10_if100_counts_exact():
    assert cifar.long_tailed_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def test_bad_imbalance_factors_are_errors():
    with pytest.raises(ValueError, match="must be >= 1"):
        cifar.long_tailed_counts(5000, 10, 0.5)
    with pytest.raises(ValueError, match=r"leaves classes \[.*9\] empty"):
        cifar.long_tailed_counts(50, 10, 1000)


def test_glmc_and_ldam_subsets_on_real_cifar10(cifar_root):
    images, labels = cifar.load_cifar(cifar_root, "cifar10", train=True)
    assert images.shape == (50000, 32, 32, 3) and images.dtype == np.uint8
    counts = cifar.long_tailed_counts(5000, 10, 100)
    glmc = cifar.long_tailed_subset(labels, counts, "glmc", 3407)
    assert len(glmc) == 12406 and len(np.unique(glmc)) == 12406
    assert np.bincount(labels[glmc]).tolist() == counts
    # The official draw: RandomState(3407), per class choice(pool, n_c, replace=False) in class order.
    rng = np.random.RandomState(3407)
    expected = [np.flatnonzero(labels == c)[rng.choice(5000, n, replace=False)] for c, n in enumerate(counts)]
    assert np.array_equal(glmc, np.concatenate(expected))
    ldam = cifar.long_tailed_subset(labels, counts, "ldam", 0)
    assert np.bincount(labels[ldam]).tolist() == counts and not np.array_equal(np.sort(ldam), np.sort(glmc))
    assert np.array_equal(ldam, cifar.long_tailed_subset(labels, counts, "ldam", 0))
    buggy = cifar.long_tailed_subset(labels, counts, "glmc", 3407, with_replacement=True)
    assert len(np.unique(buggy)) < len(buggy)  # the pre-fix official subset had duplicates


def test_missing_layout_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cifar.load_cifar(tmp_path / "nope", "cifar10", train=True)
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        cifar.load_cifar(tmp_path, "cifar100", train=True)


def test_shot_groups_convention():
    assert [int(m.sum()) for m in shot_groups(cifar.long_tailed_counts(500, 100, 100)).values()] == [35, 35, 30]
    assert [int(m.sum()) for m in shot_groups(cifar.long_tailed_counts(5000, 10, 100)).values()] == [8, 2, 0]


def test_accuracy_metrics_from_counts():
    counts = torch.tensor([[90.0, 10, 1], [95, 20, 5], [100, 20, 10]])  # top1 hits, top5 hits, totals
    m = accuracy_metrics(counts, [500, 50, 5])
    assert m["top1"] == pytest.approx(100 * 101 / 130) and m["top5"] == pytest.approx(100 * 120 / 130)
    assert (m["many"], m["medium"], m["few"]) == (pytest.approx(90), pytest.approx(50), pytest.approx(10))
    assert m["balanced_top1"] == pytest.approx(50)


def test_stratified_split_keeps_every_class():
    labels = np.repeat(np.arange(4), [100, 30, 5, 2])
    train, val = cifar.stratified_split(labels, 0.1, seed=0)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(labels)
    assert np.bincount(labels[val]).tolist() == [10, 3, 1, 1]
    assert np.bincount(labels[train]).min() >= 1


def test_split_file_errors_name_file_and_line(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    bad = tmp_path / "bad.txt"
    bad.write_text("a.jpg 0\nb.jpg\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: expected"):
        files.read_split_file(bad, tmp_path)
    missing = tmp_path / "missing.txt"
    missing.write_text("a.jpg 0\nb.jpg 1\n")
    with pytest.raises(FileNotFoundError, match=r"missing.txt:2: image .*b.jpg does not exist"):
        files.read_split_file(missing, tmp_path)
    with pytest.raises(ValueError, match=r"classes \[1\] have no sample"):
        files.class_counts([0, 2, 2], "gap.txt")


@pytest.mark.parametrize("world", [2, 3])
def test_epoch_plan_covers_each_image_once_and_ignores_world_size(world):
    weights = torch.rand(203)
    single = list(EpochPlan(203, 64, weights, seed=5).steps(epoch=2))
    shares = [list(EpochPlan(203, 64, weights, seed=5, rank=r, world_size=world).steps(epoch=2))
              for r in range(world)]
    assert all(len(s) == len(single) for s in shares)
    seen = torch.cat([step.uniform for share in shares for step in share])
    assert sorted(seen.tolist()) == list(range(203))
    for i, step in enumerate(single):
        for r in range(world):
            assert torch.equal(shares[r][i].uniform, step.uniform[r::world])
            assert torch.equal(shares[r][i].rebalanced, step.rebalanced[r::world])
    other_epoch = next(EpochPlan(203, 64, weights, seed=5).steps(epoch=3))
    assert not torch.equal(other_epoch.uniform, single[0].uniform)


@pytest.mark.parametrize("world", [1, 3])
def test_repeated_augmentation_draws_each_image_three_times_in_a_row_on_consecutive_workers(world):
    """DeiT's RASampler: the epoch as long as one pass, a third of the images each thrice, the copies on
    consecutive places of the global batch (so on different workers when there are several)."""
    plain = torch.cat([s.uniform for s in EpochPlan(200, 60, None, seed=5).steps(epoch=1)])
    order = torch.full((200,), -1)  # the global order, rebuilt from the workers' shares and their places
    for rank in range(world):
        for step in EpochPlan(200, 60, None, seed=5, rank=rank, world_size=world, repeats=3).steps(epoch=1):
            order[step.positions] = step.uniform
    assert torch.equal(order, plain[:67].repeat_interleave(3)[:200])
    assert all(len(set(order[i:i + 3].tolist())) == 1 for i in range(0, 198, 3))


def test_repeated_augmentation_is_refused_for_shards():
    shards = ["data.source=shards", "data.train_split=t", "data.test_split=t", "data.mean=[0.5]", "data.std=[0.5]",
              "data.val_fraction=0", "data.repeated_augmentation=3"]
    with pytest.raises(config_lib.ConfigError, match=r"data.repeated_augmentation: 3, but data.source=shards"):
        config_lib.load(None, shards)


def test_epoch_plan_merges_a_tail_smaller_than_the_world():
    plan = EpochPlan(129, 64, None, seed=0, rank=1, world_size=2)
    sizes = [step.global_size for step in plan.steps(0)]
    assert sizes == [64, 65] and len(plan) == 2


def test_rebalanced_stream_follows_the_class_probabilities():
    labels = torch.repeat_interleave(torch.arange(3), torch.tensor([900, 90, 10]))
    weights = torch.tensor([900.0, 90, 10]).pow(-1.0)[labels]  # q = 1: class-balanced
    drawn = torch.cat([s.rebalanced for s in EpochPlan(1000, 100, weights, seed=0).steps(0)])
    freq = torch.bincount(labels[drawn], minlength=3) / len(drawn)
    assert torch.allclose(freq, torch.full((3,), 1 / 3), atol=0.05)


def test_random_crop_flip_matches_explicit_crop():
    images = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    offsets = torch.tensor([[0, 0], [8, 8], [3, 5], [4, 4]])
    flips = torch.tensor([False, True, True, False])
    out = random_crop_flip(padded, torch.tensor([0, 1, 2, 3]), 32, offsets, flips)
    for i in range(4):
        top, left = offsets[i].tolist()
        expected = padded[i, :, top:top + 32, left:left + 32]
        assert torch.equal(out[i], expected.flip(-1) if flips[i] else expected)
    assert torch.equal(out[3], images[3])


def test_download_leaves_an_existing_layout_alone(cifar_root):
    """No network here: an attempt to fetch (or to re-check torchvision's md5) would raise."""
    cifar.download_cifar(cifar_root, "cifar10")
    assert not (cifar_root / ".cifar10.download.lock").exists()


def test_the_simclr_preset_blurs_as_the_official_code_with_pils_filter():
    """GLMC's ImageNet-LT list blurs with MoCo's GaussianBlur: PIL ImageFilter.GaussianBlur(radius=sigma),
    sigma ~ U(0.1, 2), with p 0.5 (not torchvision's 23x23 kernel)."""
    from PIL import Image, ImageFilter
    from torchvision import transforms as T

    from glmc_ray.data.images import PILGaussianBlur, train_transform

    [blur] = [t for t in train_transform("simclr", 32).transforms if isinstance(t, T.RandomApply)]
    assert blur.p == 0.5 and [type(t) for t in blur.transforms] == [PILGaussianBlur]
    assert blur.transforms[0].sigma == (0.1, 2.0)
    image = Image.fromarray((np.random.default_rng(0).random((48, 40, 3)) * 255).astype(np.uint8))
    for seed in range(5):
        torch.manual_seed(seed)
        sigma = float(torch.empty(1).uniform_(0.1, 2.0))
        torch.manual_seed(seed)
        blurred = np.asarray(PILGaussianBlur((0.1, 2.0))(image))
        assert 0.1 <= sigma <= 2.0
        assert np.array_equal(blurred, np.asarray(image.filter(ImageFilter.GaussianBlur(radius=sigma))))
