"""Pictures of a run: soft neighbors with their positiveness, the calibration of w, and the
training curves.

    python -m tools.visualize neighbors runs/long/checkpoint.pth --out neighbors.png
    python -m tools.visualize calibration runs/long/checkpoint.pth --out calibration.png
    python -m tools.visualize curves runs/long/log.txt --out curves.png

`neighbors` and `calibration` encode a fixed subset of training images (the bank) with the
momentum branch (k = g'(f'(x)), the keys SNCLR enqueues), find each test query's K nearest
bank keys (Eq. 3) and score them with the checkpoint's own positiveness module (Eq. 4) from the
query's online projection y, the model in eval mode. Labels are never used by SNCLR, only here:
`neighbors` draws each test image and its neighbors, most similar first, with w under each, a
green frame for a neighbor of the query's class and red for another class; `calibration`
draws the histograms of w over same-class and over other-class neighbors, with the mean w of
each and the AUROC of w for telling them apart. `curves` draws the loss, the kNN top-1 and,
when log.txt has them, the neighbors' class agreement (nn_agree, w_agree) per epoch.
Drawn with Pillow alone (it ships with torchvision). A bad option, a missing file or data set
ends with one `error:` line and a non-zero exit status; the picture is written atomically.
"""
import math
import os

import torch
from PIL import Image, ImageDraw

from runtime import cli
from runtime.checkpoint import ConfigError, checkpoint_data_path, load_checkpoint, load_state, read_log
from runtime.cli import nonneg_int, positive_int
from images.datasets import (IMAGENET_MEAN_STD, MEAN_STD, DataError, SkipUnreadable, build_dataset, closing_workers,
                  eval_transform)
from images.subsets import fixed_subset
from memory_queue import MemoryQueue
from model import SNCLR, build_model
from positiveness import RULES
from tools.drawing import (BLACK, BLUE, GREEN, GREY, ORANGE, RED, WHITE, check_out, histogram_panel, line_panel,
                           save_image, write)
from monitors.neighbor_quality import auroc

BANK_SIZE = 10000  # default bank (all training images if fewer)


