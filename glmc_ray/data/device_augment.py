"""The augmentation tail on the training device (`data.augment_on: device`).

The CPU side (DataLoader workers, Ray Data decode actors) decodes, crops both views to uint8 and draws every
random parameter of a view (`KeyedViews`); the training device applies the rest of the list as batched,
per-sample tensor ops that draw nothing themselves (`DeviceTail`): colour jitter in each sample's own order,
grayscale, Gaussian blur, flip, normalisation. A CPU worker and a GPU worker given the same parameters make the
same views (../shared/docs/augment-on-device.md, "Recommended design").

Parameters come from a key, `view_key(seed, epoch, stream, position, view)`: the position is the sample's place
in its stream's epoch order (files) or the image's id and its copy number (shards), never the batch or the
worker, so the views do not depend on batch size or worker count, and the duplicates that the re-balanced
stream draws with replacement still get views of their own. The draws are torchvision's own samplers
(`RandomResizedCrop.get_params`, `ColorJitter.get_params`, ...) run on a CPU generator seeded by the key.

The tail computes what the official list computes on PIL images (torchvision's ColorJitter and RandomGrayscale
call PIL's ImageEnhance and convert("L")), in float on the 0-255 scale: each blend truncated to a level, the
luma in PIL's fixed point, the contrast mean rounded. It blurs with a separable 23-tap Gaussian (torchvision's
gaussian_blur, reflect border, rounded) where the official list uses PIL's three box passes: the one op that
differs, by about half a level on average (tests/test_device_augment.py measures it).

With `data.decode_on: device` the decode actors read only each JPEG's header and draw the boxes from its size
(`KeyedViews.draw_for_size`); `JpegDecoder` decodes the batch on the training device and cuts the crops there.
"""
from __future__ import annotations

import functools
import hashlib
import io
import itertools
import sys

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import functional as TF
from torchvision.transforms.v2 import functional as TF2

from glmc_ray.data.images import UNREADABLE_IMAGE_ERRORS, Unreadable, decode_tensor

# One view's parameters, a row of PARAMS floats: the three jitter factors, the jitter order (an index into
# ORDERS), grayscale (0/1), blur (0/1), the blur sigma, horizontal flip (0/1)
BRIGHTNESS, CONTRAST, SATURATION, ORDER, GRAY, BLUR, SIGMA, FLIP = range(8)
PARAMS = 8
ORDERS = list(itertools.permutations(range(3)))  # (brightness 0, contrast 1, saturation 2) in each order
IDENTITY = (1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0)
BLUR_TAPS = 23  # torchvision's GaussianBlur(23) kernel: +-11 pixels, 5.5 sigma at the largest sigma (2)
STREAM_IDS = {"uniform": 0, "rebalanced": 1}


