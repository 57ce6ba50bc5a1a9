"""Evaluate a train.py checkpoint: linear probe, kNN, semi-supervised fine-tuning, export.

    python eval_linear.py OUT/checkpoint.pth                     # linear probe (MoCo v3 protocol)
    python eval_linear.py OUT/checkpoint.pth --knn               # weighted kNN, no training
    python eval_linear.py OUT/checkpoint.pth --train-percent 1   # fine-tune all on 1 % of labels
    python eval_linear.py OUT/checkpoint.pth --export r50.pth    # torchvision state dict
    add --random-init to any of these to measure the same architecture untrained.

Dataset, path, image size (and --fake-size) default to the checkpoint's. --knn also takes the
checkpoint's kNN settings (k, T, the fixed bank / query subsets and their seed), so it gives
exactly the figure train.py's monitor logged for the checkpoint's epoch. Runs under torchrun
like train.py. Per-epoch JSON lines go to OUTPUT/log.txt, final results are printed and then
appended to OUTPUT/results.txt, OUTPUT/checkpoint.pth resumes an interrupted run and
OUTPUT/best.pth keeps the best classifier. A run is resumed only with the same backbone weights
and options (train.py's rule: others are listed and refused unless --allow-changed-args), and a
run lock keeps a second evaluation out of OUTPUT. Every option is checked, and the output folder
or --export target too, before any work; a bad one ends with one `error:` line and nothing
written. SIGTERM, Ctrl-C and SIGHUP stop a probe or fine-tuning after its step, save it (inside
the epoch: the rerun continues with the same sample order) and exit with 143, 130, 129
(runtime/signals.py); a kNN or cached-feature evaluation stops the same way with nothing to save.
"""
import argparse
import math
import os
import sys

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from runtime import cli
from runtime import distributed
from runtime.distributed import on_main
from runtime.eval_control import (check_export_target, check_options, check_eval_output_dir, mode_of,
                                  output_folder, report, eval_runtime, resume_classifier, save_epoch,
                                  write_lines)
from runtime.checkpoint import (ConfigError, append_json, checkpoint_data_path, claim_output_dir,
                                load_checkpoint, load_state, log_changes, save_checkpoint, weights_digest)
from runtime.cli import nonneg_float, nonneg_int, positive_float, positive_int
from images.datasets import (DATASETS, NUM_CLASSES, DataError, EpochSampler, SkipUnreadable, build_dataset,
                             closing_workers, eval_transform, ignore_stop_signals)
from images.subsets import balanced_subset, fixed_subset, labels_of, subset_from_list
from monitors.knn import extract_features, knn_accuracy
from model import ARCHS, build_backbone
from runtime.progress import show_bars
from runtime.signals import Stopped, kept_checkpoint, preempted, stop_on_signals

KNN_DEFAULTS = {"knn_k": 200, "knn_t": 0.07}  # InstDisc's; for checkpoints that predate the options


