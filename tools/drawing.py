"""What tools/visualize.py draws its pictures with, on Pillow alone: words with visible spaces,
axes with ticks, histogram and line panels, a legend, and a checked, atomic write of the file."""
import math
import os

import torch
from PIL import Image

from runtime.checkpoint import ConfigError

GREEN, RED, GREY, BLACK, WHITE = (30, 150, 60), (200, 40, 40), (150, 150, 150), (0, 0, 0), (255, 255, 255)
BLUE, ORANGE = (40, 90, 200), (200, 90, 40)

SPACE = 4  # px between words: Pillow's default font draws a space 2 px wide, so words run together


def write(draw, xy, text: str, fill) -> None:
    """text at xy, word by word, with SPACE pixels between words (any font, any Pillow)."""
    x, y = xy
    for word in text.split(" "):
        if word:
            draw.text((x, y), word, fill=fill)
        x += draw.textlength(word) + SPACE


def text_width(draw, text: str) -> float:
    """The width `write` gives text."""
    return sum(draw.textlength(word) for word in text.split(" ")) + SPACE * text.count(" ")


# ------------------------------------------------------------------------- the file ---
def check_out(out: str, inputs=()) -> str:
    """The Pillow format for --out; ConfigError unless out can be written without harm: an
    image file name Pillow can write, in an existing writable folder, not one of the inputs."""
    if os.path.isdir(out):
        raise ConfigError(f"--out {out} is a folder; give a file name, e.g. {os.path.join(out, 'picture.png')}")
    stem, ext = os.path.splitext(out)
    fmt = Image.registered_extensions().get(ext.lower())
    if fmt not in Image.SAVE:
        kind = f"a {ext} file" if ext else "a file without an image extension"
        raise ConfigError(f"--out {out}: Pillow cannot write {kind}; use an image name such as {stem}.png")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise ConfigError(f"--out {out}: the folder {folder} does not exist; create it or choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: the folder {folder} is not writable; choose another path")
    for path in inputs:
        if os.path.exists(out) and os.path.exists(path) and os.path.samefile(out, path):
            raise ConfigError(f"--out {out} is the input {path}; choose another file name")
    return fmt


def save_image(canvas: Image.Image, out: str, fmt: str) -> None:
    """Write to OUT.tmp, then rename: a failed write leaves neither a half-written OUT nor OUT.tmp."""
    tmp = out + ".tmp"
    try:
        canvas.save(tmp, format=fmt)
        os.replace(tmp, out)
    except (OSError, ValueError) as e:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise ConfigError(f"cannot write {out}: {' '.join(str(e).split())}") from None


# ----------------------------------------------------------------------- the panels ---
def histogram_panel(draw, box, groups, lo: float, hi: float, bins: int = 30, marker=None) -> None:
    """Histograms of several groups on shared axes inside box = (left, top, right, bottom).

    groups: [(label, values (n,), colour)]; each group's counts are divided by its own n (the
    share of the group in each bin), and its bar takes its own slice of every bin, so no bar
    hides another. marker: an x value drawn as a dashed vertical line (1/K)."""
    left, top, right, bottom = box
    shares = [torch.histc(v.double(), bins, lo, hi) / max(v.numel(), 1) if v.numel() else torch.zeros(bins)
              for _, v, _ in groups]
    peak = max(max(s.max().item() for s in shares), 1e-12)
    bin_w = (right - left) / bins
    px = lambda x: left + (right - left) * (x - lo) / (hi - lo)  # noqa: E731
    for g, (share, (_, _, colour)) in enumerate(zip(shares, groups)):
        for b in torch.nonzero(share).flatten().tolist():
            x0 = left + b * bin_w + g * bin_w / len(groups)
            draw.rectangle([x0, bottom - (bottom - top) * share[b].item() / peak,
                            x0 + bin_w / len(groups) - 1, bottom], fill=colour)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=BLACK)
    digits = max(2, math.ceil(-math.log10((hi - lo) / 4)) + 1)
    for i in range(5):  # x ticks
        x = lo + (hi - lo) * i / 4
        draw.line([(px(x), bottom), (px(x), bottom + 4)], fill=BLACK)
        write(draw, (px(x) - 22, bottom + 6), f"{x:.{digits}f}", fill=BLACK)
    if marker is not None and lo <= marker <= hi:
        for y0 in range(top, bottom, 8):
            draw.line([(px(marker), y0), (px(marker), min(y0 + 4, bottom))], fill=GREY)
        write(draw, (px(marker) + 3, top), "1/K", fill=GREY)
    write(draw, ((left + right) / 2 - 40, bottom + 22), "positiveness w", fill=BLACK)
    legend(draw, left, bottom + 40, [(label, colour) for label, _, colour in groups])
    write(draw, (left - 50, top - 16), "share of the group's pairs", fill=BLACK)
    write(draw, (left - 40, top - 4), f"{peak:.0%}", fill=BLACK)
    write(draw, (left - 20, bottom - 6), "0", fill=BLACK)


