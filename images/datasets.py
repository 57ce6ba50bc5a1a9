"""Datasets and augmentations: the two asymmetric views of BYOL / MoCo v3 and the eval transforms.

Datasets: cifar10, cifar100 (torchvision, downloaded when a network exists), imagenet and any
`folder` (DATA_PATH/train and DATA_PATH/val, one sub-folder per class, the same classes in
both), `unlabelled` (every image under DATA_PATH at any depth, no labels, no val: images/folders.py
lists them), fashion-mnist (read straight from the IDX files, .gz or not, so Debian's
`dataset-fashion-mnist` package works offline; without it torchvision downloads them where a
network exists: fashion_mnist_root) and `fake` (torchvision FakeData, for smoke tests).

The PIL transforms here are the readable reference of the augmentations and the CPU default;
images/augment.py holds the same ops batched on the device, and images/loaders.py chooses between them.
"""
import contextlib
import gzip
import itertools
import multiprocessing
import os
import signal
import sys
import urllib.error

import numpy as np
import torch
from PIL import Image, ImageFilter
import torchvision
from torchvision import transforms

from images.folders import IMAGE_EXTENSIONS, ClassFolders, ImageFiles

DATASETS = ("imagenet", "cifar10", "cifar100", "fashion-mnist", "folder", "unlabelled", "fake")
FILE_SETS = ("imagenet", "folder", "unlabelled")  # read from folders of image files (images/folders.py)
NUM_CLASSES = {"imagenet": 1000, "cifar10": 10, "cifar100": 100, "fashion-mnist": 10, "fake": 10}
IMAGE_SIZE = {"imagenet": 224, "folder": 224, "unlabelled": 224, "cifar10": 32, "cifar100": 32,
              "fashion-mnist": 28, "fake": 32}
# Per-channel statistics of each training set (ImageNet's for folders and fake data).
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
MEAN_STD = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
            "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
            "fashion-mnist": ((0.2860,) * 3, (0.3530,) * 3)}
FASHION_MNIST_DEB = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
SMALL_IMAGE = 64  # at or below this side: no blur (model.py's SMALL_IMAGE: the small-image stems)


class DataError(Exception):
    """A dataset that cannot be found or fetched; the message says what to do."""


# ---------------------------------------------------------------- augmentations (MoCo v3) ---
# BYOL's asymmetric pair, as MoCo v3 uses it: (blur probability, solarize probability) per view.
VIEW_PROBS = ((1.0, 0.0), (0.1, 0.2))


