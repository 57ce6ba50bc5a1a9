"""What SNCLR costs on top of its MoCo v3 / InfoNCE baseline, and what feeds it, measured in one process.

The step benchmark (default): one model, the paper's settings (queue 65536, K = 30, dim 256,
MLP 4096). The full training step (train.py's train_step) is timed alternately with K = 30 and
with K = 0, which is the baseline with the same weights and queue; the median over repeats gives
the ratio. The SNCLR-only parts (neighbor search for both views, positiveness, the larger loss)
are timed alone and reported as shares of the SNCLR step, and the search is timed for queue sizes
from 4k to 1M entries and several K. --channels-last and --compile time the step as train.py runs
it on a GPU (torch.channels_last for ResNets; torch.compile of the two backbones).

The data benchmark (--data) measures what feeds the step, on synthetic 500x375 JPEGs written to a
temporary ImageFolder: (a) the DataLoader workers' transform alone, in this one process (so per
worker), JPEG decode included: the PIL reference path against the crop-only path of the batched
augmentation; (b) images/augment.py's batched two views on --device at 224 px and at 32 px; (c) train.py's
own loop (train_one_epoch) end to end, loader + step, against the same loop fed one fixed batch.
Its last line of stdout is one JSON object (also written to OUT/bench_data_<device>.json).

    python -m tools.bench --arch resnet18 --device cpu                    # CPU figures in docs/results.md
    python -m tools.bench --arch resnet50 --device cuda --batch-size 256 --image-size 224 --channels-last --compile
    python -m tools.bench --data --device cuda --arch resnet50 --batch-size 256 --image-size 224 --compile \\
        --data-workers 15 --data-images 3000 --data-steps 80
    bash tools/bench_gpu.sh                                               # all GPU figures, under 8 minutes
"""
import contextlib
import itertools
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torchvision import datasets

from images import augment
from runtime import cli
from images import datasets as image_sets
from images.folders import list_images
from runtime import distributed
from runtime import options
from runtime import run_control
import train
from runtime.checkpoint import ConfigError, check_writable_folder, write_json
from runtime.cli import nonneg_int, positive_int
from images.loaders import AUGMENT_DEVICES
from loss import info_nce, snclr_loss
from memory_queue import MemoryQueue
from model import ARCHS, RESNETS, STEMS, SNCLR
from tools.op_count import count_ops
from train import train_step

JPEG_SIZE, JPEG_QUALITY = (500, 375), 90  # a typical ImageNet photo (width, height), typical quality
LOADER_SIZE = 224                         # (a) times the ImageNet recipe's crop size
CROP_MIN = options.RECIPES["resnet"]["crop_min"]
CLASSES = 10                              # class folders of the synthetic ImageFolder
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")  # torch.compile's modes used here