def train_percent(text: str) -> float:
    """argparse type of --train-percent: 1 or 10, the standard semi-supervised splits."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value not in (1.0, 10.0):
        raise argparse.ArgumentTypeError(f"must be 1 or 10 (the standard semi-supervised splits), got {text}")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    p = cli.Parser("eval_linear.py", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("checkpoint", help="a train.py checkpoint.pth")
    a("--arch", default=None, choices=ARCHS, help="if given, the checkpoint must be of this arch")
    a("--dataset", default=None, choices=DATASETS, help="default: the checkpoint's pretraining dataset")
    a("--data-path", default=None, help="default: the checkpoint's (a relative path stored by an older "
      "train.py is taken relative to the parent of the checkpoint's folder)")
    a("--knn", action="store_true", help="weighted kNN on frozen features instead of a linear probe; with "
      "the checkpoint's kNN settings it equals train.py's monitor figure for the checkpoint's epoch")
    a("--knn-k", type=positive_int, default=None, help="kNN neighbors; default: the checkpoint's --knn-k "
      "(train.py's default 200, InstDisc)")
    a("--knn-t", type=positive_float, default=None, help="kNN vote temperature; default: the checkpoint's "
      "--knn-t (train.py's default 0.07, InstDisc)")
    a("--knn-train-size", type=nonneg_int, default=None, help="kNN bank: a fixed subset of the train split "
      "drawn with the checkpoint's --seed; default: the checkpoint's (train.py's monitor: 100000 on "
      "imagenet, else all); 0 = all")
    a("--knn-test-size", type=nonneg_int, default=None, help="kNN queries: a fixed subset of the test split, "
      "as --knn-train-size; default: the checkpoint's (10000 on imagenet, else all); 0 = all")
    a("--train-percent", type=train_percent, default=None, help="1 or 10: fine-tune the whole network on a "
      "class-balanced subset of the labels (semi-supervised protocol of SimCLR / BYOL)")
    a("--subset-list", default=None, help="file of training image names (one per line) for "
      "--train-percent; required for ImageNet (the standard 1%% / 10%% split files)")
    a("--export", default=None, metavar="PATH", help="write the backbone as a plain torchvision state dict "
      "to PATH and exit; PATH's folder must exist, and PATH must not exist (see --force) nor be the checkpoint")
    a("--force", action="store_true", help="--export: replace an existing PATH (never the checkpoint itself)")
    a("--random-init", action="store_true", help="evaluate the untrained backbone of the same arch")
    a("--epochs", type=positive_int, default=90, help="training epochs (MoCo v3 linear protocol: 90)")
    a("--batch-size", type=positive_int, default=1024, help="global batch (MoCo v3: 1024); must divide by "
      "the number of processes")
    a("--lr", type=positive_float, default=None, help="base lr, scaled by batch/256; default 0.1 for ResNets, "
      "3.0 for ViTs (MoCo v3); for fine-tuning this is the head's lr")
    a("--backbone-lr-scale", type=nonneg_float, default=0.1, help="fine-tuning: backbone lr = head lr x this")
    a("--weight-decay", type=nonneg_float, default=0.0, help="MoCo v3 linear protocol: 0")
    a("--cache-features", action="store_true", help="linear probe on features computed once without "
      "augmentation (minutes on a CPU instead of hours; not the MoCo v3 protocol)")
    a("--workers", type=nonneg_int, default=8, help="data-loading processes per rank")
    a("--output-dir", default=None, help="default: CHECKPOINT's folder / eval_<mode>; must not hold a "
      "train.py run")
    a("--device", default="auto", choices=("auto", "cuda", "cpu"), help="auto = CUDA when available")
    a("--seed", type=int, default=0, help="seed for the head and the label subset")
    a("--allow-changed-args", action="store_true", help="resume an interrupted probe or fine-tuning in "
      "--output-dir although options that change its result differ (listed and logged)")
    return p


# --------------------------------------------------------------------- backbone, training ---
def load_backbone(path: str, arch=None, random_init: bool = False, seed: int = 0):
    """The online encoder f of a train.py checkpoint.

    Returns (backbone, feature dim, pretraining args, where the checkpoint stands: the epochs it
    completed and the steps of the next one, nonzero for a checkpoint saved mid-epoch).
    """
    ckpt = load_checkpoint(path, expect={"arch": arch} if arch else {})
    pre = ckpt["args"]
    torch.manual_seed(seed)
    try:
        backbone, dim = build_backbone(pre["arch"], pre["image_size"], pre.get("stem", "auto"))
    except (KeyError, ValueError) as e:  # args of another program, or edited by hand
        raise ConfigError(f"the options stored in {path} do not describe a backbone: {e}") from None
    if not random_init:
        state = {k[len("backbone."):]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")}
        load_state(backbone, state, f"the backbone weights of {path}")  # strict: every tensor must fit
    return backbone, dim, pre, (ckpt["epoch"], ckpt.get("step_in_epoch", 0))


def export_backbone(backbone: nn.Module, path: str) -> None:
    """A plain state dict with torchvision's key names; only the classifier (fc / heads) is absent."""
    save_checkpoint(path, {k: v.clone() for k, v in backbone.state_dict().items()},
                    advice="free some space or choose another --export path")


def check_backbone_unchanged(backbone: nn.Module, reference: dict) -> None:
    """MoCo v3's sanity check: a linear probe must leave every backbone tensor (BN stats too) intact."""
    changed = [k for k, v in backbone.state_dict().items() if not torch.equal(v.cpu(), reference[k])]
    if changed:
        raise RuntimeError(f"the frozen backbone changed during linear probing: {changed[:5]}")


