"""train.py's options: the command line, the recipes behind its arch-dependent defaults, and the
checks that need more than one option or the machine (one `error:` line each).

Kept apart from train.py so that the training loop reads on its own; `--help` shows every option
with its default and where the default comes from (MoCo v3, the released SNCLR run, the paper).
"""
import argparse
import os

from runtime import cli
from runtime.checkpoint import ConfigError
from runtime.cli import nonneg_float, nonneg_int, positive_float, positive_int
from images.datasets import DATASETS, FASHION_MNIST_DEB, IMAGE_SIZE, debian_fashion_mnist
from images.loaders import AUGMENT_DEVICES
from loss import FORMS
from model import ARCHS, STEMS, VITS, check_image_size
from positiveness import RULES, Option, check_options, option_names

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
    p = cli.Parser("train.py", description="SNCLR pretraining: `torchrun --nproc_per_node=G train.py --arch "
                   "resnet50 --data-path DIR` (or `python train.py ...` in one process); docs/running.md has "
                   "the recipes")
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
    a("-K", "--num-neighbors", type=nonneg_int, default=30, help="neighbors per key (Eq. 3); the paper's "
      "ablation finds 30 best; 0 gives the MoCo v3 / InfoNCE baseline")
    a("--queue-size", type=positive_int, default=65536, help="memory queue C; 'relatively large' in the "
      "paper, 128000 in the released ViT-S run; must hold at least one global batch")
    a("--positiveness", default="cosine", choices=list(RULES), help="Eq. 4 (positiveness.py): " +
      "; ".join(f"{name} = {rule.help}" for name, rule in RULES.items()))
    for rule_name, rule in RULES.items():  # each rule's hyperparameters, declared beside the rule
        for name, option in rule.options.items():
            add_rule_option(p, rule_name, name, option)
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
      "the first steps are slow while it compiles) and, on CUDA, the batched augmentation")
    a("--compile-mode", default="default", choices=("default", "reduce-overhead"), help="with --compile: "
      "reduce-overhead replays the compiled backbones as CUDA graphs (fewer kernel launches, for small "
      "images such as the Fashion-MNIST demo on the resident data path; one process)")
    # data
    a("--dataset", default="imagenet", choices=DATASETS, help="imagenet and folder read DATA_PATH/train "
      "and DATA_PATH/val (one folder per class); unlabelled: every image under DATA_PATH at any depth, no "
      "labels (the monitors need --monitor-path); cifar downloads when a network exists; fake needs no data")
    a("--data-path", default=None, help=f"dataset root (stored absolute); default ./data, or "
      f"{FASHION_MNIST_DEB} for fashion-mnist when Debian's dataset-fashion-mnist is installed")
    a("--image-size", type=positive_int, default=None, help="default: 224 ImageNet/folder, 32 CIFAR/fake, "
      "28 Fashion-MNIST; <= 64 selects the small-image stems")
    a("--crop-min", type=positive_float, default=None, help="smallest RandomResizedCrop area; default 0.2 "
      "for ResNets, 0.08 for ViTs (MoCo v3)")
    a("--augment-device", default="auto", choices=AUGMENT_DEVICES, help="where the augmentations run: "
      "workers = PIL in DataLoader workers (the readable reference), cpu / cuda = batched on that device "
      "(images/augment.py; small data sets then live on the device); auto = cuda when training on CUDA, else workers")
    a("--subset", type=nonneg_int, default=0, help="train on a fixed random subset of this many images (0 = all)")
    a("--fake-size", type=positive_int, default=512, help="images in --dataset fake")
    a("--workers", type=nonneg_int, default=8, help="data-loading processes per rank")
    a("--strict-data", action="store_true", help="stop at an unreadable training image instead of "
      "skipping it (skips are counted in log.txt)")
    # monitor, output, runtime
    a("--monitor-path", default=None, help="a labelled folder DIR (DIR/train, DIR/val, one folder per "
      "class) for the kNN monitor instead of the training data, e.g. beside --dataset unlabelled")
    a("--knn-every", type=nonneg_int, default=1, help="kNN monitor every N epochs (0 = only before and after)")
    a("--knn-k", type=positive_int, default=200, help="kNN neighbors (InstDisc)")
    a("--knn-t", type=positive_float, default=0.07, help="kNN vote temperature (InstDisc)")
    a("--knn-train-size", type=nonneg_int, default=None, help="kNN bank: a fixed subset of the train split; "
      "default 100000 for imagenet (about 1 %% of an epoch's compute), else all (0)")
    a("--knn-test-size", type=nonneg_int, default=None, help="kNN queries: a fixed subset of the test split; "
      "default 10000 for imagenet, else all (0)")
    a("--print-freq", type=positive_int, default=20, help="read loss and w every N steps: progress bar "
      "figures, or one plain line when stderr is not a terminal (SLURM, nohup); a NaN loss "
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


def add_rule_option(p, rule: str, name: str, option: Option) -> None:
    """A positiveness rule's hyperparameter as a flag: on/off for a bool default, else a finite
    number > 0."""
    flag, text = "--" + name.replace("_", "-"), f"--positiveness {rule}: {option.help}"
    if isinstance(option.default, bool):
        p.add_argument(flag, action="store_true", default=option.default, help=text)
    else:
        p.add_argument(flag, type=positive_float, default=option.default, help=text)


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of args with the arch / dataset dependent defaults filled in."""
    out = dict(vars(args))
    for key, value in RECIPES["vit" if args.arch in VITS else "resnet"].items():
        if out[key] is None:
            out[key] = value
    debian = args.dataset == "fashion-mnist" and debian_fashion_mnist()  # else read from or downloaded to ./data
    data_path = args.data_path or (FASHION_MNIST_DEB if debian else "data")
    out["data_path"] = os.path.abspath(data_path)  # so evaluation finds it from any folder
    if args.monitor_path:
        out["monitor_path"] = os.path.abspath(args.monitor_path)
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
    if args.batch_size // env.world_size < 2:  # batch norm in training needs two values per channel
        raise ConfigError(f"--batch-size {args.batch_size} gives {args.batch_size // env.world_size} image per rank; "
                          f"batch norm needs at least 2: use --batch-size {2 * env.world_size} or more")
    if args.warmup_epochs > args.epochs:
        raise ConfigError(f"--warmup-epochs {args.warmup_epochs:g} is longer than --epochs {args.epochs}: the lr "
                          f"would never reach its peak; use --warmup-epochs {args.epochs} or less")
    if args.num_neighbors > args.queue_size:
        raise ConfigError(f"-K {args.num_neighbors} must be in [0, --queue-size {args.queue_size}]")
    if args.queue_size < args.batch_size:
        raise ConfigError(f"--queue-size {args.queue_size} must hold one global batch "
                          f"(--batch-size {args.batch_size})")
    if args.momentum > 1 or args.crop_min > 1:
        raise ConfigError(f"--momentum ({args.momentum}) and --crop-min ({args.crop_min}) must be at most 1")
    if args.compile_mode != "default" and not args.compile:
        raise ConfigError(f"--compile-mode {args.compile_mode} applies with --compile; add --compile or drop it")
    if args.compile_mode == "reduce-overhead" and env.world_size > 1:
        raise ConfigError(f"--compile-mode reduce-overhead is for one process, not {env.world_size}; use "
                          f"--compile-mode default")
    try:  # positiveness.py states which rule takes which option
        check_options(args.positiveness, {name: getattr(args, name) for name in option_names()})
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:  # the backbone's own rule (model.py), before any data is read
        check_image_size(args.arch, args.image_size, args.stem)
    except ValueError as e:
        raise ConfigError(f"--image-size {args.image_size}: {e}") from None
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


def parse_args(argv=None) -> argparse.Namespace:
    """The command line parsed, with the arch / dataset dependent defaults filled in."""
    return resolve_args(get_args_parser().parse_args(argv))