def to_pil(x: torch.Tensor, dataset: str, side: int) -> Image.Image:
    """A normalised (3, H, W) tensor back to an RGB image of side x side pixels."""
    mean, std = (torch.tensor(v)[:, None, None] for v in MEAN_STD.get(dataset, IMAGENET_MEAN_STD))
    img = ((x * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(img).resize((side, side), Image.NEAREST)


# ------------------------------------------------------------------- model, data, Eq. 3 / 4 ---
def load_model(path: str, device: torch.device):
    """The checkpoint's SNCLR model in eval mode (BatchNorm running statistics) and its options."""
    ckpt = load_checkpoint(path)
    a = ckpt["args"]
    try:
        model = build_model(a)
    except (KeyError, ValueError) as e:  # options of another program, or edited by hand
        raise ConfigError(f"the options stored in {path} do not describe an SNCLR model: {e}") from None
    load_state(model, ckpt["model"], f"checkpoint {path}")
    return model.eval().to(device), a


def bank_and_queries(a: dict, ckpt_path: str, data_path, bank_size, queries, default_queries: int):
    """Fixed subsets of the checkpoint's train split (bank, seed 0) and test split (queries, seed 1),
    eval transform. None sizes: the defaults, capped at the split's size; a given size larger
    than its split is an error."""
    if a["dataset"] == "unlabelled":
        raise ConfigError(f"the pictures mark neighbors by class, and {ckpt_path} was trained on --dataset "
                          f"unlabelled ({a['data_path']}): no class to mark; eval_linear.py --dataset folder "
                          f"measures it on a labelled folder")
    root = checkpoint_data_path(ckpt_path, a, data_path)
    t = eval_transform(a["dataset"], a["image_size"])
    try:
        train, test = (SkipUnreadable(build_dataset(a["dataset"], root, split, t, download=False,
                                                    fake_size=a.get("fake_size", 512), image_size=a["image_size"]),
                                      strict=True) for split in (True, False))
    except DataError as e:
        raise DataError(f"{e} (give --data-path where the data set is on this machine)" if not data_path
                        else str(e)) from None
    bank_size = min(BANK_SIZE, len(train)) if bank_size is None else bank_size
    queries = min(default_queries, len(test)) if queries is None else queries
    if bank_size > len(train):
        raise ConfigError(f"--bank-size {bank_size} is more than the {len(train)} training images; use at most "
                          f"{len(train)}, or 0 for all")
    if queries > len(test):
        raise ConfigError(f"--queries {queries} is more than the {len(test)} test images; use at most {len(test)}")
    return fixed_subset(train, bank_size, 0, "--bank-size"), fixed_subset(test, queries, 1, "--queries")


@torch.no_grad()
def encode(model: SNCLR, dataset, batch_size: int, workers: int, device, online: bool = False):
    """Momentum keys k = g'(f'(x)) (n, dim), labels (n,) and, if online, the online projections
    y = g(f(x)) (n, dim) of a data set, in its order, batch by batch (on the CPU)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size, num_workers=workers)
    keys, ys, labels = [], [], []
    with closing_workers(loader) as batches:  # an unreadable image ends its workers too
        for x, y in batches:
            x = x.to(device)
            keys.append(model.momentum_keys(x).cpu())
            if online:
                ys.append(model.projector(model.backbone(x)).cpu())
            labels.append(torch.as_tensor(y))
    return torch.cat(keys), torch.cat(ys) if online else None, torch.cat(labels)


def positiveness_name(a: dict) -> str:
    """The run's positiveness rule as the pictures name it, with the options it changed:
    "cosine, t = 0.1", "attention, learn gamma"."""
    words = [a["positiveness"]]
    for name, option in RULES[a["positiveness"]].options.items():
        value, short = a.get(name, option.default), name.removeprefix("positiveness_")
        if value != option.default:
            words.append(short.replace("_", " ") if isinstance(value, bool) else f"{short} = {value:g}")
    return ", ".join(words)


@torch.no_grad()
def soft_neighbors(model: SNCLR, bank_keys: torch.Tensor, query_keys: torch.Tensor, y: torch.Tensor, k: int):
    """Indices (Q, k) into the bank and positiveness w (Q, k) of each query's neighbors.

    bank_keys (n, dim) and query_keys (Q, dim) momentum keys, y (Q, dim) the queries' online
    projections. The search is the training step's (Eq. 3, MemoryQueue.nearest_indices, most
    similar first) and w the model's positiveness module (Eq. 4) on the normalised keys.
    """
    bank = MemoryQueue(len(bank_keys), bank_keys.shape[1])
    bank.enqueue(bank_keys)
    idx = bank.nearest_indices(query_keys, k)                                     # (Q, k)
    return idx, model.positiveness(y, bank.features[idx])                         # (Q, k)


def neighbors_of(args, default_queries: int):
    """Everything both pictures need: (options, bank, queries, K, idx (Q, K), w (Q, K),
    bank labels (n,), query labels (Q,))."""
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    model, a = load_model(args.checkpoint, device)
    bank, test = bank_and_queries(a, args.checkpoint, args.data_path, args.bank_size, args.queries, default_queries)
    k = args.K or max(a["num_neighbors"], 1)
    if k > len(bank):
        raise ConfigError(f"-K {k} is more than the {len(bank)} bank images; lower -K or raise --bank-size")
    bank_keys, _, bank_y = encode(model, bank, args.batch_size, args.workers, device)
    query_keys, y, query_y = encode(model, test, args.batch_size, args.workers, device, online=True)
    idx, w = soft_neighbors(model.cpu(), bank_keys, query_keys, y, k)
    return a, bank, test, k, idx, w, bank_y, query_y


# ---------------------------------------------------------------------------- neighbors ---
def neighbor_grid(args, side: int = 64) -> None:
    """Rows of a test image and its K neighbors, w under each, green / red frame by class."""
    fmt = check_out(args.out, [args.checkpoint])
    a, bank, test, k, idx, w, bank_y, query_y = neighbors_of(args, default_queries=8)
    queries, pad, text_h = len(test), 4, 14
    cell_w, cell_h = side + 2 * pad, side + 2 * pad + text_h
    canvas = Image.new("RGB", ((k + 1) * cell_w + pad, queries * cell_h + 20), WHITE)
    draw = ImageDraw.Draw(canvas)
    write(draw, (pad, 4), f"query | {k} nearest of {len(bank)} train images | w: {positiveness_name(a)} "
                        f"| green: same class", fill=BLACK)
    for r in range(queries):
        top = 20 + r * cell_h
        canvas.paste(to_pil(test[r][0], a["dataset"], side), (pad, top + pad))
        write(draw, (pad, top + side + pad + 1), "query", fill=BLACK)
        for c in range(k):
            left, j = (c + 1) * cell_w + pad, int(idx[r, c])
            colour = GREEN if int(bank_y[j]) == int(query_y[r]) else RED
            draw.rectangle([left - 3, top + pad - 3, left + side + 2, top + pad + side + 2], outline=colour, width=3)
            canvas.paste(to_pil(bank[j][0], a["dataset"], side), (left, top + pad))
            write(draw, (left, top + side + pad + 2), f"w={float(w[r, c]):.3f}", fill=BLACK)
    save_image(canvas, args.out, fmt)
    same = (bank_y[idx] == query_y[:, None]).float().mean().item()
    print(f"wrote {args.out}: {queries} queries x {k} neighbors, {100 * same:.1f}% of neighbors share the class")


# --------------------------------------------------------------------------- calibration ---
def calibration_figures(w: torch.Tensor, same: torch.Tensor) -> dict:
    """w (Q, K), same (Q, K) bool -> pair counts, mean w of each group (None if empty), AUROC
    of w for same vs other class (None without both groups)."""
    w, same = w.flatten().double(), same.flatten()
    mean = lambda v: v.mean().item() if v.numel() else None  # noqa: E731
    score = auroc(w, same)
    return {"same": int(same.sum()), "other": int((~same).sum()), "w_same": mean(w[same]),
            "w_other": mean(w[~same]), "auroc": None if math.isnan(score) else score}


def show(value, digits: int = 5) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def histogram_range(w: torch.Tensor, tail: float = 0.005) -> tuple[float, float]:
    """The x range of the w histogram, from the data: the released rule gives w within ~0.003
    of 1/K, so fixed bins would show one bar. The central 1 - 2 tail of the values, so a few
    outliers do not squeeze the rest into one bin; the whole range if that is one value, and a
    narrow range around w if every w is the same (K = 1, hard, none)."""
    values = w.flatten().double()
    lo, hi = torch.quantile(values, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    if hi - lo < 1e-9:
        lo, hi = values.min().item(), values.max().item()
    if hi - lo < 1e-9:
        pad = max(abs(lo) * 1e-3, 1e-6)
        lo, hi = lo - pad, hi + pad
    return lo, hi


def calibration(args) -> None:
    """Histograms of w for same-class and other-class neighbors, with their means and AUROC."""
    fmt = check_out(args.out, [args.checkpoint])
    a, bank, test, k, idx, w, bank_y, query_y = neighbors_of(args, default_queries=500)
    same = bank_y[idx] == query_y[:, None]                                        # (Q, K)
    f = calibration_figures(w, same)
    lo, hi = histogram_range(w)
    clipped = int(((w < lo) | (w > hi)).sum())
    w = w.clamp(lo, hi)  # the few values beyond the range count in the end bins
    canvas = Image.new("RGB", (760, 460), WHITE)
    draw = ImageDraw.Draw(canvas)
    write(draw, (20, 8), f"w of each test query's K = {k} nearest keys among {len(bank)} train images "
                       f"({len(test)} queries, {positiveness_name(a)} positiveness)", fill=BLACK)
    write(draw, (20, 24), f"mean w: same class {show(f['w_same'])}, other class {show(f['w_other'])}; "
                        f"AUROC same vs other {show(f['auroc'], 3)} (0.5 = chance)", fill=BLACK)
    histogram_panel(draw, (80, 80, 730, 380), [(f"same class ({f['same']} pairs)", w[same], GREEN),
                                               (f"other class ({f['other']} pairs)", w[~same], RED)],
                    lo, hi, marker=1.0 / k)
    if clipped:
        write(draw, (400, 420), f"{clipped} values beyond the range are counted in the end bins", fill=GREY)
    save_image(canvas, args.out, fmt)
    print(f"wrote {args.out}: K={k}, {len(test)} queries x {k} neighbors in a bank of {len(bank)}: "
          f"{100 * f['same'] / same.numel():.1f}% same class; mean w same class {show(f['w_same'])}, "
          f"other class {show(f['w_other'])}; AUROC {show(f['auroc'], 3)}")


# -------------------------------------------------------------------------------- curves ---
def read_train_log(path: str) -> list:
    """checkpoint.read_log, with one ConfigError line for a file that is not a train.py log."""
    if os.path.isdir(path):
        raise ConfigError(f"log {path} is a directory; give the run's log file (e.g. {os.path.join(path, 'log.txt')})")
    if not os.path.isfile(path):
        raise ConfigError(f"log {path}: no such file")
    try:
        log = read_log(path)
        if log.broken:
            print(f"{path}: {log.broken} broken line(s) skipped (a write cut short)")
        return log
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError):  # not text, not JSON, or JSON lines without an epoch
        raise ConfigError(f"{path} is not a train.py log.txt: each line must be a JSON object with an "
                          f"\"epoch\"") from None


def points(entries, key: str, scale: float = 1.0):
    """(epochs, values) of the entries that have a value for key."""
    have = [e for e in entries if e.get(key) is not None]
    return [e["epoch"] for e in have], [scale * e[key] for e in have]


def curves(args) -> None:
    """Loss, kNN top-1 and (when logged) neighbor class agreement per epoch, side by side."""
    fmt = check_out(args.out, [args.log])
    entries = read_train_log(args.log)
    train = [e for e in entries if "loss" in e]
    if not train:
        raise ConfigError(f"{args.log} has no training epochs yet")
    init = next((e.get("knn_top1") for e in entries if e["epoch"] == 0), None)
    panels = [([("loss", *points(train, "loss"), BLUE)], "SNCLR loss (epoch mean)", None)]
    knn = points([e for e in entries if e["epoch"] > 0], "knn_top1")
    if knn[0]:
        panels.append(([("kNN top-1", *knn, ORANGE)], "kNN top-1 (%) on the test split", init))
    agree = [(label, *points(entries, key, 100.0), colour) for label, key, colour in (
        ("nn_agree: neighbors", "nn_agree", BLUE), ("w_agree: weight w", "w_agree", ORANGE))]
    agree = [s for s in agree if s[1]]
    if agree:
        panels.append((agree, "share of the query's class among the K neighbors (%)", None))
    canvas = Image.new("RGB", (460 * len(panels) - 20, 350), WHITE)
    draw = ImageDraw.Draw(canvas)
    for i, (series, title, baseline) in enumerate(panels):
        line_panel(draw, (60 + 460 * i, 40, 420 + 460 * i, 300), series, title, baseline)
    save_image(canvas, args.out, fmt)
    print(f"wrote {args.out}")


# ---------------------------------------------------------------------------------- main ---
def add_encoding_options(p) -> None:
    """The options of the subcommands that encode a bank and queries."""
    a = p.add_argument
    a("checkpoint", help="a train.py checkpoint.pth")
    a("-K", type=positive_int, default=None, help="neighbors per query; default: the run's K (at least 1)")
    a("--bank-size", type=nonneg_int, default=None, help=f"training images searched: a fixed subset; "
      f"default {BANK_SIZE} (or all if fewer); 0 = all")
    a("--data-path", default=None, help="default: the checkpoint's")
    a("--batch-size", type=positive_int, default=256, help="images encoded at once")
    a("--workers", type=nonneg_int, default=2, help="data-loading processes")
    a("--device", default="auto", choices=("auto", "cuda", "cpu"), help="auto = CUDA when available")


def get_args_parser() -> cli.Parser:
    p = cli.Parser("python -m tools.visualize", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True, metavar="COMMAND", parser_class=cli.Parser)
    n = sub.add_parser("neighbors", help="query images and their soft neighbors with w",
                       description="Rows of a test image and its K nearest bank images (Eq. 3), w (Eq. 4) "
                       "under each; a green frame marks a neighbor of the query's class.")
    add_encoding_options(n)
    n.add_argument("--out", default="neighbors.png", help="the picture (any image type Pillow writes)")
    n.add_argument("--queries", type=positive_int, default=None, help="rows: test images; default 8 "
                   "(or all if fewer)")
    c = sub.add_parser("calibration", help="histograms of w for same-class and other-class neighbors, AUROC",
                       description="How well w (Eq. 4) tells the neighbors (Eq. 3) of the query's class from "
                       "the others: a histogram of w for each group, their mean w and the AUROC; the same "
                       "figures are printed on one line.")
    add_encoding_options(c)
    c.add_argument("--out", default="calibration.png", help="the picture (any image type Pillow writes)")
    c.add_argument("--queries", type=positive_int, default=None, help="test images; default 500 (or all "
                   "if fewer)")
    k = sub.add_parser("curves", help="loss, kNN accuracy and neighbor agreement from a log.txt",
                       description="Loss, kNN top-1 and, when logged, nn_agree and w_agree per epoch.")
    k.add_argument("log", help="a train.py run's log.txt")
    k.add_argument("--out", default="curves.png", help="the picture (any image type Pillow writes)")
    return p


def main(argv=None) -> None:
    """Exit status 0, 2 for a bad command line, 1 with one `error:` line for anything else."""
    args = get_args_parser().parse_args(argv)
    try:
        {"neighbors": neighbor_grid, "calibration": calibration, "curves": curves}[args.what](args)
    except (ConfigError, DataError) as e:
        cli.fail(e)


if __name__ == "__main__":
    main()
