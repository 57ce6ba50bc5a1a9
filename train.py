"""SNCLR pretraining: `torchrun --nproc_per_node=G train.py --arch resnet50 --data-path DIR`.

Also runs as `python train.py ...` (one process, CPU or GPU). Every epoch rank 0 appends one
JSON line to OUTPUT/log.txt and rewrites OUTPUT/checkpoint.pth atomically; rerunning the same
command resumes from it. A kNN monitor measures the random-initialised encoder before training
and the encoder every --knn-every epochs. See README.md for recipes and measured results.
"""
import argparse
import inspect
import json
import math
import os
import signal
import sys
import threading
import time

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import distributed
from checkpoint import ConfigError, append_json, load_checkpoint, load_state, save_checkpoint
from data import (DATASETS, FASHION_MNIST_DEB, IMAGE_SIZE, NUM_CLASSES, DataError, EpochSampler, TwoViews,
                  build_dataset, eval_transform, fixed_subset, ignore_sigterm, two_view_transforms)
from knn import knn_accuracy
from lars import LARS, param_groups
from loss import FORMS
from model import ARCHS, SNCLR, STEMS, VITS, momentum_schedule
from positiveness import MODES


# Recipes that differ between ResNets (MoCo v3, LARS) and ViTs (MoCo v3 / released SNCLR, AdamW).
RECIPES = {"resnet": dict(optimizer="lars", lr=0.6, weight_decay=1e-6, tau=1.0, epochs=100,
                          warmup_epochs=10),
           "vit": dict(optimizer="adamw", lr=1.5e-4, weight_decay=0.1, tau=0.2, epochs=300,
                       warmup_epochs=40)}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None: those options explain their arch-dependent default in words."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("SNCLR pretraining", formatter_class=HelpFormatter,
                                description=__doc__.split("\n\n")[0])
    a = p.add_argument
    # model
    a("--arch", default="resnet50", choices=ARCHS, help="encoder f; the paper uses resnet50, vit_small, vit_base")
    a("--stem", default="auto", choices=STEMS, help="auto: small-image stem (3x3 conv, no max-pool / "
      "4x4 patches) at <= 64 px, else torchvision's; imagenet keeps torchvision's stem at any size")
    a("--dim", type=int, default=256, help="output dim of projector and predictor (MoCo v3)")
    a("--mlp-dim", type=int, default=4096, help="hidden dim of projector and predictor MLPs (MoCo v3)")
    a("--stop-grad-patch", action=argparse.BooleanOptionalAction, default=True,
      help="ViT only: freeze the random patch embedding (MoCo v3's stability trick)")
    # SNCLR
    a("-K", "--num-neighbors", type=int, default=30, help="neighbours per key (Eq. 3); the paper's ablation "
      "finds 30 best; 0 gives the MoCo v3 / InfoNCE baseline")
    a("--queue-size", type=int, default=65536, help="memory queue C; 'relatively large' in the paper, "
      "128000 in the released ViT-S run; must hold at least one global batch")
    a("--positiveness", default="cosine", choices=MODES, help="Eq. 4: cosine = released code, "
      "attention = paper text, hard / none = ablations")
    a("--loss-form", default="code", choices=FORMS, help="Eq. 2: code = soft-target cross-entropy "
      "(released), paper = log of the weighted sum (as printed)")
    a("--threshold", action="store_true", help="released code's option: zero the w below 1/K")
    a("--tau", type=float, default=None, help="temperature; default 1.0 for ResNets, 0.2 for ViTs (MoCo v3)")
    a("--momentum", type=float, default=0.99, help="base EMA momentum, raised to 1 on a half cosine (MoCo v3)")
    # optimisation
    a("--epochs", type=int, default=None, help="default 100 for ResNets (MoCo v3), 300 for ViTs (SNCLR ViT-S)")
    a("--warmup-epochs", type=float, default=None, help="linear lr warm-up; default 10 ResNets, 40 ViTs")
    a("--batch-size", type=int, default=4096, help="global batch over all ranks (paper: 4096); "
      "each rank takes batch-size / world-size")
    a("--optimizer", default=None, choices=("lars", "adamw", "sgd"), help="default lars for ResNets, adamw for ViTs")
    a("--lr", type=float, default=None, help="base lr, scaled by batch-size / 256; default 0.6 "
      "(ResNet, LARS) or 1.5e-4 (ViT, AdamW) as in MoCo v3")
    a("--weight-decay", type=float, default=None, help="default 1e-6 ResNets, 0.1 ViTs (MoCo v3); "
      "biases and norm weights are never decayed, with any optimizer")
    a("--amp", default="bf16", choices=("bf16", "fp16", "none"), help="mixed precision on CUDA (CPU runs fp32)")
    # data
    a("--dataset", default="imagenet", choices=DATASETS, help="imagenet and folder read DATA_PATH/train "
      "and DATA_PATH/val; cifar downloads when a network exists; fake needs no data")
    a("--data-path", default=None, help=f"dataset root; default ./data, or {FASHION_MNIST_DEB} "
      "for fashion-mnist (Debian package dataset-fashion-mnist)")
    a("--image-size", type=int, default=None, help="default: 224 ImageNet/folder, 32 CIFAR/fake, "
      "28 Fashion-MNIST; <= 64 selects the small-image stems")
    a("--crop-min", type=float, default=0.08, help="smallest RandomResizedCrop area (MoCo v3)")
    a("--subset", type=int, default=0, help="train on a fixed random subset of this many images (0 = all)")
    a("--fake-size", type=int, default=512, help="images in --dataset fake")
    a("--workers", type=int, default=8, help="data-loading processes per rank")
    # monitor, output, runtime
    a("--knn-every", type=int, default=1, help="kNN monitor every N epochs (0 = only before and after)")
    a("--knn-k", type=int, default=200, help="kNN neighbours (InstDisc)")
    a("--knn-t", type=float, default=0.07, help="kNN vote temperature (InstDisc)")
    a("--knn-train-size", type=int, default=0, help="kNN bank: a fixed subset of the train split (0 = all)")
    a("--knn-test-size", type=int, default=0, help="kNN queries: a fixed subset of the test split (0 = all)")
    a("--output-dir", default="output", help="args.json, log.txt, checkpoint.pth; resumes from its checkpoint")
    a("--resume", default=None, help="resume from this checkpoint instead of OUTPUT/checkpoint.pth")
    a("--device", default="auto", choices=("auto", "cuda", "cpu"), help="auto = CUDA when available")
    a("--seed", type=int, default=0, help="seed for weights, data order and augmentations")
    a("--stop-after-epoch", type=int, default=0, help="end this launch once this epoch is done, the "
      "schedules still spanning --epochs (for time-limited jobs); rerun to continue (0 = never)")
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of args with the arch / dataset dependent defaults filled in."""
    recipe = RECIPES["vit" if args.arch in VITS else "resnet"]
    out = dict(vars(args))
    for key, value in recipe.items():
        if out[key] is None:
            out[key] = value
    if out["data_path"] is None:
        out["data_path"] = FASHION_MNIST_DEB if args.dataset == "fashion-mnist" else "data"
    if out["image_size"] is None:
        out["image_size"] = IMAGE_SIZE[args.dataset]
    return argparse.Namespace(**out)


def check_args(args, world_size: int) -> None:
    if args.batch_size % world_size:
        raise ConfigError(f"--batch-size {args.batch_size} is not divisible by the world size "
                          f"{world_size}; use a multiple of {world_size}")
    if not 0 <= args.num_neighbors <= args.queue_size:
        raise ConfigError(f"-K {args.num_neighbors} must be in [0, --queue-size {args.queue_size}]")
    if args.queue_size < args.batch_size:
        raise ConfigError(f"--queue-size {args.queue_size} must hold one global batch "
                          f"(--batch-size {args.batch_size})")
    if not args.tau > 0:
        raise ConfigError(f"--tau must be > 0, got {args.tau}")
    if args.epochs < 1 or args.warmup_epochs < 0:
        raise ConfigError(f"need --epochs >= 1 and --warmup-epochs >= 0, got {args.epochs}, "
                          f"{args.warmup_epochs}")


def learning_rate(step: int, steps_per_epoch: int, args) -> float:
    """lr = base_lr * batch / 256 (Goyal et al.), linear warm-up then cosine, per step (MoCo v3)."""
    peak = args.lr * args.batch_size / 256
    epoch = step / steps_per_epoch
    if epoch < args.warmup_epochs:
        return peak * epoch / args.warmup_epochs
    progress = (epoch - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-8)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def build_optimizer(model: nn.Module, args):
    groups = param_groups(model, args.weight_decay)
    if args.optimizer == "lars":
        return LARS(groups, weight_decay=args.weight_decay, momentum=0.9)
    if args.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, weight_decay=args.weight_decay)
    return torch.optim.SGD(groups, lr=0.0, momentum=0.9, weight_decay=args.weight_decay)


def train_step(model: SNCLR, ddp_model: nn.Module, x1, x2, optimizer, scaler, momentum: float,
               rank: int = 0, autocast=None):
    """One SNCLR step, every state change in order. Returns (loss, stats, neighbour-search s).

    model is the bare SNCLR; ddp_model the same module wrapped for gradient averaging (or
    model itself in one process). autocast is a mixed-precision context (None: fp32).
    """
    autocast = autocast or torch.autocast(x1.device.type, enabled=False)
    with autocast:
        k1, k2 = model.momentum_keys(x1), model.momentum_keys(x2)          # (B, dim) each
    k1_all, k2_all = distributed.all_gather(k1), distributed.all_gather(k2)  # (N, dim)
    # Eq. 3 in the queue as it is before this step's keys go in. The queue is identical on
    # every rank, so each rank searches its own keys and only the indices are gathered.
    t0 = time.perf_counter()
    K = model.neighbors_ready()
    idx1 = model.queue.nearest_indices(k1, K)                               # (B, K)
    idx2 = model.queue.nearest_indices(k2, K)                               # (B, K)
    if x1.device.type == "cuda":
        torch.cuda.synchronize(x1.device)
    search_s = time.perf_counter() - t0
    n1_all = model.queue.features[distributed.all_gather(idx1)]             # (N, K, dim)
    n2_all = model.queue.features[distributed.all_gather(idx2)]             # (N, K, dim)
    with autocast:                                                          # Eq. 4 + Eq. 2
        loss, stats = ddp_model(x1, x2, k1_all, k2_all, n1_all, n2_all, rank)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    model.momentum_update(momentum)                                         # f', g' <- EMA
    model.queue.enqueue(k2_all)                                             # C <- view-2 keys
    return loss.detach(), stats, search_s


def train_one_epoch(model, ddp_model, loader, optimizer, scaler, epoch, start_it, steps, args, env):
    """Iterations start_it .. steps-1 of one epoch. Returns (statistics, iterations done, stopped).

    It stops early, on every rank after the same step, once any rank has received SIGTERM
    (env.stop, set by the signal handler that main installs).
    """
    total = steps * args.epochs
    use_amp = env.device.type == "cuda" and args.amp != "none"
    amp_dtype = torch.float16 if args.amp == "fp16" else torch.bfloat16
    sums = torch.zeros(3, dtype=torch.float64)  # loss, w_mean, search seconds
    w_max, start, it, stop = 0.0, time.perf_counter(), start_it, False
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not env.main, dynamic_ncols=True,
               initial=start_it, total=steps)
    for (x1, x2), _ in bar:
        step = epoch * steps + it
        lr, m = learning_rate(step, steps, args), momentum_schedule(step, total, args.momentum)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x1, x2 = x1.to(env.device, non_blocking=True), x2.to(env.device, non_blocking=True)
        loss, stats, search_s = train_step(model, ddp_model, x1, x2, optimizer, scaler, m, env.rank,
                                           torch.autocast(env.device.type, amp_dtype, enabled=use_amp))
        it += 1
        # One small collective per step: loss (for the log and the NaN check), w statistics, and
        # whether any rank received SIGTERM (every rank must stop after the same step).
        mine = torch.stack([loss.float(), stats["w_mean"].float(), stats["w_max"].float(),
                            torch.tensor(float(env.stop.is_set()), device=loss.device)])
        every = distributed.all_gather(mine[None]).cpu()                     # (R, 4)
        loss_v, w_mean = every[:, 0].mean().item(), every[:, 1].mean().item()
        if not math.isfinite(loss_v):
            raise FloatingPointError(f"loss is {loss_v} at step {step} (epoch {epoch + 1}, iteration "
                                     f"{it - 1}); stopped, the last checkpoint in {args.output_dir} is kept")
        sums += torch.tensor([loss_v, w_mean, search_s], dtype=torch.float64)
        w_max, stop = max(w_max, every[:, 2].max().item()), bool(every[:, 3].any())
        bar.set_postfix(loss=f"{loss_v:.4f}", lr=f"{lr:.3g}", w=f"{w_mean:.3f}", K=model.neighbors_ready())
        if stop:
            break
    done, elapsed = max(it - start_it, 1), time.perf_counter() - start
    log = {"epoch": epoch + 1, "loss": sums[0].item() / done, "lr": lr, "momentum": m,
           "w_mean": sums[1].item() / done, "w_max": w_max, "nn_search_ms": 1000 * sums[2].item() / done,
           "images_per_s": done * args.batch_size / elapsed, "epoch_s": elapsed}
    return log, it, stop


# Options that change the model's tensors: a checkpoint resumes only a run that agrees on them.
STRUCTURE = ("arch", "stem", "image_size", "dim", "mlp_dim", "queue_size", "positiveness")


def build_model(a: dict) -> SNCLR:
    """The SNCLR model a run's options describe (a dict, as stored in args.json and checkpoints)."""
    try:
        return SNCLR(a["arch"], a["image_size"], a["dim"], a["mlp_dim"], a["tau"], a["num_neighbors"],
                     a["queue_size"], a["positiveness"], a["loss_form"], a["threshold"],
                     a["stop_grad_patch"], a["stem"])
    except ValueError as e:  # e.g. a ViT patch size that does not divide the image size
        raise ConfigError(str(e)) from None


