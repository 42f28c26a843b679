"""The augmentation tail on the training device (glmc_ray/data/device_augment.py), by the design note's test plan
(../shared/docs/augment-on-device.md section 4): T1 parameter distributions against torchvision's own
samplers, T2 op parity with torchvision's functionals and with PIL, T3 per-sample randomness, T4 pixel
statistics against the PIL reference pipeline, T5 replay. T6 (CUDA) is in the GPU check script and below,
skipped without CUDA."""
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from scipy import stats
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from glmc_ray.data import cifar
from glmc_ray.data.batches import EpochPlan
from glmc_ray.data.device_augment import (
    BLUR,
    BRIGHTNESS,
    CONTRAST,
    FLIP,
    GRAY,
    IDENTITY,
    ORDER,
    ORDERS,
    SATURATION,
    SIGMA,
    KeyedViews,
    augment_tail,
    view_key,
)
from glmc_ray.data.files import _PlannedBatchSampler
from glmc_ray.data.images import BadImageLog, Unreadable, decode_tensor, train_transform
from glmc_ray.data.shards import Decode

KS_5_PERCENT_400 = 0.096  # two-sample KS critical value at 5 % for 400 against 400
DRAWS = 4000


def _draws(sizes=((375, 500),), n=DRAWS, augmentation="simclr"):
    views = KeyedViews(augmentation, 224)
    out = []
    for height, width in sizes:
        image = Image.new("RGB", (width, height))
        out += [views.draw(image, view_key(7, 0, 0, i, 0)) for i in range(n)]
    return out


def test_t1_tail_parameters_follow_glmcs_list():
    params = torch.stack([p for _, p in _draws()]).double().numpy()
    for column in (BRIGHTNESS, CONTRAST, SATURATION):  # ColorJitter(0.4, 0.4, 0.4): U(0.6, 1.4)
        assert stats.kstest(params[:, column], stats.uniform(0.6, 0.8).cdf).pvalue > 0.001
    blurred = params[params[:, BLUR] == 1]
    assert stats.kstest(blurred[:, SIGMA], stats.uniform(0.1, 1.9).cdf).pvalue > 0.001
    orders = np.bincount(params[:, ORDER].astype(int), minlength=6)
    assert stats.chisquare(orders).pvalue > 0.001  # each of the 6 jitter orders 1/6 of the time
    for column, p in ((GRAY, 0.2), (BLUR, 0.5), (FLIP, 0.5)):
        assert stats.binomtest(int(params[:, column].sum()), DRAWS, p).pvalue > 0.001


@pytest.mark.parametrize("height,width", [(375, 500), (500, 375), (100, 1000)])  # the last: RRC's fallback box
def test_t1_crop_boxes_follow_torchvisions_random_resized_crop(height, width):
    ours = np.array([box for box, _ in _draws(((height, width),), n=1500)], dtype=float)
    torch.manual_seed(0)
    image = Image.new("RGB", (width, height))
    theirs = np.array([T.RandomResizedCrop.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(1500)],
                      dtype=float)

    def features(boxes):
        top, left, h, w = boxes.T
        return {"area": h * w / (height * width), "log-aspect": np.log(w / h), "centre-x": left + w / 2,
                "centre-y": top + h / 2}
    for name, (a, b) in {k: (features(ours)[k], features(theirs)[k]) for k in features(ours)}.items():
        assert stats.ks_2samp(a, b).pvalue > 0.001, name


def test_t1_views_of_one_image_and_duplicates_are_uncorrelated():
    views = KeyedViews("simclr", 224)
    image = Image.new("RGB", (500, 375))
    rows = [[views.draw(image, view_key(7, 0, 1, position, v))[1] for v in (0, 1)] for position in range(2000)]
    first = torch.stack([r[0] for r in rows]).numpy()
    second = torch.stack([r[1] for r in rows]).numpy()
    for column in (BRIGHTNESS, SIGMA, FLIP):
        assert abs(np.corrcoef(first[:, column], second[:, column])[0, 1]) < 0.06
    # the re-balanced stream's duplicates: the same image at two positions (files) or two copies (shards)
    copies = [views.draw(image, view_key(7, 0, 1, f"5.{c}", 0))[1] for c in range(2000)]
    a, b = torch.stack(copies[0::2]).numpy(), torch.stack(copies[1::2]).numpy()
    assert abs(np.corrcoef(a[:, BRIGHTNESS], b[:, BRIGHTNESS])[0, 1]) < 0.08


