"""SNCLR pretraining: `torchrun --nproc_per_node=G train.py --arch resnet50 --data-path DIR`.

Also runs as `python train.py ...` (one process, CPU or GPU). Every epoch rank 0 rewrites
OUTPUT/checkpoint.pth atomically and appends one JSON line to OUTPUT/log.txt; rerunning the same
command resumes from the checkpoint. A kNN monitor measures the random-initialised encoder
before training and the encoder every --knn-every epochs. SIGTERM saves and exits with status
143. See README.md for recipes and measured results.
"""
import argparse
import json
import math
import os
import signal
import sys
import threading
import time

import torch
import torch.nn as nn

import cli
import distributed
from checkpoint import (ConfigError, RunLock, append_json, check_output_dir, check_resume, load_checkpoint,
                        load_state, prepare_output_dir, save_checkpoint)
from cli import nonneg_float, nonneg_int, positive_float, positive_int
from data import DATASETS, FASHION_MNIST_DEB, IMAGE_SIZE, DataError
from knn import knn_accuracy
from lars import LARS, param_groups
from loaders import AUGMENT_DEVICES, build_knn_sets, build_train_loader, prepare_dataset
from loss import FORMS
from model import ARCHS, RESNETS, STEMS, VITS, SNCLR, build_model, momentum_schedule
from neighbour_monitor import NeighbourQuality
from progress import Progress
from positiveness import MODES

# Recipes that differ between ResNets (MoCo v3, LARS) and ViTs (MoCo v3 / released SNCLR, AdamW);
# crop_min from MoCo v3's CONFIG.md (0.2 in its ResNet-50 commands, 0.08 for ViTs).
RECIPES = {"resnet": dict(optimizer="lars", lr=0.6, weight_decay=1e-6, tau=1.0, epochs=100,
                          warmup_epochs=10, crop_min=0.2),
           "vit": dict(optimizer="adamw", lr=1.5e-4, weight_decay=0.1, tau=0.2, epochs=300,
                       warmup_epochs=40, crop_min=0.08)}
# kNN monitor (bank, queries) on ImageNet: fixed subsets, so an epoch's monitor encodes 110k
# images (one forward each) against the epoch's 1.28M x 8 forward-equivalents: about 1 %.
KNN_SUBSETS = {"imagenet": (100_000, 10_000)}