def get_args_parser():
    p = cli.Parser("python -m tools.bench", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--arch", default="resnet18", choices=ARCHS)
    a("--device", default="auto", choices=("auto", "cuda", "cpu"))
    a("--batch-size", type=positive_int, default=64, help="images per step (one process); also the "
      "batch of --data's augmentation timing")
    a("--image-size", type=positive_int, default=32, help="the step's images (and --data's end-to-end run)")
    a("-K", "--num-neighbors", type=positive_int, default=30, help="the paper's K")
    a("--queue-size", type=positive_int, default=65536, help="queue entries (>= 65536: paper scale)")
    a("--dim", type=positive_int, default=256)
    a("--mlp-dim", type=positive_int, default=4096)
    a("--repeats", type=positive_int, default=5, help="timed calls per figure, median taken")
    a("--warmup", type=nonneg_int, default=None, help="untimed steps first, 0 for none (step benchmark: "
      "pairs of steps; --data: steps of the fixed-batch loop); default 1, or 5 with --compile so that "
      "compilation stays out of the timing")
    a("--scaling-queues", type=positive_int, nargs="+", default=[4096, 16384, 65536, 262144, 1048576])
    a("--scaling-k", type=positive_int, nargs="+", default=[1, 5, 30, 100])
    a("--channels-last", action="store_true", help="step benchmark, ResNets: model and inputs in "
      "torch.channels_last, as train.py runs ResNets on CUDA")
    a("--compile", action="store_true", help="torch.compile the two backbones, as train.py --compile "
      "(with --data it is passed to train.py)")
    a("--compile-mode", default="default", choices=COMPILE_MODES, help="step benchmark with --compile: "
      "torch.compile's mode; reduce-overhead replays the backbones as CUDA graphs (static shapes: the "
      "resident data path), each step begun with torch.compiler.cudagraph_mark_step_begin()")
    a("--stem", default="auto", choices=STEMS, help="the model's stem, as train.py --stem (the Fashion-MNIST "
      "demo recipe uses imagenet)")
    a("--listing", type=nonneg_int, default=0, metavar="N", help="instead of timing a step: list a folder "
      "of N empty .jpg files (100 sub-folders, in a temporary folder) as --dataset unlabelled and "
      "folder do (images/folders.py); writes OUT/bench_listing.json")
    a("--count-ops", action="store_true", help="instead of timing: count the aten operators (and bytes they "
      "touch) of one step on --device: the two-view augmentation of a uint8 batch, train_step with the "
      "recipe's optimiser, and the optimiser alone; print them and write OUT/bench_ops_<arch>_<size>.json")
    a("--out", default=os.path.join("runs", "bench"), help="writes OUT/bench_<device>_<arch>[_channels_last]"
      "[_compile].json, or OUT/bench_data_<device>.json with --data; runs/ is git-ignored: pass --out "
      "results to replace the committed figures in results/ deliberately")
    d = p.add_argument_group("data benchmark")
    d.add_argument("--data", action="store_true", help="instead of the step: (a) the workers' transform alone, "
                   "old PIL path and new crop-only path, in pairs/s per worker; (b) images/augment.py's batched "
                   "views, ms per batch; (c) train.py's loop end to end against the step alone, img/s")
    d.add_argument("--data-images", type=positive_int, default=512, help="distinct synthetic JPEGs written")
    d.add_argument("--data-steps", type=positive_int, default=20, help="(c): steps of each timed loop; the "
                   "training folder links the JPEGs as often as that needs")
    d.add_argument("--data-workers", type=nonneg_int, default=min(8, os.cpu_count() or 1),
                   help="(c): DataLoader workers (train.py --workers); also the processes writing the JPEGs")
    d.add_argument("--loader-images", type=positive_int, default=200, help="(a): image pairs timed per "
                   "transform (cycling over the JPEGs if there are fewer)")
    d.add_argument("--augment-device", default="auto", choices=AUGMENT_DEVICES, help="(c): train.py "
                   "--augment-device (auto: batched on CUDA, PIL workers on the CPU)")
    return p


def check_args(p, args) -> None:
    """Option combinations the parser cannot check alone: one `error:` line, nothing written."""
    if args.num_neighbors > args.queue_size or args.batch_size > args.queue_size:
        p.error(f"-K {args.num_neighbors} and --batch-size {args.batch_size} must be at most --queue-size "
                f"{args.queue_size}")
    if max(args.scaling_k) > min(args.scaling_queues):
        p.error(f"--scaling-k {max(args.scaling_k)} exceeds the smallest --scaling-queues {min(args.scaling_queues)}")
    if args.channels_last and args.arch not in RESNETS:
        p.error(f"--channels-last applies to ResNets ({', '.join(RESNETS)}), not {args.arch}")
    if args.channels_last and args.data:
        p.error("--channels-last is the step benchmark's; --data runs train.py's loop, which uses channels_last "
                "for ResNets on CUDA by itself")
    if args.compile_mode != "default" and not args.compile:
        p.error(f"--compile-mode {args.compile_mode} needs --compile")
    if args.compile_mode != "default" and args.data:
        p.error("--compile-mode is the step benchmark's; --data runs train.py's loop, which compiles in its "
                "default mode")
    if args.count_ops and (args.data or args.compile):
        p.error("--count-ops counts eager operators of the step; it cannot be combined with --data or --compile")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} is a file, not a folder")
    try:  # before the benchmark's minutes: a folder that cannot be written would lose its figures
        check_writable_folder(args.out, "--out")
    except ConfigError as e:
        p.error(str(e))
    if args.warmup is None:
        args.warmup = 5 if args.compile else 1


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"


def timed(fn, device, repeats: int) -> float:
    """Median seconds of fn() over repeats, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ------------------------------------------------------------------------ the step ---
def as_train_runs(model, x1, x2, args, device):
    """--channels-last and --compile applied as run_control.setup and train.py's loop apply them; cuDNN picks its
    fastest kernels for the fixed shapes on CUDA, as in train.py."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x1, x2 = (x.contiguous(memory_format=torch.channels_last) for x in (x1, x2))
    if args.compile:  # in place, as train.py does
        model.backbone.compile(mode=args.compile_mode)
        model.momentum_backbone.compile(mode=args.compile_mode)
    return model, x1, x2