def _image(seed=0, size=48) -> torch.Tensor:
    """A smooth colour image with edges (uint8 (1, 3, size, size))."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 6, 6, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    x[..., size // 3: size // 2, :] = torch.rand(3, 1, 1, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _params(b, c, s, order, gray, blur, sigma, flip) -> torch.Tensor:
    return torch.tensor([[b, c, s, order, gray, blur, sigma, flip]], dtype=torch.float32)


CASES = [(1.3, 0.7, 1.2, order, gray, blur, sigma, flip) for order, gray, blur, sigma, flip in
         [(0, 0, 0, 0.5, 0), (1, 1, 0, 0.5, 1), (2, 0, 1, 0.3, 0), (3, 0, 1, 1.9, 1), (4, 1, 1, 1.0, 0),
          (5, 0, 0, 1, 1)]]


def _pil_reference(image: torch.Tensor, p: torch.Tensor, blur_with_pil: bool = True) -> torch.Tensor:
    """The official CPU list's ops with fixed parameters: torchvision's functionals on a PIL image (ImageEnhance,
    convert("L")), then the official ImageFilter blur."""
    pil = TF.to_pil_image(image[0])
    for op in ORDERS[int(p[ORDER])]:
        pil = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation][op](pil, float(p[op]))
    if p[GRAY]:
        pil = TF.rgb_to_grayscale(pil, 3)
    if p[BLUR] and blur_with_pil:
        pil = pil.filter(ImageFilter.GaussianBlur(radius=float(p[SIGMA])))
    if p[FLIP]:
        pil = TF.hflip(pil)
    return TF.pil_to_tensor(pil)[None].float()


@pytest.mark.parametrize("case", [c for c in CASES if not c[5]])
@pytest.mark.parametrize("seed", [1, 2])
def test_t2_jitter_grayscale_and_flip_are_the_official_pil_ops(case, seed):
    image, params = _image(seed), _params(*case)
    diff = (augment_tail(image, params) - _pil_reference(image, params[0])).abs()
    assert diff.max() <= 1 and diff.mean() <= 0.01, (diff.max(), diff.mean())


@pytest.mark.parametrize("sigma", [0.3, 1.0, 1.9])
def test_t2_the_blur_is_torchvisions_and_close_to_pils_official_filter(sigma):
    image, params = _image(2), _params(1, 1, 1, 0, 0, 1, sigma, 0)
    ours = augment_tail(image, params)
    torchvision = TF.gaussian_blur(image, 23, sigma).float()
    assert (ours - torchvision).abs().max() <= 1  # separable here: a value on a half level may round apart
    diff = (ours - _pil_reference(image, params[0])).abs()
    print(f"blur sigma {sigma}: mean abs difference to PIL's ImageFilter.GaussianBlur {diff.mean():.3f} levels, "
          f"max {diff.max():.1f}")
    assert diff.mean() <= 1.5


def test_identity_parameters_change_nothing():
    image = _image(3)
    assert torch.equal(augment_tail(image, torch.tensor([IDENTITY])), image.float())


def test_t3_randomness_is_per_sample_not_per_batch():
    views = KeyedViews("simclr", 32)
    image = TF.to_pil_image(_image(4, 64)[0])
    crops, params = zip(*(views(image, view_key(1, 0, 0, i, 0)) for i in range(64)), strict=True)
    out = augment_tail(torch.stack(crops), torch.stack(params))
    assert len({tuple(o.flatten()[::7].tolist()) for o in out}) == 64
    blurred = torch.stack(params)[:, BLUR].mean()
    assert 0.3 <= blurred <= 0.7 and len(set(torch.stack(params)[:, ORDER].tolist())) > 1


def _view_statistics(views: torch.Tensor) -> dict[str, np.ndarray]:
    x = views.double()
    channel_means = x.mean(dim=(2, 3))
    rows, columns = x.diff(dim=-2).abs(), x.diff(dim=-1).abs()
    high = rows.mean(dim=(1, 2, 3)) + columns.mean(dim=(1, 2, 3))
    return {"mean": x.mean(dim=(1, 2, 3)).numpy(), "std": x.std(dim=(1, 2, 3)).numpy(),
            "channel spread": channel_means.std(dim=1).numpy(), "high-frequency energy": high.numpy()}


def test_t4_pixel_statistics_match_the_pil_reference_pipeline(cifar_root):
    images, _ = cifar.load_cifar(cifar_root, "cifar10", train=False)
    crop = Image.fromarray(images[7]).resize((64, 64), Image.BICUBIC)  # one fixed crop (RRC is T1's)
    reference_list = T.Compose(train_transform("simclr", 64).transforms[1:])  # jitter, gray, PIL blur, flip, tensor
    reference = []
    for i in range(400):
        torch.manual_seed(i)
        reference.append(reference_list(crop))
    views = KeyedViews("simclr", 64)
    params = torch.stack([views.draw(crop, view_key(3, 0, 0, i, 0))[1] for i in range(400)])
    ours = augment_tail(TF.pil_to_tensor(crop)[None].expand(400, -1, -1, -1), params)
    a, b = _view_statistics(torch.stack(reference).float()), _view_statistics(ours)
    for name in a:
        statistic = stats.ks_2samp(a[name], b[name]).statistic
        print(f"{name}: KS D = {statistic:.3f}")
        assert statistic < KS_5_PERCENT_400, name


def test_t5_the_same_key_gives_the_same_bits():
    views = KeyedViews("simclr", 32)
    image = TF.to_pil_image(_image(5, 80)[0])
    (c1, p1), (c2, p2) = views(image, 12345), views(image, 12345)
    assert torch.equal(c1, c2) and torch.equal(p1, p2)
    assert torch.equal(augment_tail(c1[None], p1[None]), augment_tail(c2[None], p2[None]))


def _keys_by_position(batch_size: int, world_size: int) -> dict:
    """position in the epoch -> (image, view keys) for the uniform stream, over all ranks."""
    seen = {}
    for rank in range(world_size):
        plan = EpochPlan(100, batch_size, None, seed=3, rank=rank, world_size=world_size)
        sampler = _PlannedBatchSampler(plan, "uniform", [f"{i}.JPEG" for i in range(100)], BadImageLog(0), keyed=True)
        sampler.epoch = 2
        for step, batch in zip(plan.steps(2), sampler, strict=True):
            seen |= dict(zip(step.positions.tolist(), batch, strict=True))
    return seen


def test_t5_files_views_do_not_depend_on_batch_size_or_worker_count():
    reference = _keys_by_position(8, 1)
    assert len(reference) == 100 and len({keys for _, keys in reference.values()}) == 100
    assert _keys_by_position(64, 1) == reference
    assert _keys_by_position(8, 2) == reference


def test_t5_shard_views_do_not_depend_on_how_rows_are_batched():
    rng = np.random.default_rng(0)
    encoded = [_encoded(Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)), "JPEG") for _ in range(6)]
    batch = {"image": np.array(encoded, dtype=object), "label": np.arange(6), "path": np.array(["p"] * 6, object),
             "index": np.arange(10, 16), "execution": np.full(6, 4)}
    decode = Decode("simclr", 16, 3, train=True, keyed=True, seed=9)
    whole = decode(batch)
    halves = [decode({k: v[s] for k, v in batch.items()}) for s in (slice(0, 3), slice(3, 6))]

    def by_index(out):
        return {int(i): (out["x1"][n].tobytes(), out["p1"][n].tobytes(), out["p2"][n].tobytes())
                for n, i in enumerate(out["index"])}
    assert by_index(whole) == by_index(halves[0]) | by_index(halves[1])
    assert not np.array_equal(whole["p1"], whole["p2"])  # the two views are drawn apart


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run by bench/gpu_check.py)")
def test_t6_cpu_and_cuda_tails_agree_within_a_level():
    views = KeyedViews("simclr", 64)
    image = TF.to_pil_image(_image(6, 96)[0])
    crops, params = zip(*(views(image, view_key(1, 0, 0, i, 0)) for i in range(32)), strict=True)
    crops, params = torch.stack(crops), torch.stack(params)
    cpu = augment_tail(crops, params)
    cuda = augment_tail(crops.cuda(), params.cuda()).cpu()
    assert (cpu - cuda).abs().max() <= 1


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=95) if fmt == "JPEG" else image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_tensor_decode_reads_what_the_dataset_holds_and_names_what_it_cannot(tmp_path):
    rgb = TF.to_pil_image(_image(7, 64)[0])
    reference = TF.pil_to_tensor(rgb).float()
    for fmt, image in (("JPEG", rgb), ("JPEG", rgb.convert("CMYK")), ("PNG", rgb), ("BMP", rgb)):
        decoded = decode_tensor(_encoded(image, fmt), 3)  # BMP: torchvision does not read it, PIL does
        assert decoded.shape == (3, 64, 64) and decoded.dtype == torch.uint8, fmt
        assert (decoded.float() - reference).abs().mean() < 6, fmt  # JPEG's loss; CMYK round trip
    assert decode_tensor(_encoded(rgb, "JPEG"), 1).shape == (1, 64, 64)
    truncated = _encoded(rgb, "JPEG")[:300]
    assert isinstance(decode_tensor(truncated, 3, "a.JPEG"), Unreadable)
    assert isinstance(decode_tensor(tmp_path / "missing.JPEG", 3), Unreadable)


def test_crops_from_tensors_and_from_pil_images_agree():
    """The device path crops torchvision's decoded tensors; the box is the same for the same key and the pixels
    are PIL's bilinear resize within a level or two."""
    pil = TF.to_pil_image(_image(8, 200)[0])
    views = KeyedViews("simclr", 64)
    for position in range(8):
        key = view_key(1, 0, 0, position, 0)
        (from_pil, p1), (from_tensor, p2) = views(pil, key), views(TF.pil_to_tensor(pil), key)
        assert torch.equal(p1, p2)
        assert (from_pil.float() - from_tensor.float()).abs().mean() < 2


