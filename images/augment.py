"""The two asymmetric views of BYOL / MoCo v3, made for a whole batch at once on its own device.

The same pipeline as images/datasets.py's PIL reference (`two_view_transforms`), in the same order, with
independent random parameters per image:

  1. random resized crop to size x size (scale crop_min..1, ratio 3/4..4/3), bilinear, antialiased
  2. horizontal flip, p 0.5 (folded into 1)
  3. ColorJitter(brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1), p 0.8, random op order
  4. grayscale, p 0.2
  5. Gaussian blur, sigma in [0.1, 2], kernel 2 * (size // 20) + 1, p blur_p (none if size <= 64)
  6. solarize at 128 / 255, p solarize_p
  7. normalise with the dataset's per-channel mean / std
  view 1: blur_p 1.0, solarize_p 0.0        view 2: blur_p 0.1, solarize_p 0.2

Input uint8 (B, C, H, W), C = 3 or 1 (made 3 channels, as images/datasets.py's Grayscale(3)); output float32
(B, 3, size, size). With crop=False (the ImageNet path, where the DataLoader workers crop and flip
and hand over uint8 images of the final size) only steps 3-7 run.

Each op mirrors a torchvision functional op on float images in [0, 1] (test_snclr.py compares
them image by image). Sampling (`sample_params`) is kept apart from applying (`apply_params`).
Every random number comes from the `torch.Generator` passed in, on the batch's device, so seeding
it per step reproduces a step bit for bit after a resume. Nothing reads a tensor value on the host
(no .item(), no data-dependent shapes, no branches on values): a GPU step never waits for the GPU.
Per-image choices are made with torch.where, which computes an op for the whole batch and keeps it
where it applies.
"""
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from images.datasets import SMALL_IMAGE

RATIO = (3 / 4, 4 / 3)                   # RandomResizedCrop's aspect ratio range
JITTER = (0.4, 0.4, 0.2, 0.1)            # ColorJitter(brightness, contrast, saturation, hue)
JITTER_P, GRAY_P, FLIP_P = 0.8, 0.2, 0.5
SIGMA = (0.1, 2.0)                       # Gaussian blur sigma range (SimCLR / MoCo v3)
SOLARIZE_THRESHOLD = 128 / 255           # RandomSolarize(128) on uint8, on [0, 1] floats
VIEW1 = dict(blur_p=1.0, solarize_p=0.0)
VIEW2 = dict(blur_p=0.1, solarize_p=0.2)


@dataclass
class Params:
    """The random parameters of one view of a batch of B images (tensors on its device)."""
    box: torch.Tensor       # (B, 4) long: crop top, left, height, width
    flip: torch.Tensor      # (B,) bool
    jitter: torch.Tensor    # (B,) bool: colour jitter applied
    factors: torch.Tensor   # (B, 4) brightness, contrast, saturation factors and hue shift
    order: torch.Tensor     # (B, 4) long: order[b, k] = jitter op applied k-th (0 b, 1 c, 2 s, 3 h)
    gray: torch.Tensor      # (B,) bool
    blur: torch.Tensor      # (B,) bool (no image <= 64 px is blurred, whatever it says)
    sigma: torch.Tensor     # (B,) blur sigma
    solarize: torch.Tensor  # (B,) bool


# ------------------------------------------------------------------------------ sampling ---
def _uniform(lo: float, hi: float, shape, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g, device=g.device)


def _coin(p: float, B: int, g: torch.Generator) -> torch.Tensor:
    return torch.rand(B, generator=g, device=g.device) < p  # True with probability p  # (B,) bool


