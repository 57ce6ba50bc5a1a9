"""Subsets of a data set: a fixed random one (--subset, the kNN monitor's bank and queries) and
the semi-supervised label fractions of eval_linear.py (--train-percent: a class-balanced draw, or
SimCLR's 1 % / 10 % ImageNet split files)."""
import os

import torch

from images.datasets import DataError
from runtime.checkpoint import ConfigError


def fixed_subset(dataset, size: int, seed: int = 0, what: str = "--subset"):
    """A fixed random subset of `size` items (all of them when size is 0 or len(dataset))."""
    if size > len(dataset):
        raise DataError(f"{what} {size} is larger than the data set ({len(dataset)} images); "
                        f"use at most {len(dataset)}, or 0 for all")
    if size <= 0 or size == len(dataset):
        return dataset
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size]
    return torch.utils.data.Subset(dataset, idx.tolist())


def balanced_subset(labels: list, percent: float, seed: int) -> list:
    """percent % of each class (at least one image), drawn with a fixed seed; sorted indices."""
    g = torch.Generator().manual_seed(seed)
    by_class = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    chosen = []
    for idx in by_class.values():
        take = max(1, round(len(idx) * percent / 100))
        chosen += [idx[j] for j in torch.randperm(len(idx), generator=g)[:take].tolist()]
    return sorted(chosen)


def subset_from_list(dataset, list_file: str) -> list:
    """Indices of the ImageFolder samples whose file names appear in list_file (SimCLR's split files)."""
    if not os.path.isfile(list_file):
        raise ConfigError(f"--subset-list {list_file}: no such file")
    if not hasattr(dataset, "samples"):  # split files name image files: only ImageFolder datasets have them
        raise ConfigError(f"--subset-list needs an image-folder dataset (imagenet or folder); "
                          f"{type(dataset).__name__} has no image files: omit --subset-list to draw "
                          f"a class-balanced subset by --seed")
    with open(list_file) as f:
        names = {os.path.basename(line.strip()) for line in f if line.strip()}
    chosen = [i for i, (p, _) in enumerate(dataset.samples) if os.path.basename(p) in names]
    if not chosen:
        raise ConfigError(f"no training image of {dataset.root} is named in {list_file}")
    return chosen


def labels_of(dataset) -> list:
    return list(dataset.targets) if hasattr(dataset, "targets") else [y for _, y in dataset]