def accuracy(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list:
    """Number of rows whose target is among the top-k logits, for each k (k capped at C)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices            # (n, kmax)
    hit = top == target[:, None]                                               # (n, kmax)
    return [hit[:, :k].any(dim=1).sum().item() for k in ks]


@torch.no_grad()
def evaluate(model: nn.Module, loader, env) -> tuple[float, float]:
    """Top-1 / top-5 (%) over a loader whose sampler shards the data across ranks."""
    model.eval()
    counts = torch.zeros(3, device=env.device)  # top-1 hits, top-5 hits, images
    with closing_workers(loader) as batches:
        for x, y in tqdm(batches, desc="eval", disable=not show_bars(env.main), leave=False):
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            with torch.autocast(env.device.type, torch.bfloat16, enabled=env.device.type == "cuda"):
                logits = model(x).float()
            counts += torch.tensor([*accuracy(logits, y), len(y)], device=env.device)
    counts = distributed.all_reduce_sum(counts)
    return (100 * counts[0] / counts[2]).item(), (100 * counts[1] / counts[2]).item()


def linear_head(dim: int, num_classes: int) -> nn.Linear:
    """MoCo v3's BN-free linear classifier: weights N(0, 0.01), zero bias."""
    head = nn.Linear(dim, num_classes)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    return head


def cosine_lr(step: int, total: int, base: float) -> float:
    """Cosine decay from base to 0 over `total` steps, no warm-up (MoCo v3 linear protocol)."""
    return base * 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))