def recipe_optimizer(model, arch: str):
    """The optimiser train.py builds for arch with its recipe's defaults: LARS for ResNets, AdamW
    for ViTs (SGD, which this benchmark timed before, costs ~1/8 of LARS's operators)."""
    return train.build_optimizer(model, options.parse_args(["--arch", arch]))


def step_times(model, x1, x2, args, device):
    """Alternate SNCLR (K) and baseline (K = 0) steps; median seconds and peak memory of each,
    after --warmup untimed pairs (with --compile these compile both graphs)."""
    opt = recipe_optimizer(model, args.arch)
    graphs = args.compile and args.compile_mode == "reduce-overhead"
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    amp = lambda: torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")  # noqa: E731
    times, peak = {"snclr": [], "baseline": []}, {}
    for i in range(2 * (args.repeats + args.warmup)):
        name = "snclr" if i % 2 == 0 else "baseline"
        model.num_neighbors = args.num_neighbors if name == "snclr" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        if graphs:  # a new step: the CUDA graphs may overwrite the last step's outputs
            torch.compiler.cudagraph_mark_step_begin()
        train_step(model, model, x1, x2, opt, scaler, 0.99, autocast=amp())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak[name] = torch.cuda.max_memory_allocated(device) / 2**20
        if i >= 2 * args.warmup:
            times[name].append(time.perf_counter() - t0)
    model.num_neighbors = args.num_neighbors
    return {k: statistics.median(v) for k, v in times.items()}, peak


def part_times(model, args, device):
    """Seconds of each SNCLR-only part for one step (both views), timed on its own."""
    B, K, D = args.batch_size, args.num_neighbors, args.dim
    keys = torch.randn(B, D, device=device)
    y = torch.randn(B, D, device=device, requires_grad=True)
    z = torch.randn(B, D, device=device, requires_grad=True)
    nb = model.queue.features[model.queue.nearest_indices(keys, K)]               # (B, K, D)
    w = model.positiveness(y, nb).detach()

    def positiveness():
        model.positiveness(y, nb).sum().backward()

    def extra_loss():  # the SNCLR loss minus the InfoNCE it replaces, forward and backward
        snclr_loss(z, keys, nb, w, 0.2).backward()

    def base_loss():
        info_nce(z, keys, 0.2).backward()

    search = timed(lambda: model.queue.nearest_indices(keys, K), device, args.repeats)
    return {"neighbor_search": 2 * search, "positiveness": 2 * timed(positiveness, device, args.repeats),
            "loss_extra": 2 * max(timed(extra_loss, device, args.repeats)
                                  - timed(base_loss, device, args.repeats), 0.0)}


def search_scaling(args, device):
    """Median ms of one view's neighbor search (B queries) for each queue size and K."""
    rows = []
    for size in args.scaling_queues:
        queue = MemoryQueue(size, args.dim).to(device)
        queue.enqueue(torch.randn(size, args.dim, device=device))
        q = torch.randn(args.batch_size, args.dim, device=device)
        for k in args.scaling_k:
            ms = 1000 * timed(lambda: queue.nearest_indices(q, k), device, args.repeats)
            rows.append({"queue": size, "K": k, "ms": ms})
    return rows


