"""Pictures of a run: soft neighbours with their positiveness, and the training curves.

    python visualize.py neighbours runs/long/checkpoint.pth --out neighbours.png
    python visualize.py curves runs/long/log.txt --out curves.png

`neighbours` encodes a bank of training images with the momentum branch (k = g'(f'(x)), the
features SNCLR enqueues), finds each query's K nearest bank entries (Eq. 3) and scores them
with the model's own positiveness module (Eq. 4) from the query's online projection y. Each
row shows a test image, then its neighbours, most similar first, with w under each; a green
frame marks a neighbour of the query's class, red another class (labels are never used by
SNCLR, only here). Drawn with Pillow alone (it ships with torchvision).
"""
import argparse
import json

import torch
from PIL import Image, ImageDraw

from checkpoint import load_checkpoint, load_state
from data import IMAGENET_MEAN_STD, MEAN_STD, build_dataset, eval_transform, fixed_subset
from memory_queue import MemoryQueue
from model import SNCLR, build_model


GREEN, RED, GREY, BLACK, WHITE = (30, 150, 60), (200, 40, 40), (150, 150, 150), (0, 0, 0), (255, 255, 255)


def to_pil(x: torch.Tensor, dataset: str, side: int) -> Image.Image:
    """A normalised (3, H, W) tensor back to an RGB image of side x side pixels."""
    mean, std = (torch.tensor(v)[:, None, None] for v in MEAN_STD.get(dataset, IMAGENET_MEAN_STD))
    img = ((x * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(img).resize((side, side), Image.NEAREST)


@torch.no_grad()
def soft_neighbours(model: SNCLR, bank_x: torch.Tensor, query_x: torch.Tensor, k: int):
    """Indices (Q, k) into the bank and positiveness w (Q, k) of each query's neighbours.

    The model should be in eval mode (BatchNorm running statistics, no batch dependence).
    """
    keys = torch.cat([model.momentum_keys(b) for b in bank_x.split(256)])          # (n, dim)
    bank = MemoryQueue(len(keys), keys.shape[1])
    bank.enqueue(keys)
    idx = bank.nearest_indices(model.momentum_keys(query_x), k)                   # (Q, k)
    y = model.projector(model.backbone(query_x))                                  # (Q, dim)
    return idx, model.positiveness(y, bank.features[idx])                         # (Q, k)


def neighbour_grid(ckpt_path: str, out: str, queries: int, k: int, bank_size: int, data_path=None, side=64):
    ckpt = load_checkpoint(ckpt_path)
    a = ckpt["args"]
    model = build_model(a)
    load_state(model, ckpt["model"], f"checkpoint {ckpt_path}")
    model.eval()
    k = k or max(a["num_neighbors"], 1)
    t = eval_transform(a["dataset"], a["image_size"])
    path = data_path or a["data_path"]
    bank = fixed_subset(build_dataset(a["dataset"], path, True, t, download=False, image_size=a["image_size"]),
                        bank_size, seed=0)
    test = fixed_subset(build_dataset(a["dataset"], path, False, t, download=False, image_size=a["image_size"]),
                        queries, seed=1)
    bank_x, bank_y = map(torch.stack, zip(*[(x, torch.tensor(y)) for x, y in bank]))
    query_x, query_y = map(torch.stack, zip(*[(x, torch.tensor(y)) for x, y in test]))
    idx, w = soft_neighbours(model, bank_x, query_x, k)
    pad, text_h = 4, 14
    cell_w, cell_h = side + 2 * pad, side + 2 * pad + text_h
    canvas = Image.new("RGB", ((k + 1) * cell_w + pad, queries * cell_h + 20), WHITE)
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 4), f"query | {k} nearest of {len(bank)} train images | w: {a['positiveness']} "
                        f"| green: same class", fill=BLACK)
    for r in range(queries):
        top = 20 + r * cell_h
        canvas.paste(to_pil(query_x[r], a["dataset"], side), (pad, top + pad))
        draw.text((pad, top + side + pad + 1), "query", fill=BLACK)
        for c in range(k):
            left, j = (c + 1) * cell_w + pad, int(idx[r, c])
            colour = GREEN if int(bank_y[j]) == int(query_y[r]) else RED
            draw.rectangle([left - 3, top + pad - 3, left + side + 2, top + pad + side + 2], outline=colour, width=3)
            canvas.paste(to_pil(bank_x[j], a["dataset"], side), (left, top + pad))
            draw.text((left, top + side + pad + 2), f"w={float(w[r, c]):.3f}", fill=BLACK)
    canvas.save(out)
    same = (bank_y[idx] == query_y[:, None]).float().mean().item()
    print(f"wrote {out}: {queries} queries x {k} neighbours, {100 * same:.1f}% of neighbours share the class")