def wrap_ddp(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    """DDP for gradient averaging only. No buffer broadcast before each forward: the queue
    (65536 x 256 floats) is identical on every rank by construction, and CPU ranks average their
    BatchNorm statistics once per epoch (SyncBatchNorm is CUDA-only). Newer PyTorch renamed the
    option."""
    option = "forward_sync_buffers" if "forward_sync_buffers" in \
        inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers"
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   **{option: False})


def build_data(args, env):
    """Pretraining loader (two views), its sampler, and the kNN monitor's sets and class count."""
    failed = None
    if env.main:  # rank 0 downloads first (when the dataset can be, and a network exists)
        try:
            build_dataset(args.dataset, args.data_path, True, None, True, args.fake_size, args.image_size)
        except DataError as e:
            failed = e
    # every rank learns whether rank 0 failed (this is also the barrier after the download)
    if distributed.all_reduce_sum(torch.tensor([float(failed is not None)], device=env.device)).item():
        raise failed or DataError(f"rank 0 could not prepare --dataset {args.dataset}; see its error")
    views = TwoViews(*two_view_transforms(args.dataset, args.image_size, args.crop_min))
    train_set = fixed_subset(build_dataset(args.dataset, args.data_path, True, views, False,
                                           args.fake_size, args.image_size), args.subset, args.seed)
    if len(train_set) < args.batch_size:
        raise ConfigError(f"{len(train_set)} training images are fewer than one --batch-size {args.batch_size}")
    local_batch = args.batch_size // env.world_size
    sampler = EpochSampler(torch.utils.data.DistributedSampler(train_set, env.world_size, env.rank, shuffle=True,
                                                               seed=args.seed, drop_last=True))
    loader = torch.utils.data.DataLoader(train_set, local_batch, sampler=sampler, num_workers=args.workers,
                                         pin_memory=env.device.type == "cuda", drop_last=True,
                                         worker_init_fn=ignore_sigterm)
    test_t = eval_transform(args.dataset, args.image_size)
    knn_train = build_dataset(args.dataset, args.data_path, True, test_t, False, args.fake_size, args.image_size)
    knn_test = build_dataset(args.dataset, args.data_path, False, test_t, False, args.fake_size, args.image_size)
    num_classes = NUM_CLASSES.get(args.dataset) or len(knn_train.classes)
    knn_sets = (fixed_subset(knn_train, args.knn_train_size, args.seed),
                fixed_subset(knn_test, args.knn_test_size, args.seed))
    return loader, sampler, len(sampler.base) // local_batch, knn_sets, num_classes