def step_benchmark(args, env) -> tuple[dict, list[str]]:
    """The step benchmark's result and its lines of text."""
    device = env.device
    torch.manual_seed(0)
    try:
        model = SNCLR(args.arch, args.image_size, args.dim, args.mlp_dim, 0.2, args.num_neighbors,
                      args.queue_size, stem=args.stem).to(device)
    except ValueError as e:  # e.g. a ViT patch size that does not divide the image size
        raise ConfigError(str(e)) from None
    model.queue.enqueue(torch.randn(args.queue_size, args.dim, device=device))   # a full queue
    x1 = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    model, x1, x2 = as_train_runs(model, x1, torch.randn_like(x1), args, device)
    steps, peak = step_times(model, x1, x2, args, device)
    parts = part_times(model, args, device)
    result = {"device": device_name(device), "torch": torch.__version__, "args": vars(args),
              "cudnn_benchmark": device.type == "cuda", "step_s": steps, "ratio": steps["snclr"] / steps["baseline"],
              "images_per_s": {k: args.batch_size / v for k, v in steps.items()},
              "parts_share_of_snclr_step": {k: v / steps["snclr"] for k, v in parts.items()},
              "peak_memory_mib": peak or {"process_max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
              "search_scaling": search_scaling(args, device)}
    variant = " + ".join(name for name, on in (("channels_last", args.channels_last), ("compile", args.compile)) if on)
    lines = [f"{args.arch} on {result['device']}, batch {args.batch_size}, {args.image_size} px, "
             f"queue {args.queue_size}, K {args.num_neighbors}{', ' + variant if variant else ''}",
             f"step: SNCLR {1000 * steps['snclr']:.1f} ms ({result['images_per_s']['snclr']:.1f} img/s), baseline "
             f"{1000 * steps['baseline']:.1f} ms ({result['images_per_s']['baseline']:.1f} img/s), "
             f"ratio {result['ratio']:.3f}",
             "parts (share of SNCLR step): " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in
                                                         result["parts_share_of_snclr_step"].items()),
             f"peak memory (MiB): {result['peak_memory_mib']}",
             "search ms by queue size (rows) and K (columns):"]
    lines += [f"  {size:>8}: " + "  ".join(f"K={r['K']}: {r['ms']:.2f}" for r in result["search_scaling"]
                                           if r["queue"] == size) for size in args.scaling_queues]
    return result, lines


