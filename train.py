"""SNCLR pretraining: the training step, the epoch and the schedules (paper Sec. 3).

    torchrun --nproc_per_node=G train.py --arch resnet50 --data-path DIR   (or python train.py)

One step, every state change in order (`train_step`; B images on this rank, N = B R over the
R ranks, K neighbors; notation in README.md):

    k1, k2 = g'(f'(x1)), g'(f'(x2))               momentum keys, no gradient      model.py
    gather k1, k2 over ranks                      (N, D)
    idx1, idx2 = top-K_c cos(k, c), c in C        Eq. 3, C before this step        memory_queue.py
    n1, n2 = C[gather idx1], C[gather idx2]       NN(k1), NN(k2)  (N, K, D)
    w1 = softmax_i(y1 . NN(k2)_i), w2 likewise    Eq. 4, y = g(f(x))              positiveness.py
    loss = 2 tau (L(z1; k2, NN(k2), w1) + L(z2; k1, NN(k1), w2))   Eq. 2, z = h(y)  loss.py
    backward, optimizer step                      DDP averages the gradients
    f', g' <- m f' + (1 - m) (f, g)               EMA, m from 0.99 to 1 (half cosine)
    C <- k2                                       FIFO, view-2 keys only (as released)

C is the same on every rank, so each rank searches its own keys and only the (B, K) indices
travel. With K = 0 (or while C holds fewer than K keys) the loss is Eq. 1: the MoCo v3
baseline. Nothing in the step waits for the GPU. What keeps a run alive (options, resume,
checkpoints, lock, signals) is in runtime/; `python train.py --help` lists every option.
"""
import contextlib
import math
import time

import torch
import torch.nn as nn

from runtime import options
from runtime import run_control
from runtime.distributed import all_gather
from runtime.lars import LARS, param_groups
from model import RESNETS, SNCLR, momentum_schedule
from monitors.neighbor_quality import NeighborQuality
from runtime.progress import Progress
from runtime.signals import preempted


def learning_rate(step: int, steps_per_epoch: int, args) -> float:
    """lr = base_lr * batch / 256 (Goyal et al.), linear warm-up then half cosine, per step
    (MoCo v3)."""
    peak = args.lr * args.batch_size / 256
    epoch = step / steps_per_epoch
    if epoch < args.warmup_epochs:
        return peak * epoch / args.warmup_epochs
    progress = (epoch - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-8)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def build_optimizer(model: nn.Module, args):
    """MoCo v3's optimisers: LARS for ResNets (biases and norms neither decayed nor adapted),
    AdamW for ViTs (every parameter decayed); SGD with LARS's groups as a plain alternative."""
    if args.optimizer == "adamw":
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0,
                                 weight_decay=args.weight_decay)
    groups = param_groups(model, args.weight_decay)
    if args.optimizer == "lars":
        return LARS(groups, weight_decay=args.weight_decay, momentum=0.9)
    return torch.optim.SGD(groups, lr=0.0, momentum=0.9, weight_decay=args.weight_decay)