def view_key(seed: int, epoch: int, stream: int, position: int | str, view: int) -> int:
    """A 63-bit seed for one view, from where it is in the run (a hash: neighbouring keys give unrelated draws)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{stream}/{position}/{view}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class KeyedViews:
    """The CPU side of one augmentation preset: `(PIL image, key) -> (uint8 (C, size, size) crop, PARAMS floats)`.

    simclr: RandomResizedCrop(size) here; ColorJitter(0.4, 0.4, 0.4, 0) always, RandomGrayscale(0.2), the
    blur with p 0.5 and sigma ~ U(0.1, 2), and the flip drawn here and applied on the device.
    crop_flip: resize, centre crop, pad by size/8 and random crop here; the flip drawn here, applied there."""

    def __init__(self, augmentation: str, size: int):
        self.augmentation, self.size = augmentation, size

    def __call__(self, image: Image.Image | torch.Tensor, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`image`: PIL, or uint8 (C, H, W) (`decode_tensor`'s, cropped by torchvision's v2 uint8 kernel,
        bilinear with antialiasing, as PIL's resize)."""
        if self.augmentation != "simclr":
            image = TF.pad(TF.center_crop(TF.resize(image, self.size), self.size), self.size // 8)
        box, params = self.draw(image, key)
        if self.augmentation != "simclr":
            crop = TF.crop(image, *box)
        elif torch.is_tensor(image):  # v2's uint8 kernel: 3x the speed of v1's, which resizes in float
            crop = TF2.resized_crop(image, *box, [self.size, self.size], antialias=True)
        else:
            crop = TF.resized_crop(image, *box, [self.size, self.size], antialias=True)
        return (crop if torch.is_tensor(crop) else TF.pil_to_tensor(crop)), params

    def draw_for_size(self, height: int, width: int, key: int) -> tuple[tuple[int, int, int, int], torch.Tensor]:
        """`draw` for an image known by its size only (a JPEG header): simclr's box and parameters."""
        return self.draw(torch.empty(1, 1, 1, dtype=torch.uint8).expand(3, height, width), key)

    def draw(self, image: Image.Image | torch.Tensor, key: int) -> tuple[tuple[int, int, int, int], torch.Tensor]:
        """The crop box (top, left, height, width) in `image` and the tail's parameters; only the image's size
        is read. Every draw is one of torchvision's samplers, on the generator seeded by `key`."""
        with torch.random.fork_rng(devices=[]):  # torchvision's samplers draw from the global generator
            torch.manual_seed(key)
            if self.augmentation != "simclr":
                box = T.RandomCrop.get_params(image, (self.size, self.size))
                params = torch.tensor(IDENTITY)
                params[FLIP] = float(torch.rand(1) < 0.5)
                return box, params
            box = T.RandomResizedCrop.get_params(image, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
            order, b, c, s, _ = T.ColorJitter.get_params((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), None)
            steps = tuple(int(i) for i in order if int(i) < 3)  # 3 is hue, which GLMC leaves at 0
            gray = float(torch.rand(1) < 0.2)  # T.RandomGrayscale(p=0.2)
            blur = float(torch.rand(1) <= 0.5)  # T.RandomApply(p=0.5) skips when p < rand
            sigma = float(torch.empty(1).uniform_(0.1, 2.0))
            flip = float(torch.rand(1) < 0.5)  # T.RandomHorizontalFlip
            return box, torch.tensor([b, c, s, ORDERS.index(steps), gray, blur, sigma, flip])


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) levels -> (N, 1, H, W) luma as PIL's convert("L") computes it (ITU-R 601 in 16-bit fixed
    point, rounded; exact in float32 for whole levels); one channel is its own gray."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return torch.floor((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536).unsqueeze(1)


def _blend(x: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance blend: degenerate + factor * (x - degenerate) in float32, clipped, truncated to a level."""
    f = factor.view(-1, 1, 1, 1)
    return (degenerate + f * (x - degenerate)).clamp(0, 255).floor()


@functools.cache
def _orders(device: torch.device) -> torch.Tensor:
    """ORDERS on the device, copied there once (a copy per batch would wait on the host)."""
    return torch.tensor(ORDERS, device=device)


def color_jitter(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and saturation (PIL's ImageEnhance, which torchvision's ColorJitter calls on PIL
    images) in each sample's order (ORDERS[params[:, ORDER]]): at step k every sample applies its k-th
    operation; the other two get factor 1 at that step, which changes nothing."""
    order = _orders(x.device)[params[:, ORDER].long()]  # (N, 3)
    ones = torch.ones_like(params[:, 0])
    for k in range(3):
        b = torch.where(order[:, k] == 0, params[:, BRIGHTNESS], ones)
        c = torch.where(order[:, k] == 1, params[:, CONTRAST], ones)
        s = torch.where(order[:, k] == 2, params[:, SATURATION], ones)
        x = _blend(x, torch.zeros_like(x), b)
        # Contrast's degenerate image: the mean luma rounded to a level (ImageStat's mean, in double)
        mean = torch.floor(_gray(x).double().mean(dim=(1, 2, 3), keepdim=True) + 0.5).float()
        x = _blend(x, mean, c)
        x = _blend(x, _gray(x), s)
    return x


def gaussian_kernels(sigma: torch.Tensor, taps: int = BLUR_TAPS) -> torch.Tensor:
    """(N, taps) normalised 1-D Gaussians, torchvision's `_get_gaussian_kernel1d` per sample."""
    half = (taps - 1) * 0.5
    x = torch.linspace(-half, half, taps, device=sigma.device, dtype=torch.float32)
    pdf = torch.exp(-0.5 * (x[None] / sigma[:, None].float()) ** 2)
    return pdf / pdf.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, taps: int = BLUR_TAPS) -> torch.Tensor:
    """Per-sample separable Gaussian blur with reflect padding, rounded to levels (torchvision's
    gaussian_blur(x, taps, sigma) on uint8, which convolves with the outer product of the same 1-D kernel):
    one grouped conv per axis."""
    n, c, h, w = x.shape
    kernels = gaussian_kernels(sigma, taps).to(x.dtype).repeat_interleave(c, dim=0)  # (N*C, taps)
    pad = taps // 2
    flat = x.reshape(1, n * c, h, w)
    flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode="reflect"), kernels[:, None, :, None], groups=n * c)
    flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode="reflect"), kernels[:, None, None, :], groups=n * c)
    return flat.reshape(n, c, h, w).round()


