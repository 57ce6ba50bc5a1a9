"""Tests of the GPU path, runnable on the CPU where they can be: batch norm over the global batch
(two gloo processes against nn.BatchNorm on the concatenated batch), the loader's device-side
pieces, the /dev/shm check, the stop agreement, the limited and compiled augmentation;
and, only where CUDA is present, the training step under torch.cuda.set_sync_debug_mode("error").
`pytest tests/test_gpu_path.py`."""
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from runtime.batch_norm import GlobalBatchNorm, convert_to_global_batch_norm
from conftest import free_port

BN_TOL = 1e-6     # float64: every difference here is ~1e-15 rounding


def join_gloo(rank: int, world: int, port: int) -> None:
    """This spawned process joins a gloo group of `world` processes on localhost."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")


# --------------------------------------------------------------- batch norm, 2 processes ---
# (name, layer class, global input shape, layer options): 2-d and 1-d, affine or not, EMA or
# cumulative average. The global batch of 8 is split 4 + 4 over the two ranks.
BN_CASES = [("2d", nn.BatchNorm2d, (8, 3, 5, 4), dict(momentum=0.3)),
            ("1d", nn.BatchNorm1d, (8, 6), dict()),
            ("1d-seq", nn.BatchNorm1d, (8, 5, 7), dict(momentum=None)),
            ("1d-noaffine", nn.BatchNorm1d, (8, 6), dict(affine=False))]
BN_STEPS = 3


def bn_case(shape, cls, options):
    """A float64 layer with non-trivial weight and bias, the inputs of BN_STEPS steps and the
    fixed random weights r of each step's loss sum(r * y)."""
    g = torch.Generator().manual_seed(7)
    layer = cls(shape[1], **options).double()
    if layer.affine:
        with torch.no_grad():
            layer.weight.copy_(torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5)
            layer.bias.copy_(torch.randn(shape[1], generator=g, dtype=torch.float64))
    xs = [3 * torch.randn(shape, generator=g, dtype=torch.float64) + 1 for _ in range(BN_STEPS)]
    rs = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(BN_STEPS)]
    return layer, xs, rs


def run_bn(layer, xs, rs, part=slice(None)):
    """BN_STEPS training steps of layer on the `part` rows; then one eval forward. Returns the
    outputs, input gradients, summed weight / bias gradients, and the final state."""
    outs, grads = [], []
    for x, r in zip(xs, rs):
        x = x[part].clone().requires_grad_()
        y = layer(x)
        (r[part] * y).sum().backward()
        outs.append(y.detach())
        grads.append(x.grad)
    layer.eval()
    evaluated = layer(xs[0][part])
    layer.train()
    params = {k: p.grad.clone() for k, p in layer.named_parameters()}
    return dict(outs=outs, grads=grads, params=params, eval=evaluated.detach(),
                state={k: v.clone() for k, v in layer.state_dict().items()})


