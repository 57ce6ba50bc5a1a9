"""Data sets read from folders of image files: `--dataset unlabelled` (every image under one
folder, no labels) and `folder` / `imagenet` (one sub-folder per class).

Which files count is decided by one walk of the tree, in sorted order, the same on every
machine that sees the same files:
- image files by extension, case-insensitive (IMAGE_EXTENSIONS), at any depth;
- hidden files and folders (a name starting with ".") skipped: .DS_Store, .git, .ipynb_checkpoints;
- symbolic links followed, to files and to folders, but every real folder is entered once: a link
  back into a folder already walked (a loop such as `a/up -> ..`) adds nothing, where
  torchvision's ImageFolder follows it again and again (`a/up/a/up/...`, until the path is too
  long) and trains on copies of the same images.
os.scandir reads each folder's entries with their types in one call, so 1.28 million files are
listed in seconds (tools/bench.py --listing measures it).
"""
import hashlib
import os

import torch
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(root: str, seen: set = None) -> list[str]:
    """Every image file under root, as paths relative to root, sorted; see the module docstring.
    seen: (device, inode) of real folders not to enter (shared by the walks of one data set)."""
    found, seen = [], set() if seen is None else seen
    pending = [""]
    while pending:
        relative = pending.pop()
        folder = os.path.join(root, relative)
        try:
            real = real_folder(folder)
        except OSError:  # a broken link to a folder, or one removed meanwhile
            continue
        if real in seen:  # a link back into a folder already walked
            continue
        seen.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:  # unreadable: nothing of it is listed
            continue
        folders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = os.path.join(relative, entry.name)
            try:
                if entry.is_dir():                       # follows links
                    folders.append(path)
                elif entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    found.append(path)
            except OSError:
                continue
        pending += reversed(folders)  # depth first, in name order: the same walk on every machine
    return sorted(found)


def real_folder(path: str) -> tuple:
    """The (device, inode) of the folder path is or links to."""
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


def list_digest(files: list[str]) -> str:
    """SHA-256 of a listing (its relative paths in order): two listings agree iff it does."""
    h = hashlib.sha256()
    for path in files:
        h.update(path.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


def load_rgb(path: str) -> Image.Image:
    """An image file as RGB (what torchvision's ImageFolder loads)."""
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


class ImageFiles(torch.utils.data.Dataset):
    """Every image under root (list_images), unlabelled: item i is (transform(image), -1), the
    label -1 that the queue stores for "unknown". `samples` names the files, as ImageFolder's."""

    def __init__(self, root: str, transform=None):
        self.root, self.transform = root, transform
        self.files = list_images(root)
        self.samples = [(os.path.join(root, f), -1) for f in self.files]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        image = load_rgb(path)
        return (self.transform(image) if self.transform else image), label


class ClassFolders(ImageFiles):
    """ImageFolder's layout (root/<class>/..., classes numbered by sorted name) with list_images'
    rules inside each class folder: any depth, hidden entries skipped, loops entered once."""

    def __init__(self, root: str, transform=None):
        self.root, self.transform = root, transform
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        # one walk: a link from a class folder back into root or another class adds nothing
        seen = {real_folder(path) for path in [root, *(os.path.join(root, c) for c in self.classes)]}
        self.files = []
        for c in self.classes:
            seen.discard(real_folder(os.path.join(root, c)))  # its own walk enters it
            self.files += [os.path.join(c, f) for f in list_images(os.path.join(root, c), seen)]
        index = {c: i for i, c in enumerate(self.classes)}
        self.samples = [(os.path.join(root, f), index[f.split(os.sep, 1)[0]]) for f in self.files]
        self.targets = [label for _, label in self.samples]