def get_args_parser() -> argparse.ArgumentParser:
    p = cli.Parser("train.py", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    # model
    a("--arch", default="resnet50", choices=ARCHS, help="encoder f; the paper uses resnet50, vit_small, vit_base")
    a("--stem", default="auto", choices=STEMS, help="auto: small-image stem (3x3 conv, no max-pool / "
      "4x4 patches) at <= 64 px, else torchvision's; imagenet keeps torchvision's stem at any size")
    a("--dim", type=positive_int, default=256, help="output dim of projector and predictor (MoCo v3)")
    a("--mlp-dim", type=positive_int, default=4096, help="hidden dim of projector and predictor MLPs (MoCo v3)")
    a("--stop-grad-patch", action=argparse.BooleanOptionalAction, default=True,
      help="ViT only: freeze the random patch embedding (MoCo v3's stability trick)")
    # SNCLR
    a("-K", "--num-neighbors", type=nonneg_int, default=30, help="neighbours per key (Eq. 3); the paper's "
      "ablation finds 30 best; 0 gives the MoCo v3 / InfoNCE baseline")
    a("--queue-size", type=positive_int, default=65536, help="memory queue C; 'relatively large' in the "
      "paper, 128000 in the released ViT-S run; must hold at least one global batch")
    a("--positiveness", default="cosine", choices=MODES, help="Eq. 4: cosine = released code, "
      "attention = paper text, hard / none = ablations")
    a("--positiveness-t", type=positive_float, default=1.0, help="cosine positiveness temperature t: "
      "w = softmax(cos / t); 1 is the released code, smaller is sharper")
    a("--learn-gamma", action="store_true", help="attention positiveness: learn the paper's scaling "
      "factor gamma (log-parameterised, starts at 1; logged as 'gamma')")
    a("--loss-form", default="code", choices=FORMS, help="Eq. 2: code = soft-target cross-entropy "
      "(released), paper = log of the weighted sum (as printed)")
    a("--threshold", action="store_true", help="released code's option: zero the w below 1/K")
    a("--tau", type=positive_float, default=None, help="temperature; default 1.0 for ResNets, 0.2 for ViTs "
      "(MoCo v3)")
    a("--momentum", type=nonneg_float, default=0.99, help="base EMA momentum in [0, 1], raised to 1 on a "
      "half cosine (MoCo v3)")
    # optimisation
    a("--epochs", type=positive_int, default=None, help="default 100 for ResNets (MoCo v3), 300 for ViTs "
      "(SNCLR ViT-S)")
    a("--warmup-epochs", type=nonneg_float, default=None, help="linear lr warm-up; default 10 ResNets, 40 ViTs "
      "(MoCo v3)")
    a("--batch-size", type=positive_int, default=4096, help="global batch over all ranks (paper: 4096); "
      "each rank takes batch-size / world-size")
    a("--optimizer", default=None, choices=("lars", "adamw", "sgd"), help="default lars for ResNets, adamw "
      "for ViTs (MoCo v3)")
    a("--lr", type=positive_float, default=None, help="base lr, scaled by batch-size / 256; default 0.6 "
      "(ResNet, LARS) or 1.5e-4 (ViT, AdamW) as in MoCo v3")
    a("--weight-decay", type=nonneg_float, default=None, help="default 1e-6 ResNets, 0.1 ViTs (MoCo v3); "
      "LARS and SGD leave biases and norm weights undecayed (MoCo v3's LARS), AdamW decays every "
      "parameter (MoCo v3's ViT recipe)")
    a("--amp", default="bf16", choices=("bf16", "fp16", "none"), help="mixed precision on CUDA (CPU runs fp32)")
    a("--compile", action="store_true", help="torch.compile the two backbones (the GPU recipes use it; "
      "the first steps are slow while it compiles)")
    # data
    a("--dataset", default="imagenet", choices=DATASETS, help="imagenet and folder read DATA_PATH/train "
      "and DATA_PATH/val; cifar downloads when a network exists; fake needs no data")
    a("--data-path", default=None, help=f"dataset root (stored absolute); default ./data, or "
      f"{FASHION_MNIST_DEB} for fashion-mnist (Debian package dataset-fashion-mnist)")
    a("--image-size", type=positive_int, default=None, help="default: 224 ImageNet/folder, 32 CIFAR/fake, "
      "28 Fashion-MNIST; <= 64 selects the small-image stems")
    a("--crop-min", type=positive_float, default=None, help="smallest RandomResizedCrop area; default 0.2 "
      "for ResNets, 0.08 for ViTs (MoCo v3)")
    a("--augment-device", default="auto", choices=AUGMENT_DEVICES, help="where the augmentations run: "
      "workers = PIL in DataLoader workers (the readable reference), cpu / cuda = batched on that device "
      "(augment.py; small data sets then live on the device); auto = cuda when training on CUDA, else workers")
    a("--subset", type=nonneg_int, default=0, help="train on a fixed random subset of this many images (0 = all)")
    a("--fake-size", type=positive_int, default=512, help="images in --dataset fake")
    a("--workers", type=nonneg_int, default=8, help="data-loading processes per rank")
    a("--strict-data", action="store_true", help="stop at an unreadable training image instead of "
      "skipping it (skips are counted in log.txt)")
    # monitor, output, runtime
    a("--knn-every", type=nonneg_int, default=1, help="kNN monitor every N epochs (0 = only before and after)")
    a("--knn-k", type=positive_int, default=200, help="kNN neighbours (InstDisc)")
    a("--knn-t", type=positive_float, default=0.07, help="kNN vote temperature (InstDisc)")
    a("--knn-train-size", type=nonneg_int, default=None, help="kNN bank: a fixed subset of the train split; "
      "default 100000 for imagenet (about 1 %% of an epoch's compute), else all (0)")
    a("--knn-test-size", type=nonneg_int, default=None, help="kNN queries: a fixed subset of the test split; "
      "default 10000 for imagenet, else all (0)")
    a("--print-freq", type=positive_int, default=20, help="read loss and w every N steps: progress bar "
      "figures, or one plain line when stderr is not a terminal (SLURM, nohup); a NaN or a SIGTERM "
      "stops the run at the next such step")
    a("--output-dir", default="output", help="args.json, log.txt, checkpoint.pth; resumes from its checkpoint")
    a("--resume", default=None, help="resume from this checkpoint instead of OUTPUT/checkpoint.pth")
    a("--allow-changed-args", action="store_true", help="resume even though options differ from the "
      "checkpoint's (the differences are printed and logged); without it such a resume is refused")
    a("--device", default="auto", choices=("auto", "cuda", "cpu"), help="auto = CUDA when available")
    a("--seed", type=int, default=0, help="seed for weights, data order and augmentations")
    a("--stop-after-epoch", type=nonneg_int, default=0, help="end this launch once this epoch is done, the "
      "schedules still spanning --epochs (for time-limited jobs); rerun to continue (0 = never)")
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of args with the arch / dataset dependent defaults filled in."""
    out = dict(vars(args))
    for key, value in RECIPES["vit" if args.arch in VITS else "resnet"].items():
        if out[key] is None:
            out[key] = value
    data_path = args.data_path or (FASHION_MNIST_DEB if args.dataset == "fashion-mnist" else "data")
    out["data_path"] = os.path.abspath(data_path)  # so evaluation finds it from any folder
    if out["image_size"] is None:
        out["image_size"] = IMAGE_SIZE[args.dataset]
    bank, queries = KNN_SUBSETS.get(args.dataset, (0, 0))
    out["knn_train_size"] = bank if args.knn_train_size is None else args.knn_train_size
    out["knn_test_size"] = queries if args.knn_test_size is None else args.knn_test_size
    return argparse.Namespace(**out)


def check_args(args, env) -> None:
    """Option combinations the parser cannot check alone; one ConfigError line each."""
    if args.batch_size % env.world_size:
        raise ConfigError(f"--batch-size {args.batch_size} is not divisible by the world size "
                          f"{env.world_size}; use a multiple of {env.world_size}")
    if args.num_neighbors > args.queue_size:
        raise ConfigError(f"-K {args.num_neighbors} must be in [0, --queue-size {args.queue_size}]")
    if args.queue_size < args.batch_size:
        raise ConfigError(f"--queue-size {args.queue_size} must hold one global batch "
                          f"(--batch-size {args.batch_size})")
    if args.momentum > 1 or args.crop_min > 1:
        raise ConfigError(f"--momentum ({args.momentum}) and --crop-min ({args.crop_min}) must be at most 1")
    if args.positiveness_t != 1.0 and args.positiveness != "cosine":
        raise ConfigError(f"--positiveness-t applies to --positiveness cosine, not {args.positiveness}")
    if args.learn_gamma and args.positiveness != "attention":
        raise ConfigError(f"--learn-gamma applies to --positiveness attention, not {args.positiveness}")
    wanted = args.augment_device
    if wanted in ("cpu", "cuda") and wanted != env.device.type:
        raise ConfigError(f"--augment-device {wanted} must be the training device ({env.device.type}); use "
                          f"--augment-device {env.device.type} or workers")


def runtime(args, env) -> dict:
    """What a run resolved on its machine (not in args: --device auto and --augment-device auto
    resolve here), stored in checkpoints beside the world size so a resume that changes it is
    noticed."""
    return {"device": env.device.type, "augment": augment_path(args, env)}


def augment_path(args, env) -> str:
    """--augment-device resolved: "workers", "cpu" or "cuda"."""
    if args.augment_device == "auto":
        return "cuda" if env.device.type == "cuda" else "workers"
    return args.augment_device


def learning_rate(step: int, steps_per_epoch: int, args) -> float:
    """lr = base_lr * batch / 256 (Goyal et al.), linear warm-up then cosine, per step (MoCo v3)."""
    peak = args.lr * args.batch_size / 256
    epoch = step / steps_per_epoch
    if epoch < args.warmup_epochs:
        return peak * epoch / args.warmup_epochs
    progress = (epoch - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-8)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def build_optimizer(model: nn.Module, args):
    if args.optimizer == "adamw":  # MoCo v3's ViT recipe decays every parameter
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0,
                                 weight_decay=args.weight_decay)
    groups = param_groups(model, args.weight_decay)
    if args.optimizer == "lars":
        return LARS(groups, weight_decay=args.weight_decay, momentum=0.9)
    return torch.optim.SGD(groups, lr=0.0, momentum=0.9, weight_decay=args.weight_decay)


def train_step(model: SNCLR, ddp_model: nn.Module, x1, x2, optimizer, scaler, momentum: float,
               rank: int = 0, autocast=None, labels=None):
    """One SNCLR step, every state change in order. Returns (loss, w, same, search_s).

    model is the bare SNCLR; ddp_model the same module wrapped for gradient averaging (or model
    itself in one process); autocast a mixed-precision context (None: fp32); labels (B,) the
    images' classes or None. loss () and w (2B, K) stay on the device: nothing here waits for
    the GPU. same (2B, K) marks the neighbours whose queue label is the image's (None without
    labels); it is for monitoring only: the loss never sees a label. search_s is the neighbour
    search's time on the CPU, None on CUDA (timing it there would synchronise).
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
    search_s = time.perf_counter() - t0 if x1.device.type == "cpu" else None
    n1_all = model.queue.features[distributed.all_gather(idx1)]             # (N, K, dim)
    n2_all = model.queue.features[distributed.all_gather(idx2)]             # (N, K, dim)
    with autocast:                                                          # Eq. 4 + Eq. 2
        loss, w = ddp_model(x1, x2, k1_all, k2_all, n1_all, n2_all, rank)   # (), (2B, K)
    same = None  # w's rows: view 1 (neighbours of k2), then view 2 (neighbours of k1)
    if labels is not None:
        same = model.queue.labels[torch.cat([idx2, idx1])] == labels.repeat(2)[:, None]  # (2B, K)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    model.momentum_update(momentum)                                         # f', g' <- EMA
    model.queue.enqueue(k2_all, None if labels is None else distributed.all_gather(labels))  # C <- view 2
    return loss.detach(), w, same, search_s