def _bn_worker(rank, port, out_dir):
    join_gloo(rank, 2, port)
    results = {}
    for name, cls, shape, options in BN_CASES:
        layer, xs, rs = bn_case(shape, cls, options)
        layer = convert_to_global_batch_norm(layer)
        assert type(layer) is GlobalBatchNorm
        got = run_bn(layer, xs, rs, slice(4 * rank, 4 * rank + 4))
        for k, grad in got["params"].items():  # each rank holds its own loss's share: sum them
            torch.distributed.all_reduce(grad)
        results[name] = got
    torch.save(results, os.path.join(out_dir, f"bn{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_global_batch_norm_on_two_gloo_ranks_equals_batch_norm_on_the_whole_batch(tmp_path):
    """Outputs, input gradients, weight and bias gradients, running mean and var (and the
    number of batches) of GlobalBatchNorm on 2 ranks x 4 images = nn.BatchNorm on the 8, in
    float64, after 3 training steps; and the eval forward with the running statistics."""
    mp.spawn(_bn_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"bn{r}.pt", weights_only=True) for r in range(2)]
    for name, cls, shape, options in BN_CASES:
        ref = run_bn(*bn_case(shape, cls, options))
        for rank, got in enumerate(r[name] for r in ranks):
            mine = slice(4 * rank, 4 * rank + 4)
            for step in range(BN_STEPS):
                assert torch.allclose(got["outs"][step], ref["outs"][step][mine], rtol=0, atol=BN_TOL), (name, step)
                assert torch.allclose(got["grads"][step], ref["grads"][step][mine], rtol=0, atol=BN_TOL), (name, step)
            assert torch.allclose(got["eval"], ref["eval"][mine], rtol=0, atol=BN_TOL), name
            assert got["params"].keys() == ref["params"].keys()
            for k in ref["params"]:
                assert torch.allclose(got["params"][k], ref["params"][k], rtol=0, atol=BN_TOL), (name, k)
            assert got["state"].keys() == ref["state"].keys()
            for k in ref["state"]:
                assert torch.allclose(got["state"][k].double(), ref["state"][k].double(), rtol=0, atol=BN_TOL), \
                    (name, k)


def _bn_compile_worker(rank, port, out_dir):
    join_gloo(rank, 2, port)
    torch._dynamo.config.cache_size_limit = 8
    layer = GlobalBatchNorm(3).double()
    step = torch.compile(lambda x: (layer(x) * torch.arange(3.0, dtype=x.dtype)[:, None]).sum(),
                         fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    x = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(rank), dtype=torch.float64,
                    requires_grad=True)
    step(x).backward()
    eager = GlobalBatchNorm(3).double()
    x2 = x.detach().clone().requires_grad_()
    (eager(x2) * torch.arange(3.0, dtype=x.dtype)[:, None]).sum().backward()
    torch.save({"compiled": x.grad, "eager": x2.grad, "running": (layer.running_mean, eager.running_mean)},
               os.path.join(out_dir, f"c{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_global_batch_norm_compiles_into_one_graph_on_two_ranks(tmp_path):
    """torch.compile(fullgraph=True) traces the layer with its all-reduce, forward and backward,
    without a graph break, and gives the eager layer's gradients and running statistics."""
    mp.spawn(_bn_compile_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    for r in range(2):
        got = torch.load(tmp_path / f"c{r}.pt", weights_only=True)
        assert torch.allclose(got["compiled"], got["eager"], atol=1e-12)
        assert torch.allclose(*got["running"], atol=1e-12)


def test_conversion_keeps_the_state_dict_and_one_process_is_plain_batch_norm():
    """convert_to_global_batch_norm replaces every BatchNorm of a ResNet and an MLP (1-d, with
    and without affine) keeping keys and values; without a process group, the converted model
    computes what the original does, in training and in eval mode."""
    from model import SNCLR
    torch.manual_seed(0)
    model = SNCLR("resnet18", 16, dim=8, mlp_dim=16, num_neighbors=0, queue_size=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bns = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    import copy
    original = copy.deepcopy(model)
    converted = convert_to_global_batch_norm(model)
    assert sum(type(m) is GlobalBatchNorm for m in converted.modules()) == bns > 20
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in converted.modules())
    after = converted.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    x = torch.randn(4, 3, 16, 16)
    for mode in (True, False):
        original.train(mode), converted.train(mode)
        a, b = original.backbone(x), converted.backbone(x)
        assert torch.equal(a, b), mode
    with pytest.raises(ValueError, match="expects input \\(n, C, \\*\\) of at least 2 dimensions, got shape \\(3,\\)"):
        GlobalBatchNorm(3)(torch.zeros(3))


# ------------------------------------------------------------------- loaders, /dev/shm ---
class FakeStatvfs:
    def __init__(self, free_bytes):
        self.f_bavail, self.f_frsize = free_bytes // 4096, 4096


def test_prefetch_is_sized_from_dev_shm_and_too_little_is_one_error_line(monkeypatch):
    """shm_prefetch: 2 batches per worker where half of /dev/shm holds them for every local
    rank, 1 where only one fits, and a DataError naming /dev/shm, --shm-size and --ipc=host
    where not even one does (a container's default 64 MB against ImageNet's 154 MB batches)."""
    from images.datasets import DataError
    from images.loaders import shm_prefetch, worker_batch_bytes
    imagenet = worker_batch_bytes(512, 224, batched=True)
    assert imagenet == 512 * (2 * 3 * 224 * 224 + 8)                      # 154 MB per rank-batch
    monkeypatch.setattr(os, "statvfs", lambda path: FakeStatvfs(64 * 2**30))
    assert shm_prefetch(imagenet, 12, 8) == 2                             # 8 x 12 x 2 x 154 MB = 30 GB
    monkeypatch.setattr(os, "statvfs", lambda path: FakeStatvfs(40 * 2**30))
    assert shm_prefetch(imagenet, 12, 8) == 1                             # half of 40 GiB: one per worker
    assert shm_prefetch(2**20, 4, 1) == 2                                 # plenty: torch's default
    monkeypatch.setattr(os, "statvfs", lambda path: FakeStatvfs(3 * 2**30))
    assert shm_prefetch(100 * 2**20, 10, 1) == 1                          # 1 GiB in flight of 1.5
    monkeypatch.setattr(os, "statvfs", lambda path: FakeStatvfs(64 * 2**20))
    with pytest.raises(DataError) as e:
        shm_prefetch(imagenet, 12, 8)
    message = str(e.value)
    assert "\n" not in message and "/dev/shm has 0.06 GiB free" in message
    assert "--shm-size=" in message and "--ipc=host" in message and "--workers" in message

    def no_shm(path):
        raise FileNotFoundError(path)
    monkeypatch.setattr(os, "statvfs", no_shm)
    assert shm_prefetch(imagenet, 12, 8) == 2                             # not Linux: nothing to size


def test_a_worker_bus_error_becomes_one_error_line():
    from images.datasets import DataError
    from images.loaders import TrainLoader

    def dying():
        yield 1
        raise RuntimeError("DataLoader worker (pid 123) is killed by signal: Bus error. It is possible that "
                           "dataloader's workers are out of shared memory. Please try to raise your shared "
                           "memory limit.")

    class Base(list):                                     # a DistributedSampler's length and data set
        dataset = range(8)

    class Sampler:
        base = Base(range(8))
    with pytest.raises(DataError, match=r"ran out of shared memory \(/dev/shm\).*--ipc=host"):
        list(TrainLoader(dying(), Sampler(), 4))


def test_cpu_batches_pass_through_side_stream_copies_unchanged():
    """On the CPU SideStreamCopies is .to(device) over a nested batch, and host_to_device a copy."""
    from images.loaders import SideStreamCopies, host_to_device
    batches = [((torch.arange(3), torch.ones(2)), torch.zeros(1)) for _ in range(2)]
    out = list(SideStreamCopies(batches, torch.device("cpu")))
    assert len(out) == 2
    assert all(torch.equal(a[0][0], b[0][0]) and torch.equal(a[1], b[1]) for a, b in zip(out, batches))
    assert torch.equal(host_to_device(torch.arange(4), torch.device("cpu")), torch.arange(4))


# -------------------------------------------------------------- SIGTERM agreement, gloo ---
def _stop_worker(rank, port, out_dir):
    import threading
    from runtime import distributed
    join_gloo(rank, 2, port)
    event = threading.Event()
    stopper = distributed.StopAgreement(event)
    seen = []
    for i in range(6):
        if rank == 1 and i == 2:
            event.set()                                       # SIGTERM reaches rank 1 during step 2
        seen.append(stopper.poll())
    seen.append(stopper.finish())
    torch.save({"seen": seen}, os.path.join(out_dir, f"s{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_stop_agreement_on_the_default_group_stops_every_rank_after_the_same_step(tmp_path):
    """The flag set on rank 1 at poll 2 is agreed at poll 3 (LAG 1 on gloo) on both ranks."""
    mp.spawn(_stop_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    seen = [torch.load(tmp_path / f"s{r}.pt")["seen"] for r in range(2)]
    assert seen[0] == seen[1] == [False, False, False, True, True, True, True]


# ------------------------------------------------- CUDA: the step never waits for the GPU ---
class PairCrops(torch.utils.data.Dataset):
    """What the ImageNet workers hand over: two uint8 crops (3, S, S) of an image and its label."""

    def __init__(self, n: int, size: int):
        g = torch.Generator().manual_seed(1)
        self.crops = torch.randint(0, 256, (n, 2, 3, size, size), dtype=torch.uint8, generator=g)

    def __len__(self):
        return len(self.crops)

    def __getitem__(self, key):
        _, i = key  # loaders.EpochItems' (epoch, index)
        return (self.crops[i, 0], self.crops[i, 1]), i % 10


def nosync_views(path: str, dev, compiled: bool, n: int, size: int, batch: int):
    """The batches train.py's loader yields on CUDA: "resident" (the uint8 set on the device,
    gathered and cropped there) or "loader" (a pinned DataLoader of worker crops, copied on the
    side stream, colour etc. on the device). Returns (iterable, sampler)."""
    from images.datasets import EpochSampler
    from images.loaders import DeviceAugmented, EpochItems, ResidentImages
    sampler = EpochSampler(torch.utils.data.DistributedSampler(range(n), 1, 0, seed=0, drop_last=True))
    ms = ((0.5,) * 3, (0.25,) * 3)
    if path == "resident":
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g).to(dev)
        source = ResidentImages(images, torch.arange(n, device=dev) % 10, sampler, batch)
        return DeviceAugmented(source, sampler, dev, size, 0.2, ms, 0, 0, crop=True, batch=batch,
                               compiled=compiled), sampler
    loader = torch.utils.data.DataLoader(PairCrops(n, size), batch, sampler=EpochItems(sampler), num_workers=1,
                                         pin_memory=True, drop_last=True, persistent_workers=True)
    return DeviceAugmented(loader, sampler, dev, size, 0.2, ms, 0, 0, crop=False, batch=batch,
                           compiled=compiled), sampler


@pytest.mark.skipif(not torch.cuda.is_available(), reason="checks CUDA synchronisation: needs a GPU")
@pytest.mark.parametrize("compiled", [False, True])
def test_the_training_step_train_py_runs_never_waits_for_the_gpu(compiled):
    """torch.cuda.set_sync_debug_mode("error") raises at any host-device synchronisation (.item(),
    nonzero, boolean-mask indexing, a blocking or pageable copy). After a warm-up epoch (cuDNN's
    choices, the allocator, compilation), a whole epoch of what train.py's loop runs on CUDA is
    checked: the loader's batches (both data paths), channels_last inputs, train.train_step with
    bf16 autocast through the DDP wrapper (distributed.wrap_ddp) on a one-process NCCL group,
    GlobalBatchNorm (its all-reduce path), LARS and AdamW as train.py builds them, with and
    without torch.compile of the backbones (and of the augmentation), then Progress.add and
    NeighborQuality.update."""
    from images import augment
    from runtime import distributed
    from runtime import options
    import train
    from runtime.batch_norm import convert_to_global_batch_norm
    from runtime.lars import LARS, param_groups
    from model import SNCLR
    from monitors.neighbor_quality import NeighborQuality
    from runtime.progress import Progress
    dev = torch.device("cuda", torch.cuda.current_device())
    torch.distributed.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                         world_size=1, device_id=dev)
    try:
        torch.manual_seed(0)
        n, size, batch = 64, 32, 16
        model = convert_to_global_batch_norm(SNCLR("resnet18", size, dim=16, mlp_dim=32, num_neighbors=2,
                                                   queue_size=64)).to(dev).to(memory_format=torch.channels_last)
        model.queue.enqueue(torch.randn(64, 16, device=dev), torch.randint(0, 10, (64,), device=dev))
        if compiled:
            model.backbone.compile()
            model.momentum_backbone.compile()
        ddp = distributed.wrap_ddp(model, dev)
        optimizers = {"lars": LARS(param_groups(model, 1e-6), weight_decay=1e-6, momentum=0.9),
                      "adamw": torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.1)}
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        args = options.parse_args(["--dataset", "fake", "--arch", "resnet18", "--batch-size", str(batch),
                                   "--epochs", "1"])
        env = distributed.Env(0, 1, dev)
        big, g = torch.randint(0, 256, (16, 3, 96, 96), dtype=torch.uint8, device=dev), torch.Generator(device=dev)
        assert augment.blur_capacity(16, augment.VIEW2["blur_p"]) < 16
        for path in ("resident", "loader"):
            views, sampler = nosync_views(path, dev, compiled, n, size, batch)
            for name, optimizer in optimizers.items():
                progress, quality = Progress(args, env, 0, 0, n // batch), NeighborQuality(dev)
                for epoch, strict in enumerate((False, True)):       # a warm-up epoch first
                    for group in optimizer.param_groups:
                        group["lr"] = 0.01                            # train.py sets a float each step
                    sampler.set_epoch(epoch)
                    torch.cuda.set_sync_debug_mode("error" if strict else "default")
                    try:
                        for (x1, x2), y in views:
                            x1 = x1.contiguous(memory_format=torch.channels_last)
                            x2 = x2.contiguous(memory_format=torch.channels_last)
                            loss, w = train.train_step(model, ddp, x1, x2, optimizer, scaler, 0.99, 0,
                                                       torch.autocast("cuda", torch.bfloat16), y, quality)
                            progress.add(loss, w, 0.0)
                        g.manual_seed(epoch)  # 96 px crops: view 2 blurs its 12 of 16 (blur_some's gather)
                        augment.two_views([big, big], 96, 0.2, (0.5,) * 3, (0.25,) * 3, g, crop=False,
                                          compiled=compiled)
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                assert torch.isfinite(loss).item(), (path, name)
    finally:
        torch.distributed.destroy_process_group()


# ------------------------------------------------------------------- augmentation ---
def binomial_tail(B, p, m):
    """P(more than m of B coins with probability p come up), exactly (fractions of integers)."""
    from fractions import Fraction
    from math import comb
    q = Fraction(p).limit_denominator(10**6)
    return float(sum(comb(B, k) * q**k * (1 - q)**(B - k) for k in range(m + 1, B + 1)))


def test_blur_capacity_is_the_smallest_count_with_a_tail_below_1e_9():
    from images.augment import blur_capacity
    for B in (16, 64, 256, 1024):
        m = blur_capacity(B, 0.1)
        assert m < B and binomial_tail(B, 0.1, m) < 1e-9 <= binomial_tail(B, 0.1, m - 1), B
    assert blur_capacity(4, 0.1) == 4 and blur_capacity(256, 1.0) == 256 and blur_capacity(256, 0.0) == 0


def test_blur_some_blurs_exactly_the_due_images_within_capacity():
    """With at most `capacity` images due, blur_some = the whole-batch blur kept where due; with
    more, the first `capacity` due (batch order) are blurred and the others stay sharp."""
    from images.augment import blur_some, gaussian_blur
    g = torch.Generator().manual_seed(2)
    x, sigma = torch.rand(10, 3, 70, 70, generator=g), 0.1 + 1.9 * torch.rand(10, generator=g)
    full = gaussian_blur(x, 7, sigma)
    due = torch.tensor([0, 1, 0, 0, 1, 0, 1, 0, 0, 0], dtype=torch.bool)
    out = blur_some(x, due, sigma, 7, capacity=4)
    expected = torch.where(due[:, None, None, None], full, x)
    assert torch.allclose(out, expected, atol=1e-6)
    many = torch.ones(10, dtype=torch.bool)
    out = blur_some(x, many, sigma, 7, capacity=4)
    assert torch.allclose(out[:4], full[:4], atol=1e-6) and torch.equal(out[4:], x[4:])
    assert torch.equal(blur_some(x, due, sigma, 7, capacity=0), x)


def test_compiled_augmentation_equals_eager():
    """two_views(compiled=True) applies the same parameters as eager mode (same generator
    draws), to float32 rounding; one-channel 28 px crops (the Fashion-MNIST resident path)."""
    from images import augment
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ms = ((0.3,) * 3, (0.35,) * 3)
    eager = augment.two_views(images, 28, 0.2, *ms, torch.Generator().manual_seed(4))
    compiled = augment.two_views(images, 28, 0.2, *ms, torch.Generator().manual_seed(4), compiled=True)
    for a, b in zip(eager, compiled):
        assert torch.allclose(a, b, atol=1e-5)