class PILGaussianBlur:
    """MoCo v3's blur: PIL's ImageFilter.GaussianBlur with sigma uniform in [0.1, 2.0] (SimCLR).
    PIL blurs in integer arithmetic with box-filter passes: about 20x faster than a float
    tensor convolution on a 500x375 image, and what MoCo v3 runs."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        sigma = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * torch.rand(()).item()
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))


def two_view_transforms(dataset: str, image_size: int, crop_min: float = 0.08):
    """The asymmetric BYOL / MoCo v3 views: (transform of view 1, transform of view 2).

    Both: RandomResizedCrop(scale crop_min..1), ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8,
    grayscale p 0.2, flip. View 1: blur p 1.0. View 2: blur p 0.1, solarize p 0.2.
    Small images (<= 64 px) get no blur (a 3x3 blur of a 32 px image mostly erases it).
    Grayscale datasets are made 3-channel first, so every backbone sees RGB.
    """
    mean, std = MEAN_STD.get(dataset, IMAGENET_MEAN_STD)

    def view(blur_p: float, solarize_p: float):
        ops = [transforms.Grayscale(3)] if dataset == "fashion-mnist" else []
        ops += [transforms.RandomResizedCrop(image_size, scale=(crop_min, 1.0)),
                transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                transforms.RandomGrayscale(p=0.2)]
        if image_size > SMALL_IMAGE:
            ops.append(transforms.RandomApply([PILGaussianBlur()], p=blur_p))
        ops += [transforms.RandomSolarize(128, p=solarize_p),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(), transforms.Normalize(mean, std)]
        return transforms.Compose(ops)

    return tuple(view(blur_p, solarize_p) for blur_p, solarize_p in VIEW_PROBS)


class CropToUint8:
    """The worker side of the batched path: RandomResizedCrop(scale crop_min..1) and flip in
    PIL, then a uint8 (3, size, size) tensor. Colour, blur, solarize and normalisation run on
    the device (images/augment.py), where they are cheap; decoding and cropping stay in the workers
    because they shrink the image (a 500x375 JPEG becomes 224x224) before it crosses to the GPU."""

    def __init__(self, image_size: int, crop_min: float):
        self.crop = transforms.Compose([transforms.RandomResizedCrop(image_size, scale=(crop_min, 1.0)),
                                        transforms.RandomHorizontalFlip()])

    def __call__(self, img: Image.Image) -> torch.Tensor:
        array = np.array(self.crop(img.convert("RGB")), dtype=np.uint8)         # (size, size, 3)
        return torch.from_numpy(array).permute(2, 0, 1)                         # (3, size, size)


class TwoViews:
    """Apply two transforms to one image: the input of one SNCLR step."""

    def __init__(self, t1, t2):
        self.t1, self.t2 = t1, t2

    def __call__(self, img):
        return self.t1(img), self.t2(img)


def eval_transform(dataset: str, image_size: int, train: bool = False):
    """Linear-probe / kNN transforms: random crop + flip to train, center crop to test.

    Small images (<= 64 px, CIFAR's protocol): the shorter side resized to image_size (a no-op
    for images of that size), then a padded random crop or a center crop to a square: photos of
    any shape (a `folder` data set) give batches of one size."""
    mean, std = MEAN_STD.get(dataset, IMAGENET_MEAN_STD)
    ops = [transforms.Grayscale(3)] if dataset == "fashion-mnist" else []
    if image_size <= 64:
        ops += [transforms.Resize(image_size)]
        ops += [transforms.RandomCrop(image_size, padding=4), transforms.RandomHorizontalFlip()] \
            if train else [transforms.CenterCrop(image_size)]
    else:
        ops += [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()] if train \
            else [transforms.Resize(image_size * 256 // 224), transforms.CenterCrop(image_size)]
    return transforms.Compose(ops + [transforms.ToTensor(), transforms.Normalize(mean, std)])


# ---------------------------------------------------------------------------- datasets ---
def read_idx(path: str) -> np.ndarray:
    """An IDX file (the MNIST format; gzip or not) as a uint8 array."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # a truncated or corrupt .gz
        raise DataError(f"cannot read {path} ({e}); it is damaged: reinstall or replace it") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != 4 + 4 * ndim + int(np.prod(shape)):
        raise DataError(f"{path} holds {len(data) - 4 - 4 * ndim} bytes of data but its header "
                        f"promises {shape}: the file is truncated; reinstall or replace it")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                       "t10k-labels-idx1-ubyte")
DEFAULT_ROOT = "data"  # where a download goes when no --data-path is given (runtime/options.py's default too)


