"""What keeps an evaluation safe, kept out of eval_linear.py's way (as runtime/run_control.py is for
train.py): the option checks, the output folder and the --export target checked before any
work, the rule for resuming an interrupted probe or fine-tuning, the run lock, and the writes
that rank 0 makes while every rank learns whether they succeeded.
"""
import json
import os

from runtime.checkpoint import ConfigError, append_json, check_resume, load_checkpoint, save_checkpoint


def mode_of(args) -> str:
    """The evaluation asked for: export, knn, finetune1 / finetune10 or linear."""
    if args.export is not None:
        return "export"
    return "knn" if args.knn else f"finetune{args.train_percent:g}" if args.train_percent else "linear"


def check_options(args, world_size: int) -> None:
    """Option combinations the parser cannot check alone; one ConfigError line each."""
    modes = [flag for flag, on in (("--knn", args.knn), ("--train-percent", args.train_percent is not None),
                                   ("--cache-features", args.cache_features), ("--export", args.export is not None))
             if on]
    if len(modes) > 1:
        raise ConfigError(f"{' and '.join(modes)} are different evaluations; give one of them per run")
    knn_only = [f"--{name.replace('_', '-')}" for name in ("knn_k", "knn_t", "knn_train_size", "knn_test_size")
                if getattr(args, name) is not None]
    if knn_only and not args.knn:
        raise ConfigError(f"{', '.join(knn_only)} appl{'ies' if len(knn_only) == 1 else 'y'} to --knn only; "
                          f"add --knn or drop {'it' if len(knn_only) == 1 else 'them'}")
    if args.subset_list and args.train_percent is None:
        raise ConfigError("--subset-list applies to --train-percent 1 or 10 only; add one or drop it")
    if args.export == "":
        raise ConfigError("--export needs a file name, e.g. --export backbone.pth")
    if args.force and args.export is None:
        raise ConfigError("--force applies to --export only (it allows replacing an existing file)")
    if args.batch_size % world_size:
        raise ConfigError(f"--batch-size {args.batch_size} is not divisible by the number of processes "
                          f"{world_size}; use a multiple of {world_size}")


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file (through symbolic or hard links too)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def check_export_target(path: str, checkpoint: str, force: bool) -> None:
    """ConfigError unless --export PATH can be written without harm: PATH is not the checkpoint
    (not even with --force), not a folder, in a writable folder that exists, and new unless force."""
    folder = os.path.dirname(os.path.abspath(path))
    if same_file(path, checkpoint):
        raise ConfigError(f"--export {path} is the checkpoint being exported; choose another file name")
    if os.path.isdir(path):
        raise ConfigError(f"--export {path} is a folder; give a file name, e.g. "
                          f"{os.path.join(path, 'backbone.pth')}")
    if not os.path.isdir(folder):
        raise ConfigError(f"--export {path}: the folder {folder} does not exist; create it or choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"--export {path}: the folder {folder} is not writable; choose another path")
    if os.path.lexists(path) and not force:
        raise ConfigError(f"--export {path} exists; add --force to replace it, or choose another file name")


def output_folder(args, mode: str) -> str:
    return args.output_dir or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                           f"eval_{mode}" + ("_random" if args.random_init else ""))


def check_eval_output_dir(folder: str, given: bool, checkpoint: str) -> None:
    """ConfigError unless folder is, or can be created as, a writable folder that holds no
    train.py run (the evaluation's log.txt and checkpoint.pth would mix with the training's).
    Creates nothing: the folder is made once the data is found."""
    name = f"--output-dir {folder}" if given else f"the output folder {folder} (the default, beside the checkpoint)"
    change = "choose another --output-dir"
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ConfigError(f"{name} is a file, not a folder; {change}")
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):  # the folder or its nearest existing parent
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"{name} cannot be created: {existing} is a file; {change}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{name} is not writable ({existing}); {change}")
    ckpt_in_folder = os.path.join(folder, "checkpoint.pth")
    if os.path.isfile(os.path.join(folder, "args.json")) or (os.path.exists(ckpt_in_folder)
                                                              and same_file(ckpt_in_folder, checkpoint)):
        raise ConfigError(f"{name} holds a train.py run; its log.txt and checkpoint.pth would be mixed with "
                          f"the evaluation's: {change}")


# Options a resumed probe or fine-tuning may change freely: where it writes and reads, how fast
# it loads, and checks. --device is compared as the device type the run resolved (runtime).
EVAL_FREE_ON_RESUME = ("output_dir", "workers", "data_path", "checkpoint", "arch", "device", "allow_changed_args")


def eval_runtime(env) -> dict:
    return {"device": env.device.type}


def resume_classifier(ckpt_path: str, source: dict, digest: str, args, env) -> tuple:
    """(the checkpoint of an interrupted probe or fine-tuning in the output folder, the option
    changes it accepts), or (None, []). Checked before any work, and writes nothing.

    It is resumed only if it evaluates the same backbone weights (digest: the checkpoint may
    have been rewritten since, e.g. by a training that went on) with the same protocol and
    options (checkpoint.check_resume's rule: differences are refused unless --allow-changed-args);
    otherwise one ConfigError line.
    """
    if not os.path.isfile(ckpt_path):
        return None, []
    ckpt = load_checkpoint(ckpt_path, required=("model", "optimizer", "epoch", "best_top1", "source"))
    if ckpt["source"] != source:
        raise ConfigError(f"{os.path.dirname(ckpt_path)} holds an evaluation of {ckpt['source']}, not of {source}; "
                          f"choose another --output-dir")
    if ckpt.get("backbone_sha256") != digest:
        raise ConfigError(f"the backbone weights in {source['checkpoint']} changed since {ckpt_path} began evaluating "
                          f"them (the checkpoint was rewritten); choose another --output-dir, or delete {ckpt_path} "
                          f"to start this evaluation over")
    ckpt.setdefault("args", {})  # written before the options were kept: every option counts as changed
    changes = check_resume(ckpt, ckpt_path, vars(args), {"world_size": env.world_size, **eval_runtime(env)},
                           args.allow_changed_args, free=EVAL_FREE_ON_RESUME)
    return ckpt, changes


def save_epoch(out_dir: str, state: dict, log: dict, is_best: bool) -> None:
    """One epoch's files: its log line first (the figures survive a full disk), then best.pth
    and the checkpoint to resume from."""
    append_json(os.path.join(out_dir, "log.txt"), log)
    if is_best:
        save_checkpoint(os.path.join(out_dir, "best.pth"), {"model": state["model"], "top1": log["top1"]})
    save_checkpoint(os.path.join(out_dir, "checkpoint.pth"), state)


def write_lines(path: str, entries: list) -> None:
    for entry in entries:
        append_json(path, entry)


def report(env, result: dict) -> None:
    """The result as one JSON line on stdout (rank 0), before any file holds it."""
    if env.main:
        print(json.dumps(result), flush=True)