def line_panel(draw, box, xs, ys, title, colour, baseline=None):
    """One plot inside box = (left, top, right, bottom): axes, min / max labels, a polyline."""
    left, top, right, bottom = box
    draw.text((left, top - 16), title, fill=BLACK)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=BLACK)
    lo, hi = min(ys + ([baseline] if baseline is not None else [])), max(ys + ([baseline] if baseline is not None else []))
    hi = hi if hi > lo else lo + 1
    px = lambda x: left + (right - left) * (x - min(xs)) / max(max(xs) - min(xs), 1e-9)  # noqa: E731
    py = lambda y: bottom - (bottom - top) * (y - lo) / (hi - lo)  # noqa: E731
    if baseline is not None:
        for x0 in range(left, right, 8):  # dashed line: the random-init value
            draw.line([(x0, py(baseline)), (min(x0 + 4, right), py(baseline))], fill=GREY)
        draw.text((right - 120, py(baseline) - 13), f"random init {baseline:.2f}", fill=GREY)
    pts = [(px(x), py(y)) for x, y in zip(xs, ys)]
    if len(pts) > 1:
        draw.line(pts, fill=colour, width=2)
    for x, y in pts:
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    draw.text((left - 44, top - 6), f"{hi:.2f}", fill=BLACK)
    draw.text((left - 44, bottom - 6), f"{lo:.2f}", fill=BLACK)
    draw.text((left, bottom + 4), f"epoch {min(xs):g}", fill=BLACK)
    draw.text((right - 50, bottom + 4), f"epoch {max(xs):g}", fill=BLACK)


def curves(log_path: str, out: str) -> None:
    entries = [json.loads(line) for line in open(log_path) if line.strip()]
    train = [e for e in entries if "loss" in e]
    knn = [e for e in entries if "knn_top1" in e]
    if not train:
        raise SystemExit(f"error: {log_path} has no training epochs yet")
    canvas = Image.new("RGB", (900, 340), WHITE)
    draw = ImageDraw.Draw(canvas)
    line_panel(draw, (60, 40, 420, 300), [e["epoch"] for e in train], [e["loss"] for e in train],
               "SNCLR loss (epoch mean)", (40, 90, 200))
    init = next((e["knn_top1"] for e in knn if e["epoch"] == 0), None)
    trained = [e for e in knn if e["epoch"] > 0]
    if trained:
        line_panel(draw, (520, 40, 880, 300), [e["epoch"] for e in trained], [e["knn_top1"] for e in trained],
                   "kNN top-1 (%) on the test split", (200, 90, 40), baseline=init)
    canvas.save(out)
    print(f"wrote {out}")


def main(argv=None):
    p = argparse.ArgumentParser("SNCLR pictures", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    n = sub.add_parser("neighbours", help="query images and their soft neighbours with w")
    n.add_argument("checkpoint")
    n.add_argument("--out", default="neighbours.png")
    n.add_argument("--queries", type=int, default=8, help="rows: test images")
    n.add_argument("-K", type=int, default=0, help="neighbours per row (default: the run's K)")
    n.add_argument("--bank-size", type=int, default=10000, help="training images searched")
    n.add_argument("--data-path", default=None, help="default: the checkpoint's")
    c = sub.add_parser("curves", help="loss and kNN accuracy from a log.txt")
    c.add_argument("log")
    c.add_argument("--out", default="curves.png")
    args = p.parse_args(argv)
    if args.what == "neighbours":
        neighbour_grid(args.checkpoint, args.out, args.queries, args.K, args.bank_size, args.data_path)
    else:
        curves(args.log, args.out)


if __name__ == "__main__":
    main()
