"""How image pairs reach the training step: three paths behind one interface (--augment-device).

  workers     DataLoader workers run images/datasets.py's PIL transforms: the readable reference of the
              augmentations, and the default when training on the CPU.
  cuda / cpu  the same augmentations batched on that device (images/augment.py):
              - small in-memory data sets (fashion-mnist, cifar10/100, fake): the whole uint8
                training set lives on the device; no worker processes; each step gathers its
                images there and makes both views there;
              - imagenet / folder: workers only decode, crop each view to its final size and
                flip (data.CropToUint8) and hand over uint8 tensors, pinned and copied without
                blocking; colour, blur, solarize and normalisation run batched on the device.
                Decoding and cropping stay in the workers because they shrink the image (a
                500x375 JPEG to 224x224 uint8) before it crosses to the GPU; everything after
                the crop is per-pixel float work, which the GPU does for a whole batch at once.

Every path walks one epoch of the same seeded, rank-sharded order (data.EpochSampler), skips
the steps already trained on when an epoch is resumed, and yields ((x1, x2), y) on the training
device. Random numbers are tied to the data, not to the process: each image's worker-side
randomness is seeded by (seed, epoch, index) and each step's batched augmentation by (seed,
epoch, step, rank), so the number of workers does not change a run and a resumed epoch repeats
the interrupted one exactly.
"""
import copy
import hashlib
import math
import os

import numpy as np
import torch

from images import augment
from images.folders import list_digest
from runtime.distributed import agree, all_gather, on_main
from images.datasets import (FILE_SETS, IMAGENET_MEAN_STD, MEAN_STD, NUM_CLASSES, CropToUint8, DataError,
                             EpochSampler, FashionMNIST, SkipUnreadable, TwoViews, build_dataset, check_folders,
                             eval_transform, ignore_stop_signals, two_view_transforms)
from images.subsets import fixed_subset

RESIDENT = ("fashion-mnist", "cifar10", "cifar100", "fake")  # held on the device by the batched path
AUGMENT_DEVICES = ("auto", "workers", "cpu", "cuda")


def derived_seed(*parts) -> int:
    """A 64-bit seed from several integers (seed, epoch, step, ...), different for each tuple."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")


class SeededItems(torch.utils.data.Dataset):
    """dataset[(epoch, i)] = the base dataset's item i, its random transform seeded by
    (seed, epoch, i): the same augmentation whichever worker draws it, and on resume."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        with torch.random.fork_rng(devices=[]):  # with --workers 0 this runs in the main process:
            torch.manual_seed(derived_seed(self.seed, epoch, i))  # leave its generator as it was
            return self.dataset[i]


class EpochItems(torch.utils.data.Sampler):
    """The EpochSampler's indices as (epoch, index) keys for SeededItems."""

    def __init__(self, sampler: EpochSampler):
        self.sampler = sampler

    def __iter__(self):
        return ((self.sampler.epoch, i) for i in self.sampler)

    def __len__(self):
        return len(self.sampler)