def monitor_knn(model, knn_sets, num_classes, args, env, tag: str) -> float:
    """kNN top-1 of the online encoder f (eval mode; training mode is restored)."""
    acc = knn_accuracy(model.backbone, *knn_sets, num_classes, max(args.batch_size // env.world_size, 64),
                       args.workers, env.device, env.rank, env.world_size, args.knn_k, args.knn_t)
    if env.main:
        print(f"kNN top-1 ({tag}): {acc:.2f}%")
    return acc


def restore(ckpt: dict, path: str, model, optimizer, scaler) -> tuple[int, int]:
    """Load a checkpoint into model, optimizer and scaler; return where training continues."""
    load_state(model, ckpt["model"], f"checkpoint {path}")
    load_state(optimizer, ckpt["optimizer"], f"the optimizer state of {path}")
    if ckpt.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(ckpt["scaler"])
    return ckpt["epoch"], ckpt.get("step_in_epoch", 0)


def run(args, env) -> None:
    check_args(args, env.world_size)
    ckpt_path = args.resume or os.path.join(args.output_dir, "checkpoint.pth")
    structure = {key: getattr(args, key) for key in STRUCTURE}
    ckpt = load_checkpoint(ckpt_path, structure) if args.resume or os.path.isfile(ckpt_path) else None
    loader, sampler, steps, knn_sets, num_classes = build_data(args, env)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = build_model(vars(args)).to(env.device)
    if env.world_size > 1 and env.device.type == "cuda":  # SyncBatchNorm is CUDA-only in PyTorch
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(model, args)
    scaler = torch.amp.GradScaler(env.device.type, enabled=env.device.type == "cuda" and args.amp == "fp16")
    epoch, start_it = restore(ckpt, ckpt_path, model, optimizer, scaler) if ckpt else (0, 0)
    ddp_model = wrap_ddp(model, env.device) if env.world_size > 1 else model
    log_path, save_path = os.path.join(args.output_dir, "log.txt"), os.path.join(args.output_dir, "checkpoint.pth")
    if env.main:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
    baseline = ckpt.get("knn_random_init") if ckpt else None
    if epoch == 0 and start_it == 0:  # every run measures its own random-init baseline
        baseline = monitor_knn(model, knn_sets, num_classes, args, env, "random init")
        if env.main:
            append_json(log_path, {"epoch": 0, "knn_top1": baseline})

    def save(epoch, step_in_epoch=0):  # (epoch, step) = where training continues
        if env.main:
            save_checkpoint(save_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                        "scaler": scaler.state_dict(), "epoch": epoch,
                                        "step_in_epoch": step_in_epoch, "knn_random_init": baseline,
                                        "args": vars(args)})

    end = min(args.epochs, args.stop_after_epoch or args.epochs)
    if epoch >= end and env.main:
        print(f"{save_path} is at epoch {epoch}: nothing to train (--epochs {args.epochs})")
    for epoch in range(epoch, end):
        sampler.set_epoch(epoch, skip=start_it * (args.batch_size // env.world_size))
        torch.manual_seed(args.seed + 1000 * epoch + 100 * start_it + env.rank)  # reproducible augmentations
        log, it, stopped = train_one_epoch(model, ddp_model, loader, optimizer, scaler, epoch, start_it, steps,
                                           args, env)
        start_it = 0
        distributed.average_batchnorm_stats(model)  # CPU ranks: one set of statistics to eval and save
        if stopped and it < steps:
            save(epoch, it)
            if env.main:
                print(f"SIGTERM: saved {save_path} at epoch {epoch + 1}, iteration {it}; rerun the same command "
                      "to resume from there")
            return
        if epoch + 1 == args.epochs or (args.knn_every > 0 and (epoch + 1) % args.knn_every == 0):
            log["knn_top1"] = monitor_knn(model, knn_sets, num_classes, args, env, f"epoch {epoch + 1}")
            if epoch + 1 == args.epochs and baseline is not None and env.main:  # the demo's two figures
                print(f"kNN top-1: random init {baseline:.2f}% -> after {args.epochs} epochs {log['knn_top1']:.2f}%")
        save(epoch + 1)
        if env.main:
            append_json(log_path, log)
            print(json.dumps(log))
        if stopped:  # SIGTERM during the epoch's last step: the epoch is complete and saved
            if env.main:
                print(f"SIGTERM: saved {save_path} after epoch {epoch + 1}; rerun the same command to resume")
            return
    distributed.barrier()


def main(argv=None) -> None:
    args = resolve_args(get_args_parser().parse_args(argv))
    previous = None
    try:
        try:
            env = distributed.init_distributed(args.device)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if threading.current_thread() is threading.main_thread():  # SIGTERM: finish the step, save, exit
            previous = signal.signal(signal.SIGTERM, lambda *_: env.stop.set())
        run(args, env)
    except (ConfigError, DataError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        distributed.cleanup()


if __name__ == "__main__":
    main()