def train_one_epoch(model, ddp_model, loader, optimizer, scaler, epoch, start_it, args, env, labelled: bool,
                    stopper: distributed.StopAgreement):
    """Iterations start_it .. steps-1 of one epoch. Returns (log entry, iterations done, stopped).

    No host-device synchronisation per step (see Progress). It stops early, on every rank after
    the same step, once any rank has received SIGTERM (the signal handler sets the event that
    stopper polls; a step in progress, or a wait for its batch, is finished first).
    """
    steps = loader.steps
    use_amp = env.device.type == "cuda" and args.amp != "none"
    autocast = torch.autocast(env.device.type, torch.float16 if args.amp == "fp16" else torch.bfloat16,
                              enabled=use_amp)
    channels_last = env.device.type == "cuda" and args.arch in RESNETS
    progress, quality = Progress(args, env, epoch, start_it, steps), NeighbourQuality(env.device)
    kept = f"the last checkpoint in {args.output_dir} is kept" if epoch or start_it else "no checkpoint was written"
    it, stop, lr, m = start_it, False, 0.0, 0.0
    waited = time.perf_counter()
    for (x1, x2), y in loader:
        wait_s = time.perf_counter() - waited
        step = epoch * steps + it
        lr, m = learning_rate(step, steps, args), momentum_schedule(step, steps * args.epochs, args.momentum)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if channels_last:  # cuDNN's fastest convolution layout (setup converts the model)
            x1, x2 = x1.contiguous(memory_format=torch.channels_last), x2.contiguous(memory_format=torch.channels_last)
        loss, w, same, search_s = train_step(model, ddp_model, x1, x2, optimizer, scaler, m, env.rank, autocast,
                                             y if labelled else None)
        it += 1
        progress.add(loss, w, search_s, wait_s)
        if same is not None:
            quality.update(w, same)
        stop = stopper.poll()  # every rank agrees after every step, without waiting for the GPU
        if stop or it % args.print_freq == 0 or it == steps:
            progress.read(it, lr, kept)
        if stop:
            break
        waited = time.perf_counter()
    stop = stopper.finish() or stop  # a SIGTERM during the last step
    log = progress.summary(max(it - start_it, 1), lr, m)
    if args.learn_gamma:
        log["gamma"] = model.positiveness.gamma.item()
    return {**log, **quality.summary()}, it, stop