class FashionMNIST(torch.utils.data.Dataset):
    """Fashion-MNIST from its four IDX files, found in ROOT, ROOT/raw or ROOT/FashionMNIST/raw."""

    def __init__(self, root: str, train: bool, transform=None):
        prefix = "train" if train else "t10k"
        images_path = self._find(root, f"{prefix}-images-idx3-ubyte")
        labels_path = self._find(root, f"{prefix}-labels-idx1-ubyte")
        self.images = read_idx(images_path)  # (n, 28, 28)
        self.labels = read_idx(labels_path)  # (n,)
        check_pair(images_path, self.images, labels_path, self.labels)
        self.transform = transform
        self.targets = self.labels.tolist()

    @staticmethod
    def find(root: str, name: str):
        """The path of the IDX file `name` (.gz or not) under root, or None."""
        for folder in (root, os.path.join(root, "raw"), os.path.join(root, "FashionMNIST", "raw")):
            for candidate in (os.path.join(folder, name), os.path.join(folder, name + ".gz")):
                if os.path.isfile(candidate):
                    return candidate
        return None

    @staticmethod
    def _find(root: str, name: str) -> str:
        path = FashionMNIST.find(root, name)
        if path is None:
            raise DataError(f"no {name}[.gz] under {root!r} (nor raw/, FashionMNIST/raw/); install "
                            f"Debian's dataset-fashion-mnist (files in {FASHION_MNIST_DEB}) or put "
                            f"the four IDX files there")
        return path

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i])  # uint8 (n, rows, columns) -> mode "L"
        return (self.transform(img) if self.transform else img), int(self.labels[i])


def check_pair(images_path: str, images: np.ndarray, labels_path: str, labels: np.ndarray) -> None:
    """DataError naming the file unless the arrays are n grayscale images and their n labels in 0..9:
    a shorter labels file would silently train on fewer images, the rest fail deep in PIL or torch."""
    if images.ndim != 3:
        raise DataError(f"{images_path} holds an array of shape {images.shape}; an images file holds "
                        f"(images, rows, columns): reinstall or replace it")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{labels_path} holds labels of shape {labels.shape} for the {len(images)} images of "
                        f"{images_path}; the files must hold one label per image: reinstall or replace them")
    if len(labels) and labels.max() >= NUM_CLASSES["fashion-mnist"]:
        raise DataError(f"{labels_path} holds the label {labels.max()}; Fashion-MNIST's labels are 0 to 9: "
                        f"reinstall or replace it")


def debian_fashion_mnist() -> bool:
    """Whether Debian's dataset-fashion-mnist package has put the four IDX files in place."""
    return all(FashionMNIST.find(FASHION_MNIST_DEB, name) for name in FASHION_MNIST_FILES)


def fashion_mnist_root(root, download: bool) -> str:
    """The folder that holds Fashion-MNIST's four IDX files (its raw/ or FashionMNIST/raw/ too).

    root given (--data-path): root, else torchvision downloads the files into root/FashionMNIST/raw
    when download is True and a network exists. root None (or Debian's folder itself): Debian's
    folder (package dataset-fashion-mnist) when the files are there, else DEFAULT_ROOT, else the
    same download into DEFAULT_ROOT.
    An asked folder is never silently replaced by another. Otherwise one DataError line that
    gives both ways to get the data.
    """
    if root == FASHION_MNIST_DEB:  # runtime/options.py's default --data-path when the package is installed
        root = None
    for folder in ([root] if root else [FASHION_MNIST_DEB, DEFAULT_ROOT]):
        if all(FashionMNIST.find(folder, name) for name in FASHION_MNIST_FILES):
            return folder
    target, failure = root or DEFAULT_ROOT, ""
    if download:
        failure = download_fashion_mnist(target)
        if not failure:
            return target
    where = repr(target) if root else f"{FASHION_MNIST_DEB} nor under {target!r}"
    raise DataError(f"no Fashion-MNIST in {where} (its four IDX files, in it, raw/ or FashionMNIST/raw/)"
                    f"{failure}: install Debian's package dataset-fashion-mnist (read from {FASHION_MNIST_DEB} "
                    f"when no --data-path is given), or run train.py where a network exists to download it "
                    f"into {target}")


def download_fashion_mnist(root: str) -> str:
    """torchvision's download into root/FashionMNIST/raw: "" when done, else why not (as the end
    of a message); the folders it made are removed again if they stayed empty."""
    raw = os.path.join(root, "FashionMNIST", "raw")
    made = [d for d in (raw, os.path.dirname(raw), root) if not os.path.exists(d)]  # innermost first
    try:
        torchvision.datasets.FashionMNIST(root, train=True, download=True)  # all four files, both splits
        return ""
    except (OSError, RuntimeError, ValueError) as e:  # no network (URLError), a bad download, no room
        for folder in made:
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        reason = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        return f", and downloading it failed ({reason[-1]})"


