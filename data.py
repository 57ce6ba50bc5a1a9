"""Datasets and augmentations: the two asymmetric views of BYOL / MoCo v3 and the eval transforms.

Datasets: cifar10, cifar100 (torchvision, downloaded when a network exists), imagenet and any
`folder` (ImageFolder over DATA_PATH/train and DATA_PATH/val), fashion-mnist (read straight from
the IDX files, .gz or not, so Debian's `dataset-fashion-mnist` package works offline) and `fake`
(torchvision FakeData, for smoke tests).
"""
import gzip
import itertools
import os
import signal
import urllib.error

import numpy as np
import torch
from PIL import Image
from torchvision import datasets, transforms

DATASETS = ("imagenet", "cifar10", "cifar100", "fashion-mnist", "folder", "fake")
NUM_CLASSES = {"imagenet": 1000, "cifar10": 10, "cifar100": 100, "fashion-mnist": 10, "fake": 10}
IMAGE_SIZE = {"imagenet": 224, "folder": 224, "cifar10": 32, "cifar100": 32, "fashion-mnist": 28,
              "fake": 32}
# Per-channel statistics of each training set (ImageNet's for folders and fake data).
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
MEAN_STD = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
            "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
            "fashion-mnist": ((0.2860,) * 3, (0.3530,) * 3)}
FASHION_MNIST_DEB = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist


class DataError(Exception):
    """A dataset that cannot be found or fetched; the message says what to do."""


# ---------------------------------------------------------------- augmentations (MoCo v3) ---
def two_view_transforms(dataset: str, image_size: int, crop_min: float = 0.08):
    """The asymmetric BYOL / MoCo v3 views: (transform of view 1, transform of view 2).

    Both: RandomResizedCrop(scale crop_min..1), ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8,
    grayscale p 0.2, flip. View 1: blur p 1.0. View 2: blur p 0.1, solarize p 0.2.
    Small images (<= 64 px) get no blur (a 3x3 blur of a 32 px image mostly erases it).
    Grayscale datasets are made 3-channel first, so every backbone sees RGB.
    """
    small = image_size <= 64
    mean, std = MEAN_STD.get(dataset, IMAGENET_MEAN_STD)

    def view(blur_p: float, solarize_p: float):
        ops = [transforms.Grayscale(3)] if dataset == "fashion-mnist" else []
        ops += [transforms.RandomResizedCrop(image_size, scale=(crop_min, 1.0)),
                transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                transforms.RandomGrayscale(p=0.2)]
        if not small:  # kernel ~10% of the side, sigma in [0.1, 2] as in SimCLR / MoCo v3
            kernel = 2 * (image_size // 20) + 1
            ops.append(transforms.RandomApply([transforms.GaussianBlur(kernel, (0.1, 2.0))], p=blur_p))
        ops += [transforms.RandomSolarize(128, p=solarize_p),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(), transforms.Normalize(mean, std)]
        return transforms.Compose(ops)

    return view(blur_p=1.0, solarize_p=0.0), view(blur_p=0.1, solarize_p=0.2)


class TwoViews:
    """Apply two transforms to one image: the input of one SNCLR step."""

    def __init__(self, t1, t2):
        self.t1, self.t2 = t1, t2

    def __call__(self, img):
        return self.t1(img), self.t2(img)


def eval_transform(dataset: str, image_size: int, train: bool = False):
    """Linear-probe / kNN transforms: random crop + flip to train, center crop (or none) to test."""
    mean, std = MEAN_STD.get(dataset, IMAGENET_MEAN_STD)
    ops = [transforms.Grayscale(3)] if dataset == "fashion-mnist" else []
    if image_size <= 64:
        ops += [transforms.RandomCrop(image_size, padding=4), transforms.RandomHorizontalFlip()] \
            if train else [transforms.Resize(image_size)]
    else:
        ops += [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()] if train \
            else [transforms.Resize(image_size * 256 // 224), transforms.CenterCrop(image_size)]
    return transforms.Compose(ops + [transforms.ToTensor(), transforms.Normalize(mean, std)])


# ---------------------------------------------------------------------------- datasets ---
def read_idx(path: str) -> np.ndarray:
    """An IDX file (the MNIST format; gzip or not) as a uint8 array."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\0\0" or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


class FashionMNIST(torch.utils.data.Dataset):
    """Fashion-MNIST from its four IDX files, found in ROOT, ROOT/raw or ROOT/FashionMNIST/raw."""

    def __init__(self, root: str, train: bool, transform=None):
        prefix = "train" if train else "t10k"
        self.images = read_idx(self._find(root, f"{prefix}-images-idx3-ubyte"))  # (n, 28, 28)
        self.labels = read_idx(self._find(root, f"{prefix}-labels-idx1-ubyte"))  # (n,)
        self.transform = transform
        self.targets = self.labels.tolist()

    @staticmethod
    def _find(root: str, name: str) -> str:
        for folder in (root, os.path.join(root, "raw"), os.path.join(root, "FashionMNIST", "raw")):
            for candidate in (os.path.join(folder, name), os.path.join(folder, name + ".gz")):
                if os.path.isfile(candidate):
                    return candidate
        raise DataError(f"no {name}[.gz] under {root!r} (nor raw/, FashionMNIST/raw/); install "
                        f"Debian's dataset-fashion-mnist (files in {FASHION_MNIST_DEB}) or put "
                        f"the four IDX files there")

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i])  # uint8 (28, 28) -> mode "L"
        return (self.transform(img) if self.transform else img), int(self.labels[i])


def _cifar(name: str, root: str, train: bool, transform, download: bool):
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
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
        return datasets.FakeData(fake_size if train else max(fake_size // 4, 1),
                                 (3, image_size, image_size), 10, transform,
                                 random_offset=0 if train else 10**6)
    if name == "fashion-mnist":
        return FashionMNIST(root, train, transform)
    if name in ("cifar10", "cifar100"):
        return _cifar(name, root, train, transform, download)
    folder = os.path.join(root, "train" if train else "val")
    if not os.path.isdir(folder):
        raise DataError(f"--dataset {name} expects ImageFolder directories {root}/train and "
                        f"{root}/val (one sub-folder per class); {folder!r} does not exist")
    return datasets.ImageFolder(folder, transform)


class EpochSampler(torch.utils.data.Sampler):
    """The DistributedSampler order of one epoch, optionally without its first `skip` items,
    so a run resumed mid-epoch sees exactly the batches it had not trained on yet."""

    def __init__(self, base: torch.utils.data.DistributedSampler):
        self.base, self.skip = base, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.base.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return len(self.base) - self.skip


def ignore_sigterm(_worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM: torchrun signals the whole process group, and a dead
    worker would crash the main process before it can save."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def fixed_subset(dataset, size: int, seed: int = 0):
    """A fixed random subset of `size` items (all of them when size <= 0 or >= len)."""
    if size <= 0 or size >= len(dataset):
        return dataset
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size]
    return torch.utils.data.Subset(dataset, idx.tolist())