def monitor_knn(model, knn_sets, num_classes, args, env, tag: str):
    """kNN top-1 of the online encoder f (eval mode; training mode is restored); None when a
    SIGTERM interrupted it."""
    acc = knn_accuracy(model.backbone, *knn_sets, num_classes, max(args.batch_size // env.world_size, 64),
                       args.workers, env.device, env.rank, env.world_size, args.knn_k, args.knn_t, stop=env.stop)
    if env.main and acc is not None:
        print(f"kNN top-1 ({tag}): {acc:.2f}%")
    return acc


def restore(ckpt: dict, path: str, model, optimizer, scaler) -> tuple[int, int]:
    """Load a checkpoint into model, optimizer and scaler; return where training continues."""
    load_state(model, ckpt["model"], f"checkpoint {path}")
    load_state(optimizer, ckpt["optimizer"], f"the optimizer state of {path}")
    if ckpt.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(ckpt["scaler"])
    return ckpt["epoch"], ckpt.get("step_in_epoch", 0)


def setup(args, env):
    """Everything a run needs, checked before anything is written: data, model, optimizer,
    scaler, the checkpoint to resume and the option changes it accepts."""
    check_args(args, env)
    ckpt_path = args.resume or os.path.join(args.output_dir, "checkpoint.pth")
    ckpt = load_checkpoint(ckpt_path) if args.resume or os.path.isfile(ckpt_path) else None
    changes = check_resume(ckpt, ckpt_path, vars(args), {"world_size": env.world_size, **runtime(args, env)},
                           args.allow_changed_args) if ckpt else []
    check_output_dir(args.output_dir)  # before the data is read; created after everything is checked
    prepare_dataset(args, env)
    loader = build_train_loader(args, env, augment_path(args, env))
    knn_sets, num_classes = build_knn_sets(args)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    try:
        model = build_model(vars(args)).to(env.device)
    except ValueError as e:  # e.g. a ViT patch size that does not divide the image size
        raise ConfigError(str(e)) from None
    if env.world_size > 1 and env.device.type == "cuda":  # SyncBatchNorm is CUDA-only in PyTorch
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
        if args.arch in RESNETS:
            model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, args)
    scaler = torch.amp.GradScaler(env.device.type, enabled=env.device.type == "cuda" and args.amp == "fp16")
    start = restore(ckpt, ckpt_path, model, optimizer, scaler) if ckpt else (0, 0)
    if args.compile:  # in place: the state dict keeps its keys
        model.backbone.compile()
        model.momentum_backbone.compile()
    return loader, knn_sets, num_classes, model, optimizer, scaler, ckpt, start, changes