def test_the_gpu_check_script_runs_its_parts_on_the_cpu(tmp_path):
    """bench/gpu_check.py is what a lent GPU runs as it is: its code must not rot between GPU sessions."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--images", "48", "--skip", "step",
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["tail"]["pass"] and report["nvjpeg"]["fallbacks_to_cpu"] >= 1  # the PNG named .JPEG
    assert report["training"]["test_top1"] is not None and report["feed"]["eager"]["rows_per_s"] > 0
    assert set(report["experts"]["step_vs_ce"]) == {"ce", "ldam_drw", "ride", "mdcs", "shike", "ce_deit", "deit_lt"}
    assert report["recipe"]["epochs"] == 2 and report["recipe"]["projected_recipe_hours"] > 0
    assert report["deit"]["pass"] and report["deit"]["images_per_s"] > 0


def test_jpegs_decoded_on_the_device_give_the_crops_the_decode_actors_would_cut():
    """data.decode_on: device ships the encoded image and the boxes drawn from its header; decoding and
    cropping on the device (here the CPU's decode_jpeg) gives the crops the actors cut from their own decode.
    A PNG named .JPEG is decoded on the CPU instead and counted; a truncated JPEG is an unreadable image."""
    from glmc_ray.data.device_augment import JpegDecoder

    pictures = [TF.to_pil_image(_image(seed, 90)[0]) for seed in range(6)]
    encoded = [_encoded(p, "JPEG") for p in pictures[:4]] + [_encoded(pictures[4], "PNG")]
    encoded.append(_encoded(pictures[5], "JPEG")[:700])  # the header reads, the pixels do not
    batch = {"image": np.array(encoded, dtype=object), "label": np.arange(6),
             "path": np.array([f"img{i}.JPEG" for i in range(6)], object), "index": np.arange(6),
             "execution": np.zeros(6)}
    headers = Decode("simclr", 32, 3, train=True, keyed=True, seed=2, decode_on_device=True)(batch)
    pixels = Decode("simclr", 32, 3, train=True, keyed=True, seed=2)(batch)
    assert "x1" not in headers and headers["ok"].all()
    assert np.array_equal(headers["index"], pixels["index"])  # the same keyed order inside the block
    log = BadImageLog(5)
    decoder = JpegDecoder(torch.device("cpu"), 3, 32, log)
    images, kept = decoder.decode(list(headers["jpeg"]), list(headers["path"]))
    assert kept.tolist() == (headers["index"] != 5).tolist() == pixels["ok"].tolist()
    assert decoder.cpu_decoded == 1 and log.take("train") == 1
    for v in (1, 2):
        crops = decoder.crops(images, torch.from_numpy(headers[f"box{v}"])[kept])
        assert torch.equal(crops, torch.from_numpy(pixels[f"x{v}"][pixels["ok"]]))
        assert np.array_equal(headers[f"p{v}"][kept.numpy()], pixels[f"p{v}"][pixels["ok"]])


def test_decoding_on_the_device_needs_the_shards_and_the_simclr_tail():
    from glmc_ray.core import config as config_lib
    from glmc_ray.core.config import ConfigError

    sets = ["data.source=files", "data.train_split=t.txt", "data.test_split=t.txt", "data.mean=[0.5]",
            "data.std=[0.2]", "data.augmentation=simclr", "data.decode_on=device"]
    with pytest.raises(ConfigError, match="data.decode_on: device decodes the JPEGs of data.source=shards"):
        config_lib.load(None, sets)