def legend(draw, left: float, y: float, entries) -> None:
    """Colour boxes with their labels, side by side on one line from (left, y)."""
    for label, colour in entries:
        draw.rectangle([left, y, left + 10, y + 10], fill=colour)
        write(draw, (left + 14, y - 1), label, fill=BLACK)
        left += 14 + text_width(draw, label) + 24


def line_panel(draw, box, series, title: str, baseline=None) -> None:
    """One plot inside box = (left, top, right, bottom): axes, min / max labels, one polyline
    per series = [(label, xs, ys, colour)], a legend naming them by colour when there are
    several (under the panel), and an optional dashed baseline (the random-init kNN figure)."""
    left, top, right, bottom = box
    write(draw, (left, top - 16), title, fill=BLACK)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=BLACK)
    xs_all = [x for _, xs, _, _ in series for x in xs]
    ys_all = [y for _, _, ys, _ in series for y in ys] + ([baseline] if baseline is not None else [])
    lo, hi = min(ys_all), max(ys_all)
    hi = hi if hi > lo else lo + 1
    x_lo, x_hi = min(xs_all), max(xs_all)
    px = lambda x: left + (right - left) * (x - x_lo) / max(x_hi - x_lo, 1e-9)  # noqa: E731
    py = lambda y: bottom - (bottom - top) * (y - lo) / (hi - lo)  # noqa: E731
    if baseline is not None:
        for x0 in range(left, right, 8):  # dashed line: the random-init value
            draw.line([(x0, py(baseline)), (min(x0 + 4, right), py(baseline))], fill=GREY)
        write(draw, (right - 120, py(baseline) - 13), f"random init {baseline:.2f}", fill=GREY)
    for _, xs, ys, colour in series:
        pts = [(px(x), py(y)) for x, y in zip(xs, ys)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for x, y in pts:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    if len(series) > 1:
        legend(draw, left, bottom + 30, [(label, colour) for label, _, _, colour in series])
    for i in range(5):  # y ticks: min, max and three between
        y = lo + (hi - lo) * i / 4
        draw.line([(left - 4, py(y)), (left, py(y))], fill=BLACK)
        write(draw, (left - 8 - text_width(draw, f"{y:.2f}"), py(y) - 6), f"{y:.2f}", BLACK)
    epochs = sorted(set(xs_all))
    every = max(1, math.ceil(len(epochs) / 10))  # at most about ten labelled epochs
    for x in epochs[::every]:  # x ticks: the logged epochs
        draw.line([(px(x), bottom), (px(x), bottom + 4)], fill=BLACK)
        write(draw, (px(x) - text_width(draw, f"{x:g}") / 2, bottom + 6), f"{x:g}", BLACK)
    write(draw, ((left + right) / 2 - 15, bottom + 18), "epoch", BLACK)