def ops_benchmark(args, env) -> tuple[dict, list[str]]:
    """--count-ops: aten operators (non-view) and the bytes they touch for one step, eager, on
    --device: the batched two views of a one-channel uint8 batch (crop=True, the resident path),
    train_step (K, the recipe's optimiser, a full queue) and that optimiser's step alone; the
    second call of each is counted (the first creates the optimiser state)."""
    device, B, S = env.device, args.batch_size, args.image_size
    torch.manual_seed(0)
    model = SNCLR(args.arch, S, args.dim, args.mlp_dim, 0.2, args.num_neighbors, args.queue_size,
                  stem=args.stem).to(device)
    model.queue.enqueue(torch.randn(args.queue_size, args.dim, device=device))
    opt, scaler = recipe_optimizer(model, args.arch), torch.amp.GradScaler(device.type, enabled=False)
    images = torch.randint(0, 256, (B, 1, S, S), dtype=torch.uint8, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    views = lambda: augment.two_views(images, S, CROP_MIN, *image_sets.IMAGENET_MEAN_STD, g)  # noqa: E731
    x1, x2 = views()
    step = lambda: train_step(model, model, x1, x2, opt, scaler, 0.99)  # noqa: E731
    counted = {}
    for name, fn in (("augment", views), ("step", step), ("optimizer", opt.step)):
        fn()
        c = count_ops(fn)
        counted[name] = {"ops": c.ops, "mib_per_image": c.bytes / B / 2**20}
    optimizer = type(opt).__name__
    result = {"device": device_name(device), "torch": torch.__version__, "args": vars(args), "optimizer": optimizer,
              **counted, "total_ops": counted["augment"]["ops"] + counted["step"]["ops"]}
    lines = [f"aten operators (non-view) per step, eager, {args.arch} (stem {args.stem}), {S} px, batch {B}, "
             f"K {args.num_neighbors}, dim {args.dim}, mlp {args.mlp_dim}, queue {args.queue_size}, {optimizer}",
             f"  two-view augmentation   {counted['augment']['ops']:6d} ops  "
             f"{counted['augment']['mib_per_image']:8.2f} MiB per image",
             f"  train_step              {counted['step']['ops']:6d} ops  {counted['step']['mib_per_image']:8.2f} "
             f"MiB per image",
             f"    of which {optimizer:11s} {counted['optimizer']['ops']:6d} ops",
             f"  step total              {result['total_ops']:6d} ops"]
    return result, lines


# ------------------------------------------------------------------------ the data ---
def synthetic_jpeg(path: str, seed: int) -> int:
    """Write one 500x375 JPEG of smooth random colour at three scales plus fine texture (about
    70 KB at quality 90, near an ImageNet photo's size, so decoding costs what it does there);
    returns its size in bytes."""
    rng = np.random.default_rng(seed)
    (w, h) = JPEG_SIZE
    x = rng.integers(-20, 21, (h, w, 3), dtype=np.int16) + 128                  # fine texture
    for cells, shift in ((3, 0), (12, 1), (48, 2)):                              # coarse to fine
        small = rng.integers(0, 256, (cells * h // w + 1, cells, 3), dtype=np.uint8)
        up = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.int16)
        x += (up - 128) >> shift
    Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).save(path, quality=JPEG_QUALITY)
    return os.path.getsize(path)


def write_jpegs(root: str, count: int, processes: int) -> list[str]:
    """count synthetic JPEGs as an ImageFolder root/<class>/<i>.jpg; returns their paths, in order.
    Several processes write them when allowed: thousands take seconds instead of a minute."""
    paths = [os.path.join(root, f"c{i % CLASSES}", f"{i:06d}.jpg") for i in range(count)]
    for folder in {os.path.dirname(path) for path in paths}:
        os.makedirs(folder)
    jobs = [(path, i) for i, path in enumerate(paths)]
    if processes > 1 and count > 64:  # below that, starting the processes costs more than it saves
        with multiprocessing.get_context("fork").Pool(processes) as pool:  # no CUDA in the children
            pool.starmap(synthetic_jpeg, jobs, chunksize=16)
    else:
        list(itertools.starmap(synthetic_jpeg, jobs))
    return paths


def link_folder(paths: list[str], root: str, count: int) -> None:
    """An ImageFolder root/train with count entries cycling over paths (hard links: no copies, so
    an end-to-end epoch of any length costs no extra writing), and root/val with one per class."""
    def link(src, dst):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:  # a file system without hard links
            os.symlink(src, dst)

    for j in range(count):
        src = paths[j % len(paths)]
        link(src, os.path.join(root, "train", os.path.basename(os.path.dirname(src)), f"{j:07d}.jpg"))
    for src in paths[:CLASSES]:
        link(src, os.path.join(root, "val", os.path.basename(os.path.dirname(src)), os.path.basename(src)))


def loader_rates(root: str, count: int) -> dict:
    """(a) Image pairs per second of each worker-side transform, decode included, in this process
    with one thread (as in a DataLoader worker); the two alternate in chunks so that a change in
    the machine's load hits both alike."""
    old = image_sets.TwoViews(*image_sets.two_view_transforms("folder", LOADER_SIZE, CROP_MIN))     # PIL reference
    new = image_sets.TwoViews(*[image_sets.CropToUint8(LOADER_SIZE, CROP_MIN)] * 2)                 # batched path's
    sets = {"pil": datasets.ImageFolder(root, old), "new": datasets.ImageFolder(root, new)}
    seconds = dict.fromkeys(sets, 0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        for ds in sets.values():
            ds[0]                                                   # first-call costs stay out
        chunk = max(count // 4, 1)
        for start in range(0, count, chunk):
            for name, ds in sets.items():
                t0 = time.perf_counter()
                for i in range(start, min(start + chunk, count)):
                    ds[i % len(ds)]
                seconds[name] += time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    return {name: count / s for name, s in seconds.items()}


def augment_ms(args, device) -> dict:
    """(b) Median ms of augment.two_views for one batch on device: at 224 px from the workers' two
    uint8 crops (crop=False), and at 32 px from one uint8 batch it crops itself (crop=True)."""
    g = torch.Generator(device=device).manual_seed(0)
    B, mean_std = args.batch_size, image_sets.IMAGENET_MEAN_STD

    def uint8(size):
        return torch.randint(0, 256, (B, 3, size, size), dtype=torch.uint8, device=device)

    pair, small = (uint8(224), uint8(224)), uint8(32)
    return {"224": 1000 * timed(lambda: augment.two_views(pair, 224, CROP_MIN, *mean_std, g, crop=False), device,
                                args.repeats),
            "32": 1000 * timed(lambda: augment.two_views(small, 32, CROP_MIN, *mean_std, g), device, args.repeats)}


class FixedBatch:
    """A stand-in for loaders.TrainLoader that yields one batch `steps` times: train.py's loop with
    the data path taken out, so the same loop times the step alone."""

    def __init__(self, batch, steps: int):
        self.batch, self.steps = batch, steps

    def __iter__(self):
        return itertools.repeat(self.batch, self.steps)


class Clock:
    """Wraps what train.py's loop iterates and notes, for each batch, when the loop asked for it
    and when it got it, so a window of steady steps can be timed inside train.py's own loop."""

    def __init__(self, loader):
        self.loader, self.steps = loader, loader.steps
        self.asked, self.got = [], []

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            self.asked.append(time.perf_counter())
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.got.append(time.perf_counter())
            yield batch

    def window(self, skip: int, end: float, batch: int) -> tuple[float, float]:
        """(images/s, share of the time spent waiting for data) of the steps after the first
        `skip`, up to `end` (after the loop's last synchronisation)."""
        span = end - self.asked[skip]
        waited = sum(g - a for a, g in zip(self.asked[skip:], self.got[skip:]))
        return (len(self.got) - skip) * batch / span, waited / span


def train_args(args, root: str):
    """train.py's options for (c): a --dataset folder run on the synthetic JPEGs under root."""
    argv = ["--dataset", "folder", "--data-path", os.path.join(root, "data"), "--output-dir",
            os.path.join(root, "run"), "--arch", args.arch, "--image-size", str(args.image_size),
            "--batch-size", str(args.batch_size), "-K", str(args.num_neighbors), "--queue-size",
            str(args.queue_size), "--dim", str(args.dim), "--mlp-dim", str(args.mlp_dim), "--workers",
            str(args.data_workers), "--device", args.device, "--augment-device", args.augment_device]
    return options.parse_args(argv + ["--compile"] * args.compile)


def end_to_end(args, env, targs) -> dict:
    """(c) run_control.setup and train.py's train_one_epoch: one epoch of --data-steps steps from the loader,
    then as many on one fixed batch, after --warmup fixed-batch steps (compilation, cuDNN's
    choice of kernels). Both are timed after their first max(1, workers) steps, the loader's
    pipeline fill (each worker makes a whole batch before the first arrives), which a real epoch
    of thousands of steps amortises; train.py's own whole-epoch figure is reported too."""
    with contextlib.redirect_stdout(sys.stderr), run_control.setup(targs, env, train.build_optimizer) as run:
        # stdout keeps the table: train.py's progress lines go to stderr
        loader, B, S, dev = run.loader, targs.batch_size, targs.image_size, env.device
        views = tuple(torch.randn(B, 3, S, S, device=dev) for _ in range(2))
        fixed = (views, torch.arange(B, device=dev) % run.num_classes)

        def loop(source):  # train.py's epoch, reading batches from source
            clock = Clock(source)
            run.loader, run.start_it = clock, 0
            try:
                log, _, _ = train.train_one_epoch(run, 0)
            finally:
                run.loader = loader  # the run closes its own loader
            return clock, log, time.perf_counter()

        loop(FixedBatch(fixed, args.warmup))
        loader.set_epoch(0)
        clock, log, end = loop(loader)
        alone, _, alone_end = loop(FixedBatch(fixed, loader.steps))
    skip = min(max(targs.workers, 1), loader.steps // 2)
    rate, wait = clock.window(skip, end, B)
    return {"end_to_end_images_per_s": rate, "step_only_images_per_s": alone.window(skip, alone_end, B)[0],
            "data_wait_share": wait, "end_to_end_epoch_images_per_s": log["images_per_s"],
            "epoch_data_wait_share": log["data_wait_share"], "timed_steps": loader.steps - skip,
            "skipped_steps": skip, "augment_path": options.augment_path(targs, env)}


def data_benchmark(args, env) -> tuple[dict, list[str]]:
    """(a), (b), (c) on JPEGs in a temporary folder; the result and its lines of text."""
    with tempfile.TemporaryDirectory(prefix="snclr_bench_") as tmp:
        targs = train_args(args, tmp)
        options.check_args(targs, env)                                # before anything is written
        t0 = time.perf_counter()
        paths = write_jpegs(os.path.join(tmp, "jpeg"), args.data_images, args.data_workers)
        link_folder(paths, os.path.join(tmp, "data"), args.data_steps * args.batch_size)
        written_s, kb = time.perf_counter() - t0, statistics.mean(map(os.path.getsize, paths)) / 1024
        pairs = loader_rates(os.path.join(tmp, "jpeg"), args.loader_images)
        ms = augment_ms(args, env.device)
        e2e = end_to_end(args, env, targs)
    result = {"loader_pairs_per_s_per_worker": pairs["new"], "loader_pairs_per_s_per_worker_pil": pairs["pil"],
              "augment_ms_per_batch_224": ms["224"], "augment_ms_per_batch_32": ms["32"], **e2e,
              "device": device_name(env.device), "torch": torch.__version__, "jpeg_kb_mean": kb,
              "jpegs_written_s": written_s, "args": vars(args)}
    lines = [f"data paths on {result['device']}, torch {torch.__version__}",
             f"(a) worker-side transform, {LOADER_SIZE} px two views from {JPEG_SIZE[0]}x{JPEG_SIZE[1]} JPEGs "
             f"({kb:.0f} KB), decode included, one process, {args.loader_images} pairs each:",
             f"    old: PIL, all augmentations (two_view_transforms)  {pairs['pil']:8.1f} pairs/s per worker",
             f"    new: crop + flip to uint8 (CropToUint8 x 2)        {pairs['new']:8.1f} pairs/s per worker",
             f"(b) augment.two_views on {env.device.type}, batch {args.batch_size}: 224 px (crop=False) "
             f"{ms['224']:.1f} ms, 32 px (crop=True) {ms['32']:.1f} ms",
             f"(c) train.py's loop, {args.arch} {args.image_size} px, batch {args.batch_size}, {args.data_workers} "
             f"workers, --augment-device {e2e['augment_path']}{', --compile' if args.compile else ''}; steps "
             f"{e2e['skipped_steps'] + 1}-{e2e['skipped_steps'] + e2e['timed_steps']} of {args.data_steps}:",
             f"    loader + step  {e2e['end_to_end_images_per_s']:8.1f} img/s (waiting for data "
             f"{100 * e2e['data_wait_share']:.0f}% of the time; whole epoch {e2e['end_to_end_epoch_images_per_s']:.1f} "
             f"img/s, as train.py logs it)",
             f"    step alone     {e2e['step_only_images_per_s']:8.1f} img/s"]
    return result, lines


def listing_benchmark(args, env):
    """Seconds to list --listing empty image files in 100 folders (best of --repeats, after
    one untimed walk: the operating system's cache warm, as for a folder read every launch)."""
    with tempfile.TemporaryDirectory() as root:
        per = -(-args.listing // 100)
        for i in range(args.listing):
            folder = os.path.join(root, f"{i // per:03d}")
            if i % per == 0:
                os.makedirs(folder)
            open(os.path.join(folder, f"{i:08d}.jpg"), "wb").close()
        listed = len(list_images(root))
        times = []
        for _ in range(max(args.repeats, 1)):
            t0 = time.perf_counter()
            list_images(root)
            times.append(time.perf_counter() - t0)
    if listed != args.listing:
        raise ConfigError(f"listed {listed} of {args.listing} files")
    best = min(times)
    line = (f"listing {args.listing} image files in 100 folders: {best:.3f} s (best of {len(times)}), "
            f"{args.listing / best:,.0f} files/s; 1.28 M files: about {1.28e6 / (args.listing / best):.0f} s")
    return {"files": args.listing, "seconds": best, "files_per_s": args.listing / best, "args": vars(args)}, [line]


def main(argv=None):
    """Parse, measure, write OUT/<name>.json, print; one `error:` line and status 1 or 2 on bad input."""
    p = get_args_parser()
    args = p.parse_args(argv)
    check_args(p, args)
    try:
        try:
            env = distributed.init_distributed(args.device)  # one process: no process group
        except ValueError as e:
            raise ConfigError(str(e)) from None
        run = data_benchmark if args.data else ops_benchmark if args.count_ops else \
            listing_benchmark if args.listing else step_benchmark
        result, lines = run(args, env)
    except (ConfigError, image_sets.DataError) as e:
        cli.fail(e)
    name = ("bench_listing" if args.listing else f"bench_data_{env.device.type}" if args.data else
            f"bench_ops_{env.device.type}_{args.arch}_{args.image_size}" if args.count_ops else
            f"bench_{env.device.type}_{args.arch}" + "_channels_last" * args.channels_last + "_compile" * args.compile
            + ("_" + args.compile_mode) * (args.compile_mode != "default"))
    print("\n".join(lines), flush=True)  # the figures first: a failed write below loses nothing
    path = os.path.join(args.out, name + ".json")
    try:
        os.makedirs(args.out, exist_ok=True)
        write_json(path, result, advice="the figures are printed above")
    except OSError as e:
        cli.fail(ConfigError(f"cannot create --out {args.out}: {e.strerror}"))
    except ConfigError as e:
        cli.fail(e)
    print(f"wrote {path}")
    if args.data:  # the last line: one JSON object, for scripts
        print(json.dumps({k: v for k, v in result.items() if k != "args"}))


if __name__ == "__main__":
    main()