def _cifar(name: str, root: str, train: bool, transform, download: bool):
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        return cls(root, train=train, transform=transform, download=False)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted"
        if not download:
            raise DataError(f"{name} not found under {root!r}")
    try:
        return cls(root, train=train, transform=transform, download=True)
    except (urllib.error.URLError, OSError) as e:
        raise DataError(f"{name} is not under {root!r} and downloading it failed ({e}); "
                        f"copy the extracted cifar-*-python folder there") from None


def build_dataset(name: str, root: str, train: bool, transform, download: bool = True,
                  fake_size: int = 512, image_size: int = 32):
    """The train (train=True) or test / val split of a dataset, with `transform` applied."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    if name == "fake":  # deterministic per index; a different offset keeps the splits apart
        return torchvision.datasets.FakeData(fake_size if train else max(fake_size // 4, 1),
                                 (3, image_size, image_size), 10, transform,
                                 random_offset=0 if train else 10**6)
    if name == "fashion-mnist":
        return FashionMNIST(fashion_mnist_root(root, download), train, transform)
    if name in ("cifar10", "cifar100"):
        return _cifar(name, root, train, transform, download)
    check_folders(name, root, train)
    if name == "unlabelled":
        return unlabelled_images(root, transform)
    folder = os.path.join(root, "train" if train else "val")
    images = ClassFolders(folder, transform)
    if not images.samples:
        raise DataError(f"{folder} holds no images in class sub-folders (files ending in "
                        f"{', '.join(IMAGE_EXTENSIONS)}, at any depth)")
    return images


def check_folders(name: str, root: str, train: bool = True) -> None:
    """The folders a file-backed data set reads exist (nothing listed yet): DATA_PATH for
    unlabelled (which has no test split), DATA_PATH/train or /val with the same classes else."""
    if name == "unlabelled":
        if not train:
            raise DataError("--dataset unlabelled has no test split: labels are needed for that; give a "
                            "labelled --dataset folder (DIR/train and DIR/val, one folder per class)")
        if os.path.isfile(root):
            raise DataError(f"--data-path {root} is a file; give the folder that holds the images")
        if not os.path.isdir(root):
            raise DataError(f"--data-path {root} does not exist; give the folder that holds the images")
        return
    folder = os.path.join(root, "train" if train else "val")
    if not os.path.isdir(folder):
        raise DataError(f"--dataset {name} expects ImageFolder directories {root}/train and "
                        f"{root}/val (one sub-folder per class); {folder!r} does not exist; "
                        f"--dataset unlabelled reads a folder of images without classes")
    check_same_classes(root)


def unlabelled_images(root: str, transform) -> ImageFiles:
    """Every image under root (images/folders.py), as the training set."""
    images = ImageFiles(root, transform)
    if not images.samples:
        raise DataError(f"{root} holds no image files (names ending in {', '.join(IMAGE_EXTENSIONS)}, "
                        f"at any depth; hidden files and folders are skipped)")
    return images


def check_same_classes(root: str) -> None:
    """DataError unless ROOT/train and ROOT/val (where both exist) hold the same class folders.
    ImageFolder numbers the classes of each split by their sorted names on its own: a class
    missing from val would shift the numbers of the others, and every kNN or probe figure would
    score val images against the wrong training class."""
    splits = [os.path.join(root, split) for split in ("train", "val")]
    if not all(os.path.isdir(split) for split in splits):
        return
    train, val = ({entry.name for entry in os.scandir(split) if entry.is_dir() and not entry.name.startswith(".")}
                  for split in splits)
    if train != val:
        missing = [f"{split} lacks {', '.join(sorted(names))}" for split, names in
                   ((splits[1], train - val), (splits[0], val - train)) if names]
        raise DataError(f"{splits[0]} and {splits[1]} must hold the same class folders (ImageFolder numbers "
                        f"the classes by their sorted names): {'; '.join(missing)}")


def _flat(error: BaseException) -> str:
    """An error message on one line (PIL and torchvision messages can span several)."""
    return " ".join(str(error).split())


# What PIL raises for a damaged image file, and for one whose pixel count exceeds twice
# Image.MAX_IMAGE_PIXELS (a decompression bomb: decoding it could exhaust the memory).
UNREADABLE = (OSError, SyntaxError, Image.DecompressionBombError)


class SkipUnreadable(torch.utils.data.Dataset):
    """A dataset whose unreadable images (a truncated JPEG, a file that is not an image, one
    over PIL's decompression-bomb limit) are replaced by the next readable one and counted,
    with a warning naming the file: ImageNet's training set has a few such files, and one
    should not end a 300-epoch run. strict=True
    (evaluation sets, or --strict-data) instead stops with a DataError naming the file.

    The count lives in shared memory, so increments made in DataLoader workers are seen here.
    """

    def __init__(self, dataset, strict: bool = False):
        self.dataset, self.strict = dataset, strict
        self.skipped = multiprocessing.get_context().Value("l", 0)

    def __len__(self):
        return len(self.dataset)

    def path(self, i: int) -> str:
        samples = getattr(self.dataset, "samples", None)
        return samples[i][0] if samples else f"item {i} of {type(self.dataset).__name__}"

    def check_any_readable(self) -> None:
        """A DataError naming the folder when no image can be read at all, found by reading up
        to the first readable one (one read, normally) without a warning per file."""
        for i in range(len(self.dataset)):
            try:
                self.dataset[i]
                return
            except UNREADABLE:
                continue
        where = getattr(self.dataset, "root", type(self.dataset).__name__)
        raise DataError(f"none of the {len(self.dataset)} image files under {where} can be read "
                        f"(truncated, or not images); check the folder")

    def __getitem__(self, i: int):
        for j in range(i, i + len(self.dataset)):
            j %= len(self.dataset)
            try:
                return self.dataset[j]
            except UNREADABLE as e:
                if self.strict:
                    raise DataError(f"cannot read image {self.path(j)}: {_flat(e)}") from None
                print(f"warning: skipping unreadable training image {self.path(j)}: {_flat(e)}",
                      file=sys.stderr)
                with self.skipped.get_lock():
                    self.skipped.value += 1
        raise DataError(f"no image of {type(self.dataset).__name__} can be read")


class EpochSampler(torch.utils.data.Sampler):
    """The DistributedSampler order of one epoch, optionally without its first `skip` items,
    so a run resumed mid-epoch sees exactly the batches it had not trained on yet."""

    def __init__(self, base: torch.utils.data.DistributedSampler):
        self.base, self.skip, self.epoch = base, 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.base.set_epoch(epoch)
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return len(self.base) - self.skip


def ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM, Ctrl-C (SIGINT) and SIGHUP: torchrun and a terminal
    signal the whole process group, and a dead worker would crash the main process before it
    can save (runtime/signals.py)."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


@contextlib.contextmanager
def closing_workers(loader):
    """`with closing_workers(loader) as batches:` iterates the loader once, and every way out of
    the block (the end, an error such as an unreadable image, a stop) ends its worker processes.

    Why: workers that ignore SIGTERM (ignore_stop_signals) outlive an error, and at exit Python's
    multiprocessing sends its children SIGTERM and then waits for them: the process would print
    its error line and never exit."""
    iterator = iter(loader)
    try:
        yield iterator
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)  # the DataLoader's own; no public call
        if shutdown is not None:                                 # (None with --workers 0)
            shutdown()