def probe_cached(backbone, dim, num_classes, train_set, test_set, args, env, base_lr):
    """Linear probe on features computed once without augmentation: (top-1, top-5, log lines)."""
    feat_args = (args.batch_size // env.world_size, args.workers, env.device, env.rank, env.world_size)
    train_f, train_y = extract_features(backbone, train_set, *feat_args, desc="train features", normalize=False,
                                        stop=env.stop)
    test_f, test_y = extract_features(backbone, test_set, *feat_args, desc="test features", normalize=False,
                                      stop=env.stop)
    if train_f is None or test_f is None:  # a few minutes of work, rerun from the start
        raise Stopped(preempted(env, "while computing the features; nothing to save"))
    torch.manual_seed(args.seed)  # every rank holds all features and trains the same head
    head = linear_head(dim, num_classes).to(env.device)
    opt = torch.optim.SGD(head.parameters(), lr=base_lr, momentum=0.9, weight_decay=args.weight_decay)
    steps, logs = math.ceil(len(train_y) / args.batch_size), []
    for epoch in tqdm(range(args.epochs), desc="linear probe", disable=not show_bars(env.main)):
        for it, idx in enumerate(torch.randperm(len(train_y), device=env.device).split(args.batch_size)):
            opt.param_groups[0]["lr"] = cosine_lr(epoch * steps + it, args.epochs * steps, base_lr)
            loss = nn.functional.cross_entropy(head(train_f[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            logits = head(test_f)
        top1, top5 = (100 * h / len(test_y) for h in accuracy(logits, test_y))
        logs.append({"epoch": epoch + 1, "loss": loss.item(), "top1": top1, "top5": top5})
    return top1, top5, logs


def train_epoch(model, ddp, backbone, loader, opt, epoch: int, start_it: int, steps: int, base_lr: float,
                args, env, finetune: bool, stopper):
    """Steps start_it .. steps - 1 of one epoch of the classifier: (last loss, last lr, steps
    done, stopped). It stops after a step, on every rank alike, once a rank has a stop signal."""
    model.train()
    backbone.train(finetune)  # a probe keeps BN statistics frozen too
    loss, lr, it, stopped = torch.zeros(()), 0.0, start_it, False
    with closing_workers(loader) as batches:
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{args.epochs}", total=steps, initial=start_it,
                   disable=not show_bars(env.main))
        for x, y in bar:
            lr = cosine_lr(epoch * steps + it, args.epochs * steps, base_lr)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            with torch.autocast(env.device.type, torch.bfloat16, enabled=env.device.type == "cuda"):
                loss = nn.functional.cross_entropy(ddp(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            it += 1
            if stopper.poll():
                stopped = True
                break
    return loss, lr, it, stopper.finish() or stopped


def train_classifier(backbone, dim, num_classes, train_set, test_set, args, env, base_lr, finetune, out_dir,
                     source=None, resume=(None, [])):
    """Linear probe (frozen backbone) or fine-tuning (all weights) with resume and best-keeping.

    Returns (final top-1, final top-5, best top-1). Per-epoch lines go to out_dir/log.txt.
    source describes the evaluation (checkpoint, its epoch, random init, mode, data set); resume
    is resume_classifier's answer for out_dir: the checkpoint to continue and its accepted changes.
    """
    torch.manual_seed(args.seed)
    model = nn.Sequential(backbone, linear_head(dim, num_classes)).to(env.device)
    reference = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    digest = weights_digest(reference)
    backbone.requires_grad_(finetune)
    groups = [{"params": model[1].parameters(), "lr_scale": 1.0}]
    if finetune:
        groups.append({"params": backbone.parameters(), "lr_scale": args.backbone_lr_scale})
    opt = torch.optim.SGD(groups, lr=base_lr, momentum=0.9, weight_decay=args.weight_decay)
    start, start_it, best = 0, 0, 0.0
    ckpt, changes = resume
    if ckpt is not None:
        on_main(env, log_changes, os.path.join(out_dir, "log.txt"), ckpt["epoch"] + 1, changes)
        load_state(model, ckpt["model"], f"evaluation checkpoint {out_dir}/checkpoint.pth")
        load_state(opt, ckpt["optimizer"], f"the optimizer state of {out_dir}/checkpoint.pth")
        start, start_it, best = ckpt["epoch"], ckpt.get("step_in_epoch", 0), ckpt["best_top1"]
    ddp = DistributedDataParallel(model) if env.world_size > 1 else model
    batch = args.batch_size // env.world_size
    sampler = EpochSampler(torch.utils.data.DistributedSampler(train_set, env.world_size, env.rank, seed=args.seed))
    loader = torch.utils.data.DataLoader(train_set, batch, sampler=sampler, num_workers=args.workers,
                                         pin_memory=env.device.type == "cuda", worker_init_fn=ignore_stop_signals)
    mine = torch.utils.data.Subset(test_set, range(env.rank, len(test_set), env.world_size))
    test_loader = torch.utils.data.DataLoader(mine, batch, num_workers=args.workers, worker_init_fn=ignore_stop_signals)
    steps, saved = math.ceil(len(sampler.base) / batch), os.path.join(out_dir, "checkpoint.pth")
    stopper = distributed.StopAgreement(env.stop, env.device)

    def state(epoch: int, step: int) -> dict:
        """The evaluation's checkpoint; (epoch, step) is where its training continues."""
        return {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch, "step_in_epoch": step,
                "best_top1": best, "source": source or {}, "backbone_sha256": digest, "args": vars(args),
                "world_size": env.world_size, "runtime": eval_runtime(env)}
    top1, top5 = 0.0, 0.0
    for epoch in range(start, args.epochs):
        sampler.set_epoch(epoch, skip=start_it * batch)
        torch.manual_seed(args.seed + 1000 * epoch + env.rank)
        loss, lr, it, stopped = train_epoch(model, ddp, backbone, loader, opt, epoch, start_it, steps, base_lr,
                                            args, env, finetune, stopper)
        start_it = 0
        if stopped and it < steps:  # inside the epoch: save where it stands, no figures yet
            on_main(env, save_checkpoint, saved, state(epoch, it))
            raise Stopped(preempted(env, f"at epoch {epoch + 1}, iteration {it}; saved {saved}"))
        top1, top5 = evaluate(model, test_loader, env)
        is_best, best = top1 > best, max(best, top1)
        on_main(env, save_epoch, out_dir, state(epoch + 1, 0), {"epoch": epoch + 1, "loss": loss.item(), "lr": lr,
                                                                "top1": top1, "top5": top5}, is_best)
        if stopped or not distributed.all_ok(not env.stop.is_set(), env.device):  # during the test pass
            raise Stopped(preempted(env, f"after epoch {epoch + 1}; saved {saved}"))
    if start >= args.epochs:  # resumed a finished run: report its final classifier
        top1, top5 = evaluate(model, test_loader, env)
    if not finetune:
        check_backbone_unchanged(backbone, reference)
    return top1, top5, best


# ------------------------------------------------------------------------------ data sets ---
def eval_sets(args, pre: dict, augment: bool):
    """Train / test sets (train reduced to the semi-supervised subset if asked) and class count.

    The checkpoint's data set, data path, image size and --fake-size unless --dataset or
    --data-path say otherwise. An unreadable image is skipped with a warning in the train
    split and an error naming it in the test split (as in train.py's kNN monitor).
    """
    dataset, size = args.dataset or pre["dataset"], pre["image_size"]
    root = checkpoint_data_path(args.checkpoint, pre, args.data_path, dataset)

    def split(train: bool):
        transform = eval_transform(dataset, size, train=train and augment)
        try:
            return build_dataset(dataset, root, train, transform, download=False,
                                 fake_size=pre.get("fake_size", 512), image_size=size)
        except DataError as e:
            if args.data_path:
                raise
            raise DataError(f"{e} (the checkpoint's data path: give --data-path where the data set is "
                            f"on this machine)") from None

    train_set, test_set = split(True), split(False)
    num_classes = NUM_CLASSES.get(dataset) or len(train_set.classes)
    chosen = None
    if args.train_percent is not None:  # labels and file names come from the unwrapped data set
        if args.subset_list:
            chosen = subset_from_list(train_set, args.subset_list)
        elif dataset == "imagenet":
            raise ConfigError("--train-percent on imagenet needs --subset-list: the standard 1% / 10% "
                              "split files (SimCLR's 1percent.txt / 10percent.txt)")
        else:
            chosen = balanced_subset(labels_of(train_set), args.train_percent, args.seed)
    train_set = SkipUnreadable(train_set)
    if chosen is not None:
        train_set = torch.utils.data.Subset(train_set, chosen)
    return train_set, SkipUnreadable(test_set, strict=True), num_classes


def knn_sets(args, pre: dict, train_set, test_set):
    """The kNN bank and queries, and k and T: train.py's monitor settings from the checkpoint
    unless given. The subsets are drawn with the checkpoint's --seed, as the monitor draws them
    (its sizes apply when the data set is the checkpoint's; another one defaults to all)."""
    own_data = (args.dataset or pre["dataset"]) == pre["dataset"]
    sizes = [getattr(args, name) if getattr(args, name) is not None else pre.get(name, 0) if own_data else 0
             for name in ("knn_train_size", "knn_test_size")]
    seed = pre.get("seed", 0)
    bank = fixed_subset(train_set, sizes[0], seed, "--knn-train-size")
    queries = fixed_subset(test_set, sizes[1], seed, "--knn-test-size")
    k, t = (getattr(args, name) if getattr(args, name) is not None else pre.get(name, KNN_DEFAULTS[name])
            for name in ("knn_k", "knn_t"))
    return bank, queries, k, t


# ------------------------------------------------------------------------------------ run ---


def evaluate_backbone(backbone, dim, pre, args, env, out_dir: str, source: dict, resume: tuple) -> dict:
    """The kNN, cached-feature probe, probe or fine-tuning figures as a results.txt entry,
    printed as one JSON line before it is appended to results.txt (a full disk loses nothing)."""
    train_set, test_set, num_classes = eval_sets(args, pre, augment=not (args.knn or args.cache_features))
    if args.knn:
        train_set, test_set, k, t = knn_sets(args, pre, train_set, test_set)
    lock = on_main(env, claim_output_dir, out_dir, "evaluation")  # the data is there: the first write
    try:
        backbone = backbone.to(env.device)
        result = {**source, "arch": pre["arch"], "train_images": len(train_set), "test_images": len(test_set)}
        base_lr = (args.lr if args.lr is not None else 3.0 if pre["arch"].startswith("vit") else 0.1) \
            * args.batch_size / 256
        if args.knn:
            top1 = knn_accuracy(backbone, train_set, test_set, num_classes, args.batch_size // env.world_size,
                                args.workers, env.device, env.rank, env.world_size, k, t, stop=env.stop)
            if top1 is None:
                raise Stopped(preempted(env, "during the kNN evaluation; nothing to save"))
            result.update(knn_k=k, knn_t=t, top1=top1)
        elif args.cache_features:
            result["top1"], result["top5"], logs = probe_cached(backbone, dim, num_classes, train_set, test_set,
                                                                args, env, base_lr)
            result.update(epochs=args.epochs, protocol="cached features, no augmentation")
            on_main(env, write_lines, os.path.join(out_dir, "log.txt"), logs)
        else:
            top1, top5, best = train_classifier(backbone, dim, num_classes, train_set, test_set, args, env,
                                                base_lr, args.train_percent is not None, out_dir, source, resume)
            result.update(top1=top1, top5=top5, best_top1=best, epochs=args.epochs)
        report(env, result)
        on_main(env, append_json, os.path.join(out_dir, "results.txt"), result,
                "the result is printed above; free some space and rerun to keep it in results.txt")
    finally:
        if lock is not None:
            lock.release()
    return result


def run(args, env) -> dict:
    """Check the options and where they write, then export or evaluate; the result entry,
    printed as one JSON line."""
    check_options(args, env.world_size)
    mode = mode_of(args)
    out_dir = None if mode == "export" else output_folder(args, mode)
    if mode == "export":
        check_export_target(args.export, args.checkpoint, args.force)
    else:
        check_eval_output_dir(out_dir, args.output_dir is not None, args.checkpoint)
    backbone, dim, pre, (pre_epoch, pre_step) = load_backbone(args.checkpoint, args.arch, args.random_init,
                                                               args.seed)
    if mode != "export" and (args.dataset or pre["dataset"]) == "unlabelled":
        raise ConfigError(f"evaluation needs labels, and {args.checkpoint} was pretrained on --dataset unlabelled "
                          f"({pre['data_path']}); give --dataset folder --data-path DIR, with DIR/train and "
                          f"DIR/val holding one folder per class")
    if mode == "export":  # one writer: every rank holds the same weights
        on_main(env, export_backbone, backbone, args.export)
        result = {"export": args.export, "arch": pre["arch"], "stem": pre.get("stem", "auto"),
                  "image_size": pre["image_size"], "random_init": args.random_init}
        report(env, result)
        return result
    # what an evaluation folder's checkpoint must match to be resumed: the weights, and the
    # protocol and data (a 1 % fine-tuning must not continue as a 10 % one). pretrain_step_in_epoch:
    # nonzero for a checkpoint saved inside epoch pretrain_epoch + 1 (a SIGTERM)
    source = {"checkpoint": os.path.abspath(args.checkpoint), "pretrain_epoch": pre_epoch,
              "pretrain_step_in_epoch": pre_step, "random_init": args.random_init, "mode": mode,
              "dataset": args.dataset or pre["dataset"]}
    resume = (None, []) if args.knn or args.cache_features else resume_classifier(
        os.path.join(out_dir, "checkpoint.pth"), source, weights_digest(backbone.state_dict()), args, env)
    return evaluate_backbone(backbone, dim, pre, args, env, out_dir, source, resume)


def main(argv=None) -> dict:
    """Parse, evaluate, print the result as one JSON line. Exit status 0, 2 for a bad command
    line, 1 with one `error:` line (printed by rank 0 alone under torchrun) for anything else,
    128 + signal after a SIGTERM, Ctrl-C or SIGHUP (saved where there was something to save)."""
    args = get_args_parser().parse_args(argv)
    env, result, status = None, None, 0
    try:
        try:
            env = distributed.init_distributed(args.device)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        mode = mode_of(args)
        with stop_on_signals(env.stop, lambda: "nothing is written" if mode == "export" else
                             kept_checkpoint(output_folder(args, mode))):
            result = run(args, env)
    except Stopped as stopped:  # saved what it had, said so
        status = stopped.status
    except distributed.OtherRankFailed:  # that rank prints the error line
        sys.exit(cli.EXIT_ERROR)
    except (ConfigError, DataError) as e:  # a data error may be one rank's own: that rank reports it
        cli.fail(e, show=(env.main or isinstance(e, DataError)) if env else int(os.environ.get("RANK", "0")) == 0,
                 rank=None if env is None or env.world_size == 1 else env.rank)
    finally:
        distributed.cleanup()
    if status:
        sys.exit(status)
    return result


if __name__ == "__main__":
    main()
