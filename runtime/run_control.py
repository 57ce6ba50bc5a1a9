"""What keeps a training run alive, kept out of train.py's way (DINO keeps the same in utils.py).

train.py holds the method: the step, the epoch, the schedules. Around them a run needs:
- `launch`: the torchrun process group, the stop signals (runtime/signals.py), one `error:`
  line per failure and the exit status (0 done, 1 error, 143 SIGTERM, 130 Ctrl-C, 129 SIGHUP);
- `setup`: options checked, the checkpoint to resume read and compared with the options,
  data, model, optimizer, then the output folder, its lock and args.json;
- `Run.end_epoch`: the checkpoint and the epoch's log line (on disk
  together), then the kNN monitor, whose figure is added to the log when it exists;
- `Run.close`: every loader and the lock released, on every exit path.
The order after an epoch (save, then monitor) means a signal during the monitor loses nothing.
"""
import json
import os
import sys

import torch

from runtime import cli
from runtime import distributed
from runtime.distributed import on_main
from runtime.batch_norm import convert_to_global_batch_norm
from runtime.checkpoint import (ConfigError, append_json, check_output_dir, check_resume, claim_output_dir,
                                load_checkpoint, load_state, log_changes, new_log, read_log, save_checkpoint,
                                write_json)
from images.datasets import DataError
from monitors.knn import knn_accuracy
from images.loaders import build_knn_sets, build_train_loader, prepare_dataset, worker_death
from model import RESNETS, build_model
from runtime.options import augment_path, check_args, runtime
from runtime.signals import kept_checkpoint, preempted, stop_on_signals

def launch(train, args) -> None:
    """Run train(args, env) in this torchrun process and exit with its status: 0 done,
    128 + signal after a SIGTERM / Ctrl-C / SIGHUP (saved, resumable), 1 with one `error:` line."""
    env, status = None, 0
    try:
        try:
            env = distributed.init_distributed(args.device)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        with stop_on_signals(env.stop, lambda: kept_checkpoint(args.output_dir)):  # finish the step, save
            status = train(args, env)
    except distributed.OtherRankFailed:  # that rank prints the error line
        sys.exit(cli.EXIT_ERROR)
    except (ConfigError, DataError, FloatingPointError) as e:
        # options and the loss (all-reduced) are the same on every rank: rank 0 alone reports
        # them; a data error may be one rank's own (its shard, its GPU), so that rank reports it
        cli.fail(e, show=env is None or env.main or isinstance(e, DataError),
                 rank=None if env is None or env.world_size == 1 else env.rank)
    finally:
        distributed.cleanup()
    if status:
        sys.exit(status)


def find_checkpoint(args) -> tuple[str, dict]:
    """(path, checkpoint or None) to resume from. Refuses what would mix two runs in one folder:
    --resume of another folder's checkpoint into a folder that holds another run (the same
    command rerun continues from the folder's own checkpoint), and a log.txt with trained
    epochs but no readable checkpoint.pth beside it (a damaged folder)."""
    out, own = args.output_dir, os.path.join(args.output_dir, "checkpoint.pth")
    log = os.path.join(out, "log.txt")
    if os.path.lexists(log) and not os.path.isfile(log):
        raise ConfigError(f"{log} is not a file; remove it or choose another --output-dir")
    if os.path.lexists(own) and not os.path.isfile(own):
        raise ConfigError(f"{own} is not a checkpoint file (a folder or a broken link); remove it or choose "
                          f"another --output-dir")
    if args.resume and not resumed_here_before(args.resume, out):
        came_from = os.path.dirname(os.path.realpath(args.resume))
        if came_from != os.path.realpath(out) and os.path.isdir(out) and os.listdir(out):
            raise ConfigError(f"--resume {args.resume} would write into {out}, which holds another run's files; "
                              f"resume into {came_from} or an empty --output-dir")
        return args.resume, load_checkpoint(args.resume)
    if not os.path.isfile(own) and os.path.isfile(log) and logs_training(log):
        raise ConfigError(f"{out} holds a log.txt of trained epochs but no checkpoint.pth; remove {log} to start "
                          f"over, or choose another --output-dir")
    return own, load_checkpoint(own) if os.path.isfile(own) else None


