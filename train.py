"""SNCLR pretraining: the training step, the epoch and the schedules (paper Sec. 3).

    torchrun --nproc_per_node=G train.py --arch resnet50 --data-path DIR     (or: python train.py ...)

One step, every state change in order (`train_step`; N = B x ranks images, K neighbors):

    k1, k2  = g'(f'(x1)), g'(f'(x2))                    momentum keys, no gradient   model.py
    k*_all  = all_gather(k*)                            (N, D)                       distributed.py
    idx*    = top-K cos(k*, C)                          Eq. 3, queue before update   memory_queue.py
    n*_all  = C[all_gather(idx*)]                       (N, K, D): C is the same on every rank
    w1, w2  = softmax_i(y1 . NN(k2)_i), (y2, NN(k1))    Eq. 4, y = g(f(x))           positiveness.py
    loss    = 2 tau (L(z1; k2, NN(k2), w1) + L(z2; k1, NN(k1), w2))   Eq. 2, z = h(y)   loss.py
    backward, optimizer step (DDP averages the gradients)
    f', g' <- m f' + (1 - m) (f, g)                     EMA, m: 0.99 -> 1 (half cosine)
    C <- enqueue(k2_all)                                FIFO, view-2 keys only (as released)

With K = 0 (or while C holds fewer than K keys) the loss is Eq. 1: the MoCo v3 baseline.
Nothing in the step waits for the GPU; the loop reads its figures every --print-freq steps.
What keeps a run alive (options, resume, checkpoints, lock, signals) is in options.py and
run_control.py; `python train.py --help` lists every option with its source.
"""
import contextlib
import math
import time

import torch
import torch.nn as nn

import options
import run_control
from distributed import all_gather
from lars import LARS, param_groups
from model import RESNETS, SNCLR, momentum_schedule
from neighbor_monitor import NeighborQuality
from progress import Progress


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


def train_step(model: SNCLR, ddp_model: nn.Module, x1, x2, optimizer, scaler, m: float, rank: int = 0,
               autocast=None, labels=None, quality: NeighborQuality = None):
    """One SNCLR step (the module docstring's pseudo-code). Returns (loss, w) on the device.

    model is the bare SNCLR, ddp_model the same wrapped for gradient averaging (or model itself
    in one process); x1, x2 (B, 3, H, W) this rank's two views; m the EMA momentum; autocast a
    mixed-precision context (None: fp32). w (2B, K): rows 0..B-1 weigh view 1's neighbors
    NN(k2), rows B..2B-1 view 2's NN(k1). labels (B,) and quality are for monitoring only:
    labels are stored beside the keys in C, the loss never sees them.
    """
    autocast = autocast or contextlib.nullcontext()
    with autocast:
        k1, k2 = model.momentum_keys(x1), model.momentum_keys(x2)          # k = g'(f'(x))   (B, D)
    k1_all, k2_all = all_gather(k1), all_gather(k2)                         # (N, D)
    # Eq. 3 in C before this step's keys go in. C is the same on every rank, so each rank
    # searches its own keys and only the (B, K) indices travel.
    K = model.neighbors_ready()
    idx1, idx2 = model.queue.nearest_indices(k1, K), model.queue.nearest_indices(k2, K)  # (B, K)
    n1_all = model.queue.features[all_gather(idx1)]                         # NN(k1)  (N, K, D)
    n2_all = model.queue.features[all_gather(idx2)]                         # NN(k2)  (N, K, D)
    with autocast:  # Eq. 4 + Eq. 2: 2 tau (L(z1; k2, NN(k2), w1) + L(z2; k1, NN(k1), w2))
        loss, w = ddp_model(x1, x2, k1_all, k2_all, n1_all, n2_all, rank)  # (), (2B, K)
    if quality is not None:  # same-class neighbors and w (before C changes)
        quality.observe(w, model.queue.labels, torch.cat([idx2, idx1]), labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    model.momentum_update(m)                                                # f', g' <- EMA of f, g
    model.queue.enqueue(k2_all, None if labels is None else all_gather(labels))  # C <- k2 (FIFO)
    return loss.detach(), w


def train_one_epoch(run: run_control.Run, epoch: int):
    """Iterations run.start_it .. steps-1 of one epoch. Returns (log entry, iterations done, stopped).

    It stops early, on every rank after the same step, once any rank has received SIGTERM or
    Ctrl-C (the step in progress, or the wait for its batch, is finished first).
    """
    args, env, loader, steps = run.args, run.env, run.loader, run.loader.steps
    cuda = env.device.type == "cuda"
    autocast = torch.autocast(env.device.type, torch.float16 if args.amp == "fp16" else torch.bfloat16,
                              enabled=cuda and args.amp != "none")
    channels_last = cuda and args.arch in RESNETS  # cuDNN's fastest convolution layout
    progress, quality = Progress(args, env, epoch, run.start_it, steps), NeighborQuality(env.device)
    kept = f"the last checkpoint in {args.output_dir} is kept" if epoch or run.start_it else "no checkpoint was written"
    it, stop, lr, m, waited = run.start_it, False, 0.0, 0.0, time.perf_counter()
    for (x1, x2), y in loader:
        wait_s = time.perf_counter() - waited
        step = epoch * steps + it
        lr, m = learning_rate(step, steps, args), momentum_schedule(step, steps * args.epochs, args.momentum)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        if channels_last:
            x1, x2 = (x.contiguous(memory_format=torch.channels_last) for x in (x1, x2))
        if args.compile_mode == "reduce-overhead":  # CUDA graphs may reuse the last step's outputs now
            torch.compiler.cudagraph_mark_step_begin()
        loss, w = train_step(run.model, run.ddp_model, x1, x2, run.optimizer, run.scaler, m, env.rank, autocast,
                             y if run.labelled else None, quality if run.labelled else None)
        it += 1
        progress.add(loss, w, wait_s)
        stop = run.stopper.poll()  # every rank agrees after every step, without waiting for the GPU
        if stop or it % args.print_freq == 0 or it == steps:
            progress.read(it, lr, kept)
        if stop:
            break
        waited = time.perf_counter()
    stop = run.stopper.finish() or stop  # a signal during the last step
    log = progress.summary(max(it - run.start_it, 1), lr, m)
    if args.learn_gamma:
        log["gamma"] = run.model.positiveness.gamma.item()
    return {**log, **quality.summary()}, it, stop


def train(args, env) -> int:
    """The epochs of this launch: train, then save and monitor (run_control). Returns the exit
    status: 0, or 128 + signal after a SIGTERM / Ctrl-C (saved, resumable)."""
    with run_control.setup(args, env, build_optimizer) as run:  # checks, data, model, resume, folder
        if not run.measure_baseline():  # kNN of the random-init encoder, once per run
            return run_control.preempted(env, "before training; nothing was saved")
        for epoch in range(run.epoch, run.end):
            run.loader.set_epoch(epoch, run.start_it)
            skipped = run.loader.skipped()
            log, it, stopped = train_one_epoch(run, epoch)
            status = run.end_epoch(epoch, it, log, stopped, run.loader.skipped() - skipped)  # save, log, kNN
            if status is not None:
                return status
    return 0


def main(argv=None) -> None:
    """Parse, train, exit: 0 done, 143 after SIGTERM, 130 after Ctrl-C, 1 with one `error:` line."""
    run_control.launch(train, options.parse_args(argv))


if __name__ == "__main__":
    main()