def _fallback_crop(height: int, width: int):
    """RandomResizedCrop's crop when 10 attempts fail: the largest central crop whose ratio is
    allowed. -> top, left, height, width (Python ints: they depend on the shape only)."""
    if width / height < RATIO[0]:
        h, w = int(round(width / RATIO[0])), width
    elif width / height > RATIO[1]:
        h, w = height, int(round(height * RATIO[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def sample_crop(B: int, height: int, width: int, crop_min: float,
                g: torch.Generator) -> torch.Tensor:
    """torchvision.transforms.v2.RandomResizedCrop(scale=(crop_min, 1), ratio=(3/4, 4/3))'s
    get_params for B images of height x width at once -> boxes (B, 4) long (top, left, h, w).

    Area fraction ~ U(crop_min, 1) and log ratio ~ U(log 3/4, log 4/3); the first of 10 attempts
    whose rounded box fits is kept, the top-left corner is uniform over the positions where it
    fits, and an image with no fitting attempt gets the fallback central crop. All 10 attempts
    are drawn for every image, so the number of draws does not depend on the values.
    """
    area = height * width * _uniform(crop_min, 1.0, (B, 10), g)                     # (B, 10)
    ratio = _uniform(math.log(RATIO[0]), math.log(RATIO[1]), (B, 10), g).exp()      # (B, 10)
    # torch.round rounds half to even, as Python's round does in torchvision
    w = (area * ratio).sqrt().round()                                              # (B, 10)
    h = (area / ratio).sqrt().round()                                              # (B, 10)
    fits = (w >= 1) & (w <= width) & (h >= 1) & (h <= height)                      # (B, 10)
    first = fits.int().argmax(dim=1, keepdim=True)  # of equal maxima, the first   # (B, 1)
    found = fits.any(dim=1)                                                        # (B,)
    top0, left0, h0, w0 = _fallback_crop(height, width)
    h = torch.where(found, h.gather(1, first)[:, 0], h0)                           # (B,)
    w = torch.where(found, w.gather(1, first)[:, 0], w0)                           # (B,)
    # floor(u * n) is uniform on 0..n-1 (torch.randint's range); the minimum guards against
    # u * n rounding up to n in float32
    top = torch.minimum((_uniform(0, 1, B, g) * (height - h + 1)).floor(), height - h)
    left = torch.minimum((_uniform(0, 1, B, g) * (width - w + 1)).floor(), width - w)
    top, left = torch.where(found, top, top0), torch.where(found, left, left0)    # (B,)
    return torch.stack([top, left, h, w], dim=1).long()                            # (B, 4)


def sample_params(B: int, height: int, width: int, crop_min: float, blur_p: float,
                  solarize_p: float, generator: torch.Generator) -> Params:
    """All random choices of one view for B images of height x width (on generator.device).

    Jitter factors as ColorJitter(0.4, 0.4, 0.2, 0.1): brightness, contrast ~ U(0.6, 1.4),
    saturation ~ U(0.8, 1.2), hue ~ U(-0.1, 0.1); the op order is a uniform random permutation
    (argsort of 4 uniforms), as the torch.randperm(4) that ColorJitter draws per call.
    """
    g = generator
    ranges = [(max(0.0, 1 - j), 1 + j) for j in JITTER[:3]] + [(-JITTER[3], JITTER[3])]
    factors = torch.stack([_uniform(lo, hi, B, g) for lo, hi in ranges], dim=1)    # (B, 4)
    order = torch.rand(B, 4, generator=g, device=g.device).argsort(dim=1)          # (B, 4)
    return Params(box=sample_crop(B, height, width, crop_min, g), flip=_coin(FLIP_P, B, g),
                  jitter=_coin(JITTER_P, B, g), factors=factors, order=order,
                  gray=_coin(GRAY_P, B, g), blur=_coin(blur_p, B, g),
                  sigma=_uniform(*SIGMA, B, g), solarize=_coin(solarize_p, B, g))


# ------------------------------------------------------------------------------ geometry ---
def resize_weights(start: torch.Tensor, length: torch.Tensor, in_size: int,
                   out_size: int) -> torch.Tensor:
    """Interpolation matrices of torch's antialiased bilinear resize (`_upsample_bilinear2d_aa`,
    which torchvision.transforms.v2.functional.resized_crop(..., antialias=True) calls on float
    images) of the crop [start, start + length) of an axis of in_size pixels to out_size pixels.

    With scale = length / out_size, output pixel i sits at centre_i = (i + 0.5) * scale in crop
    coordinates (align_corners=False: source (i + 0.5) * scale - 0.5 in pixel-index units). Crop
    pixel j (centre j + 0.5) gets weight max(0, 1 - |j + 0.5 - centre_i| / support), support =
    max(scale, 1): the bilinear tent when upscaling, a tent one output pixel wide when downscaling
    (the antialias, as PIL). Pixels outside the crop get 0; each row is normalised to sum to 1.
    start, length (B,) long -> (B, out_size, in_size) float32.
    """
    scale = length.float() / out_size                                              # (B,)
    support = scale.clamp(min=1)[:, None, None]                                    # (B, 1, 1)
    centre = (torch.arange(out_size, device=start.device) + 0.5) * scale[:, None]  # (B, out)
    j = torch.arange(in_size, device=start.device) - start[:, None]  # in the crop # (B, in)
    inside = (j >= 0) & (j < length[:, None])                                      # (B, in)
    dist = (j[:, None, :] + 0.5 - centre[:, :, None]).abs()                        # (B, out, in)
    w = (1 - dist / support).clamp(min=0) * inside[:, None, :]                     # (B, out, in)
    return w / w.sum(dim=2, keepdim=True)                                          # (B, out, in)


def resized_crop(x: torch.Tensor, box: torch.Tensor, flip: torch.Tensor,
                 size: int) -> torch.Tensor:
    """torchvision.transforms.v2.functional.resized_crop(x[b], *box[b], [size, size],
    antialias=True), then horizontal_flip where flip[b], for every image b.

    Resizing is separable: out = R x C^T with R (B, size, H) and C (B, size, W) from
    resize_weights, two batched matmuls. Flipping the output reverses C's rows, so it is free.
    x (B, C, H, W) float in [0, 1], box (B, 4) long, flip (B,) bool -> (B, C, size, size).
    """
    top, left, h, w = box.unbind(dim=1)                                            # (B,) each
    rows = resize_weights(top, h, x.shape[2], size)                                # (B, size, H)
    cols = resize_weights(left, w, x.shape[3], size)                               # (B, size, W)
    cols = torch.where(flip[:, None, None], cols.flip(1), cols)                    # (B, size, W)
    out = rows[:, None] @ x @ cols[:, None].transpose(2, 3)                        # (B, C, size, size)
    # rounding can leave a normalised row summing to 1 + 1e-7; clamping keeps the image in
    # [0, 1], so jitter's identity factors below are exact identities
    return out.clamp(0, 1)


# -------------------------------------------------------------------------------- colour ---
def _per_image(v: torch.Tensor) -> torch.Tensor:
    return v[:, None, None, None]                                                  # (B, 1, 1, 1)


def _blend(x: torch.Tensor, y: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's _blend: factor * x + (1 - factor) * y, clamped to [0, 1]; factor (B,)."""
    f = _per_image(factor)
    return (x * f).add_(y * (1 - f)).clamp_(0, 1)  # in place: fewer passes over the batch


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """torchvision.transforms.v2.functional.rgb_to_grayscale: L = 0.2989 R + 0.587 G + 0.114 B.
    x (B, 3, H, W) -> (B, 1, H, W)."""
    r, g, b = x.unbind(dim=1)                                                      # (B, H, W)
    return (r * 0.2989 + g * 0.587 + b * 0.114)[:, None]                           # (B, 1, H, W)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision.transforms.v2.functional.adjust_brightness: factor * x, clamped (a blend with
    black). x (B, 3, H, W), factor (B,) -> (B, 3, H, W)."""
    return (x * _per_image(factor)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision.transforms.v2.functional.adjust_contrast: a blend with the image's mean grey
    level. x (B, 3, H, W), factor (B,) -> (B, 3, H, W)."""
    mean = rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True)                   # (B, 1, 1, 1)
    return _blend(x, mean, factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision.transforms.v2.functional.adjust_saturation: a blend with the grayscale image.
    x (B, 3, H, W), factor (B,) -> (B, 3, H, W)."""
    return _blend(x, rgb_to_grayscale(x), factor)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision.transforms.v2.functional.adjust_hue: RGB -> HSV, hue += shift (mod 1), -> RGB.
    x (B, 3, H, W) in [0, 1], shift (B,) in [-0.5, 0.5] -> (B, 3, H, W).

    HSV, hue in turns: v = max, chroma c = max - min, s = c / v, and the hue's sextant is set by
    the largest channel (R, then G, then B on ties, as torchvision). Back to RGB: channel
    n = 5, 3, 1 (R, G, B) is v - v s clamp(min(k, 4 - k), 0, 1) with k = (n + 6 h) mod 6, the
    closed form of torchvision's sextant table.
    """
    r, g, b = x.unbind(dim=1)                                                      # (B, H, W)
    v = x.amax(dim=1)                                                              # (B, H, W)
    c = v - x.amin(dim=1)                                                          # (B, H, W)
    s = c / torch.where(v > 0, v, 1)  # v = 0 is black: c = 0, so s = 0
    safe_c = torch.where(c > 0, c, 1)  # grey (c = 0) has s = 0: any hue gives back the grey
    h = torch.where(v == r, (g - b) / safe_c,
                    torch.where(v == g, (b - r) / safe_c + 2, (r - g) / safe_c + 4))  # sextants
    h = (h / 6 + shift[:, None, None]) % 1.0                                       # (B, H, W)
    rgb = [v - v * s * torch.minimum(k, 4 - k).clamp(0, 1)
           for k in ((n + 6 * h) % 6 for n in (5, 3, 1))]                         # 3 x (B, H, W)
    return torch.stack(rgb, dim=1).clamp(0, 1)                                     # (B, 3, H, W)


def _blends(x: torch.Tensor, op: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness (op 0), contrast (1) or saturation (2) with its factor, or nothing (-1), per
    image, in one pass: each is torchvision's _blend of x with a partner y, black for
    brightness, the mean grey level for contrast, the grey image for saturation, so one blend
    with a per-image partner and factor does all three. An image with nothing due gets factor
    1, an exact identity (1 * x + 0 * y = x, and the clamp keeps [0, 1] as it is).
    x (B, 3, H, W), op (B,) long, factors (B, 4) -> (B, 3, H, W)."""
    f = torch.where(op >= 0, factors.gather(1, op.clamp(min=0)[:, None])[:, 0], 1.0)   # (B,)
    grey = rgb_to_grayscale(x)                                                     # (B, 1, H, W)
    partner = torch.where(_per_image(op == 1), grey.mean(dim=(1, 2, 3), keepdim=True), grey)
    return _blend(x, partner * _per_image(op != 0), f)                            # black when op 0


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor,
                 apply: torch.Tensor) -> torch.Tensor:
    """torchvision.transforms.ColorJitter with given parameters: per image, the ops
    0 brightness, 1 contrast, 2 saturation, 3 hue in the order order[b] (as ColorJitter applies
    its randperm(4)), and none where apply[b] is False (RandomApply's coin).
    x (B, 3, H, W) in [0, 1], factors (B, 4), order (B, 4) long, apply (B,) bool -> (B, 3, H, W).

    Hue, an HSV round trip, costs more than the three blends together and is no exact identity
    at shift 0, so the batch applies it once: each image's blends are split into those before
    its hue and those after, 3 slots each, and a slot an image does not use applies nothing.
    """
    is_hue = (order == 3).int()                                                    # (B, 4)
    hue_at = is_hue.argmax(dim=1)  # hue's position in the order                  # (B,)
    # a stable sort moving hue last leaves the blends in their order
    blends = order.gather(1, is_hue.argsort(dim=1, stable=True))[:, :3]            # (B, 3)
    for k in range(3):  # blend k comes before hue when k < hue_at
        x = _blends(x, torch.where(apply & (k < hue_at), blends[:, k], -1), factors)
    x = torch.where(_per_image(apply), adjust_hue(x, factors[:, 3]), x)
    for k in range(3):
        x = _blends(x, torch.where(apply & (k >= hue_at), blends[:, k], -1), factors)
    return x


def random_grayscale(x: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """torchvision.transforms.v2.functional.rgb_to_grayscale(x[b], num_output_channels=3) where
    apply[b]. x (B, 3, H, W), apply (B,) bool -> (B, 3, H, W)."""
    return torch.where(_per_image(apply), rgb_to_grayscale(x).expand_as(x), x)


# ------------------------------------------------------------ blur, solarize, normalise ---
def blur_kernel_size(size: int) -> int:
    """images/datasets.py's blur kernel, about 10 % of the side; 0 (no blur) for images <= 64 px."""
    return 2 * (size // 20) + 1 if size > SMALL_IMAGE else 0


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """torchvision.transforms.v2.functional.gaussian_blur(x[b], [k, k], [sigma[b]] * 2) for
    every image b: weights exp(-t^2 / (2 sigma^2)) / sum for t = -k//2 .. k//2, reflect padding.

    The 2-D kernel is the outer product of the 1-D one, so two 1-D convolutions do it, grouped
    with one group per (image, channel) so that each image has its own sigma. (On a GPU, cuDNN
    convolutions default to TF32: errors ~1e-3 instead of ~1e-7, still inside one uint8 step.)
    x (B, C, H, W), sigma (B,) -> (B, C, H, W).
    """
    B, C, H, W = x.shape
    half = kernel_size // 2
    t = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)              # (k,)
    kernel = torch.softmax(-(t / sigma[:, None]) ** 2 / 2, dim=1)  # rows sum to 1 # (B, k)
    kernel = kernel.repeat_interleave(C, dim=0)                                    # (B*C, k)
    y = F.pad(x.reshape(1, B * C, H, W), (half,) * 4, mode="reflect")   # (1, B*C, H+2h, W+2h)
    y = F.conv2d(y, kernel[:, None, :, None], groups=B * C)                        # (1, B*C, H, W+2h)
    y = F.conv2d(y, kernel[:, None, None, :], groups=B * C)                        # (1, B*C, H, W)
    return y.reshape(B, C, H, W)


def solarize(x: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """torchvision.transforms.v2.functional.solarize(x[b], 128 / 255) where apply[b]: pixels
    >= the threshold become 1 - x. x (B, C, H, W), apply (B,) bool -> (B, C, H, W)."""
    return torch.where(_per_image(apply) & (x >= SOLARIZE_THRESHOLD), 1 - x, x)


_CHANNEL_CONSTANTS = {}  # (values, device, dtype) -> (1, C, 1, 1) tensor: made once per process


def _per_channel(values, x: torch.Tensor) -> torch.Tensor:
    """C Python floats as a (1, C, 1, 1) tensor on x's device, made there from the floats (kernel
    arguments; a tensor made on the host would need a copy to the GPU, which waits for it), once:
    later calls reuse it (in a compiled graph the few operators fold into its constants)."""
    key = (tuple(values), x.device, x.dtype)
    if key in _CHANNEL_CONSTANTS and not torch.compiler.is_compiling():
        return _CHANNEL_CONSTANTS[key]
    out = torch.stack([torch.full((), v, device=x.device, dtype=x.dtype) for v in values])
    if not torch.compiler.is_compiling():
        _CHANNEL_CONSTANTS[key] = out.view(1, -1, 1, 1)
    return out.view(1, -1, 1, 1)                                                   # (1, C, 1, 1)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """torchvision.transforms.v2.functional.normalize: (x_c - mean_c) / std_c, computed as
    x_c * (1 / std_c) - mean_c / std_c in one pass over the batch (addcmul).
    x (B, C, H, W), mean and std C floats -> (B, C, H, W)."""
    scale = _per_channel([1 / s for s in std], x)
    shift = _per_channel([-m / s for m, s in zip(mean, std)], x)
    return torch.addcmul(shift, x, scale)


@functools.lru_cache
def blur_capacity(B: int, p: float, miss: float = 1e-9) -> int:
    """The fewest images M such that more than M of B are due for blur with probability p less
    often than `miss` (a binomial tail, in log space so that B in the thousands stays finite).
    View 2 (p = 0.1) blurs at most M of its images, a fixed number (static shapes, no host
    read): 58 of 256 instead of all 256. Depends on B and p only."""
    if p <= 0:
        return 0
    if p >= 1:
        return B
    log_pmf = [math.lgamma(B + 1) - math.lgamma(k + 1) - math.lgamma(B - k + 1) + k * math.log(p)
               + (B - k) * math.log1p(-p) for k in range(B + 1)]
    tail = 0.0
    for k in range(B, -1, -1):  # tail = P(more than k - 1 due), summed from the top
        tail += math.exp(log_pmf[k])
        if tail >= miss:
            return min(B, k)
    return B


def blur_some(x: torch.Tensor, apply: torch.Tensor, sigma: torch.Tensor, kernel_size: int,
              capacity: int) -> torch.Tensor:
    """gaussian_blur(x[b], sigma[b]) where apply[b], blurring only `capacity` images: those due
    come first (a stable sort of the coins), the first `capacity` of the batch order are blurred
    and written back; with more due than capacity (probability < 1e-9 with blur_capacity) the
    rest stay sharp. Shapes depend on capacity only, never on the coins' values.
    x (B, C, H, W), apply (B,) bool, sigma (B,) -> (B, C, H, W)."""
    if capacity >= x.shape[0]:  # view 1 (p = 1), or small batches: blur all, keep where due
        return torch.where(_per_image(apply), gaussian_blur(x, kernel_size, sigma), x)
    if capacity == 0:
        return x
    idx = torch.argsort((~apply).int(), stable=True)[:capacity]  # due first  # (M,)
    chosen = x[idx]                                                                # (M, C, H, W)
    blurred = gaussian_blur(chosen, kernel_size, sigma[idx])                       # (M, C, H, W)
    return x.index_copy(0, idx, torch.where(_per_image(apply[idx]), blurred, chosen))


# ------------------------------------------------------------------------------ pipeline ---
def apply_params(images: torch.Tensor, p: Params, size: int, mean, std,
                 crop: bool = True, max_blurred: int = None) -> torch.Tensor:
    """Steps 1-7 with the given parameters. crop=False skips steps 1-2 (crop and flip), which
    the DataLoader workers did already: images must then be size x size. max_blurred: blur
    at most that many images (see blur_some; None: any number, the whole batch is blurred).
    images uint8 (B, C, H, W), C = 1 or 3 -> float32 (B, 3, size, size), normalised.
    """
    x = images.float() / 255                                                       # (B, C, H, W)
    if crop:
        x = resized_crop(x, p.box, p.flip, size)                                   # (B, C, size, size)
    x = x.expand(-1, 3, -1, -1)  # one channel: images/datasets.py's Grayscale(3), cheaper after the crop
    x = color_jitter(x, p.factors, p.order, p.jitter)
    x = random_grayscale(x, p.gray)
    k = blur_kernel_size(size)
    if k:
        x = blur_some(x, p.blur, p.sigma, k, x.shape[0] if max_blurred is None else max_blurred)
    x = solarize(x, p.solarize)
    return normalize(x, mean, std)                                                 # (B, 3, size, size)


def augment(images: torch.Tensor, size: int, crop_min: float, blur_p: float, solarize_p: float,
            mean, std, generator: torch.Generator, crop: bool = True, compiled: bool = False) -> torch.Tensor:
    """One augmented view of a batch: uint8 (B, C, H, W), C = 1 or 3, on the generator's device
    -> float32 (B, 3, size, size). crop=False: images are already cropped and flipped to size.
    compiled: apply the parameters with a torch.compile'd apply_params (see compiled_apply)."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images (B, 1 or 3, H, W), got {images.dtype} "
                         f"{tuple(images.shape)}")
    if generator.device.type != images.device.type:
        raise ValueError(f"the generator is on {generator.device}, the images on {images.device}")
    B, _, H, W = images.shape
    if not crop and (H, W) != (size, size):
        raise ValueError(f"crop=False needs images of the final size {size}x{size}, got {H}x{W}")
    p = sample_params(B, H, W, crop_min, blur_p, solarize_p, generator)
    apply = compiled_apply() if compiled else apply_params
    return apply(images, p, size, mean, std, crop, blur_capacity(B, blur_p))


@functools.cache
def compiled_apply():
    """apply_params under torch.compile, made once per process. Sampling stays eager (its
    random numbers come from a torch.Generator, which torch.compile does not trace); applying,
    ~600 operators over whole images in eager mode, becomes a few fused kernels. Every shape is
    fixed by (B, H, W, size) and max_blurred, so dynamic=False: one graph per view, compiled in
    the first step."""
    return torch.compile(apply_params, dynamic=False)


def two_views(images, size: int, crop_min: float, mean, std, generator: torch.Generator,
              crop: bool = True, compiled: bool = False):
    """BYOL's asymmetric pair -> (view 1, view 2), each float32 (B, 3, size, size).
    View 1: blur p 1.0, solarize p 0.0. View 2: blur p 0.1, solarize p 0.2.

    images: one uint8 batch (B, C, H, W) that the two views crop independently, or a pair of
    batches, one per view (with crop=False: the two crops the DataLoader workers made).
    compiled: torch.compile the applying of the parameters (images/loaders.py does on CUDA with --compile).
    """
    first, second = images if isinstance(images, (tuple, list)) else (images, images)
    common = dict(mean=mean, std=std, generator=generator, crop=crop, compiled=compiled)
    return (augment(first, size, crop_min, **VIEW1, **common),
            augment(second, size, crop_min, **VIEW2, **common))