def run(args, env) -> int:
    """Train, then return the exit status: 0, or cli.EXIT_PREEMPTED after a SIGTERM."""
    loader, knn_sets, num_classes, model, optimizer, scaler, ckpt, (epoch, start_it), changes = setup(args, env)
    ddp_model = distributed.wrap_ddp(model, env.device) if env.world_size > 1 else model
    log_path = os.path.join(args.output_dir, "log.txt")
    lock, failed = None, None
    if env.main:  # the first writes: the folder, its lock, args.json
        try:
            prepare_output_dir(args.output_dir)
            lock = RunLock(args.output_dir)
            with open(os.path.join(args.output_dir, "args.json"), "w") as f:
                json.dump(vars(args), f, indent=2)
            for change in changes:
                print(f"resumed with a changed option (--allow-changed-args): {change}")
            if changes:  # logged with the first epoch they apply to
                append_json(log_path, {"epoch": epoch + 1, "changed_args": changes})
        except ConfigError as e:
            failed = e
    if not distributed.all_ok(failed is None, env.device):
        raise failed or ConfigError(f"rank 0 cannot use --output-dir {args.output_dir}")
    try:
        return train_epochs(model, ddp_model, loader, optimizer, scaler, knn_sets, num_classes, ckpt, epoch,
                            start_it, args, env)
    finally:
        loader.close()
        if lock is not None:
            lock.release()


def save(path: str, state: dict, env, log_path: str, log: dict = None) -> None:
    """Rank 0 writes the checkpoint; every rank learns whether it could, so a full disk stops
    all of them (one line, from rank 0). The epoch's log line is kept even then."""
    error = None
    if env.main:
        try:
            save_checkpoint(path, state)
        except ConfigError as e:
            error = e
            if log:
                append_json(log_path, log)
    if not distributed.all_ok(error is None, env.device):
        raise error or ConfigError("rank 0 could not save the checkpoint; see its error")