def augment_tail(views: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) crops and their (N, PARAMS) parameters -> float views on the 0-255 scale, whole
    levels, on the views' device. Draws nothing: the same inputs give the same output."""
    params = params.to(views.device, torch.float32)
    x = color_jitter(views.float(), params)
    if x.shape[1] == 3:
        x = torch.where(params[:, GRAY].bool().view(-1, 1, 1, 1), _gray(x).expand_as(x), x)
    x = torch.where(params[:, BLUR].bool().view(-1, 1, 1, 1), gaussian_blur(x, params[:, SIGMA].clamp_min(1e-3)), x)
    return torch.where(params[:, FLIP].bool().view(-1, 1, 1, 1), x.flip(-1), x)


def augment_on_device(data, gpu: bool, strong: str = "none", rotation: float = 0.0) -> bool:
    """data.augment_on resolved: auto is the device where the workers train on GPUs (and wherever the JPEGs are
    decoded there). On CPU workers the decode workers (processes of their own) run the tail side by side, off
    the training process. With a strong view (`strong`, config.strong_view) or the weak view's rotation
    (`rotation`, config.weak_rotation) the whole list runs in the workers."""
    if strong != "none" or rotation:  # the strong view's policy and the rotation run in the decode workers, on PIL
        return False
    return data.augment_on == "device" or (data.augment_on == "auto" and (gpu or data.decode_on == "device"))


def header_size(encoded: bytes) -> tuple[int, int] | str:
    """(height, width) from an image's header (PIL reads no pixels), or why it cannot be read."""
    try:
        with Image.open(io.BytesIO(encoded)) as image:
            return image.height, image.width
    except UNREADABLE_IMAGE_ERRORS as err:
        return f"{type(err).__name__}: {err}"


class JpegDecoder:
    """JPEGs decoded on the training device (`data.decode_on: device`): one batched
    `torchvision.io.decode_jpeg(device=...)` call (nvJPEG on a GPU, libjpeg-turbo on a CPU); what it refuses
    (a CMYK JPEG on some GPUs, a PNG named .JPEG) is decoded on the CPU (`decode_tensor`), named once and
    counted; what nothing decodes is an unreadable image for `bad_images`. Then each view's crop, from the box
    the decode actor drew on the header's size."""

    def __init__(self, device: torch.device, channels: int, size: int, bad_images):
        self.device, self.size, self.bad_images = torch.device(device), size, bad_images
        self.mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
        self.channels, self.cpu_decoded, self.named = channels, 0, set()

    def decode(self, encoded: list[bytes], paths: list[str]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The images on the device, and which rows have one (unreadable rows are left out of the list)."""
        data = [torch.frombuffer(bytearray(e), dtype=torch.uint8) for e in encoded]
        try:
            return list(decode_jpeg(data, mode=self.mode, device=self.device)), torch.ones(len(data), dtype=torch.bool)
        except RuntimeError:  # one refused image fails the batched call: decode one by one
            pass
        images, kept, bad = [], torch.ones(len(data), dtype=torch.bool), []
        for row, (one, path) in enumerate(zip(data, paths, strict=True)):
            try:
                images.append(decode_jpeg(one, mode=self.mode, device=self.device))
                continue
            except RuntimeError as err:
                reason = str(err).splitlines()[-1]
            image = decode_tensor(encoded[row], self.channels, path)
            if isinstance(image, Unreadable):
                kept[row] = False
                bad.append(image)
                continue
            self.cpu_decoded += 1
            if path not in self.named:
                self.named.add(path)
                print(f"note: {path} decoded on the CPU, not by {self.device.type}'s JPEG decoder ({reason}); "
                      f"{self.cpu_decoded} so far", file=sys.stderr, flush=True)
            images.append(image.to(self.device))
        self.bad_images.add("train", bad)
        return images, kept

    def crops(self, images: list[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, size, size): each image's box (top, left, height, width), resized as KeyedViews does."""
        return torch.stack([TF2.resized_crop(image, *box, [self.size, self.size], antialias=True)
                            for image, box in zip(images, boxes.tolist(), strict=True)])


class DeviceTail:
    """The training device's half: a view (uint8 crops, their parameters) -> normalised float views in the
    device's memory format."""

    def __init__(self, normalizer):
        self.normalizer = normalizer

    def __call__(self, view) -> torch.Tensor:
        crops, params = view
        crops = crops.to(self.normalizer.device, non_blocking=True)
        return self.normalizer.normalize(augment_tail(crops, params))