def train_step(model: SNCLR, ddp_model: nn.Module, x1, x2, optimizer, scaler, m: float,
               rank: int = 0, autocast=None, labels=None, quality: NeighborQuality = None):
    """One SNCLR step (the module docstring) on this rank's views x1, x2 (B, 3, H, W): the loss
    and w (2B, K: view 1's rows, then view 2's), on the device. ddp_model is model wrapped to
    average gradients (or model itself); m the EMA momentum; autocast None for fp32. labels (B,)
    go beside the keys in C for the monitor `quality`; the loss never sees them."""
    autocast = autocast or contextlib.nullcontext()
    with autocast:
        k1, k2 = model.momentum_keys(x1), model.momentum_keys(x2)          # (B, D)
    k1_all, k2_all = all_gather(k1), all_gather(k2)                         # (N, D)
    # Eq. 3 in C before this step's keys go in
    K = model.neighbors_ready()
    idx1, idx2 = model.queue.nearest_indices(k1, K), model.queue.nearest_indices(k2, K)  # (B, K)
    n1 = model.queue.features[all_gather(idx1)]                             # NN(k1) (N, K, D)
    n2 = model.queue.features[all_gather(idx2)]                             # NN(k2) (N, K, D)
    with autocast:  # Eq. 4 and Eq. 2, both views
        loss, w = ddp_model(x1, x2, k1_all, k2_all, n1, n2, rank)          # (), (2B, K)
    if quality is not None:  # same-class neighbors and their w, before C changes
        quality.observe(w, model.queue.labels, torch.cat([idx2, idx1]), labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    model.momentum_update(m)                                                # f', g' <- EMA
    model.queue.enqueue(k2_all, None if labels is None else all_gather(labels))  # C <- k2
    return loss.detach(), w


def train_one_epoch(run: run_control.Run, epoch: int):
    """Iterations run.start_it .. steps-1 of one epoch: (log entry, iterations done, stopped).

    It stops early, on every rank after the same step, once any rank has received SIGTERM or
    Ctrl-C (the step in progress, or the wait for its batch, is finished first).
    """
    args, env, loader, steps = run.args, run.env, run.loader, run.loader.steps
    cuda = env.device.type == "cuda"
    half = torch.float16 if args.amp == "fp16" else torch.bfloat16
    autocast = torch.autocast(env.device.type, half, enabled=cuda and args.amp != "none")
    channels_last = cuda and args.arch in RESNETS  # cuDNN's fastest convolution layout
    progress = Progress(args, env, epoch, run.start_it, steps)
    quality = NeighborQuality(env.device) if run.labelled else None  # monitoring only
    it, stop, lr, m, waited = run.start_it, False, 0.0, 0.0, time.perf_counter()
    for (x1, x2), y in loader:
        wait_s = time.perf_counter() - waited
        step = epoch * steps + it  # both schedules move every step
        lr = learning_rate(step, steps, args)
        m = momentum_schedule(step, steps * args.epochs, args.momentum)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        if channels_last:
            x1, x2 = (x.contiguous(memory_format=torch.channels_last) for x in (x1, x2))
        if args.compile_mode == "reduce-overhead":  # CUDA graphs may reuse last step's outputs now
            torch.compiler.cudagraph_mark_step_begin()
        loss, w = train_step(run.model, run.ddp_model, x1, x2, run.optimizer, run.scaler, m,
                             env.rank, autocast, y if run.labelled else None, quality)
        it += 1
        progress.add(loss, w, wait_s)
        stop = run.stopper.poll()  # every rank agrees after every step, without waiting for the GPU
        if stop or it % args.print_freq == 0 or it == steps:
            progress.read(it, lr)
        if stop:
            break
        waited = time.perf_counter()
    stop = run.stopper.finish() or stop  # a signal during the last step
    log = progress.summary(max(it - run.start_it, 1), lr, m)
    figures = quality.summary() if quality else {}
    return {**log, **run.model.positiveness.figures(), **figures}, it, stop


def train(args, env) -> int:
    """The epochs of this launch: train, then save and monitor (run_control). Returns the exit
    status: 0, or 128 + signal after a SIGTERM / Ctrl-C (saved, resumable)."""
    with run_control.setup(args, env, build_optimizer) as run:  # checks, data, model, resume
        if not run.measure_baseline():  # kNN of the random-init encoder, once per run
            return preempted(env, "before training; nothing was saved")
        for epoch in range(run.epoch, run.end):
            run.loader.set_epoch(epoch, run.start_it)
            skipped = run.loader.skipped()
            log, it, stopped = train_one_epoch(run, epoch)
            # save, log, then the kNN monitor
            status = run.end_epoch(epoch, it, log, stopped, run.loader.skipped() - skipped)
            if status is not None:
                return status
    return 0


def main(argv=None) -> None:
    """Parse, train, exit: 0 done, 143 after SIGTERM, 130 after Ctrl-C, 1 with one `error:` line."""
    run_control.launch(train, options.parse_args(argv))


if __name__ == "__main__":
    main()