def train_epochs(model, ddp_model, loader, optimizer, scaler, knn_sets, num_classes, ckpt, epoch, start_it,
                 args, env) -> int:
    """The epoch loop. After each epoch: the log line is ready, the checkpoint is saved, and
    only then does the kNN monitor run, so a SIGTERM during the monitor (or the save) loses
    nothing: the run stops within seconds with a complete checkpoint."""
    log_path, save_path = os.path.join(args.output_dir, "log.txt"), os.path.join(args.output_dir, "checkpoint.pth")
    baseline = ckpt.get("knn_random_init") if ckpt else None
    state = lambda epoch, step=0: {  # noqa: E731  (epoch, step) = where training continues
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
        "epoch": epoch, "step_in_epoch": step, "knn_random_init": baseline, "args": vars(args),
        "world_size": env.world_size, "runtime": runtime(args, env)}
    if epoch == 0 and start_it == 0:  # every run measures its own random-init baseline
        baseline = monitor_knn(model, knn_sets, num_classes, args, env, "random init")
        if baseline is None:
            return preempted(env, "before training; nothing was saved")
        if env.main:
            append_json(log_path, {"epoch": 0, "knn_top1": baseline})
    end = min(args.epochs, args.stop_after_epoch or args.epochs)
    if epoch >= end and env.main:
        print(f"{save_path} is at epoch {epoch}: nothing to train (it stops after epoch {end}: --epochs "
              f"{args.epochs}, --stop-after-epoch {args.stop_after_epoch})")
    labelled, stopper = num_classes > 1, distributed.StopAgreement(env.stop)  # one class: no labels to compare
    for epoch in range(epoch, end):
        loader.set_epoch(epoch, start_it)
        skipped = loader.skipped()
        log, it, stopped = train_one_epoch(model, ddp_model, loader, optimizer, scaler, epoch, start_it, args, env,
                                           labelled, stopper)
        start_it = 0
        distributed.average_batchnorm_stats(model)  # CPU ranks: one set of statistics to eval and save
        if stopped and it < loader.steps:
            save(save_path, state(epoch, it), env, log_path)
            return preempted(env, f"at epoch {epoch + 1}, iteration {it}; saved {save_path}")
        log["skipped_images"] = int(distributed.all_reduce_sum(
            torch.tensor([loader.skipped() - skipped], device=env.device)).item())
        save(save_path, state(epoch + 1), env, log_path, log)
        due = epoch + 1 == args.epochs or (args.knn_every > 0 and (epoch + 1) % args.knn_every == 0)
        if due and not stopped:
            knn = monitor_knn(model, knn_sets, num_classes, args, env, f"epoch {epoch + 1}")
            stopped = knn is None
            log.update({"knn_top1": knn} if knn is not None else {"knn_interrupted": True})
        if env.main:
            append_json(log_path, log)
            print(json.dumps(log))
        if stopped:
            return preempted(env, f"after epoch {epoch + 1}; saved {save_path}")
        if epoch + 1 == args.epochs and baseline is not None and env.main:  # the run's closing figures
            print(summary_line(baseline, log, args.epochs))
    distributed.barrier()
    return 0


def summary_line(baseline: float, log: dict, epochs: int) -> str:
    """kNN before and after; with labels, how the last epoch's neighbours and w did."""
    line = f"kNN top-1: random init {baseline:.2f}% -> after {epochs} epochs {log['knn_top1']:.2f}%"
    if "nn_agree" in log:
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731 (undefined: e.g. w = 0 throughout)
        line += (f"; last epoch: {100 * log['nn_agree']:.1f}% of neighbours share the class, mean w "
                 f"{fmt(log['w_same'])} same / {fmt(log['w_other'])} other class, w AUROC {fmt(log['w_auroc'])}")
    return line


def preempted(env, where: str) -> int:
    if env.main:
        print(f"SIGTERM: stopped {where}; rerun the same command to resume (exit status {cli.EXIT_PREEMPTED})")
    return cli.EXIT_PREEMPTED


def main(argv=None) -> None:
    """Parse, train, exit: status 0 when done, 143 after a SIGTERM, 1 with one `error:` line."""
    args = resolve_args(get_args_parser().parse_args(argv))
    env, previous, status = None, None, 0
    try:
        try:
            env = distributed.init_distributed(args.device)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if threading.current_thread() is threading.main_thread():  # SIGTERM: finish the step, save, exit
            previous = signal.signal(signal.SIGTERM, lambda *_: env.stop.set())
        status = run(args, env)
    except (ConfigError, DataError, FloatingPointError) as e:
        # options are the same on every rank: rank 0 alone reports them; a data or numeric error
        # may be one rank's own (its shard, its GPU's memory), so that rank reports it
        cli.fail(e, show=env is None or env.main or not isinstance(e, ConfigError),
                 rank=None if env is None or env.world_size == 1 else env.rank)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        distributed.cleanup()
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