def resident_arrays(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """A data set as one uint8 tensor (N, C, H, W) and its labels (N,): straight from the
    arrays where it has them (Fashion-MNIST, CIFAR), else image by image (FakeData)."""
    indices = None
    if isinstance(dataset, torch.utils.data.Subset):
        dataset, indices = dataset.dataset, torch.as_tensor(dataset.indices)
    if isinstance(dataset, SkipUnreadable):
        dataset = dataset.dataset
    if isinstance(dataset, FashionMNIST):
        # copies: the IDX arrays are read-only views of the decompressed file
        images = torch.from_numpy(dataset.images.copy())[:, None]   # (N, 1, 28, 28)
        labels = torch.from_numpy(dataset.labels.copy())
    elif hasattr(dataset, "data") and hasattr(dataset, "targets"):  # torchvision CIFAR: (N, H, W, 3)
        images, labels = torch.from_numpy(dataset.data).permute(0, 3, 1, 2), torch.as_tensor(dataset.targets)
    else:
        pairs = [dataset[i] for i in range(len(dataset))]  # PIL images (no transform) and labels
        images = torch.stack([torch.as_tensor(np.array(img.convert("RGB"))) for img, _ in pairs])  # (N, H, W, 3)
        images, labels = images.permute(0, 3, 1, 2), torch.as_tensor([y for _, y in pairs])
    if indices is not None:
        images, labels = images[indices], labels[indices]
    return images.contiguous(), labels.long()                       # (N, C, H, W) uint8, (N,)


class PILBatches:
    """The workers path: a DataLoader whose workers return normalised float views."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, device

    def __iter__(self):
        return iter(SideStreamCopies(self.loader, self.device))


class ResidentImages:
    """uint8 batches gathered on the device from a training set that lives there."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, sampler: EpochSampler, batch: int):
        self.images, self.labels, self.sampler, self.batch = images, labels, sampler, batch

    def __iter__(self):
        order = host_to_device(torch.tensor(list(self.sampler)), self.images.device)  # (n,) this rank's epoch
        for start in range(0, len(order) - self.batch + 1, self.batch):      # drop the last partial batch
            idx = order[start:start + self.batch]                              # (B,)
            yield self.images[idx], self.labels[idx]                           # (B, C, H, W), (B,)


class DeviceAugmented:
    """The batched path: uint8 batches (from ResidentImages or worker crops) augmented on the
    device into both views, each step's parameters seeded by (seed, epoch, step, rank)."""

    def __init__(self, source, sampler: EpochSampler, device, image_size: int, crop_min: float,
                 mean_std, seed: int, rank: int, crop: bool, batch: int, compiled: bool = False):
        self.source, self.sampler, self.device, self.size = source, sampler, device, image_size
        self.crop_min, self.mean_std, self.seed, self.rank, self.crop = crop_min, mean_std, seed, rank, crop
        self.batch, self.compiled = batch, compiled

    def __iter__(self):
        generator = torch.Generator(device=self.device)
        first = self.sampler.skip // self.batch  # the step this (possibly resumed) epoch starts at
        # one batch (B, C, H, W) uint8 that both views crop, or the workers' two crops of it;
        # worker batches come from pinned host memory, copied on a side stream
        for step, (images, y) in enumerate(SideStreamCopies(self.source, self.device), start=first):
            generator.manual_seed(derived_seed(self.seed, self.sampler.epoch, step, self.rank))
            views = augment.two_views(images, self.size, self.crop_min, *self.mean_std, generator,
                                      crop=self.crop, compiled=self.compiled)  # 2 x (B, 3, size, size)
            yield views, y


def host_to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on device without waiting for the GPU: pinned, then copied asynchronously
    (a copy from pageable memory blocks the host until the GPU has done everything before it)."""
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


class SideStreamCopies:
    """Iterate a source of batches (tensors, or nested tuples / lists of them) on device. On
    CUDA each host batch is copied on a side stream, so that the copy overlaps the kernels of
    the step still running on the compute stream instead of queueing behind them; the compute
    stream then waits for the copy (on the GPU, not the host), and record_stream tells the
    allocator that the compute stream uses the memory the side stream allocated. Tensors
    already on the device pass through; on the CPU this is a plain .to(device)."""

    def __init__(self, source, device: torch.device):
        self.source, self.device = source, device

    def __iter__(self):
        if self.device.type != "cuda":
            for batch in self.source:
                yield _map_tensors(batch, lambda t: t.to(self.device))
            return
        side = torch.cuda.Stream(self.device)
        for batch in self.source:
            # no side.wait_stream(compute): the side stream allocates from its own pool (the
            # caching allocator keeps blocks per stream), so the copy waits for nothing
            compute = torch.cuda.current_stream(self.device)
            with torch.cuda.stream(side):
                batch = _map_tensors(batch, lambda t: t.to(self.device, non_blocking=True))
            compute.wait_stream(side)
            yield _map_tensors(batch, lambda t: _used_on(t, compute))


def _used_on(t: torch.Tensor, stream) -> torch.Tensor:
    t.record_stream(stream)
    return t


def _map_tensors(batch, fn):
    """fn applied to every tensor of a nested tuple / list batch, the structure kept."""
    if torch.is_tensor(batch):
        return fn(batch)
    return type(batch)(_map_tensors(b, fn) for b in batch)


def check_fits(images: torch.Tensor, device: torch.device) -> None:
    """The resident training set must leave the device room for the model: at most half its
    free memory (checked before anything is written)."""
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    if images.numel() > free // 2:
        raise DataError(f"the training set needs {images.numel() / 2**30:.1f} GiB as uint8, more than half of the "
                        f"{free / 2**30:.1f} GiB free on {device}; use --augment-device workers")


SHM = "/dev/shm"   # where DataLoader workers put the batches they hand over (torch's file_descriptor sharing)
MAX_PREFETCH = 2   # torch's DataLoader default prefetch_factor: batches queued per worker


def worker_batch_bytes(batch: int, image_size: int, batched: bool) -> int:
    """Shared memory of one worker batch: two views of `batch` 3-channel images, uint8 crops for
    the batched path, float32 for the PIL path, and the labels (int64). ImageNet, 512 crop
    pairs at 224 px: 154 MB."""
    return batch * (2 * 3 * image_size ** 2 * (1 if batched else 4) + 8)


def shm_message(free: int, need: int, what: str) -> str:
    return (f"{SHM} has {free / 2**30:.2f} GiB free but {what} need {need / 2**30:.2f} GiB; give the "
            f"container more shared memory (docker run --shm-size={math.ceil(need / 2**30) + 1}g, or "
            f"--ipc=host) or use fewer --workers")


def shm_prefetch(batch_bytes: int, workers: int, local_ranks: int) -> int:
    """The DataLoader's prefetch_factor: MAX_PREFETCH, or fewer so that the batches of all ranks
    on this node fit in half of /dev/shm's free space; the other half is for the batches the
    main processes hold while they receive and pin them. A DataError (one line naming /dev/shm,
    docker's --shm-size and --ipc=host) when not even one batch per worker fits: past that the
    workers die with "Bus error" mid-epoch. No /dev/shm (not Linux): MAX_PREFETCH."""
    try:
        st = os.statvfs(SHM)
    except OSError:
        return MAX_PREFETCH
    free = st.f_bavail * st.f_frsize
    in_flight = local_ranks * workers * batch_bytes   # one batch queued per worker, every local rank
    fits = free // 2 // in_flight
    if fits < 1:
        raise DataError(shm_message(free, 2 * in_flight, f"{local_ranks} rank(s) x {workers} workers x a batch "
                                                         f"of {batch_bytes / 2**20:.0f} MiB (twice, in flight)"))
    return min(MAX_PREFETCH, fits)


def build_train_loader(args, env, path: str) -> "TrainLoader":
    """The training batches of a run: its dataset, subset, sampler and augmentation path.

    path: "workers", "cpu" or "cuda" (options.augment_path resolves --augment-device auto, and
    options.check_args checks that a batched path runs on the training device).
    """
    batch, dev = args.batch_size // env.world_size, env.device
    batched, resident = path != "workers", args.dataset in RESIDENT
    if not batched:
        transform = TwoViews(*two_view_transforms(args.dataset, args.image_size, args.crop_min))
    else:
        transform = None if resident else TwoViews(*[CropToUint8(args.image_size, args.crop_min)] * 2)
    skipping = SkipUnreadable(build_dataset(args.dataset, args.data_path, True, transform, False, args.fake_size,
                                            args.image_size), strict=args.strict_data)
    digest = same_listing_on_every_rank(skipping.dataset, args.data_path, env)
    skipping.check_any_readable()
    train_set = fixed_subset(skipping, args.subset, args.seed)
    if len(train_set) < args.batch_size:
        raise DataError(f"{len(train_set)} training images are fewer than one --batch-size {args.batch_size} "
                        f"({args.data_path}): use a smaller --batch-size or more images")
    sampler = EpochSampler(torch.utils.data.DistributedSampler(train_set, env.world_size, env.rank, shuffle=True,
                                                               seed=args.seed, drop_last=True))
    mean_std = MEAN_STD.get(args.dataset, IMAGENET_MEAN_STD)
    # --compile compiles the augmentation too where it runs on a GPU (on a CPU compiling costs
    # more than the batched ops it saves)
    compiled = getattr(args, "compile", False) and dev.type == "cuda"
    if batched and resident:
        images, labels = resident_arrays(train_set)
        error = None
        try:
            check_fits(images, dev)  # each rank's own GPU: all ranks must agree to go on
        except DataError as e:
            error = e
        agree(error, dev)
        source = ResidentImages(images.to(dev), labels.to(dev), sampler, batch)
        views = DeviceAugmented(source, sampler, dev, args.image_size, args.crop_min, mean_std, args.seed,
                                env.rank, crop=True, batch=batch, compiled=compiled)
        return TrainLoader(views, sampler, batch, digest=digest)
    prefetch, error = None, None
    if args.workers > 0:  # every rank on the node shares /dev/shm; all ranks must agree to go on
        try:
            prefetch = shm_prefetch(worker_batch_bytes(batch, args.image_size, batched), args.workers,
                                    int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size)))
        except DataError as e:
            error = e
        agree(error, dev)
    loader = torch.utils.data.DataLoader(SeededItems(train_set, args.seed), batch, sampler=EpochItems(sampler),
                                         num_workers=args.workers, pin_memory=dev.type == "cuda", drop_last=True,
                                         worker_init_fn=ignore_stop_signals, persistent_workers=args.workers > 0,
                                         prefetch_factor=prefetch)
    views = DeviceAugmented(loader, sampler, dev, args.image_size, args.crop_min, mean_std, args.seed, env.rank,
                            crop=False, batch=batch, compiled=compiled) if batched else PILBatches(loader, dev)
    return TrainLoader(views, sampler, batch, skipping, loader, digest)


def same_listing_on_every_rank(dataset, path: str, env):
    """The digest of a file-backed data set's listing (images/folders.py), the same on every
    rank or one error line: ranks that see different files would train on different images
    under the same indices. None for the other data sets."""
    files = getattr(dataset, "files", None)
    if files is None:
        return None
    digest = list_digest(files)
    mine = torch.tensor([len(files), int(digest[:15], 16)], device=env.device)
    every = all_gather(mine[None]).view(-1, 2).tolist()                  # (ranks, 2)
    if any(row != every[0] for row in every):
        counts = ", ".join(f"rank {r}: {n} files" for r, (n, _) in enumerate(every))
        agree(DataError(f"the ranks list different files under {path} ({counts}); every node must see the "
                        f"same folder: a shared file system, or the same copy on each") if env.main else None,
              env.device)
    return digest


def prepare_dataset(args, env) -> None:
    """Rank 0 downloads first (when the dataset can be, and a network exists), or checks that
    the folders of a file-backed set exist (their files are listed once, by build_train_loader);
    every rank learns whether that failed (this is also the barrier after the download)."""
    if args.dataset in FILE_SETS:
        on_main(env, check_folders, args.dataset, args.data_path)
    else:
        on_main(env, build_dataset, args.dataset, args.data_path, True, None, True, args.fake_size,
                args.image_size)


def build_knn_sets(args, listed=None):
    """The kNN monitor's bank (train split) and queries (test split), eval transform, fixed
    subsets of --knn-train-size / --knn-test-size; and the number of classes. An unreadable
    bank image is skipped (unless --strict-data), an unreadable test image is an error naming it.
    --monitor-path DIR: a labelled folder (DIR/train, DIR/val) instead of the training data;
    (None, 0) for training data without labels and no such folder: no kNN monitor. listed: the
    training set as build_train_loader read it; its file listing is reused for the bank."""
    name, root = ("folder", args.monitor_path) if args.monitor_path else (args.dataset, args.data_path)
    if name == "unlabelled":
        return None, 0
    t = eval_transform(name, args.image_size)
    if hasattr(listed, "files") and not args.monitor_path:  # the training files, listed once
        bank_set = copy.copy(listed)
        bank_set.transform = t
    else:
        bank_set = build_dataset(name, root, True, t, False, args.fake_size, args.image_size)
    bank = SkipUnreadable(bank_set, strict=args.strict_data)
    test = SkipUnreadable(build_dataset(name, root, False, t, False, args.fake_size, args.image_size), strict=True)
    num_classes = NUM_CLASSES.get(name) or len(bank.dataset.classes)
    return (fixed_subset(bank, args.knn_train_size, args.seed, "--knn-train-size"),
            fixed_subset(test, args.knn_test_size, args.seed, "--knn-test-size")), num_classes


def worker_death(error: BaseException):
    """A DataError line for torch's word that a DataLoader worker died, else None. torch says so
    where the loop waits for a batch, or anywhere from its SIGCHLD handler: "DataLoader worker
    (pid N) is killed by signal: Killed." (the kernel's OOM killer sends SIGKILL), "... Bus
    error. ..." (shared memory full), "DataLoader worker (pid(s) N) exited unexpectedly"."""
    text = str(error)
    if not isinstance(error, RuntimeError) or "DataLoader worker" not in text:
        return None
    if "Bus error" in text or "shared memory" in text:
        return DataError(f"a DataLoader worker ran out of shared memory ({SHM}); give the container more "
                         f"(docker run --shm-size=16g or more, or --ipc=host) or use fewer --workers")
    how = text.split(" is ", 1)[1].split(".")[0] if " is killed by signal" in text else "exited unexpectedly"
    return DataError(f"a DataLoader worker died ({how}), most likely the machine ran out of memory and the "
                     f"kernel's OOM killer stopped it: lower --workers or --batch-size")


class TrainLoader:
    """What train.py iterates: set_epoch(epoch, start_step), then ((x1, x2), y) on the device for
    steps start_step .. steps - 1. `steps` is the number of steps of a whole epoch."""

    def __init__(self, batches, sampler: EpochSampler, batch: int, skipping: SkipUnreadable = None,
                 dataloader: torch.utils.data.DataLoader = None, digest: str = None):
        self.batches, self.sampler, self.batch, self.skipping = batches, sampler, batch, skipping
        self.dataloader, self.digest = dataloader, digest  # digest: of the file listing, or None
        self.dataset = skipping.dataset if skipping is not None else None  # the images as read
        self.images = len(sampler.base.dataset)
        self.steps = len(sampler.base) // batch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.sampler.set_epoch(epoch, skip=start_step * self.batch)

    def skipped(self) -> int:
        """Unreadable training images replaced so far (in this process and its workers)."""
        return self.skipping.skipped.value if self.skipping is not None else 0

    def __iter__(self):
        try:
            yield from self.batches
        except RuntimeError as e:
            raise worker_death(e) or e from None

    def close(self) -> None:
        """End the persistent DataLoader workers now. They ignore SIGTERM (data.ignore_stop_signals),
        and Python's exit handler for child processes sends SIGTERM and then waits: workers still
        running at exit would make it wait for ever."""
        iterator = getattr(self.dataloader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()  # the DataLoader's own shutdown; no public call does it
            self.dataloader._iterator = None
