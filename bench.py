"""What SNCLR costs on top of its MoCo v3 / InfoNCE baseline, measured in one process.

One model, the paper's settings (queue 65536, K = 30, dim 256, MLP 4096). The full training
step (train.py's train_step) is timed alternately with K = 30 and with K = 0, which is the
baseline with the same weights and queue; the median over repeats gives the ratio. The
SNCLR-only parts (neighbour search for both views, positiveness, the larger loss) are timed
alone and reported as shares of the SNCLR step, and the search is timed for queue sizes from
4k to 1M entries and several K.

    python bench.py --arch resnet18 --device cpu                    # CPU figures in README.md
    python bench.py --arch resnet50 --device cuda --batch-size 256 --image-size 224
"""
import argparse
import json
import os
import resource
import statistics
import time

import torch

import distributed
from loss import info_nce, snclr_loss
from memory_queue import MemoryQueue
from model import ARCHS, SNCLR
from train import train_step


def get_args_parser():
    p = argparse.ArgumentParser("SNCLR step benchmark", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet18", choices=ARCHS)
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--batch-size", type=int, default=64, help="images per step (one process)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("-K", "--num-neighbors", type=int, default=30, help="the paper's K")
    p.add_argument("--queue-size", type=int, default=65536, help="queue entries (>= 65536: paper scale)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--mlp-dim", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per variant (after one warm-up)")
    p.add_argument("--scaling-queues", type=int, nargs="+", default=[4096, 16384, 65536, 262144, 1048576])
    p.add_argument("--scaling-k", type=int, nargs="+", default=[1, 5, 30, 100])
    p.add_argument("--out", default="results", help="writes OUT/bench_<device>_<arch>.json")
    return p


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


def step_times(model, x1, x2, args, device):
    """Alternate SNCLR (K) and baseline (K = 0) steps; median seconds and peak memory of each."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    amp = lambda: torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")  # noqa: E731
    times, peak = {"snclr": [], "baseline": []}, {}
    for i in range(2 * (args.repeats + 1)):
        name = "snclr" if i % 2 == 0 else "baseline"
        model.num_neighbors = args.num_neighbors if name == "snclr" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        train_step(model, model, x1, x2, opt, scaler, 0.99, autocast=amp())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak[name] = torch.cuda.max_memory_allocated(device) / 2**20
        if i >= 2:  # the first pair warms up
            times[name].append(time.perf_counter() - t0)
    model.num_neighbors = args.num_neighbors
    return {k: statistics.median(v) for k, v in times.items()}, peak


def part_times(model, args, device):
    """Seconds of each SNCLR-only part for one step (both views), timed on its own."""
    B, K, D = args.batch_size, args.num_neighbors, args.dim
    keys = torch.randn(B, D, device=device)
    y = torch.randn(B, D, device=device, requires_grad=True)
    z = torch.randn(B, D, device=device, requires_grad=True)
    nb = model.queue.nearest_neighbors(keys, K)                                   # (B, K, D)
    w = model.positiveness(y, nb).detach()

    def positiveness():
        model.positiveness(y, nb).sum().backward()

    def extra_loss():  # the SNCLR loss minus the InfoNCE it replaces, forward and backward
        snclr_loss(z, keys, nb, w, 0.2).backward()

    def base_loss():
        info_nce(z, keys, 0.2).backward()

    search = timed(lambda: model.queue.nearest_indices(keys, K), device, args.repeats)
    return {"neighbour_search": 2 * search, "positiveness": 2 * timed(positiveness, device, args.repeats),
            "loss_extra": 2 * max(timed(extra_loss, device, args.repeats) - timed(base_loss, device, args.repeats), 0.0)}


def search_scaling(args, device):
    """Median ms of one view's neighbour search (B queries) for each queue size and K."""
    rows = []
    for size in args.scaling_queues:
        queue = MemoryQueue(size, args.dim).to(device)
        queue.enqueue(torch.randn(size, args.dim, device=device))
        q = torch.randn(args.batch_size, args.dim, device=device)
        for k in args.scaling_k:
            ms = 1000 * timed(lambda: queue.nearest_indices(q, k), device, args.repeats)
            rows.append({"queue": size, "K": k, "ms": ms})
    return rows


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    device = distributed.init_distributed(args.device).device  # one process: no process group
    torch.manual_seed(0)
    model = SNCLR(args.arch, args.image_size, args.dim, args.mlp_dim, 0.2, args.num_neighbors,
                  args.queue_size).to(device)
    model.queue.enqueue(torch.randn(args.queue_size, args.dim, device=device))   # a full queue
    x1 = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    x2 = torch.randn_like(x1)
    steps, peak = step_times(model, x1, x2, args, device)
    parts = part_times(model, args, device)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
              f"cpu, {torch.get_num_threads()} threads", "torch": torch.__version__, "args": vars(args),
              "step_s": steps, "ratio": steps["snclr"] / steps["baseline"],
              "images_per_s": {k: args.batch_size / v for k, v in steps.items()},
              "parts_share_of_snclr_step": {k: v / steps["snclr"] for k, v in parts.items()},
              "peak_memory_mib": peak or {"process_max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
              "search_scaling": search_scaling(args, device)}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"bench_{device.type}_{args.arch}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{args.arch} on {result['device']}, batch {args.batch_size}, {args.image_size} px, "
          f"queue {args.queue_size}, K {args.num_neighbors}")
    print(f"step: SNCLR {1000 * steps['snclr']:.1f} ms, baseline {1000 * steps['baseline']:.1f} ms, "
          f"ratio {result['ratio']:.3f}")
    print("parts (share of SNCLR step): " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in
                                                      result["parts_share_of_snclr_step"].items()))
    print(f"peak memory (MiB): {result['peak_memory_mib']}")
    print("search ms by queue size (rows) and K (columns):")
    for size in args.scaling_queues:
        print(f"  {size:>8}: " + "  ".join(f"K={r['K']}: {r['ms']:.2f}" for r in result["search_scaling"]
                                          if r["queue"] == size))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