def logs_training(log: str) -> bool:
    """Whether a log.txt holds more than a new run's random-init line (or cannot be read)."""
    try:
        return any(entry["epoch"] > 0 for entry in read_log(log))
    except (ValueError, KeyError, TypeError):
        return True


def resumed_here_before(resume: str, out: str) -> bool:
    """Whether out holds a checkpoint of a run started with this same --resume: rerunning that
    command continues from out's own, newer checkpoint."""
    saved = os.path.join(out, "args.json")
    try:
        with open(saved) as f:
            first = json.load(f).get("resume")
    except (OSError, ValueError, AttributeError):
        return False
    return bool(first) and os.path.isfile(os.path.join(out, "checkpoint.pth")) and \
        os.path.realpath(first) == os.path.realpath(resume)


class Run:
    """One launch of train.py: its data, model, optimizer, where it resumes and where it writes.

    Built by `setup`. model is the bare SNCLR, ddp_model the same wrapped for gradient averaging
    (model itself in one process); epoch, start_it where training continues; end the epoch this
    launch stops after; baseline the random-init kNN figure (measured by the first launch).
    """

    def __init__(self, args, env, loader, knn_sets, num_classes, model, optimizer, scaler, ckpt, start):
        self.args, self.env, self.loader, self.knn_sets, self.num_classes = args, env, loader, knn_sets, num_classes
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.ddp_model = distributed.wrap_ddp(model, env.device) if env.world_size > 1 else model
        self.epoch, self.start_it = start
        self.end = min(args.epochs, args.stop_after_epoch or args.epochs)
        self.baseline = ckpt.get("knn_random_init") if ckpt else None
        # labels of the training images (the queue's), for the neighbor quality: not with
        # --dataset unlabelled, nor with one class
        self.labelled = num_classes > 1 and args.dataset != "unlabelled"
        self.resumed = ""  # what a resume continues from: said at start and logged
        self.stopper = distributed.StopAgreement(env.stop, env.device)
        self.log_path = os.path.join(args.output_dir, "log.txt")
        self.save_path = os.path.join(args.output_dir, "checkpoint.pth")
        self.lock = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, _traceback):
        if exc_type is None:
            distributed.barrier()  # every rank done before the process group goes
        self.close()
        exc = worker_death(exc) or exc  # a dead worker may be reported from anywhere in the loop
        if isinstance(exc, DataError) and self.lock is not None:  # mid-run: say what is on disk
            raise DataError(f"{exc}; {kept_checkpoint(self.args.output_dir)}") from None

    def close(self) -> None:
        """Release the loaders' workers and the folder's lock (every exit path comes here)."""
        self.loader.close()
        if self.lock is not None:
            self.lock.release()

    def open_output(self, changes: list[str]) -> None:
        """Rank 0 creates the folder, takes its lock, writes args.json and logs accepted option
        changes; every rank learns whether it could. A launch with nothing to train (its
        checkpoint is already at the last epoch asked for) touches no file, the lock's included:
        args.json keeps describing the run that is on disk."""
        if self.env.main:
            for line in [self.resumed] + monitors_off(self.args, self.knn_sets is not None):
                if line:
                    print(line, flush=True)
        if self.epoch >= self.end:
            if self.env.main:
                print(f"{self.save_path} is at epoch {self.epoch}: nothing to train (it stops after epoch "
                      f"{self.end}: --epochs {self.args.epochs}, --stop-after-epoch {self.args.stop_after_epoch})")
            return
        self.lock = on_main(self.env, claim_output_dir, self.args.output_dir, "training")
        on_main(self.env, write_json, os.path.join(self.args.output_dir, "args.json"), vars(self.args))
        on_main(self.env, log_changes, self.log_path, self.epoch + 1, changes)
        if self.resumed:
            on_main(self.env, append_json, self.log_path, {"epoch": self.epoch + 1, "resumed": self.resumed})

    def state(self, epoch: int, step: int = 0) -> dict:
        """The checkpoint: (epoch, step) is where training continues."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": epoch, "step_in_epoch": step,
                "knn_random_init": self.baseline, "args": vars(self.args), "world_size": self.env.world_size,
                "runtime": runtime(self.args, self.env), "train_images": self.loader.images,
                "train_list_sha256": self.loader.digest}

    def save(self, epoch: int, step: int = 0, log: dict = None) -> None:
        """Rank 0 writes the checkpoint, then the epoch's log line (so both are on disk before the
        monitor); every rank learns whether it could, so a full disk stops all of them (one line,
        from rank 0). The log line is kept even when the save fails."""
        on_main(self.env, self._write_epoch, epoch, step, log)

    def _write_epoch(self, epoch: int, step: int, log: dict) -> None:
        try:
            save_checkpoint(self.save_path, self.state(epoch, step))
        finally:  # the figures survive a failed save
            if log:
                append_json(self.log_path, log)

    def monitor(self, tag: str):
        """kNN top-1 of the online encoder f (eval mode; training mode is restored); None when a
        signal interrupted it. Called only with a labelled set (knn_sets)."""
        a, env = self.args, self.env
        acc = knn_accuracy(self.model.backbone, *self.knn_sets, self.num_classes,
                           max(a.batch_size // env.world_size, 64), a.workers, env.device, env.rank,
                           env.world_size, a.knn_k, a.knn_t, stop=env.stop)
        if env.main and acc is not None:
            print(f"kNN top-1 ({tag}): {acc:.2f}%")
        return acc

    def measure_baseline(self) -> bool:
        """A new run measures its random-init kNN first; False when a signal interrupted it."""
        if self.epoch or self.start_it or self.knn_sets is None:
            return True
        self.baseline = self.monitor("random init")
        if self.baseline is not None:  # a new run's log starts here (find_checkpoint: nothing else in it)
            on_main(self.env, new_log, self.log_path, {"epoch": 0, "knn_top1": self.baseline})
        return self.baseline is not None

    def end_epoch(self, epoch: int, it: int, log: dict, stopped: bool, skipped: int):
        """After train_one_epoch: save, log, monitor. Returns the exit status when the run must
        stop now (a signal), else None."""
        env, args = self.env, self.args
        self.start_it = 0
        if stopped and it < self.loader.steps:
            self.save(epoch, it)
            return preempted(env, f"at epoch {epoch + 1}, iteration {it}; saved {self.save_path}")
        log["skipped_images"] = int(distributed.all_reduce_sum(torch.tensor([skipped], device=env.device)).item())
        self.save(epoch + 1, log=log)
        due = epoch + 1 == args.epochs or (args.knn_every > 0 and (epoch + 1) % args.knn_every == 0)
        if due and not stopped and self.knn_sets is not None:
            knn = self.monitor(f"epoch {epoch + 1}")
            stopped = knn is None
            figure = {"knn_top1": knn} if knn is not None else {"knn_interrupted": True}
            on_main(env, append_json, self.log_path, {"epoch": epoch + 1, **figure})  # read_log merges the lines
            log.update(figure)
        if env.main:
            print(json.dumps(log))
        if stopped:
            return preempted(env, f"after epoch {epoch + 1}; saved {self.save_path}")
        if epoch + 1 == args.epochs and self.baseline is not None and env.main:  # the run's closing figures
            print(summary_line(self.baseline, log, args.epochs))
        return None


def setup(args, env, build_optimizer) -> Run:
    """Everything a run needs, checked before anything is written: options, the checkpoint to
    resume and the option changes it accepts, data, model, optimizer (train.py's
    build_optimizer(model, args)); then the output folder."""
    check_args(args, env)
    ckpt_path, ckpt = find_checkpoint(args)
    changes = check_resume(ckpt, ckpt_path, vars(args), {"world_size": env.world_size, **runtime(args, env)},
                           args.allow_changed_args) if ckpt else []
    check_output_dir(args.output_dir)  # before the data is read; created after everything is checked
    prepare_dataset(args, env)
    loader, run = build_train_loader(args, env, augment_path(args, env)), None
    try:
        grown = check_same_data(ckpt, ckpt_path, loader, args)
        knn_sets, num_classes = build_knn_sets(args, loader.dataset)
        model = build_run_model(args, env)
        optimizer = build_optimizer(model, args)
        scaler = torch.amp.GradScaler(env.device.type, enabled=env.device.type == "cuda" and args.amp == "fp16")
        start = restore(ckpt, ckpt_path, model, optimizer, scaler) if ckpt else (0, 0)
        if args.compile:  # in place: the state dict keeps its keys
            model.backbone.compile(mode=args.compile_mode)
            model.momentum_backbone.compile(mode=args.compile_mode)
        run = Run(args, env, loader, knn_sets, num_classes, model, optimizer, scaler, ckpt, start)
        if ckpt:
            run.resumed = (f"resumed from {ckpt_path}: epoch {start[0] + 1}, step {start[1]} of {loader.steps}, "
                           f"queue holding {len(model.queue)} keys{grown}")
        run.open_output(changes)
        return run
    except BaseException:  # the loader's workers (and the lock) would otherwise outlive the error
        (run or loader).close()  # Run.close closes the loader too
        raise


def check_same_data(ckpt, path: str, loader, args) -> str:
    """A resume inside an epoch continues that epoch's sample order: it needs the same training
    images (the same number and, for a folder, the same files: a data set of another size or
    order would skip the wrong ones). At an epoch's end the data set may have changed (a folder
    that grew): the returned words say so for the resume line, else ""."""
    images, digest = loader.images, loader.digest
    if not ckpt:
        return ""
    saw, listed = ckpt.get("train_images", images), ckpt.get("train_list_sha256")
    same = saw == images and (listed is None or digest is None or listed == digest)
    if ckpt.get("step_in_epoch", 0) and not same:
        files = "" if saw != images else " (the same number, other files)"
        raise ConfigError(f"{path} stopped inside epoch {ckpt['epoch'] + 1} of a data set of {saw} training images; "
                          f"--data-path {args.data_path} now holds {images}{files}: a mid-epoch resume needs the "
                          f"same data set")
    return "" if same else f"; {args.data_path} now holds {images} training images (the run saw {saw} so far)"


def monitors_off(args, knn: bool) -> list[str]:
    """The lines a run without labels starts with, once: which monitors are off and why."""
    if args.dataset != "unlabelled":
        return []
    if knn:
        return [f"no labels (--dataset unlabelled): the neighbor quality is off; the kNN monitor reads "
                f"{args.monitor_path}"]
    return ["no labels (--dataset unlabelled): the kNN monitor and the neighbor quality are off (give "
            "--monitor-path DIR, a labelled DIR/train and DIR/val, for a kNN figure)"]


def build_run_model(args, env):
    """The SNCLR model on the run's device, the same initial weights on every rank."""
    torch.manual_seed(args.seed)
    try:
        model = build_model(vars(args)).to(env.device)
    except ValueError as e:  # e.g. a ViT patch size that does not divide the image size
        raise ConfigError(str(e)) from None
    if env.world_size > 1:  # the global batch's statistics, CPU (gloo) and GPU (nccl) alike
        model = convert_to_global_batch_norm(model)
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
        if args.arch in RESNETS:
            model = model.to(memory_format=torch.channels_last)
    return model


def restore(ckpt: dict, path: str, model, optimizer, scaler) -> tuple[int, int]:
    """Load a checkpoint into model, optimizer and scaler; return where training continues."""
    load_state(model, ckpt["model"], f"checkpoint {path}")
    load_state(optimizer, ckpt["optimizer"], f"the optimizer state of {path}")
    if ckpt.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(ckpt["scaler"])
    return ckpt["epoch"], ckpt.get("step_in_epoch", 0)


def summary_line(baseline: float, log: dict, epochs: int) -> str:
    """kNN before and after; with labels, how the last epoch's neighbors and w did."""
    line = f"kNN top-1: random init {baseline:.2f}% -> after {epochs} epochs {log['knn_top1']:.2f}%"
    if "nn_agree" in log:
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731 (undefined: e.g. w = 0 throughout)
        line += (f"; last epoch: {100 * log['nn_agree']:.1f}% of neighbors share the class, mean w "
                 f"{fmt(log['w_same'])} same / {fmt(log['w_other'])} other class, w AUROC {fmt(log['w_auroc'])}")
    return line
